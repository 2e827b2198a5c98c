"""One-command demo: ``python -m ledger.demo``.

Starts a local 3-node cluster as child processes, streams transfers with a progress bar, kills
the leader with SIGKILL halfway and shows the failover, restarts it, then prints the final
balances, every node's status and the chain verification, and stops everything.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from ledger.client import ClusterUnavailable, LedgerClient
from ledger.cluster import LocalCluster

GENESIS = {"alice": 1000, "bob": 1000, "carol": 1000, "dave": 1000}


def bar(done: int, total: int, started: float, note: str = "") -> None:
    width = 30
    filled = width * done // total
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {rate:6.0f} tx/s {note:<24}")
    sys.stdout.flush()


def stream(client: LedgerClient, rng: random.Random, start: int, count: int, total: int,
           started: float, counts: dict[str, int]) -> None:
    accounts = list(GENESIS)
    for k in range(start, start + count):
        sender, recipient = rng.sample(accounts, 2)
        r = client.submit(sender, recipient, rng.randint(1, 60), tx_id=f"demo-{k}")
        counts[r.status] += 1
        bar(k + 1, total, started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ledger.demo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("demo-data"), help="where data and logs go (wiped first)")
    p.add_argument("--transfers", type=int, default=400, help="how many transfers to stream")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.transfers < 2:
        p.error("--transfers must be at least 2")
    if args.dir.exists() and any(args.dir.iterdir()) and not (args.dir / "cluster.toml").exists():
        p.error(f"{args.dir} exists and is not a demo directory; pick another --dir")
    shutil.rmtree(args.dir, ignore_errors=True)  # a previous demo's data
    rng = random.Random(args.seed)
    counts = {"committed": 0, "rejected": 0}
    print(f"Starting a 3-node cluster in {args.dir}/ (logs in {args.dir}/logs/) ...")
    with LocalCluster(args.dir, nodes=3, genesis=GENESIS) as cluster, cluster.client() as client:
        try:
            leader = cluster.wait_leader(client)
            print(f"Node {leader} is the leader. Streaming {args.transfers} transfers (and one more "
                  "right after the failover):")
            half = args.transfers // 2
            started = time.monotonic()
            stream(client, rng, 0, half, args.transfers, started, counts)
            print(f"\n\nKilling the leader, node {leader}, with SIGKILL ...")
            killed_at = time.monotonic()
            cluster.kill(leader)
            new_leader = cluster.wait_leader(client, exclude=leader)
            elected = time.monotonic() - killed_at
            r = client.submit("alice", "bob", 1, tx_id="demo-after-failover")
            counts[r.status] += 1
            print(f"Node {new_leader} took over: elected {elected:.2f}s after the kill, "
                  f"first commit {time.monotonic() - killed_at:.2f}s after it.")
            print(f"Restarting node {leader}; it recovers from its own files and catches up.\n")
            cluster.start(leader)
            stream(client, rng, half, args.transfers - half, args.transfers, started, counts)
            print("\n")
            lead = client.status()[new_leader]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait for the restarted node to be level
                st = client.status()[leader]
                if st is not None and lead is not None and st.last_applied >= lead.commit_index:
                    break
                time.sleep(0.05)
        except ClusterUnavailable as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            return 3
        print(f"Transfers: {counts['committed']} committed, {counts['rejected']} rejected "
              f"(overdrafts are recorded as rejected).\n")
        print("Final balances (linearizable reads through the leader):")
        total = 0
        for account in GENESIS:
            b = client.balance(account).balance
            total += b
            print(f"  {account:<6} {b:>6}")
        print(f"  {'total':<6} {total:>6}   (genesis total {sum(GENESIS.values())})\n")
        print("Nodes:")
        for n, s in client.status().items():
            if s is None:
                print(f"  node {n}: down")
            else:
                print(f"  node {n}: {s.role:<9} term {s.term:<3} chain height {s.chain_height:<4} head {s.head_hash[:16]}")
        report = client.verify()
        print("\nVerify: " + ("OK, every node's chain verifies and all agree up to height "
                              f"{report.agreed_height}" if report.ok else "FAILED: " + "; ".join(report.problems)))
        print(f"\nStopping the cluster. Logs: {args.dir}/logs/node-<id>.log  "
              f"(try: jq -c 'select(.event==\"became_leader\")' {args.dir}/logs/*.log)")
    return 0 if report.ok and total == sum(GENESIS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
