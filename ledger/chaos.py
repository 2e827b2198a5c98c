"""Chaos run of a real cluster: real ``run_node.py`` processes, real ZeroMQ, real disk.

A nemesis kills nodes with SIGKILL (the leader included), pauses them with SIGSTOP for longer
than the election timeout, and restarts them, while concurrent clients transfer money between a
handful of accounts (retrying with the same transfer id) and read balances. After healing, it
checks that every node's chain is identical and verifies, that balances still sum to the
genesis total, that every transfer a client saw committed is in the chain exactly once, and that
none it saw rejected was applied.

    python -m ledger.chaos --duration 600 --nodes 5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ledger.client import ClusterUnavailable, LedgerClient
from ledger.cluster import LocalCluster
from ledger.messages import Transfer

GENESIS = {"alice": 10_000, "bob": 10_000, "carol": 10_000, "dave": 10_000, "erin": 10_000}


@dataclass
class ChaosReport:
    nodes: int
    duration: float
    tried: int = 0
    committed: int = 0
    rejected: int = 0
    unknown: int = 0
    reads: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    elections: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("nodes", self.nodes), ("duration s", round(self.duration, 1)), ("transfers tried", self.tried),
            ("committed", self.committed), ("rejected", self.rejected), ("unknown (timed out)", self.unknown),
            ("balance reads", self.reads), ("kills (SIGKILL)", self.faults["kill"]),
            ("pauses (SIGSTOP)", self.faults["pause"]), ("restarts", self.faults["restart"]),
            ("elections won", self.elections), ("lost", self.lost), ("problems", len(self.problems)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)


class _Worker(threading.Thread):
    def __init__(self, cluster: LocalCluster, index: int, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.index = index
        self.rng = random.Random(seed)
        self.stop = stop
        self.outcomes: dict[str, str | None] = {}  # tx_id -> committed / rejected / None (unknown)
        self.reads = 0

    def run(self) -> None:
        accounts = list(GENESIS)
        with self.cluster.client(request_timeout=0.3, deadline=4.0) as client:
            n = 0
            while not self.stop.is_set():
                if self.rng.random() < 0.2:
                    try:
                        client.balance(self.rng.choice(accounts))
                        self.reads += 1
                    except ClusterUnavailable:
                        pass
                    continue
                batch = []
                for _ in range(self.rng.choice([1, 1, 1, 5, 20])):  # single submits and batches
                    sender, recipient = self.rng.sample(accounts, 2)
                    batch.append(Transfer(tx_id=f"w{self.index}-{n}", sender=sender, recipient=recipient,
                                          amount=self.rng.randint(1, 3000)))
                    n += 1
                try:
                    # The client retries on timeout with these same ids, so it never pays twice.
                    if len(batch) == 1:
                        t = batch[0]
                        replies = [client.submit(t.sender, t.recipient, t.amount, tx_id=t.tx_id)]
                    else:
                        replies = client.submit_batch(batch)
                    self.outcomes.update((r.tx_id, r.status) for r in replies)
                except ClusterUnavailable:
                    self.outcomes.update((t.tx_id, None) for t in batch)


def run_chaos(directory: Path, nodes: int = 3, duration: float = 20.0, clients: int = 4, seed: int = 0,
              progress: bool = False) -> ChaosReport:
    rng = random.Random(seed)
    report = ChaosReport(nodes=nodes, duration=duration)
    with LocalCluster(directory, nodes=nodes, genesis=GENESIS) as cluster, cluster.client() as admin:
        cluster.wait_leader(admin, timeout=15)
        stop = threading.Event()
        workers = [_Worker(cluster, k, rng.randrange(1 << 30), stop) for k in range(clients)]
        for w in workers:
            w.start()
        down: dict[int, tuple[str, float]] = {}  # node -> (kill/pause, when to heal it)
        max_down = (nodes - 1) // 2  # keep a majority up, so the cluster can make progress
        started = time.monotonic()
        next_fault = started + rng.uniform(0.3, 1.0)
        try:
            while (now := time.monotonic()) - started < duration:
                for node, (kind, until) in list(down.items()):
                    if now >= until:
                        _heal(cluster, node, kind, report)
                        del down[node]
                if now >= next_fault and len(down) < max_down:
                    _fault(cluster, admin, rng, down, report)
                    next_fault = now + rng.uniform(0.3, 1.5)
                if progress:
                    done = sum(len(w.outcomes) for w in workers)
                    sys.stdout.write(f"\r  {now - started:6.1f}s  transfers {done}  faults {sum(report.faults.values())}  ")
                    sys.stdout.flush()
                time.sleep(0.05)  # the nemesis' pace, not synchronisation
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
            for node, (kind, _) in down.items():
                _heal(cluster, node, kind, report)
        if progress:
            print()
        _settle(cluster, admin, report)
        _check(cluster, admin, workers, report)
    return report


def _fault(cluster: LocalCluster, admin: LedgerClient, rng: random.Random,
           down: dict[int, tuple[str, float]], report: ChaosReport) -> None:
    up = [i for i in cluster.ids if i not in down]
    try:
        leader = cluster.wait_leader(admin, timeout=0.5)
    except TimeoutError:
        leader = None
    victim = leader if leader in up and rng.random() < 0.5 else rng.choice(up)
    now = time.monotonic()
    if rng.random() < 0.5:
        cluster.kill(victim)
        down[victim] = ("kill", now + rng.uniform(0.2, 2.0))
        report.faults["kill"] += 1
    else:
        cluster.pause(victim)  # longer than the election timeout: the others move on without it
        down[victim] = ("pause", now + rng.uniform(0.7, 2.5))
        report.faults["pause"] += 1


def _heal(cluster: LocalCluster, node: int, kind: str, report: ChaosReport) -> None:
    if kind == "pause":
        cluster.resume(node)
    else:
        cluster.start(node)
        report.faults["restart"] += 1


def _settle(cluster: LocalCluster, admin: LedgerClient, report: ChaosReport, timeout: float = 60.0) -> None:
    """Wait until every node has applied the same log and holds the same chain head."""
    for i in cluster.ids:
        if not cluster.alive(i):
            cluster.start(i)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            leader = cluster.wait_leader(admin, timeout=2)
            # A committed entry of the current term makes every earlier entry final.
            admin.submit("alice", "bob", 1, tx_id=f"settle-{time.monotonic_ns()}")
        except (TimeoutError, ClusterUnavailable):
            continue
        st = admin.status()
        lead = st.get(leader)
        if lead and all(s is not None and s.last_applied == lead.commit_index and s.head_hash == lead.head_hash
                        for s in st.values()):
            return
        time.sleep(0.1)  # poll interval; the deadline decides
    report.problems.append(f"the cluster did not settle within {timeout}s after healing")


def _check(cluster: LocalCluster, admin: LedgerClient, workers: list[_Worker], report: ChaosReport) -> None:
    verify = admin.verify()
    if not verify.ok or verify.unreachable:
        report.problems += verify.problems or [f"unreachable after healing: {verify.unreachable}"]
    chains = {c.node_id: c.blocks for c in verify.chains}
    heads = {c.node_id: (len(c.blocks), c.blocks[-1].hash if c.blocks else None) for c in verify.chains}
    if len(set(heads.values())) > 1:
        report.problems.append(f"chains differ after healing: {heads}")
    blocks = next(iter(chains.values()), [])
    seen: Counter[str] = Counter()
    status_in_chain: dict[str, str] = {}
    for b in blocks[1:]:
        for tx in b.txs:
            seen[tx["tx_id"]] += 1
            status_in_chain[tx["tx_id"]] = tx["status"]
    dup = [t for t, n in seen.items() if n > 1]
    if dup:
        report.problems.append(f"transfer ids twice in the chain: {dup[:5]}")
    for w in workers:
        report.reads += w.reads
        for tx_id, outcome in w.outcomes.items():
            report.tried += 1
            if outcome is None:
                report.unknown += 1
            elif outcome == "committed":
                report.committed += 1
                if status_in_chain.get(tx_id) != "committed":
                    report.lost += 1
            else:
                report.rejected += 1
                if status_in_chain.get(tx_id) == "committed":
                    report.problems.append(f"{tx_id} was reported rejected but is applied in the chain")
    if report.lost:
        report.problems.append(f"{report.lost} acknowledged transfers are missing from the chain")
    try:
        total = sum(admin.balance(a).balance for a in GENESIS)
        if total != sum(GENESIS.values()):
            report.problems.append(f"balances sum to {total}, not {sum(GENESIS.values())}")
    except ClusterUnavailable as exc:
        report.problems.append(f"could not read balances after healing: {exc}")
    for i in cluster.ids:
        for line in cluster.log_file(i).read_text().splitlines():
            if '"became_leader"' in line and json.loads(line).get("event") == "became_leader":
                report.elections += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ledger.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="where data and logs go (default: a temp dir)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        p.error("--duration and --clients must be positive")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="raftledger-chaos-"))
    print(f"chaos: {args.nodes} nodes, {args.clients} clients, {args.duration:g}s, data in {directory}")
    report = run_chaos(directory, args.nodes, args.duration, args.clients, args.seed, progress=True)
    print(report.table())
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    return 1 if report.problems or report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
