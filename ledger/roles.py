"""The three Raft roles and the volatile state each one keeps (Figure 2 of the Raft paper)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Follower:
    name = "follower"


@dataclass
class PreCandidate:
    """Asking whether it could win (pre-vote) before it bumps its term and disturbs anyone."""

    name = "pre_candidate"
    granted: set[int] = field(default_factory=set)
    denied: set[int] = field(default_factory=set)


@dataclass
class Candidate:
    name = "candidate"
    granted: set[int] = field(default_factory=set)
    denied: set[int] = field(default_factory=set)


@dataclass
class Progress:
    """What the leader knows of one follower's log.

    ``probing`` means the leader does not know where the logs match: it sends one batch per
    heartbeat and waits for the answer. Once an append succeeds it streams (pipelines) batches
    without waiting, up to ``MAX_INFLIGHT`` entries beyond ``match_index``.
    """

    next_index: int
    match_index: int = 0
    probing: bool = True
    acked_seq: int = 0  # highest heartbeat sequence number the follower echoed this term
    active: bool = False  # heard from since the last check-quorum round


@dataclass
class Leader:
    name = "leader"
    progress: dict[int, Progress] = field(default_factory=dict)
    seq: int = 0  # heartbeat sequence number, for ReadIndex
    # (ctx, seq) waiting for a majority to echo seq
    pending_reads: list[tuple[object, int]] = field(default_factory=list)
    quorum_elapsed: int = 0  # ticks since the last check-quorum round


Role = Follower | PreCandidate | Candidate | Leader
