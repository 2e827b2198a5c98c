"""The README's one-command demo runs end to end and leaves no process behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_failover_and_verifies(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ledger.demo", "--dir", str(data), "--transfers", "60"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        # The nodes run in their own sessions; make sure none outlives a failed demo.
        subprocess.run(["pkill", "-9", "-f", str(data)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "took over: elected" in out
    assert "Verify: OK" in out
    assert re.search(r"total\s+4000\s+\(genesis total 4000\)", out)
    assert sorted(p.name for p in (data / "logs").iterdir()) == ["node-0.log", "node-1.log", "node-2.log"]
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True)
    assert leftover.stdout == ""
