"""Random schedules over a MemoryBoard: Raft's safety properties hold whatever the network does.

Each example runs 3 or 5 nodes through a random sequence of ticks, deliveries out of order,
drops, duplicates, partitions, crashes (with or without losing the messages in flight) and
restarts from MemoryStorage, proposals and ReadIndex reads at whoever believes it leads.
After every step ``Invariants`` checks: at most one leader per term, log matching, applied
entries never change (every node's MemoryStorage.applied is a prefix of the longest), commit
never decreases, leader completeness, and that every ReadIndex read released covers all that
was committed when it was asked. Finally the network heals and the cluster must converge
(one leader, equal applied logs).
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.messages import RaftMessage
from raft_helpers import EntryKind, Invariants, MemoryBoard, RaftConfig, round_, stable_leader

CFG = RaftConfig(
    heartbeat_ticks=2,
    election_ticks_min=8,
    election_ticks_max=16,
    max_append_entries=3,
    max_inflight_entries=4,
)

OPS = (
    ["tick"] * 5
    + ["deliver"] * 6
    + ["round"] * 3
    + ["deliver_all", "drop", "drop", "dup", "crash", "restart", "restart"]
    + ["propose"] * 3
    + ["read"] * 2
    + ["partition", "heal"]
)
Op = tuple[str, int, int]

op_strategy = st.tuples(st.sampled_from(OPS), st.integers(0, 2**16), st.integers(1, 20))


class Run:
    """Counters and the read requests of one example."""

    def __init__(self) -> None:
        self.proposals = 0
        self.reads: dict[str, int] = {}  # ctx -> highest commit index anywhere when it was asked
        self.island: set[int] = set()  # nodes cut off from the rest until "heal"

    def blocked(self, m: RaftMessage) -> bool:
        return (m.src in self.island) != (m.dst in self.island)

    def check_reads(self, board: MemoryBoard) -> None:
        """Linearizable reads: a released read covers everything committed before it was asked."""
        released = [(ctx, idx) for states in board.read_states.values() for ctx, idx in states]
        assert len({ctx for ctx, _ in released}) == len(released), "a read was released twice"
        for ctx, idx in released:
            assert idx >= self.reads[ctx], f"read {ctx} at {idx} misses commit {self.reads[ctx]}"


def apply_op(board: MemoryBoard, op: Op, run: Run) -> None:
    kind, a, b = op
    live = sorted(board.nodes)
    down = [i for i in board.ids if i not in board.nodes]
    if kind == "tick" and live:
        board.tick(live[a % len(live)], b)
    elif kind == "deliver" and board.queue:
        m = board.queue.pop(a % len(board.queue))  # any order: reordering
        if not run.blocked(m):
            board.deliver(m)
    elif kind == "round":
        # ``b`` units of time: every node ticks, messages arrive one tick later, in random order;
        # one in ``a % 5 + 2`` of them is lost.
        rng = random.Random(a)
        for _ in range(b):
            round_(board, drop=lambda m: run.blocked(m) or rng.randrange(a % 5 + 2) == 0, shuffle=rng)
    elif kind == "deliver_all":
        board.deliver_all(drop=run.blocked, limit=300)
    elif kind == "drop" and board.queue:
        board.queue.pop(a % len(board.queue))
    elif kind == "dup" and board.queue:
        m = board.queue[a % len(board.queue)]  # a copy; the original stays queued
        if not run.blocked(m):
            board.deliver(m)
    elif kind == "partition":
        run.island = {i for i in board.ids if a >> i & 1}  # a minority or a majority, or nobody
    elif kind == "heal":
        run.island = set()
    elif kind == "crash" and live:
        i = live[a % len(live)]
        if b % 2:
            board.crash(i)  # its in-flight messages vanish too
        else:
            del board.nodes[i]  # only the process dies; packets already sent may still arrive
    elif kind == "restart" and down:
        board.restart(down[a % len(down)])
    elif kind == "propose":
        leaders = board.leaders()
        if leaders:
            i = leaders[a % len(leaders)]
            run.proposals += 1
            board.nodes[i].propose(EntryKind.TXS, f"p{run.proposals}".encode())
            board.process(i)
    elif kind == "read" and live:
        # Mostly at (possibly deposed) leaders, where a read can be released at all.
        leaders = board.leaders()
        i = leaders[a % len(leaders)] if leaders and b % 4 else live[a % len(live)]
        ctx = f"r{len(run.reads)}"
        run.reads[ctx] = max(
            [n.commit_index for n in board.nodes.values()] + [len(s.applied) for s in board.storage.values()]
        )
        board.nodes[i].read_index(ctx)
        board.process(i)


def converge(board: MemoryBoard, inv: Invariants, seed: int, rounds: int = 600) -> None:
    """Heal everything and run with a one-tick latency until the cluster agrees."""
    for i in board.ids:
        if i not in board.nodes:
            board.restart(i)
    rng = random.Random(seed)
    for _ in range(rounds):
        round_(board, shuffle=rng)
        inv.check(board)
        lead = stable_leader(board)
        if lead is None:
            continue
        ln = board.nodes[lead]
        if ln.log.term_at(ln.commit_index) != ln.term or ln.commit_index != ln.log.last_index:
            continue
        full = board.storage[lead].applied
        if all(board.storage[i].applied == full for i in board.ids):
            return
    raise AssertionError("the healed cluster did not converge")


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    size=st.sampled_from([3, 5]),
    seed=st.integers(0, 10_000),
    ops=st.lists(op_strategy, min_size=60, max_size=200),
)
def test_random_schedules_keep_raft_safety(size: int, seed: int, ops: list[Op]) -> None:
    board = MemoryBoard(list(range(size)), config=CFG, seed=seed)
    inv = Invariants()
    run = Run()
    for op in ops:
        apply_op(board, op, run)
        inv.check(board)
        run.check_reads(board)
    converge(board, inv, seed)
    run.check_reads(board)
