"""Integration: three real node processes over ZeroMQ on free loopback ports, in a temp dir."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_until

from ledger.client import LedgerClient
from ledger.cluster import RUN_NODE, LocalCluster
from ledger.messages import StatusReply, Transfer

GENESIS = {"alice": 10_000, "bob": 5_000, "carol": 2_500}
ACCOUNTS = list(GENESIS)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, nodes=3, genesis=GENESIS) as c:
        yield c


def submit_many(client: LedgerClient, n: int, start: int, acked: Counter[str]) -> None:
    for k in range(start, start + n):
        sender, recipient = ACCOUNTS[k % 3], ACCOUNTS[(k + 1) % 3]
        r = client.submit(sender, recipient, 1 + k % 7, tx_id=f"t{k}")
        assert r.status == "committed", r
        acked[r.tx_id] += 1


def node_status(client: LedgerClient, node: int) -> StatusReply | None:
    from ledger.messages import StatusRequest

    r = client.request(node, StatusRequest(req_id="s"), timeout=0.5)
    return r if isinstance(r, StatusReply) else None


def test_replicate_failover_catch_up_and_verify(cluster: LocalCluster) -> None:
    acked: Counter[str] = Counter()
    with cluster.client() as client:
        leader = cluster.wait_leader(client)
        submit_many(client, 200, 0, acked)

        t0 = time.monotonic()
        cluster.kill(leader)
        new_leader = cluster.wait_leader(client, timeout=5.0, exclude=leader)
        elected_in = time.monotonic() - t0
        assert new_leader != leader
        assert elected_in < 2.0, f"new leader took {elected_in:.2f}s"
        submit_many(client, 100, 200, acked)

        cluster.start(leader)  # the old leader restarts from its own files and catches up
        lead = node_status(client, new_leader)
        assert lead is not None
        wait_until(lambda: (s := node_status(client, leader)) is not None
                   and s.last_applied >= lead.commit_index, 10, "the old leader to catch up")

        statuses = {i: node_status(client, i) for i in cluster.ids}
        assert all(s is not None for s in statuses.values())
        heads = {s.head_hash for s in statuses.values() if s}
        assert len(heads) == 1, statuses

        report = client.verify()
        assert report.ok, report.problems
        assert report.unreachable == []
        chains = {c.node_id: [b.hash for b in c.blocks] for c in report.chains}
        assert len({tuple(h) for h in chains.values()}) == 1
        assert report.agreed_height == len(chains[0]) - 1 >= 2

        # Every acknowledged transfer is in the chain exactly once, on every node.
        for c in report.chains:
            ids = Counter(tx["tx_id"] for b in c.blocks[1:] for tx in b.txs)
            assert set(ids) == set(acked)
            assert all(v == 1 for v in ids.values())

        balances = {a: client.balance(a).balance for a in ACCOUNTS}
        assert sum(balances.values()) == sum(GENESIS.values())
        # The expected balances, recomputed from the transfers themselves.
        expected = dict(GENESIS)
        for k in range(300):
            amount = 1 + k % 7
            expected[ACCOUNTS[k % 3]] -= amount
            expected[ACCOUNTS[(k + 1) % 3]] += amount
        assert balances == expected


def test_restart_whole_cluster_keeps_everything(cluster: LocalCluster) -> None:
    acked: Counter[str] = Counter()
    with cluster.client() as client:
        cluster.wait_leader(client)
        submit_many(client, 30, 0, acked)
        before = {a: client.balance(a).balance for a in ACCOUNTS}
        term_before = max(s.term for s in client.status().values() if s)
        for i in cluster.ids:
            cluster.kill(i)
        cluster.start_all()
        cluster.wait_leader(client)
        after = {a: client.balance(a).balance for a in ACCOUNTS}
        assert after == before
        # Resubmitting an acknowledged id returns its first result and pays nothing.
        again = client.submit(ACCOUNTS[0], ACCOUNTS[1], 1, tx_id="t0")
        assert again.status == "committed" and again.height == 1
        assert {a: client.balance(a).balance for a in ACCOUNTS} == before
        assert max(s.term for s in client.status().values() if s) > term_before
        assert client.verify().ok


def test_kill_9_of_every_node_right_after_committed_loses_nothing(cluster: LocalCluster) -> None:
    """Durability: the moment the answers arrive, every node dies (SIGKILL); what was answered
    "committed" is in every chain afterwards, in the very block the answer named."""
    answered: dict[str, tuple[int, str]] = {}
    with cluster.client() as client:
        for r in range(3):
            cluster.wait_leader(client)
            ts = [Transfer(tx_id=f"d{r}-{k}", sender=ACCOUNTS[k % 3], recipient=ACCOUNTS[(k + 1) % 3], amount=1)
                  for k in range(300)]
            replies = client.submit_batch(ts)
            for i in cluster.ids:
                cluster.kill(i)
            answered.update({x.tx_id: (x.height, x.block_hash) for x in replies if x.status == "committed"})
            cluster.start_all()
        assert len(answered) == 900
        leader = cluster.wait_leader(client)
        client.submit(ACCOUNTS[0], ACCOUNTS[1], 1, tx_id="after")  # commits everything before it
        target = node_status(client, leader).commit_index  # type: ignore[union-attr]
        for i in cluster.ids:
            wait_until(lambda: (st := node_status(client, i)) is not None and st.last_applied >= target, 15,
                       f"node {i} to apply everything")
            found = {tx["tx_id"]: (b.height, b.hash) for b in client.chain(i) for tx in b.txs if b.height}
            assert {t: found.get(t) for t in answered} == answered
        assert client.verify().ok


def fill_and_stop(cluster: LocalCluster, transfers: int) -> None:
    with cluster.client() as client:
        cluster.wait_leader(client)
        submit_many(client, transfers, 0, Counter())
    cluster.stop_all()


def start_refused(cluster: LocalCluster, node: int) -> str:
    """Start ``node`` by hand, expect it to refuse with exit 1; return its one-line error."""
    proc = subprocess.run(
        [sys.executable, str(RUN_NODE), str(node), "--config", str(cluster.config_path), "--quiet"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_tampered_chain_stops_the_node_naming_the_height(cluster: LocalCluster) -> None:
    fill_and_stop(cluster, 5)
    db = cluster.cfg.node_dir(1) / "node.db"
    con = sqlite3.connect(db)
    doc = con.execute("SELECT doc FROM blocks WHERE height = 2").fetchone()[0]
    tampered = doc.replace('"amount":2', '"amount":200') if isinstance(doc, str) else doc
    assert tampered != doc
    con.execute("UPDATE blocks SET doc = ? WHERE height = 2", (tampered,))
    con.commit()
    con.close()
    error = start_refused(cluster, 1)
    assert "height 2" in error and "merkle root" in error


def test_damage_in_the_middle_of_the_store_stops_the_node(cluster: LocalCluster) -> None:
    fill_and_stop(cluster, 20)
    db = cluster.cfg.node_dir(2) / "node.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
    con.close()
    raw = bytearray(db.read_bytes())
    assert len(raw) > 3 * 4096
    raw[4096 : 3 * 4096] = b"\xff" * (2 * 4096)  # pages in the middle, not a torn tail
    db.write_bytes(bytes(raw))
    error = start_refused(cluster, 2)
    assert "damaged" in error and "refusing to start" in error
