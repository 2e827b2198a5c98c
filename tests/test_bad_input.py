"""Bad input at a running node, in the config and on the command line: a clear error, no crash."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from polling import wait_until

from ledger import server
from ledger.client import LedgerClient
from ledger.cluster import RUN_NODE, LocalCluster
from ledger.messages import (
    MAX_MESSAGE_BYTES,
    AppendEntriesMessage,
    BatchReply,
    ErrorReply,
    RedirectReply,
    StatusReply,
    StatusRequest,
    SubmitBatchRequest,
    Transfer,
    decode,
    encode,
)

GENESIS = {"alice": 100, "bob": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("bad"), nodes=3, genesis=GENESIS) as c:
        with c.client() as client:
            c.wait_leader(client)
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[LedgerClient]:
    with cluster.client() as cl:
        yield cl


def raw_exchange(endpoint: str, frames: list[bytes], expect_reply: bool = True) -> bytes | None:
    """Send raw frames; return the reply, or (expect_reply=False) the reply to a status request
    sent right behind them on the same connection, which proves the node has handled them."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send_multipart(frames)
        if not expect_reply:
            s.send(encode(StatusRequest(req_id="after")))
        return s.recv() if s.poll(3000) else None
    finally:
        s.close(0)
        ctx.term()


def log_events(cluster: LocalCluster, node: int) -> list[dict]:
    return [json.loads(line) for line in cluster.log_file(node).read_text().splitlines()]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([b"\xc1\xff garbage"], "not a msgpack frame"),
        ([msgpack.packb([1, 2, 3])], "not a map"),
        ([msgpack.packb({"v": 99, "type": "status", "req_id": "x"})], "unsupported protocol version"),
        ([msgpack.packb({"v": 1, "type": "launch_missiles", "req_id": "x"})], "invalid message"),
        ([msgpack.packb({"v": 1, "type": "balance", "req_id": "x"})], "account"),
        ([msgpack.packb({"v": 1, "type": "submit", "req_id": "x",
                         "transfer": {"tx_id": "a", "sender": "alice", "recipient": "bob", "amount": 2.5}})],
         "amount"),
        ([msgpack.packb({"v": 1, "type": "submit_batch", "req_id": "x",
                         "transfers": [["a", "alice", "bob", 1], ["b c", "alice", "bob", 1]]})],
         "submit_batch.transfers.1.0"),
        ([msgpack.packb({"v": 1, "type": "submit_batch", "req_id": "x", "transfers": []})],
         "at least 1 item"),
        ([msgpack.packb({"v": 1, "type": "chain", "req_id": "x", "start": 2**63})], "chain.start"),
        ([msgpack.packb({"v": 1, "type": "status", "req_id": "x", **{f"k{i}": 1 for i in range(500_000)}})],
         "too long"),
        ([b"one", b"two"], "expected one payload frame"),
    ],
)
def test_malformed_frames_get_an_error_and_the_node_stays_up(
    cluster: LocalCluster, client: LedgerClient, frames: list[bytes], reason: str
) -> None:
    reply = raw_exchange(cluster.cfg.nodes[0], frames)
    assert reply is not None
    err = decode(reply)
    assert isinstance(err, ErrorReply)
    assert reason in err.error
    assert "\n" not in err.error
    assert cluster.alive(0)
    assert any(e["event"] == "bad_message_dropped" and reason in e["reason"] for e in log_events(cluster, 0))
    assert client.status()[0] is not None


def test_oversized_message_is_dropped(cluster: LocalCluster, client: LedgerClient) -> None:
    reply = raw_exchange(cluster.cfg.nodes[1], [b"x" * (MAX_MESSAGE_BYTES + 1)])
    assert reply is not None
    err = decode(reply)
    assert isinstance(err, ErrorReply) and "exceeds" in err.error
    assert any(e["event"] == "bad_message_dropped" and "exceeds" in e["reason"] for e in log_events(cluster, 1))
    # Far beyond the limit ZeroMQ cuts the connection before buffering the frame; the status
    # request queued behind it goes out on the reconnected socket and is answered.
    after = raw_exchange(cluster.cfg.nodes[1], [b"x" * (3 * MAX_MESSAGE_BYTES)], expect_reply=False)
    assert after is not None and isinstance(decode(after), StatusReply)
    assert cluster.alive(1)
    assert client.status()[1] is not None
    r = client.submit("alice", "bob", 1)
    assert r.status == "committed"


def test_a_forged_term_beyond_the_limit_is_dropped(cluster: LocalCluster, client: LedgerClient) -> None:
    """Peers are not authenticated yet; still, no value a frame may carry crashes a node."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"node:1")  # claims to be a member
    s.setsockopt(zmq.LINGER, 2000)  # the frame must leave before the socket closes
    try:
        s.connect(cluster.cfg.nodes[0])
        raw = msgpack.unpackb(encode(AppendEntriesMessage(src=1, dst=0, term=1, prev_log_index=0, prev_log_term=0,
                                                          leader_commit=0)))
        s.send(msgpack.packb(raw | {"term": 2**63}))
    finally:
        s.close()
        ctx.term()
    wait_until(lambda: any(e["event"] == "bad_message_dropped" and "append_entries.term" in e["reason"]
                           for e in log_events(cluster, 0)), 5, "the forged append to be logged as dropped")
    after = raw_exchange(cluster.cfg.nodes[0], [encode(StatusRequest(req_id="after"))])
    assert after is not None and isinstance(decode(after), StatusReply) and decode(after).term < 2**62  # type: ignore[union-attr]
    assert cluster.alive(0)


def test_raft_message_from_a_non_member_socket_is_dropped(cluster: LocalCluster, client: LedgerClient) -> None:
    forged = AppendEntriesMessage(src=2, dst=0, term=10_000, prev_log_index=0, prev_log_term=0, leader_commit=0)
    after = raw_exchange(cluster.cfg.nodes[0], [encode(forged)], expect_reply=False)
    assert after is not None and isinstance(decode(after), StatusReply)
    st = client.status()
    assert st[0] is not None and st[0].term < 10_000
    assert any(e["event"] == "bad_message_dropped" and "non-member" in e["reason"]
               for e in log_events(cluster, 0))


def test_an_error_reply_carries_the_request_id_of_the_bad_request(cluster: LocalCluster) -> None:
    frame = msgpack.packb({"v": 1, "type": "submit", "req_id": "r-7",
                           "transfer": {"tx_id": "a", "sender": "alice", "recipient": "bob", "amount": "2"}})
    reply = raw_exchange(cluster.cfg.nodes[0], [frame])
    assert reply is not None
    err = decode(reply)
    assert isinstance(err, ErrorReply) and err.req_id == "r-7" and "amount" in err.error


def test_a_flood_of_junk_is_logged_at_a_bounded_rate(cluster: LocalCluster, client: LedgerClient) -> None:
    """Node 2 only: the other tests look for their own lines in nodes 0 and 1's logs."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    before = len(log_events(cluster, 2))
    try:
        s.connect(cluster.cfg.nodes[2])
        for k in range(500):
            s.send(b"\xc1junk %d" % k)
        answers = 0
        while answers < 500 and s.poll(5000):  # every junk frame is still answered
            s.recv()
            answers += 1
        assert answers == 500
        flood = [e for e in log_events(cluster, 2)[before:] if e["event"] == "bad_message_dropped"]
        assert 1 <= len(flood) <= 2 * server.BAD_LINES_PER_S  # the flood may straddle two windows
        # Once a new second has begun, the next junk line says how many were left out.
        def left_out() -> int:
            s.send(b"\xc1late")
            s.poll(1000) and s.recv()
            return sum(e.get("left_out", 0) for e in log_events(cluster, 2)[before:])
        wait_until(lambda: left_out() > 0, 10, "a line counting the left-out ones")
        lines = [e for e in log_events(cluster, 2)[before:] if e["event"] == "bad_message_dropped"]
        assert len(lines) + sum(e.get("left_out", 0) for e in lines) >= 500
    finally:
        s.close(0)
        ctx.term()
    assert client.status()[2] is not None


@pytest.mark.parametrize(
    "sender, recipient, amount, reason",
    [
        ("alice", "bob", 1000, "insufficient funds"),
        ("zed", "bob", 5, "unknown sender zed"),
        ("alice", "bob", 0, "amount must be a positive integer"),
        ("alice", "bob", -3, "amount must be a positive integer"),
        ("alice", "alice", 5, "same account"),
    ],
)
def test_bad_transfers_are_recorded_as_rejected(
    client: LedgerClient, sender: str, recipient: str, amount: int, reason: str
) -> None:
    before = client.balance("alice").balance
    r = client.submit(sender, recipient, amount)
    assert r.status == "rejected"
    assert r.reason is not None and reason in r.reason
    assert r.height >= 1
    assert client.balance("alice").balance == before


def test_resubmitted_transfer_id_pays_once(client: LedgerClient) -> None:
    before = client.balance("bob").balance
    first = client.submit("alice", "bob", 3, tx_id="once-1")
    second = client.submit("alice", "bob", 3, tx_id="once-1")
    assert first.status == second.status == "committed"
    assert (second.height, second.block_hash) == (first.height, first.block_hash)
    assert client.balance("bob").balance == before + 3


def test_transfer_id_reused_for_another_transfer_is_refused(client: LedgerClient) -> None:
    before = client.balance("bob").balance
    first = client.submit("alice", "bob", 2, tx_id="reuse-1")
    other = client.submit("alice", "carol", 7, tx_id="reuse-1")
    assert first.status == "committed" and first.transfer == "alice>bob:2"
    assert other.status == "rejected"
    assert other.reason == "transfer id reuse-1 was already used for alice>bob:2"
    assert client.balance("bob").balance == before + 2 and client.balance("carol").balance == 0


def test_submit_batch_answers_each_transfer_and_pays_once(client: LedgerClient) -> None:
    before = client.balance("bob").balance
    ts = [Transfer(tx_id=f"batch-{i}", sender="alice", recipient="bob", amount=1) for i in range(40)]
    ts.append(Transfer(tx_id="batch-over", sender="bob", recipient="alice", amount=10**9))
    replies = client.submit_batch(ts)
    assert [r.tx_id for r in replies] == [t.tx_id for t in ts]
    assert [r.status for r in replies] == ["committed"] * 40 + ["rejected"]
    assert replies[-1].reason is not None and replies[-1].reason.startswith("insufficient funds")
    assert client.balance("bob").balance == before + 40
    again = client.submit_batch(ts)  # the whole batch once more: first results, nothing paid again
    assert [(r.status, r.height, r.block_hash) for r in again] == [(r.status, r.height, r.block_hash) for r in replies]
    assert client.balance("bob").balance == before + 40
    with pytest.raises(ValueError, match="distinct ids"):
        client.submit_batch([ts[0], ts[0]])


def test_a_batch_sent_to_a_follower_is_redirected_in_a_batch_reply(cluster: LocalCluster, client: LedgerClient) -> None:
    leader = cluster.wait_leader(client)
    follower = next(i for i in cluster.ids if i != leader)
    req = SubmitBatchRequest(req_id="to-follower", transfers=[("f1", "alice", "bob", 1), ("f2", "alice", "bob", 1)])
    reply = raw_exchange(cluster.cfg.nodes[follower], [encode(req)])
    assert reply is not None
    assert decode(reply) == BatchReply(replies=[RedirectReply(req_id="to-follower", leader_id=leader)])


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_against_running_cluster(cluster: LocalCluster) -> None:
    cfg = str(cluster.config_path)
    ok = run_cli("-m", "ledger.client", "--config", cfg, "--json", "submit", "alice", "bob", "1")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["status"] == "committed" and doc["reason"] is None and len(doc["block_hash"]) == 64
    rej = run_cli("-m", "ledger.client", "--config", cfg, "submit", "alice", "bob", "100000")
    assert rej.returncode == 1 and "insufficient funds" in rej.stdout
    st = run_cli("-m", "ledger.client", "--config", cfg, "status", "--json")
    assert st.returncode == 0
    status = json.loads(st.stdout)
    assert status["leader"] in (0, 1, 2)
    assert {n["id"] for n in status["nodes"]} == {0, 1, 2} and all(n["answered"] for n in status["nodes"])
    ver = run_cli("-m", "ledger.client", "--config", cfg, "verify")
    assert ver.returncode == 0 and ver.stdout.startswith("OK")
    ch = run_cli("-m", "ledger.client", "--config", cfg, "chain", "--json", "--node", "2", "--from", "0", "--to", "1")
    blocks = [json.loads(line) for line in ch.stdout.splitlines()]
    assert [b["height"] for b in blocks] == [0, 1]


def test_run_node_rejects_bad_config_and_arguments(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[nodes]\n0 = "udp://127.0.0.1:1"\n[genesis]\nalice = 5\n')
    r = run_cli(str(RUN_NODE), "0", "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nodes: node 0" in r.stderr and "tcp://HOST:PORT" in r.stderr
    r = run_cli(str(RUN_NODE), "7", "--config", str(bad.with_name("missing.toml")))
    assert r.returncode == 2 and "cannot read config" in r.stderr
    r = run_cli(str(RUN_NODE), "zero")
    assert r.returncode == 2 and "invalid int value" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text('[nodes]\n0 = "tcp://127.0.0.1:1"\n[genesis]\nalice = 5\n')
    r = run_cli(str(RUN_NODE), "3", "--config", str(good))
    assert r.returncode == 2 and "node id 3 is not in the config" in r.stderr
