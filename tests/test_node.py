"""LedgerNode without I/O: client requests in, replies out, on a one-node cluster and a follower."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import pytest

import ledger.node
from ledger.messages import (
    AppendEntriesMessage,
    ErrorReply,
    RedirectReply,
    RequestVoteMessage,
    RequestVoteResponse,
    SubmitBatchRequest,
    SubmitReply,
    SubmitRequest,
    SubmitResults,
    Transfer,
)
from ledger.node import LedgerNode
from ledger.raft import RaftConfig
from ledger.sim import LaterSyncStorage
from ledger.storage import Storage
from ledger.txindex import MemoryTxIndex

GENESIS = {"alice": 100, "bob": 0}
CONFIG = RaftConfig(heartbeat_ticks=1, election_ticks_min=2, election_ticks_max=3)


class Events:
    """A stand-in for the structlog logger: records (event, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.seen.append((event, fields))


def node(members: list[int]) -> LedgerNode:
    return LedgerNode(0, members, Storage(":memory:", GENESIS), CONFIG, random.Random(1), Events())


def settle(n: LedgerNode, wall_ms: int = 1_700_000_000_000) -> list[tuple[Any, Any]]:
    """Flush until nothing is left to do (a one-node leader commits in the flush after its fsync)."""
    replies = []
    for _ in range(5):
        replies += n.flush(wall_ms).clients
    return replies


@pytest.fixture
def leader() -> LedgerNode:
    n = node([0])
    for _ in range(10):
        n.tick(0.0)
        n.flush(0)
        if n.raft.is_leader:
            return n
    raise AssertionError("a one-node cluster did not elect itself")


def test_a_batch_is_answered_block_by_block(leader: LedgerNode) -> None:
    rows = [("b1", "alice", "bob", 30), ("b2", "alice", "bob", 80), ("b3", "zed", "bob", 1), ("b1", "alice", "bob", 30)]
    leader.on_client("c", SubmitBatchRequest(req_id="r1", transfers=rows), 0.0)
    replies = settle(leader)
    head = leader.state.head
    assert replies == [("c", SubmitResults(req_id="r1", height=head.height, block_hash=head.hash, results=[
        ("b1", "committed", None, "alice>bob:30"),
        ("b1", "committed", None, "alice>bob:30"),  # it was in the batch twice: answered twice, applied once
        ("b2", "rejected", "insufficient funds: balance 70, amount 80", "alice>bob:80"),
        ("b3", "rejected", "unknown sender zed", "zed>bob:1"),
    ]))]
    assert leader.state.balances == {"alice": 70, "bob": 30}
    assert [tx["tx_id"] for tx in head.txs] == ["b1", "b2", "b3"]
    assert not leader.waiters and not leader.proposed and not leader.pending


def test_retries_are_answered_with_the_block_they_are_in(leader: LedgerNode) -> None:
    leader.on_client("c", SubmitBatchRequest(req_id="r1", transfers=[("x1", "alice", "bob", 5)]), 0.0)
    first = settle(leader)[0][1]
    t = Transfer(tx_id="x1", sender="alice", recipient="bob", amount=5)
    leader.on_client("d", SubmitRequest(req_id="r2", transfer=t), 0.0)
    single = settle(leader)[0][1]
    leader.on_client("c", SubmitBatchRequest(req_id="r3", transfers=[("x1", "alice", "bob", 5), ("x2", "bob", "alice", 1)]), 0.0)
    batch = [r for _, r in settle(leader)]
    assert isinstance(first, SubmitResults) and isinstance(single, SubmitReply)
    assert (single.req_id, single.status, single.height, single.block_hash) == ("r2", "committed", first.height,
                                                                                first.block_hash)
    head = leader.state.head
    assert sorted(batch, key=lambda r: r.height) == [  # type: ignore[attr-defined]
        SubmitResults(req_id="r3", height=first.height, block_hash=first.block_hash,
                      results=[("x1", "committed", None, "alice>bob:5")]),
        SubmitResults(req_id="r3", height=head.height, block_hash=head.hash,
                      results=[("x2", "committed", None, "bob>alice:1")]),
    ]
    assert leader.state.balances == {"alice": 96, "bob": 4}


def test_an_id_sent_with_two_transfers_is_applied_once_and_each_sender_told_what_happened(leader: LedgerNode) -> None:
    """The first transfer proposed under an id is applied. Whoever sent the id with another
    transfer is told it was refused, naming the applied one; whoever sent the same transfer gets
    its result: within one batch, in one turn, and when the id was applied before."""
    leader.on_client("c", SubmitBatchRequest(req_id="r1", transfers=[("w", "alice", "bob", 1), ("w", "bob", "alice", 2)]),
                     0.0)
    ((_, first),) = settle(leader)
    assert first.results == [("w", "committed", None, "alice>bob:1"),
                             ("w", "rejected", "transfer id w was already used for alice>bob:1", "alice>bob:1")]
    # Applied before: in one turn, the id with another transfer, then an honest retry of it.
    leader.on_client("m", SubmitRequest(req_id="r2", transfer=Transfer(tx_id="w", sender="bob", recipient="alice",
                                                                       amount=2)), 0.0)
    leader.on_client("g", SubmitRequest(req_id="r3", transfer=Transfer(tx_id="w", sender="alice", recipient="bob",
                                                                       amount=1)), 0.0)
    replies = dict(settle(leader))
    assert (replies["g"].status, replies["g"].height, replies["g"].block_hash) == ("committed", first.height,
                                                                                   first.block_hash)
    assert (replies["m"].status, replies["m"].reason) == ("rejected", "transfer id w was already used for alice>bob:1")
    # A new id from two senders in one turn: the first proposed is applied.
    leader.on_client("m", SubmitBatchRequest(req_id="r4", transfers=[("v", "bob", "alice", 1)]), 0.0)
    leader.on_client("g", SubmitBatchRequest(req_id="r5", transfers=[("v", "alice", "bob", 3)]), 0.0)
    replies = dict(settle(leader))
    assert replies["m"].results == [("v", "committed", None, "bob>alice:1")]
    assert replies["g"].results == [("v", "rejected", "transfer id v was already used for bob>alice:1", "bob>alice:1")]
    assert leader.state.balances == {"alice": 100, "bob": 0}


def test_a_leader_that_steps_down_redirects_each_open_request_once() -> None:
    n = node([0, 1, 2])
    for _ in range(20):
        n.tick(0.0)
        for m in n.flush(0).peers:
            if isinstance(m, RequestVoteMessage):
                n.on_raft(RequestVoteResponse(src=m.dst, dst=0, term=m.term, granted=True, pre_vote=m.pre_vote))
        if n.raft.is_leader:
            break
    assert n.raft.is_leader
    n.on_client("c", SubmitBatchRequest(req_id="r1", transfers=[("a", "alice", "bob", 1), ("b", "alice", "bob", 1),
                                                                ("c", "alice", "bob", 1)]), 0.0)
    n.on_client("d", SubmitRequest(req_id="r2", transfer=Transfer(tx_id="e", sender="alice", recipient="bob",
                                                                  amount=1)), 0.0)
    n.flush(0)  # proposed; no follower has it yet
    n.on_raft(AppendEntriesMessage(src=1, dst=0, term=n.raft.term + 1, prev_log_index=0, prev_log_term=0,
                                   leader_commit=0))
    assert sorted((c, r) for c, r in n.flush(0).clients) == [("c", RedirectReply(req_id="r1", leader_id=1)),
                                                               ("d", RedirectReply(req_id="r2", leader_id=1))]
    assert not n.raft.is_leader and not n.waiters and not n.pending


def test_a_batch_to_a_follower_gets_one_redirect() -> None:
    follower = node([0, 1, 2])
    follower.on_client("c", SubmitBatchRequest(req_id="r1", transfers=[("a", "alice", "bob", 1)] * 3), 0.0)
    assert [r for _, r in settle(follower)] == [RedirectReply(req_id="r1", leader_id=None)]
    assert not follower.pending


def test_an_overloaded_leader_refuses_the_whole_batch(leader: LedgerNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger.node, "MAX_PENDING", 3)
    leader.on_client("c", SubmitBatchRequest(req_id="r1", transfers=[("a", "alice", "bob", 1), ("b", "alice", "bob", 1)]), 0.0)
    leader.on_client("c", SubmitBatchRequest(req_id="r2", transfers=[("c", "alice", "bob", 1), ("d", "alice", "bob", 1)]), 0.0)
    replies = [r for _, r in settle(leader)]
    assert ErrorReply(req_id="r2", error="leader overloaded, retry") in replies
    assert [row[0] for r in replies if isinstance(r, SubmitResults) for row in r.results] == ["a", "b"]
    assert leader.state.balances == {"alice": 98, "bob": 2}


def batching_leader() -> LedgerNode:
    """A one-node leader with a 5 ms batch interval."""
    n = LedgerNode(0, [0], Storage(":memory:", {"alice": 1000, "bob": 0}), CONFIG, random.Random(1), Events(),
                   batch_interval_ms=5)
    while not n.raft.is_leader:
        n.tick(0.0)
        n.flush(0)
    return n


def test_a_leader_proposes_at_most_one_batch_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    n = batching_leader()
    monkeypatch.setattr(ledger.node, "LINGER_MIN_BATCH", 1)  # these batches of one count as load
    t0 = 1_700_000_000_000

    def submit(tx_id: str) -> None:
        n.on_client("c", SubmitBatchRequest(req_id=tx_id, transfers=[(tx_id, "alice", "bob", 1)]), 0.0)

    def entries() -> int:
        return n.raft.log.last_index

    start = entries()
    submit("a")
    assert n.proposal_due_ms() is None  # nothing proposed for a while: it goes at once
    n.flush(t0)
    assert entries() == start + 1 and not n.pending
    submit("b")
    submit("c")
    assert n.proposal_due_ms() == t0 + 5
    n.flush(t0 + 4)
    assert entries() == start + 1 and len(n.pending) == 2  # they wait for the interval
    n.flush(t0 + 5)
    assert entries() == start + 2 and not n.pending  # both in one entry
    submit("d")
    n.flush(t0 + 1)  # the wall clock stepped back: never wait on it
    assert entries() == start + 3
    monkeypatch.setattr(ledger.node, "MAX_BATCH", 2)
    submit("e")
    n.flush(t0 + 2)
    assert entries() == start + 3
    submit("f")  # a full batch goes at once
    n.flush(t0 + 2)
    assert entries() == start + 4 and n.proposal_due_ms() is None
    settle(n, t0 + 100)
    assert n.state.balances == {"alice": 994, "bob": 6}


def test_batches_smaller_than_the_linger_minimum_go_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    n = batching_leader()
    monkeypatch.setattr(ledger.node, "LINGER_MIN_BATCH", 3)
    t0, start = 1_700_000_000_000, n.raft.log.last_index
    for k, size in enumerate([2, 2, 3, 1, 1]):  # a client or two, each waiting for its answer
        rows = [(f"t{k}-{j}", "alice", "bob", 1) for j in range(size)]
        n.on_client("c", SubmitBatchRequest(req_id=f"r{k}", transfers=rows), 0.0)
        n.flush(t0)
    # The batches of 2 went at once; the batch of 3 made the next one wait, which then went
    # with the one after it as soon as the interval had passed.
    assert n.raft.log.last_index == start + 3 and len(n.pending) == 2
    assert n.proposal_due_ms() == t0 + 5
    n.flush(t0 + 5)
    assert n.raft.log.last_index == start + 4 and not n.pending


# ---- a three-node cluster wired by hand: when a leader proposes and when it answers ----------------

class Trio:
    """Three LedgerNodes whose peer messages wait in one queue until ``deliver``; node 0 leads.
    ``order`` records, for the leader, its fsynced transactions and its replies, in order;
    ``replied`` every node's replies, as they went out."""

    def __init__(self, storages: dict[int, Storage] | None = None, syncs_later: bool = False) -> None:
        self.queue: list[Any] = []
        self.order: list[str] = []
        self.replied: list[Any] = []
        storages = storages or {}
        self.nodes = {i: LedgerNode(i, [0, 1, 2], storages.get(i) or Storage(":memory:", GENESIS), CONFIG,
                                    random.Random(i), Events(), send_now=self.queue.extend, reply_now=self._reply,
                                    leader_syncs_later=syncs_later)
                      for i in range(3)}
        storage = self.nodes[0].storage
        plain = storage.transaction

        @contextmanager
        def recorded(durable: bool = True) -> Any:
            with plain(durable):
                yield
            if durable:
                self.order.append(f"fsync {self.nodes[0].raft.log.last_index}")

        storage.transaction = recorded  # type: ignore[method-assign]
        for _ in range(20):
            self.nodes[0].tick(0.0)
            self.flush()
            self.deliver()
            if self.nodes[0].raft.is_leader:
                break
        assert self.nodes[0].raft.is_leader
        self.deliver()  # the new term's no-op, committed everywhere
        assert self.nodes[0].raft.commit_index == self.nodes[0].raft.log.last_index
        self.order.clear()

    def _reply(self, rs: list[Any]) -> None:
        self.order.extend(f"reply {r.req_id}" for _, r in rs)
        self.replied.extend(rs)

    def flush(self, only: int | None = None) -> None:
        for i, n in self.nodes.items():
            if only is None or i == only:
                out = n.flush(1_700_000_000_000)
                self.queue.extend(out.peers)
                assert out.clients == []  # every reply went out through reply_now

    def deliver(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            msgs, self.queue[:] = list(self.queue), []
            for m in msgs:
                self.nodes[m.dst].on_raft(m)
            self.flush()


def submit(trio: Trio, req_id: str, tx_id: str) -> None:
    trio.nodes[0].on_client("c", SubmitBatchRequest(req_id=req_id, transfers=[(tx_id, "alice", "bob", 1)]), 0.0)


def test_a_leader_answers_what_committed_before_the_fsync_of_what_it_just_proposed() -> None:
    trio = Trio()
    submit(trio, "r1", "t1")
    trio.flush(only=0)  # proposes t1's entry (index 2) and fsyncs it
    for i in (1, 2):  # the followers store it and acknowledge
        for m in [m for m in trio.queue if m.dst == i]:
            trio.nodes[i].on_raft(m)
        trio.queue[:] = [m for m in trio.queue if m.dst != i]
        trio.flush(only=i)
    for m in trio.queue:
        trio.nodes[0].on_raft(m)  # the acks: index 2 is committed
    trio.queue.clear()
    submit(trio, "r2", "t2")
    trio.flush(only=0)  # one Ready: entry 2 to apply, entry 3 (t2) to persist
    assert trio.order == ["fsync 2", "reply r1", "fsync 3"]


def test_the_id_index_is_written_after_the_answers_of_its_turn_are_out() -> None:
    """A write of the id index takes milliseconds: the transfers whose block brought it to its
    size are answered first (order: the leader's fsyncs, replies and index writes)."""
    trio = Trio()
    index = trio.nodes[0].storage.index
    assert isinstance(index, MemoryTxIndex)
    index.write_every = 2
    plain = index.write_if_due

    def recorded() -> None:
        due = len(index._unwritten) >= index.write_every
        plain()
        if due:
            trio.order.append(f"index {index.height}")

    index.write_if_due = recorded  # type: ignore[method-assign]
    trio.nodes[0].on_client("c", SubmitBatchRequest(req_id="r1", transfers=[
        ("t1", "alice", "bob", 1), ("t2", "alice", "bob", 2)]), 0.0)
    trio.flush(only=0)
    trio.deliver()
    assert trio.order == ["fsync 2", "reply r1", "index 1"]
    assert index.heights(["t1", "t2"]) == {"t1": 1, "t2": 1} and index._unwritten == {}


class LaterSync(LaterSyncStorage):
    """The simulator's storage whose syncs complete when told (here: by the test setting
    ``done``), recording the tickets a node waited for."""

    def __init__(self) -> None:
        super().__init__(lambda ticket: None, GENESIS)
        self.waited: list[int] = []

    def wait_synced(self, ticket: int) -> None:
        self.waited.append(ticket)
        super().wait_synced(ticket)


def test_a_leader_counts_its_own_copy_once_synced_and_a_majority_of_followers_commits_without_it() -> None:
    storages = {i: LaterSync() for i in range(3)}
    trio = Trio(storages, syncs_later=True)
    s0, n0 = storages[0], trio.nodes[0]
    # Elected, the leader's term and vote were fsynced; only its own log writes wait for a sync.
    assert s0.tickets == 1 and s0.done == 0  # the new term's no-op, committed by the two followers
    assert [storages[i].tickets for i in (1, 2)] == [0, 0]  # followers always fsync before they answer
    submit(trio, "r1", "t1")
    trio.flush(only=0)
    assert s0.tickets == 2 and n0.raft.stable_index < n0.raft.log.last_index
    for m in [m for m in trio.queue if m.dst == 1]:  # only follower 1 gets it (and acknowledges)
        trio.nodes[1].on_raft(m)
    trio.queue[:] = [m for m in trio.queue if m.dst != 1]
    trio.flush(only=1)
    for m in [m for m in trio.queue if m.dst == 0]:
        n0.on_raft(m)
    trio.queue[:] = [m for m in trio.queue if m.dst != 0]
    trio.flush(only=0)
    assert trio.replied == []  # one follower's copy and an unsynced own copy: no majority yet
    s0.done = 2
    trio.flush(only=0)  # the sync is done: the leader's copy counts, the entry commits
    assert [(r.req_id, r.results[0][1]) for _, r in trio.replied] == [("r1", "committed")]
    submit(trio, "r2", "t2")
    trio.flush(only=0)
    trio.deliver()  # both followers acknowledge: committed while the leader's own sync is pending
    assert s0.done < s0.tickets and n0.raft.stable_index < n0.raft.commit_index
    assert [(r.req_id, r.results[0][1]) for _, r in trio.replied] == [("r1", "committed"), ("r2", "committed")]
    n0.tick(0.0)  # a heartbeat carries the commit to the followers
    trio.deliver()
    assert n0.state.head.hash == trio.nodes[1].state.head.hash == trio.nodes[2].state.head.hash
    assert n0.state.head.height == 2


def test_a_leader_that_steps_down_syncs_its_own_writes_before_it_says_anything() -> None:
    """As a follower it may acknowledge or vote on the strength of any entry in its log: the
    entries it wrote as leader and had not yet synced are made durable first."""
    storages = {i: LaterSync() for i in range(3)}
    trio = Trio(storages, syncs_later=True)
    s0, n0 = storages[0], trio.nodes[0]
    submit(trio, "r1", "t1")
    trio.flush(only=0)
    trio.queue.clear()  # its append reaches nobody; its own sync is pending
    assert s0.tickets == 2 and s0.done == 0 and n0.unsynced
    last = n0.raft.log.last_index
    # A leader of a later term: its heartbeat matches the entry before t1's, so node 0 answers
    # "I hold up to there", and steps down first.
    n0.on_raft(AppendEntriesMessage(term=n0.raft.term + 1, src=1, dst=0, prev_log_index=last - 1,
                                    prev_log_term=n0.raft.log.term_at(last - 1), leader_commit=0))
    trio.flush(only=0)
    assert not n0.raft.is_leader and s0.waited == [2] and s0.done == 2 and n0.unsynced == []
    (ack,) = trio.queue
    assert ack.type == "append_entries_response" and n0.raft.stable_index == last


def test_a_stalled_leader_applies_the_entries_that_replaced_its_own_not_its_own_rows() -> None:
    """Node 0 leads and proposes two batches that reach nobody, then stalls; nodes 1 and 2 elect a
    leader that commits other entries at those indexes. Node 0's first input after the stall is
    the new leader's append, which replaces its entries and commits them in the same turn, before
    it has stepped down: it must apply what is in its log now, not the rows it had proposed there
    (``own_batches``; the entry's bytes are another object)."""
    trio = Trio()
    n0 = trio.nodes[0]
    submit(trio, "x1", "x1")
    trio.flush(only=0)
    submit(trio, "x2", "x2")
    trio.flush(only=0)
    assert sorted(n0.own_batches) == [2, 3]
    trio.queue.clear()  # its appends are lost

    def among_1_and_2(rounds: int = 6) -> None:
        for _ in range(rounds):
            trio.queue[:] = [m for m in trio.queue if m.dst != 0 and m.src != 0]
            msgs, trio.queue[:] = list(trio.queue), []
            for m in msgs:
                trio.nodes[m.dst].on_raft(m)
            for i in (1, 2):
                trio.queue.extend(trio.nodes[i].flush(1_700_000_000_000).peers)

    for _ in range(30):
        for i in (1, 2):
            trio.nodes[i].tick(0.0)
        among_1_and_2()
        if any(trio.nodes[i].raft.is_leader for i in (1, 2)):
            break
    new = next(trio.nodes[i] for i in (1, 2) if trio.nodes[i].raft.is_leader)
    new.on_client("d", SubmitBatchRequest(req_id="y1", transfers=[("y1", "alice", "bob", 7)]), 0.0)
    among_1_and_2()
    assert new.raft.commit_index == 3 and new.state.head.txs[0]["tx_id"] == "y1"  # a no-op at 2, y1 at 3
    assert n0.raft.is_leader and sorted(n0.own_batches) == [2, 3]  # it knows nothing of it yet
    trio.queue.clear()
    new.tick(0.0)
    trio.queue.extend(new.flush(1_700_000_000_000).peers)
    to_0 = [m for m in trio.queue if m.dst == 0]
    assert [(e.index, e.term) for m in to_0 for e in m.entries] == [(2, 2), (3, 2)]  # with commit 3
    for m in to_0:
        n0.on_raft(m)
    trio.replied.clear()
    assert n0.flush(1_700_000_000_000).clients == []  # sent through reply_now, before the index's write
    replies = trio.replied
    assert n0.raft.commit_index == 3 and not n0.raft.is_leader and not n0.own_batches
    assert (n0.state.head.hash, n0.state.balances) == (new.state.head.hash, new.state.balances)
    assert sorted((r.req_id, type(r).__name__) for _, r in replies) == [("x1", "RedirectReply"), ("x2", "RedirectReply")]
