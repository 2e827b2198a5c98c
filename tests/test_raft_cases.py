"""The failure cases of raft-cases.md that concern the Raft core (C01-C03, C05, C06, C08-C10).

C11 and C13 concern the storage / ledger layer and are tested there.

Each schedule is forced with ``MemoryBoard.take`` / ``deliver`` / drops. One difference from the
text is systematic: this core appends a no-op of its term as soon as it wins an election (Raft
5.4.2 / section 8), so a leader's first client entry sits one index after the no-op. Where the
text writes a client entry at the first index of a new term, the no-op takes that index and the
client entry follows it; every message whose shape the text spells out is still checked exactly.
A, B, C are nodes 0, 1, 2.
"""

from __future__ import annotations

import random

from ledger.roles import Follower, Leader, Progress
from raft_helpers import (
    A,
    B,
    C,
    FIXED,
    AppendEntriesMessage,
    AppendEntriesResponse,
    E,
    Entry,
    EntryKind,
    FirstDraws,
    HardState,
    Invariants,
    MemoryBoard,
    RaftConfig,
    RaftNode,
    RequestVoteMessage,
    RequestVoteResponse,
    ae,
    between,
    deliver_all,
    drive,
    fire,
    involving,
    make_node,
    of_type,
    only,
    pairs,
    round_,
    rv,
    seeded_board,
    stable_leader,
    take,
    take_all,
)

ONE_ENTRY = RaftConfig(heartbeat_ticks=3, election_ticks_min=10, election_ticks_max=10, max_append_entries=1,
                       pre_vote=False, check_quorum=False)


def txs(board: MemoryBoard, leader: int, name: str) -> Entry:
    """A client transfer ``name`` proposed at ``leader`` (persisted and sent as a driver would)."""
    e = board.nodes[leader].propose(EntryKind.TXS, name.encode())
    board.process(leader)
    return e


def applied_data(board: MemoryBoard, i: int) -> list[bytes]:
    """The client transfers node ``i`` applied (seeded entries and no-ops carry no data)."""
    return [e.data for e in board.storage[i].applied if e.data]


def heartbeat(board: MemoryBoard, leader: int) -> None:
    board.tick(leader, board.config.heartbeat_ticks)


def vote_denials(board: MemoryBoard, i: int) -> list[str]:
    return [f["reason"] for name, f in board.events[i] if name == "vote_denied"]


# ---- C01 -----------------------------------------------------------------------------------


def _c01_until_step_3(board: MemoryBoard, inv: Invariants) -> None:
    """Steps 0-3 of C01 (one entry per AppendEntries, so the hinted retry is exactly step 4's)."""
    # 1. A leads term 2; T2 is appended after A's no-op; all of A's appends are lost; A crashes.
    fire(board, A)
    deliver_all(board, drop=lambda m: isinstance(m, AppendEntriesMessage))
    assert board.leaders() == [A] and board.nodes[A].term == 2
    t2 = txs(board, A, "T2")
    assert (t2.index, t2.term) == (3, 2)
    take_all(board, lambda m: True)
    board.crash(A)
    inv.check(board)
    # 2. B wins term 3 with C's vote; T3 follows its no-op; its appends are lost; B crashes.
    fire(board, B)
    deliver_all(board, drop=lambda m: isinstance(m, AppendEntriesMessage))
    assert board.leaders() == [B] and board.nodes[B].term == 3
    t3 = txs(board, B, "T3")
    assert (t3.index, t3.term) == (3, 3)
    take_all(board, lambda m: True)
    board.crash(B)
    inv.check(board)
    # 3. A restarts. Its term-3 campaign is refused (C voted for B in 3); term 4 is granted.
    board.restart(A)
    fire(board, A)
    deliver_all(board)
    assert not board.nodes[A].is_leader and vote_denials(board, C)[-1] == f"already voted for {B}"
    fire(board, A)
    board.deliver(take(board, RequestVoteMessage, dst=C))
    board.deliver(take(board, RequestVoteResponse, src=C))
    board.queue = [m for m in board.queue if m.dst == C]  # B is down
    a = board.nodes[A]
    assert a.is_leader and a.term == 4 and pairs(a) == [(1, 1), (2, 2), (3, 2), (4, 4)]
    inv.check(board)


def test_C01_leader_never_commits_older_term_entry_by_counting_replicas() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1, config=ONE_ENTRY)
    inv = Invariants()
    _c01_until_step_3(board, inv)
    a = board.nodes[A]
    # 4. A's first append (prev (3,2)) is refused by C; the hinted retry is exactly
    #    AE(4, prev=(1,1), entries=[(2,2)], commit=1).
    board.deliver(take(board, AppendEntriesMessage, dst=C))
    board.deliver(take(board, AppendEntriesResponse, src=C))
    retry = take(board, AppendEntriesMessage, dst=C)
    assert retry == ae(A, C, 4, prev=(1, 1), entries=[a.log.entry(2)], commit=1)
    board.deliver(retry)
    ack = take(board, AppendEntriesResponse, src=C)
    assert (ack.success, ack.match_index) == (True, 2)
    board.deliver(ack)
    board.deliver(take(board, AppendEntriesMessage, dst=C))  # and T2 = (3,2)
    board.deliver(take(board, AppendEntriesResponse, src=C))
    assert a.role.progress[C].match_index == 3
    assert pairs(board.storage[C]) == [(1, 1), (2, 2), (3, 2)]
    # (2,2) and T2 (3,2) are on A and C, a majority, but are of term 2: nothing is committed.
    assert a.commit_index == 1
    assert applied_data(board, A) == [] and applied_data(board, C) == []
    inv.check(board)
    # 5. A crashes before (4,4) leaves; B restarts and wins term 5 with C's vote.
    board.queue.clear()
    board.crash(A)
    board.restart(B)
    fire(board, B)  # term 4: C voted for A in 4
    deliver_all(board)
    assert not board.nodes[B].is_leader
    fire(board, B)
    vote = take(board, RequestVoteMessage, dst=C)
    assert vote == rv(B, C, 5, last=(3, 3))  # newer than C's (3,2)
    board.deliver(vote)
    granted = take(board, RequestVoteResponse, src=C)
    assert granted == RequestVoteResponse(src=C, dst=B, term=5, granted=True)
    board.deliver(granted)
    assert board.nodes[B].is_leader
    board.deliver(take(board, AppendEntriesMessage, dst=C))  # prev (3,3): conflicts with (3,2)
    board.deliver(take(board, AppendEntriesResponse, src=C))
    fix = take(board, AppendEntriesMessage, dst=C)
    assert fix == ae(B, C, 5, prev=(1, 1), entries=[board.nodes[B].log.entry(2)], commit=1)
    board.deliver(fix)
    deliver_all(board)
    board.restart(A)
    heartbeat(board, B)
    deliver_all(board)
    heartbeat(board, B)
    deliver_all(board)
    expected = [(1, 1), (2, 3), (3, 3), (4, 5)]
    for i in (A, B, C):
        assert pairs(board.storage[i]) == expected
        assert pairs(board.storage[i].applied) == expected
        assert applied_data(board, i) == [b"T3"]  # T2 was never applied anywhere
    inv.check(board)


def test_C01_liveness_variant_own_term_entry_commits_t2() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    inv = Invariants()
    _c01_until_step_3(board, inv)
    # A's no-op (4,4) reaches C along with (2,2) and T2: committing it commits them.
    deliver_all(board)
    a = board.nodes[A]
    assert pairs(board.storage[C]) == [(1, 1), (2, 2), (3, 2), (4, 4)]
    assert a.commit_index == 4 and applied_data(board, A) == [b"T2"]
    heartbeat(board, A)
    deliver_all(board)
    assert applied_data(board, C) == [b"T2"]
    inv.check(board)
    # A crashes; B's RV(5, last=(3,3)) is refused: C's last (4,4) is newer. B never leads.
    board.crash(A)
    board.restart(B)
    fire(board, B)  # term 4: C already voted for A
    deliver_all(board)
    assert vote_denials(board, C)[-1] == f"already voted for {A}"
    for term in (5, 6, 7):
        fire(board, B)
        vote = take(board, RequestVoteMessage, dst=C)
        assert vote == rv(B, C, term, last=(3, 3))
        board.deliver(vote)
        deliver_all(board)
        assert board.nodes[B].term == term and not board.nodes[B].is_leader
        assert vote_denials(board, C)[-1] == "candidate log is behind"
    fire(board, C)
    deliver_all(board)
    heartbeat(board, C)
    deliver_all(board)
    assert board.leaders() == [C]
    for i in (B, C):
        assert applied_data(board, i) == [b"T2"]
        assert pairs(board.storage[i])[:4] == [(1, 1), (2, 2), (3, 2), (4, 4)]
    inv.check(board)


# ---- C02 -----------------------------------------------------------------------------------


def test_C02_A_vote_is_durable_before_grant_no_double_vote_after_restart() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    inv = Invariants()
    fire(board, A)
    fire(board, C)
    assert [board.storage[i].hard_state for i in (A, C)] == [HardState(2, A), HardState(2, C)]
    board.deliver(take(board, RequestVoteMessage, src=A, dst=B))
    grant = take(board, RequestVoteResponse, src=B, dst=A)
    assert grant == RequestVoteResponse(src=B, dst=A, term=2, granted=True)
    delayed = take(board, RequestVoteMessage, src=C, dst=B)
    # B crashes right after its grant is on the wire, and restarts from disk.
    board.crash(B)
    b = board.restart(B)
    assert b.hard_state == HardState(2, A)
    board.deliver(delayed)
    assert take(board, RequestVoteResponse, src=B, dst=C) == RequestVoteResponse(
        src=B, dst=C, term=2, granted=False
    )
    board.deliver(grant)
    assert board.leaders() == [A]
    deliver_all(board)
    inv.check(board)
    assert board.leaders() == [A] and board.nodes[A].term == 2
    assert not board.nodes[C].is_leader and board.nodes[C].term == 2
    assert inv.leaders == {2: A}


def test_C02_B_terms_reload_after_whole_cluster_restart() -> None:
    board = seeded_board([A, B, C], term=2, log=[(1, 1), (2, 2)], applied=2)
    inv = Invariants()
    board.crash(B)  # B's start is delayed
    fire(board, A)
    deliver_all(board)
    a = board.nodes[A]
    assert a.is_leader and a.term == 3  # term reloaded from disk: 2 + 1
    t3 = txs(board, A, "T3")
    assert (t3.index, t3.term) == (4, 3)  # after A's no-op (3,3)
    deliver_all(board)
    assert a.commit_index == 4 and applied_data(board, A) == [b"T3"]  # acknowledged
    inv.check(board)

    board.restart(B)
    fire(board, B)
    rvs = of_type(board.queue, RequestVoteMessage)
    assert sorted(rvs, key=lambda m: m.dst) == [rv(B, A, 3, last=(2, 2)), rv(B, C, 3, last=(2, 2))]
    deliver_all(board)
    assert not board.nodes[B].is_leader
    inv.check(board)
    # A's heartbeats to B are lost; B campaigns again at term 4. A and C adopt term 4 (A steps
    # down) but refuse: their last (4,3) is newer than (2,2).
    fire(board, B)
    assert sorted(of_type(board.queue, RequestVoteMessage), key=lambda m: m.dst) == [
        rv(B, A, 4, last=(2, 2)),
        rv(B, C, 4, last=(2, 2)),
    ]
    deliver_all(board)
    assert [board.nodes[i].term for i in (A, B, C)] == [4, 4, 4]
    assert board.leaders() == []
    assert vote_denials(board, A)[-1] == vote_denials(board, C)[-1] == "candidate log is behind"
    inv.check(board)
    fire(board, C)
    deliver_all(board)
    heartbeat(board, C)
    deliver_all(board)
    assert board.leaders() == [C] and board.nodes[C].term == 5
    expected = [(1, 1), (2, 2), (3, 3), (4, 3), (5, 5)]
    for i in (A, B, C):
        assert pairs(board.storage[i]) == expected
        assert applied_data(board, i) == [b"T3"]
    inv.check(board)
    assert B not in inv.leaders.values()


# ---- C03 -----------------------------------------------------------------------------------


def test_C03_delayed_append_never_truncates_follower_log() -> None:
    board = seeded_board([A, B, C])
    inv = Invariants()
    cut = involving(C)  # C is partitioned
    fire(board, A)
    board.deliver(take(board, RequestVoteMessage, dst=B))
    board.deliver(take(board, RequestVoteResponse, src=B))
    take_all(board, cut)
    assert board.leaders() == [A] and board.nodes[A].term == 1
    # 1. AE#1 carries (1,1) (A's no-op); T1 = (2,1) is appended; the heartbeat retransmission
    #    AE#2 carries both.
    ae1 = take(board, AppendEntriesMessage, dst=B)
    assert ae1 == ae(A, B, 1, prev=(0, 0), entries=[board.nodes[A].log.entry(1)])
    t1 = txs(board, A, "T1")
    assert (t1.index, t1.term) == (2, 1)
    heartbeat(board, A)
    take_all(board, cut)
    ae2 = take(board, AppendEntriesMessage, dst=B)
    assert ae2 == ae(A, B, 1, prev=(0, 0), entries=[board.nodes[A].log.entry(1), t1])
    # 2. Reordered: AE#2 first.
    board.deliver(ae2)
    resp = take(board, AppendEntriesResponse, src=B)
    assert (resp.success, resp.match_index) == (True, 2)
    # 3. Index 2 on {A, B}, of the current term: committed, applied, acknowledged.
    board.deliver(resp)
    a = board.nodes[A]
    assert a.commit_index == 2 and applied_data(board, A) == [b"T1"]
    # 4. The delayed AE#1 reaches B: nothing deleted, success, and A keeps matchIndex[B] = 2.
    board.deliver(ae1)
    assert pairs(board.storage[B]) == pairs(board.nodes[B]) == [(1, 1), (2, 1)]
    resp = take(board, AppendEntriesResponse, src=B)
    assert (resp.success, resp.match_index) == (True, 1)
    board.deliver(resp)
    assert a.role.progress[B].match_index == 2
    inv.check(board)
    # 5. A crashes; C heals. C (empty log) cannot win; B can, and T1 stays.
    board.queue.clear()
    board.crash(A)
    for _ in range(2):
        fire(board, C)
        deliver_all(board)
        assert not board.nodes[C].is_leader
    assert vote_denials(board, B)[-1] == "candidate log is behind"
    fire(board, B)
    deliver_all(board)
    heartbeat(board, B)
    deliver_all(board)
    assert board.leaders() == [B]
    for i in (B, C):
        assert pairs(board.storage[i])[:2] == [(1, 1), (2, 1)]
        assert applied_data(board, i) == [b"T1"]
    inv.check(board)


def test_C03_heartbeat_variant_empty_append_does_not_delete() -> None:
    n = make_node(B, term=1, log=[(1, 1), (2, 1)])
    n.step(ae(A, B, 1, prev=(1, 1)))
    rd = n.ready()
    assert pairs(n) == [(1, 1), (2, 1)]
    assert rd.truncate_from is None
    assert only(rd.messages) == AppendEntriesResponse(src=B, dst=A, term=1, success=True, match_index=1)


# ---- C05 -----------------------------------------------------------------------------------


def test_C05_commit_index_never_moves_backwards() -> None:
    board = seeded_board([A, B, C])
    inv = Invariants()
    fire(board, A)
    deliver_all(board)
    txs(board, A, "T1")
    deliver_all(board)
    a = board.nodes[A]
    # 0. All logs [(1,1),(2,1)]; A committed 2, B and C only 1 (no heartbeat since).
    assert [pairs(board.nodes[i]) for i in (A, B, C)] == [[(1, 1), (2, 1)]] * 3
    assert [board.nodes[i].commit_index for i in (A, B, C)] == [2, 1, 1]
    assert a.applied == 2 and len(board.storage[A].applied) == 2
    # 1. B times out (A's heartbeats to it are lost) and wins term 2 with A and C.
    fire(board, B)
    deliver_all(board, drop=lambda m: isinstance(m, AppendEntriesMessage))
    assert board.leaders() == [B] and board.nodes[B].term == 2
    a = board.nodes[A]
    assert isinstance(a.role, Follower) and a.commit_index == 2
    # 2. B -> A: AE(2, prev=(2,1), entries=[], commit=1) (a heartbeat of a leader that does
    #    not know commit 2 yet), then B's real first append: (3,2) with commit=1.
    applied_before = list(board.storage[A].applied)
    board.deliver(ae(B, A, 2, prev=(2, 1), commit=1))
    assert a.commit_index == 2 and a.applied == 2 and board.storage[A].applied == applied_before
    assert a.leader_id == B and a.term == 2
    inv.check(board)
    heartbeat(board, B)
    board.deliver(take(board, AppendEntriesMessage, dst=A))
    assert pairs(a) == [(1, 1), (2, 1), (3, 2)]
    assert a.commit_index == 2 and board.storage[A].applied == applied_before
    # B commits its own-term entry (3,2): everyone's commit moves to 3.
    deliver_all(board)
    assert board.nodes[B].commit_index == 3
    heartbeat(board, B)
    deliver_all(board)
    assert [board.nodes[i].commit_index for i in (A, B, C)] == [3, 3, 3]
    for i in (A, B, C):
        assert pairs(board.storage[i].applied) == [(1, 1), (2, 1), (3, 2)]  # each once
    inv.check(board)


def test_C05_restart_resumes_commit_at_applied() -> None:
    """A restarted node's commit starts at what it applied, so nothing is replayed."""
    board = seeded_board([A, B, C], term=1, log=[(1, 1), (2, 1)], applied=2)
    n = board.nodes[A]
    assert (n.commit_index, n.applied) == (2, 2)
    n.step(ae(B, A, 2, prev=(2, 1), commit=1))
    assert n.ready().committed == [] and n.commit_index == 2


# ---- C06 -----------------------------------------------------------------------------------


def _install_leader(node: RaftNode, next_index: int) -> None:
    """Make ``node`` leader of its current term with ``nextIndex = next_index`` for every peer.

    This is the start state C06 describes (no no-op appended), which an election in this core
    cannot produce; the state is built through the public role classes instead.
    """
    node.role = Leader(progress={p: Progress(next_index=next_index) for p in node.peers})
    node.leader_id = node.id


def test_C06_stale_rejection_is_ignored_next_index_never_below_one() -> None:
    a = make_node(A, term=1, voted_for=A, log=[(1, 1)])
    b = make_node(B, term=1, voted_for=A)
    _install_leader(a, next_index=2)
    a.ready()
    # 1. H1 and, on the retry timer, the identical H2.
    for _ in range(FIXED.heartbeat_ticks):
        a.tick()
    h1 = only([m for m in a.ready().all_messages() if m.dst == B])
    for _ in range(FIXED.heartbeat_ticks):
        a.tick()
    h2 = only([m for m in a.ready().all_messages() if m.dst == B])
    assert h1 == h2 == ae(A, B, 1, prev=(1, 1))
    # 2. B rejects H1; A moves nextIndex[B] to 1 and sends AE3.
    b.step(h1)
    r1 = only(b.ready().messages)
    assert r1 == AppendEntriesResponse(
        src=B, dst=A, term=1, success=False, reject_index=1, conflict_term=0, conflict_index=1
    )
    b.step(h2)
    r2 = only(b.ready().messages)
    a.step(r1)
    ae3 = only(a.ready().all_messages())
    assert ae3 == ae(A, B, 1, prev=(0, 0), entries=[(1, 1)])
    assert a.role.progress[B].next_index == 1
    # 3. The rejection of H2 (about prev index 1) is stale: ignored, nothing sent.
    a.step(r2)
    assert a.ready().all_messages() == []
    assert a.role.progress[B].next_index == 1
    # 4. AE3 accepted.
    b.step(ae3)
    ok = only(b.ready().messages)
    assert (ok.success, ok.match_index) == (True, 1)
    a.step(ok)
    a.ready()
    assert (a.role.progress[B].match_index, a.role.progress[B].next_index) == (1, 2)
    # However often the stale rejection arrives again, nextIndex and prevLogIndex stay sane.
    for _ in range(3):
        a.step(r2)
        a.step(r1)
        for m in a.ready().all_messages():
            assert m.prev_log_index >= 0
        assert a.role.progress[B].next_index >= 1


def test_C06_natural_variant_with_noop() -> None:
    """The same schedule after a real election: H1 = H2 = the first probe, carrying the no-op."""
    board = seeded_board([A, B, C], per_node={A: (1, [(1, 1)], 1), B: (1, [], 0), C: (1, [(1, 1)], 1)})
    fire(board, A)
    board.deliver(take(board, RequestVoteMessage, dst=C))
    board.deliver(take(board, RequestVoteResponse, src=C))
    a = board.nodes[A]
    assert a.is_leader and a.role.progress[B].next_index == 2
    h1 = take(board, AppendEntriesMessage, dst=B)
    heartbeat(board, A)
    h2 = take(board, AppendEntriesMessage, dst=B)
    assert h1 == h2 == ae(A, B, 2, prev=(1, 1), entries=[a.log.entry(2)], commit=1)
    board.deliver(h1)
    r1 = take(board, AppendEntriesResponse, src=B)
    board.deliver(h2)
    r2 = take(board, AppendEntriesResponse, src=B)
    assert r1 == r2 and (r1.success, r1.reject_index, r1.conflict_index) == (False, 1, 1)
    board.deliver(r1)
    ae3 = take(board, AppendEntriesMessage, dst=B)
    assert ae3 == ae(A, B, 2, prev=(0, 0), entries=[a.log.entry(1), a.log.entry(2)], commit=1)
    board.deliver(r2)
    assert not [m for m in board.queue if isinstance(m, AppendEntriesMessage) and m.dst == B]
    assert a.role.progress[B].next_index == 1
    board.deliver(ae3)
    board.deliver(take(board, AppendEntriesResponse, src=B))
    assert (a.role.progress[B].match_index, a.role.progress[B].next_index) == (2, 3)


def test_C06_back_tracking_one_rejection_jumps_to_follower_end() -> None:
    lead_log = [E(i, 1 if i <= 10 else 2) for i in range(1, 1000)]
    board = seeded_board(
        [A, B, C],
        per_node={A: (2, lead_log, 0), B: (2, lead_log[:10], 0), C: (2, lead_log, 0)},
    )
    fire(board, A)
    board.deliver(take(board, RequestVoteMessage, dst=C))
    board.deliver(take(board, RequestVoteResponse, src=C))
    a = board.nodes[A]
    assert a.is_leader and (a.log.last_index, a.log.last_term) == (1000, 3)
    board.deliver(take(board, RequestVoteMessage, dst=B))
    board.deliver(take(board, RequestVoteResponse, src=B))
    board.deliver(take(board, AppendEntriesMessage, dst=B))  # prev (999,2): B ends at 10
    reject = take(board, AppendEntriesResponse, src=B)
    assert (reject.success, reject.reject_index, reject.conflict_term, reject.conflict_index) == (
        False, 999, 0, 11,
    )
    board.deliver(reject)
    assert a.role.progress[B].next_index == 11  # after ONE rejection
    to_b = 1
    rejections = 1
    while board.queue:
        m = board.queue.pop(0)
        if isinstance(m, AppendEntriesMessage) and m.dst == B:
            to_b += 1
        if isinstance(m, AppendEntriesResponse) and m.src == B and not m.success:
            rejections += 1
        board.deliver(m)
    assert rejections == 1
    assert to_b <= 2 + -(-990 // a.config.max_append_entries)  # the probe, then streaming 11..1000
    assert pairs(board.storage[B]) == pairs(a)
    assert a.role.progress[B].match_index == 1000 and a.commit_index == 1000


# ---- C08 -----------------------------------------------------------------------------------


def balance(entries: list[Entry]) -> int:
    x = 0
    for e in entries:
        if e.data.startswith(b"X="):
            x = int(e.data[2:])
        elif e.data.startswith(b"X-="):
            x -= int(e.data[3:])
    return x


def test_C08_deposed_leader_never_serves_a_stale_read() -> None:
    board = seeded_board([A, B, C])
    inv = Invariants()
    fire(board, A)
    deliver_all(board)
    txs(board, A, "X=100")
    deliver_all(board)
    heartbeat(board, A)
    deliver_all(board)
    assert [balance(board.storage[i].applied) for i in (A, B, C)] == [100, 100, 100]
    # 1. Partition {A} | {B, C}.
    cut = between([A], [B, C])
    # 2. B wins term 2; the transfer is committed on B and C.
    fire(board, B)
    deliver_all(board, drop=cut)
    txs(board, B, "X-=50")
    deliver_all(board, drop=cut)
    b = board.nodes[B]
    assert b.is_leader and b.term == 2 and b.commit_index == 4
    assert balance(board.storage[B].applied) == 50  # the client is told success
    # 3. A read at A, which still believes it leads term 1: never released.
    a = board.nodes[A]
    assert a.is_leader and a.term == 1
    a.read_index("r1")
    board.process(A)
    for _ in range(20):
        heartbeat(board, A)
        deliver_all(board, drop=cut)
    assert board.read_states[A] == []
    inv.check(board)
    # Healing: A's heartbeat draws a term-2 answer; A steps down and drops the read.
    heartbeat(board, A)
    beat = take(board, AppendEntriesMessage, src=A, dst=B)
    take_all(board, lambda m: m.src == A)
    board.deliver(beat)
    answer = take(board, AppendEntriesResponse, src=B, dst=A)
    assert (answer.term, answer.success) == (2, False)
    a.step(answer)
    rd = drive(board, A)
    assert rd.dropped_reads == ["r1"] and rd.read_states == []
    assert isinstance(a.role, Follower) and a.term == 2
    # A follower answers no read itself (the server redirects it).
    a.read_index("r2")
    assert drive(board, A).dropped_reads == ["r2"]
    # After healing, any read returns 50.
    deliver_all(board)
    b.read_index("r3")
    board.process(B)
    deliver_all(board)
    ((ctx, index),) = board.read_states[B]
    assert ctx == "r3" and index == 4
    assert balance(board.storage[B].applied[:index]) == 50
    heartbeat(board, B)
    deliver_all(board)
    assert balance(board.storage[A].applied) == 50
    assert board.read_states[A] == []
    inv.check(board)


def test_C08_new_leader_serves_reads_only_after_committing_own_term_entry() -> None:
    # A is down; B has (2,1) (committed by A with A and B), C lags at (1,1).
    board = seeded_board(
        [A, B, C], per_node={A: (1, [(1, 1), (2, 1)], 2), B: (1, [(1, 1), (2, 1)], 1), C: (1, [(1, 1)], 1)}
    )
    board.crash(A)
    fire(board, B)
    board.deliver(take(board, RequestVoteMessage, dst=C))
    board.deliver(take(board, RequestVoteResponse, src=C))
    b = board.nodes[B]
    assert b.is_leader and b.term == 2 and pairs(b) == [(1, 1), (2, 1), (3, 2)]
    board.queue.clear()  # its first appends are lost
    b.read_index("r")
    board.process(B)
    probe = take(board, AppendEntriesMessage, dst=C)
    assert probe.seq == 1 and (probe.prev_log_index, probe.prev_log_term) == (2, 1)
    board.deliver(probe)
    refusal = take(board, AppendEntriesResponse, src=C)
    assert (refusal.success, refusal.seq) == (False, 1)
    board.deliver(refusal)
    # A majority (B, C) acknowledged B's leadership after the read, but B has not committed an
    # entry of term 2 yet: its commit index 1 may be behind the real one (2). No read.
    assert b.role.progress[C].acked_seq == 1 and b.commit_index == 1
    assert board.read_states[B] == []
    board.deliver(take(board, AppendEntriesMessage, dst=C))  # prev (1,1), (2,1),(3,2)
    board.deliver(take(board, AppendEntriesResponse, src=C))
    assert b.commit_index == 3
    assert board.read_states[B] == [("r", 3)]


# ---- C09 -----------------------------------------------------------------------------------


def _tie_run(seed: int, bound: int, first: int = 45) -> tuple[int | None, MemoryBoard]:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    board = seeded_board([A, B, C], term=5, log=[(1, 5)], applied=1, config=cfg, seed=seed)
    # A, leader of term 5, crashes. B and C reset their timers at its last heartbeat and drew
    # the same timeout.
    board.crash(A)
    for i in (B, C):
        st = board.storage[i]
        board.nodes[i] = RaftNode(
            i, board.ids, hard_state=st.hard_state, entries=list(st.entries), applied=len(st.applied),
            config=cfg, rng=FirstDraws(seed * 7 + i, [first]),
        )
    for t in range(1, bound + 1):
        round_(board)
        if stable_leader(board) is not None:
            return t, board
    return None, board


def test_C09_tied_first_timeouts_split_then_fresh_draws_elect() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    assert cfg.election_ticks_max >= 2 * cfg.election_ticks_min  # base .. 2 x base
    t, board = _tie_run(0, 10 * cfg.election_ticks_min)
    assert t is not None
    b, c = board.nodes[B], board.nodes[C]
    # Both fired at tick 45 into term 6, each voting for itself and refusing the other.
    became = {i: [f for name, f in board.events[i] if name == "became_candidate"] for i in (B, C)}
    assert len(became[B]) >= 1 and len(became[C]) >= 1
    for i, other in ((B, C), (C, B)):
        denials = [f for name, f in board.events[i] if name == "vote_denied"]
        assert denials[0] == {"candidate": other, "reason": f"already voted for {i}"}
        assert board.nodes[i].rng.draws[0] == 45
        assert len(board.nodes[i].rng.draws) >= 2  # a fresh draw at the election
    lead = stable_leader(board)
    assert lead in (B, C) and board.nodes[lead].term in (7, 8)
    # Having voted (for itself) in term 6 did not stop the winner from moving to term 7+.
    assert board.nodes[lead].voted_for == lead
    assert {b.term, c.term} == {board.nodes[lead].term}


def test_C09_leader_within_ten_timeouts_in_99_percent_of_seeds() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    bound = 10 * cfg.election_ticks_min
    runs = [_tie_run(seed, bound)[0] for seed in range(200)]
    ok = sum(t is not None for t in runs)
    assert ok >= 198, f"{200 - ok} of 200 runs had no leader within {bound} ticks"


# ---- C10 -----------------------------------------------------------------------------------


def test_C10_rejoining_node_with_inflated_term_minimum_variant() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    log = [E(i, 15, f"e{i}".encode()) for i in range(1, 100)]
    board = seeded_board([A, B, C], term=15, log=log, applied=99, config=cfg, seed=10)
    inv = Invariants()
    fire(board, C)
    deliver_all(board)
    heartbeat(board, C)
    deliver_all(board)
    c = board.nodes[C]
    assert c.is_leader and c.term == 16 and (c.log.last_index, c.log.last_term) == (100, 16)
    # 1. B is isolated; A and C commit (101,16), (102,16); B's timer fires three times.
    cut = involving(B)
    txs(board, C, "T101")
    txs(board, C, "T102")
    deliver_all(board, drop=cut)
    heartbeat(board, C)
    deliver_all(board, drop=cut)
    assert c.commit_index == 102 and board.nodes[A].commit_index == 102
    committed = list(board.storage[C].applied)
    for _ in range(3):
        take_all(board, cut)
        fire(board, B)
    assert board.nodes[B].term == 19
    # 2. Reconnect: B's RV(19, last=(100,16)) deposes C; A and C adopt 19 and refuse.
    rvs = take_all(board, lambda m: isinstance(m, RequestVoteMessage) and m.src == B)
    assert sorted(rvs, key=lambda m: m.dst) == [rv(B, A, 19, last=(100, 16)), rv(B, C, 19, last=(100, 16))]
    board.queue.clear()
    for m in rvs:
        board.deliver(m)
    assert [board.nodes[i].term for i in (A, B, C)] == [19, 19, 19]
    assert board.leaders() == []
    assert vote_denials(board, A)[-1] == vote_denials(board, C)[-1] == "candidate log is behind"
    inv.check(board)
    # Then the cluster runs: A or C wins a later term; B never leads; nothing is lost.
    def elections_so_far() -> int:
        return sum(name == "became_candidate" for i in (A, B, C) for name, _ in board.events[i])

    elections_before = elections_so_far()
    rng = random.Random(10)
    leaderless = 0
    while stable_leader(board) is None:
        round_(board, shuffle=rng)
        leaderless += 1
        assert not board.nodes[B].is_leader
        inv.check(board)
        assert leaderless <= 10 * cfg.election_ticks_max
    elections = elections_so_far() - elections_before
    lead = stable_leader(board)
    assert lead in (A, C) and board.nodes[lead].term >= 20
    assert 1 <= elections <= 6
    for _ in range(3 * cfg.heartbeat_ticks):
        round_(board)
    for i in (A, B, C):
        assert board.storage[i].applied[:102] == committed
        assert board.nodes[i].log.last_index >= 103
    assert B not in inv.leaders.values()
