"""Chaos test: real node processes under SIGKILL, SIGSTOP and restarts, with concurrent clients.

A short run per cluster size for CI; ``python -m ledger.chaos --duration 600`` runs a long one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.chaos import run_chaos


@pytest.mark.parametrize("nodes, duration", [(3, 15.0), (5, 12.0)])
def test_chaos_loses_nothing(tmp_path: Path, nodes: int, duration: float) -> None:
    report = run_chaos(tmp_path, nodes=nodes, duration=duration, clients=4, seed=nodes)
    print(f"\n{report.table()}")
    assert report.problems == []
    assert report.lost == 0
    assert report.committed > 100
    assert report.faults["kill"] + report.faults["pause"] >= 3
    assert report.elections >= 2  # the first election, and at least one after a fault
    assert report.tried == report.committed + report.rejected + report.unknown
