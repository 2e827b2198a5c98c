"""The original teaching scenarios (seed-scenarios.md), in their correct form.

Nodes are driven message by message: either a bare ``RaftNode`` (``step`` then ``ready``) or a
``MemoryBoard`` (which persists each Ready before queueing its messages, like a real driver).
Node ``0`` is the sender / leader / candidate of the scenarios unless said otherwise.
"""

from __future__ import annotations

import random

import pytest

from ledger.messages import RaftMessage
from ledger.roles import Candidate, Follower
from raft_helpers import (
    A,
    B,
    C,
    FIXED,
    AppendEntriesMessage,
    AppendEntriesResponse,
    E,
    EntryKind,
    HardState,
    MemoryStorage,
    RaftConfig,
    RaftNode,
    Ready,
    RequestVoteMessage,
    RequestVoteResponse,
    ae,
    deliver_all,
    fire,
    log_terms,
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

TIMEOUT = FIXED.election_ticks_min  # every FIXED timer is exactly this many ticks


def tick(node: RaftNode, times: int) -> None:
    for _ in range(times):
        node.tick()


def elect_raw(node: RaftNode) -> Ready:
    """Time ``node`` out, hand it granted votes until it leads, return its first leader Ready."""
    while not isinstance(node.role, Candidate):
        node.tick()
    for p in node.peers:
        if node.is_leader:
            break
        node.step(RequestVoteResponse(src=p, dst=node.id, term=node.term, granted=True))
    assert node.is_leader
    return node.ready()


def fires_after(node: RaftNode, ticks: int) -> bool:
    """Tick ``ticks`` times; True if the node started an election on the last tick only."""
    before = node.term
    tick(node, ticks - 1)
    if node.term != before or of_type(node.ready(), RequestVoteMessage):
        return False
    node.tick()
    return node.term == before + 1 and isinstance(node.role, Candidate)


# ---- Follower ------------------------------------------------------------------------------


def test_F1_heartbeat_adopts_term_records_leader_resets_timer() -> None:
    n = make_node(B, term=0)
    tick(n, TIMEOUT - 1)  # one tick short of an election
    n.step(ae(A, B, 2, prev=(0, 0)))
    rd = n.ready()
    assert rd.hard_state == HardState(2, None)  # adopted term, persisted with the reply
    assert (n.term, n.voted_for, n.leader_id) == (2, None, A)
    assert isinstance(n.role, Follower)
    assert rd.messages == [AppendEntriesResponse(src=B, dst=A, term=2, success=True, match_index=0)]
    # The election timer was reset: a whole timeout is needed again before it campaigns.
    assert fires_after(n, TIMEOUT)
    # So does every later heartbeat of the same leader in the same term.
    n = make_node(B, term=2)
    n.step(ae(A, B, 2))
    n.ready()
    for _ in range(3):
        tick(n, TIMEOUT - 1)
        n.step(ae(A, B, 2))
        assert n.ready().hard_state is None
    assert fires_after(n, TIMEOUT)


def test_F2_lower_term_append_is_rejected_and_changes_nothing() -> None:
    n = make_node(B, term=3, voted_for=C, log=[(1, 1), (2, 3)])
    tick(n, TIMEOUT - 1)
    n.step(ae(A, B, 2, prev=(2, 3), entries=[(3, 2)], commit=2))
    rd = n.ready()
    assert rd.messages == [AppendEntriesResponse(src=B, dst=A, term=3, success=False, reject_index=2)]
    assert rd.hard_state is None and rd.truncate_from is None and rd.entries == []
    assert (n.term, n.voted_for, n.leader_id, n.commit_index) == (3, C, None, 0)
    assert pairs(n) == [(1, 1), (2, 3)]
    # Timer untouched: the very next tick is the election it was already due.
    n.tick()
    assert n.term == 4 and isinstance(n.role, Candidate)


def _node_in_role(role: str) -> RaftNode:
    """A node of term 3 with log [(1,1)] in the given role (it voted for itself unless follower)."""
    n = make_node(A, term=2, log=[(1, 1)])
    if role == "follower":
        n.step(ae(B, A, 3, prev=(1, 1)))
    elif role == "candidate":
        tick(n, TIMEOUT)
    else:
        elect_raw(n)
    n.ready()
    assert n.term == 3 and n.role.name == role
    return n


HIGHER = {
    "append_entries": lambda dst: ae(C, dst, 5, prev=(9, 4)),
    "append_response": lambda dst: AppendEntriesResponse(src=C, dst=dst, term=5, success=False),
    "request_vote": lambda dst: rv(C, dst, 5, last=(0, 0)),  # log behind: the vote is refused
    "vote_response": lambda dst: RequestVoteResponse(src=C, dst=dst, term=5, granted=False),
}


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
@pytest.mark.parametrize("kind", list(HIGHER))
def test_F3_higher_term_in_any_message_makes_follower_durably(role: str, kind: str) -> None:
    n = _node_in_role(role)
    next_index = n.log.last_index + 1
    n.step(HIGHER[kind](A))
    rd = n.ready()
    assert (n.term, n.voted_for) == (5, None)
    assert isinstance(n.role, Follower)
    assert n.leader_id == (C if kind == "append_entries" else None)
    # The new term and the cleared vote are in the same Ready as any reply, so the driver persists
    # them before the reply is sent.
    assert rd.hard_state == HardState(5, None)
    for m in rd.messages:
        assert m.term == 5
    if kind == "append_entries":
        assert only(rd.messages) == AppendEntriesResponse(
            src=A, dst=C, term=5, success=False, reject_index=9, conflict_term=0, conflict_index=next_index
        )
    if kind == "request_vote":
        assert only(rd.messages) == RequestVoteResponse(src=A, dst=C, term=5, granted=False)


def test_F3_higher_term_is_on_disk_before_the_reply_is_queued() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    board.deliver(rv(A, B, 4, last=(0, 0)))  # refused (log behind), but the term is adopted
    assert board.storage[B].hard_state == HardState(4, None)
    assert only(board.queue) == RequestVoteResponse(src=B, dst=A, term=4, granted=False)


def test_F4_mismatched_prev_log_keeps_log_and_hints() -> None:
    n = make_node(B, term=2, log=[(1, 1), (2, 1)])
    n.step(ae(A, B, 3, prev=(2, 2)))
    rd = n.ready()
    assert pairs(n) == [(1, 1), (2, 1)]  # the log is left as it is
    assert rd.truncate_from is None and rd.entries == []
    assert rd.hard_state == HardState(3, None)
    assert only(rd.messages) == AppendEntriesResponse(
        src=B, dst=A, term=3, success=False, reject_index=2, conflict_term=1, conflict_index=1
    )
    # prevLogIndex beyond the end: the hint points just past the follower's last entry.
    n.step(ae(A, B, 3, prev=(5, 3)))
    rd = n.ready()
    assert pairs(n) == [(1, 1), (2, 1)]
    assert only(rd.messages) == AppendEntriesResponse(
        src=B, dst=A, term=3, success=False, reject_index=5, conflict_term=0, conflict_index=3
    )


def test_F5_conflicting_entry_truncates_but_equal_term_never_shortens() -> None:
    start = [(1, 1), (2, 1), (3, 1), (4, 2)]
    n = make_node(B, term=2, log=start)
    st = MemoryStorage(hard_state=HardState(2), entries=[E(i, t) for i, t in start])
    n.step(ae(A, B, 3, prev=(1, 1), entries=[(2, 3)]))
    rd = n.ready()
    st.save(rd)
    assert pairs(n) == [(1, 1), (2, 3)]
    assert (rd.truncate_from, pairs(rd.entries)) == (2, [(2, 3)])
    assert pairs(st) == [(1, 1), (2, 3)]  # what survives a crash agrees
    assert only(rd.messages) == AppendEntriesResponse(src=B, dst=A, term=3, success=True, match_index=2)

    # Same term at the same index: nothing after it is deleted (delayed / duplicated AEs).
    n = make_node(B, term=2, log=start)
    for msg in (
        ae(A, B, 2, prev=(1, 1), entries=[(2, 1)]),
        ae(A, B, 2, prev=(0, 0), entries=[(1, 1)]),
        ae(A, B, 2, prev=(1, 1), entries=[(2, 1), (3, 1)]),
        ae(A, B, 2, prev=(1, 1), entries=[(2, 1)]),
    ):
        n.step(msg)
        rd = n.ready()
        assert pairs(n) == start
        assert rd.truncate_from is None and rd.entries == []
        assert only(rd.messages).success is True
        assert only(rd.messages).match_index == msg.prev_log_index + len(msg.entries)


def test_F6_first_entry_on_empty_log() -> None:
    n = make_node(B, term=0)
    n.step(ae(A, B, 1, prev=(0, 0), entries=[(1, 1)]))
    rd = n.ready()
    assert pairs(n) == [(1, 1)]
    assert (rd.truncate_from, pairs(rd.entries)) == (1, [(1, 1)])
    assert only(rd.messages) == AppendEntriesResponse(src=B, dst=A, term=1, success=True, match_index=1)


def test_F7_vote_is_on_disk_before_the_grant_leaves() -> None:
    n = make_node(B, term=0)
    n.step(rv(A, B, 2, last=(0, 0)))
    rd = n.ready()
    assert rd.hard_state == HardState(2, A)
    assert rd.messages == [RequestVoteResponse(src=B, dst=A, term=2, granted=True)]

    board = seeded_board([A, B, C])
    board.deliver(rv(A, B, 2, last=(0, 0)))
    # The board persists each Ready before queueing its messages: once the grant is on the wire
    # the vote is durable.
    assert only(board.queue) == RequestVoteResponse(src=B, dst=A, term=2, granted=True)
    assert board.storage[B].hard_state == HardState(2, A)


def test_F7_vote_in_the_current_term_is_persisted_too() -> None:
    """The term is already 2 (no vote yet): granting changes only votedFor, which is persisted."""
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    board.deliver(rv(C, B, 2, last=(0, 0)))  # refused (log behind) but term 2 adopted
    take(board, RequestVoteResponse)
    assert board.storage[B].hard_state == HardState(2, None)
    board.nodes[B].step(rv(A, B, 2, last=(1, 1)))
    rd = board.nodes[B].ready()
    assert rd.hard_state == HardState(2, A)
    assert rd.messages == [RequestVoteResponse(src=B, dst=A, term=2, granted=True)]
    board.storage[B].save(rd)
    board.crash(B)
    assert board.restart(B).hard_state == HardState(2, A)


def test_F8_one_vote_per_term_survives_restart() -> None:
    board = seeded_board([A, B, C])
    board.deliver(rv(A, B, 2))
    assert take(board, RequestVoteResponse).granted is True
    board.deliver(rv(C, B, 2))
    assert take(board, RequestVoteResponse) == RequestVoteResponse(src=B, dst=C, term=2, granted=False)
    assert board.nodes[B].hard_state == board.storage[B].hard_state == HardState(2, A)

    board.crash(B)
    node = board.restart(B)
    assert node.hard_state == HardState(2, A)
    board.deliver(rv(C, B, 2))
    assert take(board, RequestVoteResponse) == RequestVoteResponse(src=B, dst=C, term=2, granted=False)
    board.deliver(rv(A, B, 2))  # a retransmitted request from the one we voted for
    assert take(board, RequestVoteResponse) == RequestVoteResponse(src=B, dst=A, term=2, granted=True)
    assert board.storage[B].hard_state == HardState(2, A)


@pytest.mark.parametrize(
    "cand_last, granted",
    [((7, 2), False), ((4, 3), False), ((5, 3), True), ((1, 4), True)],
)
def test_F9_election_restriction(cand_last: tuple[int, int], granted: bool) -> None:
    voter = make_node(B, term=3, log=log_terms([1, 1, 2, 3, 3]))
    assert (voter.log.last_index, voter.log.last_term) == (5, 3)
    voter.step(rv(A, B, 4, last=cand_last))
    rd = voter.ready()
    assert only(rd.messages) == RequestVoteResponse(src=B, dst=A, term=4, granted=granted)
    assert rd.hard_state == HardState(4, A if granted else None)


def test_F10_commit_index_is_min_of_leader_commit_and_proved_match_and_never_lowers() -> None:
    n = make_node(B, term=1)
    applied: list[tuple[int, int]] = []

    def step(msg: AppendEntriesMessage) -> Ready:
        n.step(msg)
        rd = n.ready()
        applied.extend(pairs(rd.committed))
        return rd

    step(ae(A, B, 1, prev=(0, 0), entries=[(1, 1), (2, 1), (3, 1)], commit=2))
    assert n.commit_index == 2 and applied == [(1, 1), (2, 1)]
    # A delayed heartbeat proving only index 1: commit stays 2 (never lowered) ...
    step(ae(A, B, 1, prev=(1, 1), commit=3))
    assert n.commit_index == 2 and applied == [(1, 1), (2, 1)]
    # ... while one proving index 3 lets it reach leaderCommit.
    step(ae(A, B, 1, prev=(3, 1), commit=3))
    assert n.commit_index == 3 and applied == [(1, 1), (2, 1), (3, 1)]
    # A stale, lower leaderCommit changes nothing and applies nothing again.
    rd = step(ae(A, B, 1, prev=(2, 1), commit=1))
    assert n.commit_index == 3 and rd.committed == []
    assert applied == [(1, 1), (2, 1), (3, 1)]  # in order, each once

    # Entries past the proved match are not committed even if leaderCommit covers them:
    # (2,1),(3,1) here are an old leader's uncommitted tail, which the new leader may replace.
    n = make_node(B, term=2, log=[(1, 1), (2, 1), (3, 1)])
    n.step(ae(A, B, 2, prev=(1, 1), commit=3))
    assert n.commit_index == 1
    assert pairs(n.ready().committed) == [(1, 1)]


# ---- Candidate -----------------------------------------------------------------------------


def test_C1_timeout_starts_election() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    board.tick(B, TIMEOUT - 1)
    assert board.queue == [] and isinstance(board.nodes[B].role, Follower)
    board.tick(B)
    n = board.nodes[B]
    assert isinstance(n.role, Candidate) and (n.term, n.voted_for) == (2, B)
    assert board.storage[B].hard_state == HardState(2, B)  # durable before the requests left
    assert sorted(board.queue, key=lambda m: m.dst) == [
        rv(B, A, 2, last=(1, 1)),
        rv(B, C, 2, last=(1, 1)),
    ]


def test_C2_vote_granted_is_counted() -> None:
    ids = [0, 1, 2, 3, 4]
    board = seeded_board(ids, term=1, log=[(1, 1)], applied=1)
    fire(board, 1)
    board.deliver(take(board, RequestVoteMessage, src=1, dst=0))
    reply = take(board, RequestVoteResponse, src=0, dst=1)
    assert reply == RequestVoteResponse(src=0, dst=1, term=2, granted=True)
    assert board.storage[0].hard_state == HardState(2, 1)
    board.deliver(reply)
    cand = board.nodes[1]
    assert isinstance(cand.role, Candidate) and cand.role.granted == {0}  # 2 of 5: not yet


def test_C3_wins_with_majority_sends_appends_and_a_noop() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    fire(board, B)
    board.deliver(take(board, RequestVoteMessage, dst=A))
    board.deliver(take(board, RequestVoteResponse, src=A))
    lead = board.nodes[B]
    assert lead.is_leader and lead.leader_id == B and lead.term == 2
    noop = lead.log.entry(2)
    assert (noop.index, noop.term, noop.kind) == (2, 2, EntryKind.NOOP)
    assert pairs(board.storage[B]) == [(1, 1), (2, 2)]
    sent = of_type(board.queue, AppendEntriesMessage)
    assert sorted(m.dst for m in sent) == [A, C]
    for m in sent:
        assert (m.term, m.prev_log_index, m.prev_log_term, pairs(m.entries)) == (2, 1, 1, [(2, 2)])


def test_C4_split_vote_six_nodes_no_leader_until_timers_fire() -> None:
    ids = list(range(6))
    board = seeded_board(ids, term=1, log=[(1, 1)], applied=1)
    fire(board, 0)
    fire(board, 1)
    # 0 gets 2 and 3, 1 gets 4 and 5 first; every other request is refused.
    for cand, voters in ((0, (2, 3)), (1, (4, 5))):
        for v in voters:
            board.deliver(take(board, RequestVoteMessage, src=cand, dst=v))
    deliver_all(board)
    for cand in (0, 1):
        n = board.nodes[cand]
        assert isinstance(n.role, Candidate) and n.term == 2 and len(n.role.granted) == 2  # 3 of 6
    assert board.leaders() == []
    # They stay candidates until their own timers fire, then run again in term 3.
    board.tick(0, TIMEOUT - 1)
    assert isinstance(board.nodes[0].role, Candidate) and board.nodes[0].term == 2
    board.tick(0)
    assert board.nodes[0].term == 3 and isinstance(board.nodes[0].role, Candidate)
    assert sorted(m.dst for m in board.queue if isinstance(m, RequestVoteMessage) and m.term == 3) == [
        1, 2, 3, 4, 5
    ]


def test_C5_one_wins_of_eight_and_the_other_steps_down() -> None:
    ids = list(range(8))
    board = seeded_board(ids, term=1, log=[(1, 1)], applied=1)
    fire(board, 0)
    fire(board, 1)
    for cand, voters in ((0, (2, 3)), (1, (4, 5, 6, 7))):
        for v in voters:
            board.deliver(take(board, RequestVoteMessage, src=cand, dst=v))
    # Replies to 0 first (3 of 8), then to 1 (5 of 8).
    for m in take_all(board, lambda m: isinstance(m, RequestVoteResponse) and m.dst == 0):
        board.deliver(m)
    assert isinstance(board.nodes[0].role, Candidate)
    for m in take_all(board, lambda m: isinstance(m, RequestVoteResponse) and m.dst == 1):
        board.deliver(m)
    assert board.leaders() == [1] and board.nodes[1].term == 2
    assert isinstance(board.nodes[0].role, Candidate)
    # The leader's AppendEntries reaches the losing candidate: it becomes follower of 1.
    board.deliver(take(board, AppendEntriesMessage, src=1, dst=0))
    n0 = board.nodes[0]
    assert isinstance(n0.role, Follower) and n0.leader_id == 1 and n0.term == 2
    deliver_all(board)
    assert board.leaders() == [1]


def test_C6_retry_after_no_majority_with_term_plus_one() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)  # randomised timeouts in [30, 60]
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1, config=cfg, seed=6)
    fire(board, B)
    assert board.nodes[B].term == 2
    take_all(board, lambda m: True)  # the requests are lost
    ticks = 0
    while board.nodes[B].term == 2:
        board.tick(B)
        ticks += 1
    assert cfg.election_ticks_min <= ticks <= cfg.election_ticks_max
    n = board.nodes[B]
    assert isinstance(n.role, Candidate) and (n.term, n.voted_for) == (3, B)
    assert board.storage[B].hard_state == HardState(3, B)
    assert sorted(board.queue, key=lambda m: m.dst) == [rv(B, A, 3, last=(1, 1)), rv(B, C, 3, last=(1, 1))]


def _livelock_run(seed: int, bound: int) -> tuple[int | None, int]:
    """Five nodes; three time out together and split the vote of term 2.

    Returns (ticks until one leader stands or None, that leader's term)."""
    board = seeded_board(list(range(5)), term=1, log=[(1, 1)], applied=1, config=RaftConfig(pre_vote=False, check_quorum=False), seed=seed)
    for i in (0, 1, 2):
        fire(board, i)  # three simultaneous candidates of term 2
    # Force the split: voter 3 hears candidate 0 first, voter 4 hears candidate 1 first.
    board.deliver(take(board, RequestVoteMessage, src=0, dst=3))
    board.deliver(take(board, RequestVoteMessage, src=1, dst=4))
    deliver_all(board)
    assert board.leaders() == [] and all(board.nodes[i].term == 2 for i in range(5))
    rng = random.Random(seed)
    for t in range(1, bound + 1):
        round_(board, shuffle=rng)
        lead = stable_leader(board)
        if lead is not None:
            return t, board.nodes[lead].term
    return None, 0


def test_C7_livelock_broken_by_randomised_timeouts() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    bound = 4 * cfg.election_ticks_max  # "a few election timeouts"
    results = {seed: _livelock_run(seed, bound) for seed in range(200)}
    assert [s for s, (t, _) in results.items() if t is None] == []
    assert all(term >= 3 for _, term in results.values())  # term 2 was split for good


def test_C8_candidate_steps_down() -> None:
    # AppendEntries of its own term: the term's leader exists, follow it.
    n = make_node(B, term=1, log=[(1, 1)])
    tick(n, TIMEOUT)
    assert isinstance(n.role, Candidate) and n.term == 2
    n.ready()
    n.step(ae(A, B, 2, prev=(1, 1)))
    rd = n.ready()
    assert isinstance(n.role, Follower) and (n.term, n.voted_for, n.leader_id) == (2, B, A)
    assert only(rd.messages) == AppendEntriesResponse(src=B, dst=A, term=2, success=True, match_index=1)

    # Any message of a higher term, here a vote reply.
    n = make_node(B, term=1, log=[(1, 1)])
    tick(n, TIMEOUT)
    n.ready()
    n.step(RequestVoteResponse(src=C, dst=B, term=3, granted=False))
    assert isinstance(n.role, Follower) and (n.term, n.voted_for) == (3, None)
    assert n.ready().hard_state == HardState(3, None)

    # Vote replies from an older term do not count.
    n = make_node(B, term=1, log=[(1, 1)])
    tick(n, TIMEOUT)
    tick(n, TIMEOUT)  # second election: term 3
    n.ready()
    assert n.term == 3
    for src in (A, C):
        n.step(RequestVoteResponse(src=src, dst=B, term=2, granted=True))
    assert isinstance(n.role, Candidate) and n.role.granted == set() and not n.is_leader


# ---- Leader --------------------------------------------------------------------------------


def test_L1_leader_initialises_progress_and_heartbeats_regularly() -> None:
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    assert cfg.heartbeat_ticks * 4 <= cfg.election_ticks_min  # well below the election timeout
    board = seeded_board([A, B, C], term=1, log=[(1, 1), (2, 1)], applied=2, config=cfg, seed=1)
    fire(board, A)
    board.deliver(take(board, RequestVoteMessage, dst=B))
    board.deliver(take(board, RequestVoteResponse, src=B))
    lead = board.nodes[A]
    assert lead.is_leader
    # nextIndex = last index at election + 1 (where the no-op lands), matchIndex = 0.
    assert {p: (pr.next_index, pr.match_index) for p, pr in lead.role.progress.items()} == {
        B: (3, 0),
        C: (3, 0),
    }
    deliver_all(board)
    assert lead.commit_index == 3
    for _ in range(3):
        board.tick(A, cfg.heartbeat_ticks - 1)
        assert board.queue == []
        board.tick(A)
        beats = of_type(board.queue, AppendEntriesMessage)
        assert sorted(m.dst for m in beats) == [B, C]
        for m in beats:
            assert (m.prev_log_index, m.prev_log_term, m.entries, m.leader_commit) == (3, 2, (), 3)
        deliver_all(board)
    assert board.leaders() == [A] and all(board.nodes[i].leader_id == A for i in (B, C))


def test_L2_replicate_commit_apply() -> None:
    board = seeded_board([A, B, C], term=1, log=[(1, 1)], applied=1)
    fire(board, A)
    deliver_all(board)
    board.tick(A, FIXED.heartbeat_ticks)
    deliver_all(board)
    assert [board.nodes[i].commit_index for i in (A, B, C)] == [2, 2, 2]

    entry = board.nodes[A].propose(EntryKind.TXS, b"T1")
    assert (entry.index, entry.term) == (3, 2)
    board.process(A)
    assert pairs(board.storage[A]) == [(1, 1), (2, 2), (3, 2)]  # persisted before it is sent
    sent = of_type(board.queue, AppendEntriesMessage)
    assert sorted(m.dst for m in sent) == [B, C]
    assert all(m.entries == (entry,) and m.prev_log_index == 2 for m in sent)

    to_c = take(board, AppendEntriesMessage, dst=C)  # held back
    board.deliver(take(board, AppendEntriesMessage, dst=B))
    assert board.nodes[A].commit_index == 2  # only the leader has it
    board.deliver(take(board, AppendEntriesResponse, src=B))
    assert board.nodes[A].commit_index == 3  # A and B: a majority
    assert board.storage[A].applied[-1] == entry
    assert len(board.storage[B].applied) == 2 and len(board.storage[C].applied) == 2
    board.deliver(to_c)
    deliver_all(board)
    assert len(board.storage[B].applied) == 2
    # Followers apply it on the next AppendEntries carrying leaderCommit = 3.
    board.tick(A, FIXED.heartbeat_ticks)
    assert all(m.leader_commit == 3 for m in board.queue)
    deliver_all(board)
    for i in (A, B, C):
        assert board.storage[i].applied == board.storage[A].applied
        assert board.storage[i].applied[-1] == entry


# Figure 7 of the Raft paper: the leader of term 8 and followers (a)-(f).
FIG7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIG7_FOLLOWERS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 1, 4],
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 1, 4, 4, 4, 4],
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


def test_L3_leader_repairs_dirty_logs_of_figure_7() -> None:
    names = list(FIG7_FOLLOWERS)
    ids = list(range(7))  # 0 is the leader, 1..6 are (a)..(f)
    per_node = {0: (7, log_terms(FIG7_LEADER), 0)}
    for k, name in enumerate(names, start=1):
        per_node[k] = (7, log_terms(FIG7_FOLLOWERS[name]), 0)
    board = seeded_board(ids, per_node=per_node)
    fire(board, 0)
    sent: dict[int, int] = {k: 0 for k in ids[1:]}
    rejected: dict[int, int] = {k: 0 for k in ids[1:]}
    while board.queue:
        m = board.queue.pop(0)
        if isinstance(m, AppendEntriesMessage):
            sent[m.dst] += 1
        if isinstance(m, AppendEntriesResponse) and not m.success:
            rejected[m.src] += 1
        board.deliver(m)
    lead = board.nodes[0]
    assert lead.is_leader and lead.term == 8
    # It won with (a), (b), (e), (f); (c) and (d) have logs more up to date than the leader's.
    assert pairs(lead) == pairs(log_terms(FIG7_LEADER + [8]))  # plus its no-op (11,8)
    assert lead.log.entry(11).kind == EntryKind.NOOP
    for k in ids[1:]:
        assert pairs(board.nodes[k]) == pairs(lead), names[k - 1]
        assert pairs(board.storage[k]) == pairs(lead), names[k - 1]
    # Round trips: the hint skips a whole term per rejection. (f) needs the most: 3.
    assert max(sent.values()) <= 6
    assert {names[k - 1]: rejected[k] for k in ids[1:]} == {"a": 1, "b": 1, "c": 0, "d": 0, "e": 2, "f": 2}
    assert lead.commit_index == 11
    board.tick(0, FIXED.heartbeat_ticks)
    deliver_all(board)
    for k in ids:
        assert len(board.storage[k].applied) == 11


def test_L4_commit_rule_figure_8() -> None:
    """S1..S5 = 0..4. An entry of an older term is never committed by counting replicas."""
    cfg = RaftConfig(heartbeat_ticks=3, election_ticks_min=10, election_ticks_max=10, max_append_entries=1,
                     pre_vote=False, check_quorum=False)
    s1, s2, s3, s4, s5 = range(5)
    board = seeded_board(range(5), term=1, log=[(1, 1)], applied=1, config=cfg)

    # (a) S1 leads term 2 and replicates (2,2) to S2 only.
    fire(board, s1)
    for v in (s2, s3, s4, s5):
        board.deliver(take(board, RequestVoteMessage, dst=v))
    for v in (s2, s3, s4, s5):
        board.deliver(take(board, RequestVoteResponse, src=v))
    assert board.leaders() == [s1] and pairs(board.nodes[s1]) == [(1, 1), (2, 2)]
    board.deliver(take(board, AppendEntriesMessage, dst=s2))
    board.deliver(take(board, AppendEntriesResponse, src=s2))
    assert board.nodes[s1].commit_index == 1  # 2 of 5

    # (b) S1 crashes; S5 wins term 3 with S3, S4 and appends (2,3), which goes nowhere.
    board.crash(s1)
    board.queue.clear()
    fire(board, s5)
    deliver_all(board, drop=lambda m: isinstance(m, AppendEntriesMessage))
    assert board.leaders() == [s5] and board.nodes[s5].term == 3
    assert board.nodes[s2].voted_for is None  # S2's (2,2) is newer than S5's (1,1)
    assert pairs(board.nodes[s5]) == [(1, 1), (2, 3)]

    # (c) S5 crashes; S1 restarts and wins term 4 (its term-3 attempt is refused by S3, S4).
    board.crash(s5)
    board.restart(s1)
    fire(board, s1)
    deliver_all(board)
    assert board.nodes[s1].term == 3 and not board.nodes[s1].is_leader
    fire(board, s1)
    for m in take_all(board, lambda m: isinstance(m, RequestVoteMessage)):
        board.deliver(m)
    for m in take_all(board, lambda m: isinstance(m, RequestVoteResponse)):
        board.deliver(m)
    lead = board.nodes[s1]
    assert lead.is_leader and lead.term == 4 and pairs(lead) == [(1, 1), (2, 2), (3, 4)]
    # S1 gets (2,2),(3,4) onto S2 and, one entry per message, only (2,2) onto S3; the rest of
    # its term-4 appends are lost.
    board.queue = [m for m in board.queue if isinstance(m, AppendEntriesMessage) and m.dst in (s2, s3)]
    board.deliver(take(board, AppendEntriesMessage, dst=s2))
    board.deliver(take(board, AppendEntriesResponse, src=s2))
    board.deliver(take(board, AppendEntriesMessage, dst=s3))  # prev (2,2): S3 lacks it
    board.deliver(take(board, AppendEntriesResponse, src=s3))
    fix = take(board, AppendEntriesMessage, dst=s3)
    assert (fix.prev_log_index, fix.prev_log_term, pairs(fix.entries)) == (1, 1, [(2, 2)])
    board.deliver(fix)
    board.deliver(take(board, AppendEntriesResponse, src=s3))
    board.queue.clear()
    assert {p: pr.match_index for p, pr in lead.role.progress.items()} == {s2: 3, s3: 2, s4: 0, s5: 0}
    assert [i for i in range(5) if (2, 2) in pairs(board.storage[i])] == [s1, s2, s3]  # a majority
    assert lead.commit_index == 1  # ... but (2,2) is of term 2, not 4: not committed
    assert all(len(board.storage[i].applied) == 1 for i in range(5))

    # (d) S1 crashes; S5 restarts and wins term 5 with S3 and S4 (S2's (3,4) is newer than its
    # (2,3)), then overwrites (2,2) everywhere: legal, since (2,2) was never committed.
    board.crash(s1)
    board.restart(s5)
    for _ in range(2):
        fire(board, s5)
        deliver_all(board)
    assert board.leaders() == [s5] and board.nodes[s5].term == 5
    assert board.nodes[s2].voted_for is None
    board.restart(s1)
    board.tick(s5, cfg.heartbeat_ticks)
    deliver_all(board)
    for i in range(5):
        assert pairs(board.nodes[i]) == [(1, 1), (2, 3), (3, 5)]
        assert pairs(board.storage[i]) == [(1, 1), (2, 3), (3, 5)]
    assert all(board.storage[i].applied == board.storage[s5].applied for i in (s2, s3, s4, s5))
    assert pairs(board.storage[s5].applied) == [(1, 1), (2, 3), (3, 5)]
    assert all((2, 2) not in pairs(board.storage[i].applied) for i in range(5))


def test_L4_commit_rule_figure_8_own_term_entry_commits_older_one() -> None:
    """(e): S1 gets (3,4) of its own term onto a majority: (2,2) commits with it; S5 cannot win."""
    s1, s2, s3, s4, s5 = range(5)
    per_node = {
        s1: (3, [(1, 1), (2, 2)], 1),
        s2: (3, [(1, 1), (2, 2)], 1),
        s3: (3, [(1, 1)], 1),
        s4: (3, [(1, 1)], 1),
        s5: (3, [(1, 1), (2, 3)], 1),
    }
    board = seeded_board(range(5), per_node=per_node)
    board.crash(s5)
    fire(board, s1)
    deliver_all(board, drop=lambda m: s4 in (m.src, m.dst) and isinstance(m, AppendEntriesMessage))
    lead = board.nodes[s1]
    assert lead.is_leader and lead.term == 4
    assert pairs(board.nodes[s3]) == [(1, 1), (2, 2), (3, 4)]
    assert lead.commit_index == 3  # (3,4) on S1, S2, S3 commits (2,2) with it
    assert pairs(board.storage[s1].applied) == [(1, 1), (2, 2), (3, 4)]
    board.crash(s1)
    board.restart(s5)
    for _ in range(3):  # S5 keeps trying; only S4 can grant it
        fire(board, s5)
        deliver_all(board, drop=lambda m: isinstance(m, AppendEntriesMessage))
        assert not board.nodes[s5].is_leader
    assert all(board.nodes[i].voted_for != s5 for i in (s2, s3))
    # A holder of the committed entries wins instead, and S5's (2,3) is what gets replaced.
    fire(board, s2)
    deliver_all(board)
    board.tick(s2, FIXED.heartbeat_ticks)
    deliver_all(board)
    assert board.leaders() == [s2]
    for i in (s2, s3, s4, s5):
        assert pairs(board.storage[i])[:3] == [(1, 1), (2, 2), (3, 4)]
        assert pairs(board.storage[i].applied)[:3] == [(1, 1), (2, 2), (3, 4)]


@pytest.mark.parametrize(
    "msg",
    [
        ae(C, A, 3, prev=(0, 0)),
        AppendEntriesResponse(src=B, dst=A, term=3, success=False, reject_index=2),
        rv(C, A, 3, last=(9, 2)),
        RequestVoteResponse(src=B, dst=A, term=3, granted=False),
    ],
    ids=["append_entries", "append_response", "request_vote", "vote_response"],
)
def test_L5_leader_steps_down_on_higher_term(msg: RaftMessage) -> None:
    n = make_node(A, term=1, log=[(1, 1)])
    elect_raw(n)
    n.read_index("pending-read")
    n.ready()
    assert n.is_leader and n.term == 2
    n.step(msg)
    rd = n.ready()
    assert isinstance(n.role, Follower) and n.term == 3
    assert rd.hard_state == HardState(3, C if isinstance(msg, RequestVoteMessage) else None)
    assert rd.dropped_reads == ["pending-read"]
    assert "became_follower" in [name for name, _ in rd.events]
