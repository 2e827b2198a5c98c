"""Pre-vote and check-quorum (Raft dissertation 9.6), on by default in RaftConfig.

raft-cases C10, target behaviour: a node returning from a partition does not depose a healthy
leader; a leader cut off from the majority steps down on its own.
"""

from __future__ import annotations

import random

from raft_helpers import A, B, C, between, involving, round_, stable_leader

from ledger.memory import MemoryBoard
from ledger.messages import EntryKind, RequestVoteMessage, RequestVoteResponse
from ledger.raft import RaftConfig
from ledger.roles import Follower, PreCandidate

CFG = RaftConfig(heartbeat_ticks=3, election_ticks_min=10, election_ticks_max=20)


def settled_board(seed: int = 1) -> tuple[MemoryBoard, int]:
    board = MemoryBoard([A, B, C], config=CFG, seed=seed)
    for _ in range(200):
        round_(board)
        leader = stable_leader(board)
        if leader is not None:
            return board, leader
    raise AssertionError("no leader")


def elections(board: MemoryBoard) -> int:
    return sum(1 for evs in board.events.values() for name, _ in evs if name == "became_leader")


def test_C10_isolated_node_keeps_its_term_and_does_not_depose_the_leader() -> None:
    board, leader = settled_board()
    lone = next(i for i in (A, B, C) if i != leader)
    term = board.nodes[leader].term
    won = elections(board)
    cut = involving(lone)
    for k in range(2):
        board.nodes[leader].propose(EntryKind.TXS, b"while %d is away" % k)
    for _ in range(3 * CFG.election_ticks_max + 5):  # its timer fires at least three times
        round_(board, drop=cut)
    isolated = board.nodes[lone]
    assert isolated.term == term  # only pre-votes, which never move the term
    assert any(name == "became_pre_candidate" for name, _ in board.events[lone])
    assert not any(name == "became_candidate" for name, _ in board.events[lone])
    # Reconnect: its pre-votes are refused (a leader is active and its log is behind) ...
    for _ in range(3 * CFG.election_ticks_max):
        round_(board)
    assert stable_leader(board) == leader
    assert board.nodes[leader].term == term
    assert elections(board) == won  # no election at all
    # ... and it caught up from the leader.
    assert board.nodes[lone].log.last_index == board.nodes[leader].log.last_index
    assert board.nodes[lone].commit_index == board.nodes[leader].commit_index


def test_pre_candidate_whose_requests_are_lost_retries_without_bumping_its_term() -> None:
    board, leader = settled_board(seed=3)
    node = next(i for i in (A, B, C) if i != leader)
    term = board.nodes[node].term
    board.crash(leader)
    for _ in range(2 * CFG.election_ticks_max + 2):
        round_(board, drop=lambda m: isinstance(m, RequestVoteMessage))
    n = board.nodes[node]
    assert isinstance(n.role, (PreCandidate, Follower))
    assert n.term == term
    starts = [name for name, _ in board.events[node] if name == "became_pre_candidate"]
    assert len(starts) >= 2


def test_pre_vote_then_vote_elects_a_new_leader_after_a_crash() -> None:
    board, leader = settled_board(seed=5)
    term = board.nodes[leader].term
    board.crash(leader)
    for _ in range(10 * CFG.election_ticks_max):
        round_(board)
        if stable_leader(board) is not None:
            break
    new = stable_leader(board)
    assert new is not None and new != leader
    assert board.nodes[new].term == term + 1  # the pre-vote round did not spend a term


def test_check_quorum_leader_cut_off_from_the_majority_steps_down() -> None:
    board, leader = settled_board(seed=7)
    others = [i for i in (A, B, C) if i != leader]
    board.nodes[leader].read_index("r1")
    # Quorum is checked every election_ticks_min ticks; the round under way may still count
    # answers from before the cut, so the step-down comes within two rounds.
    for _ in range(2 * CFG.election_ticks_min + 1):
        round_(board, drop=between([leader], others))
    old = board.nodes[leader]
    assert not old.is_leader and old.leader_id is None
    assert any(name == "stepped_down" for name, _ in board.events[leader])
    # Its read never got a quorum and was not answered.
    assert board.read_states[leader] == []


def test_vote_request_ignored_while_a_leader_is_active() -> None:
    board, leader = settled_board(seed=9)
    follower = next(i for i in (A, B, C) if i != leader)
    other = next(i for i in (A, B, C) if i not in (leader, follower))
    f = board.nodes[follower]
    term = f.term
    req = RequestVoteMessage(src=other, dst=follower, term=term + 5, last_log_index=f.log.last_index + 10,
                             last_log_term=term)
    f.step(req)
    board.process(follower)
    assert f.term == term and f.voted_for != other
    assert not any(isinstance(m, RequestVoteResponse) and m.dst == other for m in board.queue)
    assert ("vote_denied", {"candidate": other, "reason": "a leader is active", "msg_term": term + 5}) in \
        board.events[follower]


def test_pre_vote_elects_one_leader_within_a_few_timeouts_over_many_seeds() -> None:
    worst = 0
    for seed in range(200):
        board = MemoryBoard([0, 1, 2, 3, 4], config=CFG, seed=seed)
        shuffle = random.Random(seed)
        for t in range(1, 8 * CFG.election_ticks_max):
            round_(board, shuffle=shuffle)
            if stable_leader(board) is not None:
                worst = max(worst, t)
                break
        else:
            raise AssertionError(f"seed {seed}: no leader within 8 election timeouts")
    assert worst <= 6 * CFG.election_ticks_max
