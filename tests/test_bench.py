"""The benchmark tool: its arguments are checked, and a small run of each kind gives real figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from polling import wait_until

from ledger import bench


@pytest.mark.parametrize("args", [
    ["--rate", "nan"], ["--rate", "0"], ["--rate", "1e308"], ["--duration", "inf"], ["--clients", "0"],
    ["--count", "-3"], ["--accounts", "1"], ["--sweep", "x.png", "--rate", "100"], ["--rate", "100", "--clients", "4"],
    ["--count", "10", "--duration", "1"], ["--rounds", "0"], ["--failover", "-1"], ["--catchup", "-5"],
    ["--json", "/nonexistent/dir/x.json"], ["--json", "/tmp"], ["--worker", "garbage"], ["--worker", "{}"],
    ["--worker", "[1, 2]"],
])
def test_bad_arguments_exit_2_with_a_reason(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_counted_closed_loop_run_answers_every_transfer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    assert bench.main(["--clients", "32", "--count", "3000", "--accounts", "10", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    (r,) = record["results"]
    assert r["committed"] + r["rejected"] == 3000 and r["unknown"] == 0
    assert r["throughput"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert len(r["cpu_s"]) == len(r["peak_rss_mb"]) == len(r["rss_end_mb"]) == len(r["rss_at_tenth_mb"]) == 3
    assert r["disk_bytes_per_transfer"] > 0
    assert len(r["load_cpu_s"]) == 2 and all(c > 0 for c in r["load_cpu_s"])  # two load processes
    assert len(record["machine"]["git_commit"]) == 40
    start, end = record["machine"]["speed_probe_s"]
    out = capsys.readouterr().out
    assert 0 < start < 30 and 0 < end < 30 and f"the probe took {start:.3f} s at the start, {end:.3f} s" in out
    assert "RSS per node at 300 answered" in out


def test_an_open_loop_run_sends_at_its_rate(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert bench.main(["--rate", "1000", "--duration", "2", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert (r["offered_rate"], r["clients"]) == (1000, 0)
    done = r["committed"] + r["rejected"]
    assert 1900 <= done <= 2000 and r["unknown"] == 0  # 1000/s for 2 s, whatever the answers
    assert 900 < r["throughput"] < 1100
    assert len(r["load_cpu_s"]) == 1  # one load process up to 50,000 transfers a second


def test_a_sweep_judges_half_the_peak_and_the_ceiling_by_the_median_of_repeats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The open-loop runs at half the peak and the ceiling runs give their median, not the first
    or the best (fixed figures stand in for the runs, in an order that tells them apart)."""
    closed = {4: (1000.0, 5.0), 32: (2000.0, 9.0)}  # clients: throughput, p99
    open_p99 = iter([30.0, 10.0, 20.0])
    offered: list[float | None] = []

    def fake_run(nodes: int, clients: int, duration: float, count: int | None, accounts: int,
                 progress: bool = True, rate: float | None = None) -> bench.Result:
        offered.append(rate)
        tput, p99 = (rate, next(open_p99)) if rate else closed[clients]
        return bench.Result("raftledger", nodes, 0 if rate else clients, duration, int(tput * duration), 0, 0, tput,
                            p99 / 2, p99, p99, p99, [1.0] * 3, [50.0] * 3, offered_rate=rate)

    monkeypatch.setattr(bench, "SWEEP_CLIENTS", [4, 32])
    monkeypatch.setattr(bench, "bench_ours", fake_run)
    monkeypatch.setattr(bench, "ceiling", lambda n, accounts: next(ceilings))
    ceilings = iter([5000.0, 3000.0, 4000.0])
    out, png = tmp_path / "b.json", tmp_path / "sweep.png"
    assert bench.main(["--sweep", str(png), "--ceiling", "--duration", "1", "--json", str(out)]) == 0
    assert offered == [None, None, 1000.0, 1000.0, 1000.0]  # three open-loop runs at half the peak of 2000
    record = json.loads(out.read_text())
    half = record["half_peak"]
    assert (half["throughput"], half["between_clients"]) == (1000.0, [4, 4])
    assert (half["open_loop_p99_ms"], half["open_loop_p50_ms"]) == (20.0, 10.0)
    assert [r["p99_ms"] for r in half["open_loop"]] == [30.0, 10.0, 20.0]
    assert record["ceiling"] == {"transfers_per_s": 4000.0, "runs": [5000.0, 3000.0, 4000.0],
                                 "replicated_fraction": 0.5}
    text = capsys.readouterr().out
    assert "3 runs: p99 20.0 ms (median; each: 30.0, 10.0, 20.0 ms), p50 10.0 ms" in text
    assert "3 runs: 4000 tx/s (median; each: 5000, 3000, 4000); replicated best is 50% of it" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _marked_processes(mark: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"BENCH_MARK={mark}".encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass  # gone, or not ours to read
    return pids


def test_a_terminated_benchmark_leaves_no_process_behind() -> None:
    mark = uuid.uuid4().hex
    bench_proc = subprocess.Popen([sys.executable, "-m", "ledger.bench", "--clients", "8", "--duration", "60"],
                                  env={**os.environ, "BENCH_MARK": mark}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        # The bench, three nodes and two load processes.
        wait_until(lambda: len(_marked_processes(mark)) >= 6, 30, "the benchmark to get going", 0.1)
        bench_proc.send_signal(signal.SIGTERM)
        assert bench_proc.wait(20) == 143
        wait_until(lambda: not _marked_processes(mark), 10, "every process it started to end", 0.1)
    finally:
        for pid in _marked_processes(mark):
            os.kill(pid, signal.SIGKILL)
