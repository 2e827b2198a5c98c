"""Small helpers for driving the sans-I/O Raft core by hand in tests.

Logs are written as ``(index, term)`` pairs, as in seed-scenarios.md and raft-cases.md.
Node ids are ints; the scenarios' ``A, B, C`` are ``0, 1, 2``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from ledger.log import RaftLog
from ledger.memory import MemoryBoard, MemoryStorage
from ledger.messages import (
    AppendEntriesMessage,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    RaftMessage,
    RequestVoteMessage,
    RequestVoteResponse,
)
from ledger.raft import HardState, RaftConfig, RaftNode, Ready

A, B, C = 0, 1, 2

# Every timer is exactly 10 ticks: hand-driven scenarios can count ticks. The scenarios are
# written for Figure 2 of the paper, so pre-vote and check-quorum (tested on their own in
# test_prevote.py) are off here.
FIXED = RaftConfig(heartbeat_ticks=3, election_ticks_min=10, election_ticks_max=10,
                   pre_vote=False, check_quorum=False)

Pair = tuple[int, int]


def E(index: int, term: int, data: bytes = b"", kind: EntryKind = EntryKind.TXS) -> Entry:
    return Entry(index=index, term=term, kind=kind, data=data)


def entries_of(pairs: Iterable[Pair]) -> list[Entry]:
    return [E(i, t) for i, t in pairs]


def log_terms(terms: Sequence[int]) -> list[Entry]:
    """A log given as the list of terms of its entries 1..n (the figures' notation)."""
    return [E(i, t) for i, t in enumerate(terms, start=1)]


def pairs(x: RaftNode | RaftLog | MemoryStorage | Iterable[Entry]) -> list[Pair]:
    if isinstance(x, RaftNode):
        x = x.log
    if isinstance(x, RaftLog):
        x = x.slice(1, x.last_index)
    elif isinstance(x, MemoryStorage):
        x = x.entries
    return [(e.index, e.term) for e in x]


def ae(
    src: int,
    dst: int,
    term: int,
    prev: Pair = (0, 0),
    entries: Iterable[Pair] | Iterable[Entry] = (),
    commit: int = 0,
    seq: int = 0,
) -> AppendEntriesMessage:
    ents = tuple(e if isinstance(e, Entry) else E(*e) for e in entries)
    return AppendEntriesMessage(
        src=src, dst=dst, term=term, prev_log_index=prev[0], prev_log_term=prev[1],
        entries=ents, leader_commit=commit, seq=seq,
    )


def rv(src: int, dst: int, term: int, last: Pair = (0, 0)) -> RequestVoteMessage:
    return RequestVoteMessage(src=src, dst=dst, term=term, last_log_index=last[0], last_log_term=last[1])


def make_node(
    node_id: int,
    ids: Sequence[int] = (A, B, C),
    *,
    term: int = 0,
    voted_for: int | None = None,
    log: Iterable[Pair] | Iterable[Entry] = (),
    applied: int = 0,
    config: RaftConfig = FIXED,
    seed: int = 0,
) -> RaftNode:
    ents = [e if isinstance(e, Entry) else E(*e) for e in log]
    return RaftNode(
        node_id, list(ids), hard_state=HardState(term, voted_for), entries=ents, applied=applied,
        config=config, rng=random.Random(seed),
    )


def only(msgs: Sequence[RaftMessage]) -> RaftMessage:
    assert len(msgs) == 1, msgs
    return msgs[0]


def of_type(rd: Ready | Sequence[RaftMessage], cls: type) -> list:
    msgs = rd.all_messages() if isinstance(rd, Ready) else rd
    return [m for m in msgs if isinstance(m, cls)]


def event_names(rd: Ready) -> list[str]:
    return [name for name, _ in rd.events]


# ---- MemoryBoard helpers ---------------------------------------------------------------------


def seeded_board(
    ids: Sequence[int],
    *,
    term: int = 0,
    log: Iterable[Pair] | Iterable[Entry] = (),
    applied: int = 0,
    per_node: dict[int, tuple[int, Iterable[Pair] | Iterable[Entry], int]] | None = None,
    config: RaftConfig = FIXED,
    seed: int = 0,
) -> MemoryBoard:
    """A board whose nodes start from the given durable state (as after a clean restart).

    ``per_node[i] = (term, log, applied)`` overrides the shared ``term``/``log``/``applied``.
    """
    board = MemoryBoard(list(ids), config=config, seed=seed)
    for i in ids:
        t, lg, ap = (per_node or {}).get(i, (term, log, applied))
        ents = [e if isinstance(e, Entry) else E(*e) for e in lg]
        board.storage[i] = MemoryStorage(hard_state=HardState(t, None), entries=ents, applied=ents[:ap])
        board.restart(i)
    return board


def drive(board: MemoryBoard, node_id: int) -> Ready:
    """``board.process(node_id)``, returning the Ready it handled (to see e.g. ``dropped_reads``)."""
    return board.process(node_id)[0]


def fire(board: MemoryBoard, node_id: int) -> None:
    """Tick ``node_id`` exactly until its current election timer fires (nothing is delivered)."""
    node = board.nodes[node_id]
    board.tick(node_id, node._timeout - node._elapsed)


def take(board: MemoryBoard, cls: type, src: int | None = None, dst: int | None = None) -> RaftMessage:
    return board.take(
        lambda m: isinstance(m, cls) and (src is None or m.src == src) and (dst is None or m.dst == dst)
    )


def take_all(board: MemoryBoard, pred: Callable[[RaftMessage], bool]) -> list[RaftMessage]:
    got = [m for m in board.queue if pred(m)]
    board.queue = [m for m in board.queue if not pred(m)]
    return got


def between(group_a: Iterable[int], group_b: Iterable[int]) -> Callable[[RaftMessage], bool]:
    """A predicate for messages crossing a partition ``group_a | group_b``."""
    ga, gb = set(group_a), set(group_b)
    return lambda m: (m.src in ga and m.dst in gb) or (m.src in gb and m.dst in ga)


def involving(node_id: int) -> Callable[[RaftMessage], bool]:
    return lambda m: node_id in (m.src, m.dst)


def deliver_all(board: MemoryBoard, drop: Callable[[RaftMessage], bool] = lambda m: False) -> int:
    return board.deliver_all(drop=drop)


def round_(
    board: MemoryBoard,
    drop: Callable[[RaftMessage], bool] = lambda m: False,
    shuffle: random.Random | None = None,
) -> None:
    """One unit of time with a one-tick network latency: deliver what was already in flight
    (in a seeded random order if ``shuffle``), then tick every live node once (so messages they
    emit arrive in the next round)."""
    in_flight, board.queue = board.queue, []
    if shuffle is not None:
        shuffle.shuffle(in_flight)
    for m in in_flight:
        if not drop(m):
            board.deliver(m)
    for i in list(board.nodes):
        board.tick(i)


def stable_leader(board: MemoryBoard) -> int | None:
    """The leader every live node follows in the leader's term, if there is exactly one."""
    leaders = board.leaders()
    if len(leaders) != 1:
        return None
    lead = board.nodes[leaders[0]]
    for i, n in board.nodes.items():
        if i != lead.id and (n.term != lead.term or n.leader_id != lead.id):
            return None
    return lead.id


def last_pair(node: RaftNode) -> Pair:
    return (node.log.last_index, node.log.last_term)


class FirstDraws(random.Random):
    """A seeded RNG whose first ``randint`` results are forced (to make timeouts tie)."""

    def __init__(self, seed: int, first: Sequence[int]) -> None:
        super().__init__(seed)
        self._first = list(first)
        self.draws: list[int] = []

    def randint(self, a: int, b: int) -> int:
        v = self._first.pop(0) if self._first else super().randint(a, b)
        self.draws.append(v)
        return v


__all__ = [
    "A", "B", "C", "FIXED", "E", "entries_of", "log_terms", "pairs", "ae", "rv", "make_node",
    "only", "of_type", "event_names", "seeded_board", "drive", "fire", "take", "take_all",
    "between", "involving", "deliver_all", "round_", "stable_leader", "last_pair", "FirstDraws",
    "AppendEntriesMessage", "AppendEntriesResponse", "RequestVoteMessage", "RequestVoteResponse",
    "Entry", "EntryKind", "HardState", "RaftConfig", "RaftNode", "Ready", "MemoryBoard",
    "MemoryStorage",
]


# ---- invariants ------------------------------------------------------------------------------


class Invariants:
    """Safety properties of raft-cases.md, checked over the life of one MemoryBoard.

    1. at most one leader per term; 2. log matching; 3. applied entries never change, are the
    same on every node, and stay in the node's own log; 4. commitIndex (per node incarnation)
    and the applied list never shrink; plus currentTerm >= last log term on disk, and leader
    completeness: a leader of a term above the one in which an entry was first seen applied
    holds that entry.
    """

    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}
        self.commits: dict[int, tuple[int, int]] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.applied_term: dict[int, tuple[Entry, int]] = {}  # index -> (entry, term when first seen)

    def check(self, board: MemoryBoard) -> None:
        logs: dict[int, list[Entry]] = {}
        for i, st in board.storage.items():
            last_term = st.entries[-1].term if st.entries else 0
            assert st.hard_state.term >= last_term, f"node {i}: term {st.hard_state.term} < {last_term}"
            old = self.applied.get(i, [])
            assert st.applied[: len(old)] == old, f"node {i}: applied entries changed"
            self.applied[i] = list(st.applied)
            assert st.entries[: len(st.applied)] == st.applied, f"node {i}: applied entry left its log"
            logs[i] = list(st.entries)
            node = board.nodes.get(i)
            term_now = node.term if node is not None else st.hard_state.term
            for e in st.applied:
                seen = self.applied_term.setdefault(e.index, (e, term_now))
                assert seen[0] == e, f"index {e.index} applied as {e} on {i} but as {seen[0]} elsewhere"
        for i, n in board.nodes.items():
            assert n.term >= n.log.last_term
            if n.is_leader:
                assert self.leaders.setdefault(n.term, i) == i, (
                    f"two leaders in term {n.term}: {self.leaders[n.term]} and {i}"
                )
            prev = self.commits.get(i)
            if prev is not None and prev[0] == id(n):
                assert n.commit_index >= prev[1], f"node {i}: commit {prev[1]} -> {n.commit_index}"
            self.commits[i] = (id(n), n.commit_index)
            assert n.applied <= n.commit_index <= n.log.last_index
            logs[i] = n.log.slice(1, n.log.last_index)
            if n.is_leader:
                for idx, (e, t) in self.applied_term.items():
                    if n.term > t:
                        assert idx <= n.log.last_index and n.log.entry(idx) == e, (
                            f"leader {i} of term {n.term} lacks {e} applied in term {t}"
                        )
        ids = sorted(logs)
        for x, i in enumerate(ids):
            for j in ids[x + 1 :]:
                a, b = logs[i], logs[j]
                for k in range(min(len(a), len(b)), 0, -1):
                    if a[k - 1].term == b[k - 1].term:
                        assert a[:k] == b[:k], f"log matching broken between {i} and {j} at {k}"
                        break


__all__ += ["Invariants"]
