"""The Raft core: a pure state machine, no sockets, threads, clock or disk.

Inputs: ``tick()`` (one unit of logical time), ``step(message)``, ``propose(kind, data)`` and
``read_index(ctx)``. Outputs accumulate until the driver calls ``ready()``, which returns a
``Ready``. The driver must handle a Ready in this order, as in etcd-io/raft:

1. persist ``hard_state``, then ``truncate_from`` / ``entries``, and fsync; then call
   ``persisted(ready)``. ``early_messages`` (a leader's appends) may be sent before this step:
   a leader writes its log in parallel with replicating it (dissertation 10.2.1) and counts its
   own copy towards a commit only once ``persisted`` says so;
2. send ``messages`` (they may depend on what was just persisted, e.g. a vote or an append ack);
3. apply ``committed`` entries in order, and answer ``read_states`` once applied. Committed
   entries at or below ``stable_index`` are durable here already and may be applied before
   step 1 (a leader answers its clients without waiting for the fsync of newer entries).

Everything follows Figure 2 of the Raft paper; comments name the sections where it matters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ledger.log import Loader, RaftLog
from ledger.messages import (
    AppendEntriesMessage,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    RaftMessage,
    RequestVoteMessage,
    RequestVoteResponse,
)
from ledger.roles import Candidate, Follower, Leader, PreCandidate, Progress, Role


@dataclass(frozen=True)
class HardState:
    """What Raft must persist before answering: currentTerm and votedFor."""

    term: int = 0
    voted_for: int | None = None


@dataclass(frozen=True)
class RaftConfig:
    heartbeat_ticks: int = 5
    # A fresh timeout is drawn from [min, max] at every reset, so split votes do not repeat.
    election_ticks_min: int = 30
    election_ticks_max: int = 60
    max_append_entries: int = 64
    max_append_bytes: int = 2 * 1024 * 1024
    # Entries sent to a follower beyond what it acknowledged. A full batch is about 100 kB, so
    # this bounds what waits for a slow follower (here and in ZeroMQ's queue) at about 2 MB.
    max_inflight_entries: int = 16
    # Applied entries kept in memory, up to this many bytes of data, for followers that lag a
    # little; older ones are read back through the log's loader (storage), so memory stays flat
    # however long the log grows. (A count of entries did not: full batches are 100 kB each.)
    log_window_bytes: int = 2 * 1024 * 1024
    # Pre-vote (dissertation 9.6): a node asks whether it could win before it bumps its term,
    # so a node coming back from a partition does not depose a healthy leader (raft-cases C10).
    pre_vote: bool = True
    # Check-quorum: a leader that has not heard from a majority for an election timeout steps
    # down, and a node that heard from a leader within that time ignores vote requests.
    check_quorum: bool = True


@dataclass
class Ready:
    hard_state: HardState | None = None
    truncate_from: int | None = None  # delete stored entries with index >= this, then add entries
    entries: list[Entry] = field(default_factory=list)
    early_messages: list[RaftMessage] = field(default_factory=list)  # may go before the fsync
    messages: list[RaftMessage] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    read_states: list[tuple[Any, int]] = field(default_factory=list)  # (ctx, index to wait for)
    dropped_reads: list[Any] = field(default_factory=list)  # reads that lost their leader
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def all_messages(self) -> list[RaftMessage]:
        return self.early_messages + self.messages

    def __bool__(self) -> bool:
        return bool(
            self.hard_state is not None
            or self.entries
            or self.truncate_from is not None
            or self.early_messages
            or self.messages
            or self.committed
            or self.read_states
            or self.dropped_reads
            or self.events
        )


class NotLeader(Exception):
    def __init__(self, leader_id: int | None) -> None:
        super().__init__(f"not the leader (leader is {leader_id})")
        self.leader_id = leader_id


class RaftNode:
    def __init__(
        self,
        node_id: int,
        peers: list[int] | tuple[int, ...] | set[int],
        *,
        hard_state: HardState = HardState(),
        entries: list[Entry] | tuple[Entry, ...] = (),
        applied: int = 0,
        config: RaftConfig = RaftConfig(),
        rng: random.Random | None = None,
        loader: Loader | None = None,
    ) -> None:
        self.id = node_id
        self.peers = tuple(sorted(p for p in peers if p != node_id))
        self.config = config
        self.rng = rng or random.Random()
        self.log = RaftLog(entries, loader)
        self.term = hard_state.term
        self.voted_for = hard_state.voted_for
        if self.log.last_term > self.term:
            raise ValueError(f"log term {self.log.last_term} above persisted term {self.term}")
        if applied > self.log.last_index:
            raise ValueError(f"applied index {applied} beyond log end {self.log.last_index}")
        # Entries up to `applied` were committed before the restart; commit restarts there (C05).
        self.commit_index = applied
        self.applied = applied
        self.role: Role = Follower()
        self.leader_id: int | None = None
        self._elapsed = 0
        self._timeout = 0
        self._reset_election_timer()
        self._persisted_hs = hard_state
        self._persist_from: int | None = None
        self._stable_index = self.log.last_index  # our own log is durable up to here
        self._need_heartbeat = False
        self._ready = Ready()

    # ---- queries -----------------------------------------------------------------------------

    @property
    def quorum(self) -> int:
        return (len(self.peers) + 1) // 2 + 1

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for)

    @property
    def is_leader(self) -> bool:
        return isinstance(self.role, Leader)

    @property
    def stable_index(self) -> int:
        """Our own log is durable up to here (as far as ``persisted`` has been told)."""
        return self._stable_index

    # ---- inputs ------------------------------------------------------------------------------

    def tick(self) -> None:
        self._elapsed += 1
        if isinstance(self.role, Leader):
            self.role.quorum_elapsed += 1
            if self.config.check_quorum and self.role.quorum_elapsed >= self.config.election_ticks_min:
                if not self._check_quorum():
                    return
            if self._elapsed >= self.config.heartbeat_ticks:
                self._elapsed = 0
                self._need_heartbeat = True
        elif self._elapsed >= self._timeout:
            self._event("election_timeout", timeout_ticks=self._timeout)
            if self.config.pre_vote:
                self._pre_campaign()
            else:
                self._campaign()

    def propose(self, kind: EntryKind, data: bytes = b"") -> Entry:
        """Append a new entry to the leader's log; it is sent with the next ``ready()``."""
        if not isinstance(self.role, Leader):
            raise NotLeader(self.leader_id)
        entry = Entry(index=self.log.last_index + 1, term=self.term, kind=kind, data=data)
        self._append(entry)
        if not self.peers:
            self._maybe_commit()
        return entry

    def read_index(self, ctx: Any) -> None:
        """Ask for a linearizable read (ReadIndex, Raft dissertation 6.4).

        The read is released in ``Ready.read_states`` with the index the state machine must have
        applied, once a majority has acknowledged a heartbeat sent after this call and this
        leader has committed an entry of its own term. A node that is not, or stops being,
        leader returns the ctx in ``Ready.dropped_reads``.
        """
        if not isinstance(self.role, Leader):
            self._ready.dropped_reads.append(ctx)
            return
        self.role.seq += 1
        self.role.pending_reads.append((ctx, self.role.seq))
        self._need_heartbeat = True
        self._release_reads()

    def step(self, m: RaftMessage) -> None:
        if m.dst != self.id or m.src not in self.peers:
            self._event("message_ignored", reason="not addressed to a member", src=m.src, dst=m.dst)
            return
        if m.term > self.term:
            if isinstance(m, RequestVoteMessage) and not m.pre_vote and self._in_lease():
                # Check-quorum: while a leader is known to be alive, a vote request does not
                # even move our term (raft-cases C10).
                self._event("vote_denied", candidate=m.src, reason="a leader is active", msg_term=m.term)
                return
            pre = isinstance(m, (RequestVoteMessage, RequestVoteResponse)) and m.pre_vote
            if not pre or (isinstance(m, RequestVoteResponse) and not m.granted):
                # F3: a newer term makes us a follower of that term, durably, before we answer.
                # Pre-votes carry a term the sender does not hold yet, so they change nothing,
                # unless a refusal tells us of a newer term.
                leader = m.src if isinstance(m, AppendEntriesMessage) else None
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            # Stale sender: requests get our term so the sender steps down; stale replies are dropped.
            if isinstance(m, AppendEntriesMessage):
                self._send(self._ae_reject(m, 0, 0))
                self._event("append_rejected", reason="stale term", src=m.src, msg_term=m.term)
            elif isinstance(m, RequestVoteMessage):
                self._send(RequestVoteResponse(src=self.id, dst=m.src, term=self.term, granted=False,
                                               pre_vote=m.pre_vote))
                self._event("vote_denied", candidate=m.src, reason="stale term", msg_term=m.term,
                            pre_vote=m.pre_vote)
            return
        if isinstance(self.role, Leader) and m.src in self.role.progress:
            self.role.progress[m.src].active = True
        if isinstance(m, AppendEntriesMessage):
            self._on_append(m)
        elif isinstance(m, AppendEntriesResponse):
            self._on_append_response(m)
        elif isinstance(m, RequestVoteMessage):
            self._on_request_vote(m)
        elif isinstance(m, RequestVoteResponse):
            self._on_vote_response(m)

    def persisted(self, rd: Ready) -> None:
        """The driver has made ``rd``'s entries durable."""
        if not rd.entries:
            return
        last = rd.entries[-1]
        if (self._persist_from is None or self._persist_from > last.index) and \
                self.log.term_at(last.index) == last.term:
            self._stable_index = max(self._stable_index, last.index)
            if isinstance(self.role, Leader):
                self._maybe_commit()

    def ready(self) -> Ready:
        """Collect everything the driver has to do; see the module docstring for the order."""
        if isinstance(self.role, Leader):
            self._replicate(heartbeat=self._need_heartbeat)
        self._need_heartbeat = False
        rd, self._ready = self._ready, Ready()
        hs = self.hard_state
        if hs != self._persisted_hs:
            rd.hard_state = hs
            self._persisted_hs = hs
        if self._persist_from is not None:
            rd.truncate_from = self._persist_from
            rd.entries = self.log.slice(self._persist_from, self.log.last_index)
            self._persist_from = None
        if self.commit_index > self.applied:
            rd.committed = self.log.slice(self.applied + 1, self.commit_index)
            self.applied = self.commit_index
            self.log.release(min(self.applied, self._stable_index), self.config.log_window_bytes)
        return rd

    # ---- roles -------------------------------------------------------------------------------

    def _become_follower(self, term: int, leader_id: int | None) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = None
        was = self.role.name
        if isinstance(self.role, Leader) and self.role.pending_reads:
            self._ready.dropped_reads.extend(ctx for ctx, _ in self.role.pending_reads)
        self.role = Follower()
        self.leader_id = leader_id
        self._reset_election_timer()
        if was != "follower":
            self._event("became_follower", previous=was, leader=leader_id)

    def _in_lease(self) -> bool:
        """Has this node heard from a live leader within the minimum election timeout?"""
        if not self.config.check_quorum:
            return False
        if isinstance(self.role, Leader):
            return True
        return self.leader_id is not None and self._elapsed < self.config.election_ticks_min

    def _check_quorum(self) -> bool:
        """Leader: step down unless a majority was heard from in the last round."""
        assert isinstance(self.role, Leader)
        self.role.quorum_elapsed = 0
        active = 1 + sum(pr.active for pr in self.role.progress.values())
        for pr in self.role.progress.values():
            pr.active = False
        if active >= self.quorum:
            return True
        self._event("stepped_down", reason="no contact with a majority", heard_from=active)
        self._become_follower(self.term, None)
        return False

    def _pre_campaign(self) -> None:
        self.role = PreCandidate()
        self.leader_id = None
        self._reset_election_timer()
        self._event("became_pre_candidate")
        if not self.peers:
            self._campaign()
            return
        self._request_votes(self.term + 1, pre_vote=True)

    def _campaign(self) -> None:
        self.term += 1
        self.voted_for = self.id
        self.role = Candidate()
        self.leader_id = None
        self._reset_election_timer()
        self._event("became_candidate")
        if not self.peers:
            self._become_leader()
            return
        self._request_votes(self.term, pre_vote=False)

    def _request_votes(self, term: int, pre_vote: bool) -> None:
        for p in self.peers:
            self._send(
                RequestVoteMessage(
                    src=self.id,
                    dst=p,
                    term=term,
                    last_log_index=self.log.last_index,
                    last_log_term=self.log.last_term,
                    pre_vote=pre_vote,
                )
            )

    def _become_leader(self) -> None:
        nxt = self.log.last_index + 1
        self.role = Leader(progress={p: Progress(next_index=nxt) for p in self.peers})
        self.leader_id = self.id
        self._elapsed = 0
        self._event("became_leader")
        # 5.4.2 / 8: commit an entry of our own term at once, so older entries commit with it.
        self._append(Entry(index=nxt, term=self.term, kind=EntryKind.NOOP))
        if not self.peers:
            self._maybe_commit()
        self._need_heartbeat = True

    # ---- handlers ----------------------------------------------------------------------------

    def _on_request_vote(self, m: RequestVoteMessage) -> None:
        if m.pre_vote:
            self._on_pre_vote(m)
            return
        if self.voted_for not in (None, m.src):
            granted, reason = False, f"already voted for {self.voted_for}"
        elif not self.log.is_up_to_date(m.last_log_index, m.last_log_term):
            granted, reason = False, "candidate log is behind"
        else:
            granted, reason = True, ""
            self.voted_for = m.src
            self._reset_election_timer()
        if granted:
            self._event("vote_granted", candidate=m.src)
        else:
            self._event("vote_denied", candidate=m.src, reason=reason)
        self._send(RequestVoteResponse(src=self.id, dst=m.src, term=self.term, granted=granted))

    def _on_pre_vote(self, m: RequestVoteMessage) -> None:
        """Answer a pre-vote as we would a vote in m.term, without changing any state."""
        could = m.term > self.term or self.voted_for == m.src or (self.voted_for is None and self.leader_id is None)
        if self._in_lease():
            granted, reason = False, "a leader is active"
        elif not could:
            granted, reason = False, f"already voted for {self.voted_for}"
        elif not self.log.is_up_to_date(m.last_log_index, m.last_log_term):
            granted, reason = False, "candidate log is behind"
        else:
            granted, reason = True, ""
        if granted:
            self._event("pre_vote_granted", candidate=m.src, for_term=m.term)
        else:
            self._event("pre_vote_denied", candidate=m.src, for_term=m.term, reason=reason)
        self._send(RequestVoteResponse(src=self.id, dst=m.src, term=m.term if granted else self.term,
                                       granted=granted, pre_vote=True))

    def _on_vote_response(self, m: RequestVoteResponse) -> None:
        if m.pre_vote:
            if isinstance(self.role, PreCandidate) and m.term == self.term + 1:
                (self.role.granted if m.granted else self.role.denied).add(m.src)
                if len(self.role.granted) + 1 >= self.quorum:
                    self._campaign()
            return
        if not isinstance(self.role, Candidate):
            return  # C8: late replies after we won or stepped down
        (self.role.granted if m.granted else self.role.denied).add(m.src)
        if len(self.role.granted) + 1 >= self.quorum:
            self._become_leader()

    def _on_append(self, m: AppendEntriesMessage) -> None:
        prev_term = m.prev_log_term
        for k, e in enumerate(m.entries):
            if e.index != m.prev_log_index + 1 + k or not prev_term <= e.term <= m.term:
                # Not what a leader sends (entries follow prev, terms never decrease).
                self._event("message_ignored", reason="malformed entries", src=m.src)
                return
            prev_term = e.term
        if isinstance(self.role, Leader):
            # Two leaders in one term would break election safety; never accept.
            self._event("append_rejected", reason="second leader in term", src=m.src)
            return
        if not isinstance(self.role, Follower) or self.leader_id != m.src:
            self._become_follower(self.term, m.src)  # C8: a candidate yields to the term's leader
        self._reset_election_timer()
        log = self.log
        prev_term = log.term_at(m.prev_log_index)
        if prev_term is None:
            # F4: our log is too short; the leader can skip straight to our end.
            self._event("append_rejected", reason="missing prev entry", prev_index=m.prev_log_index,
                        last_index=log.last_index)
            self._send(self._ae_reject(m, 0, log.last_index + 1))
            return
        if prev_term != m.prev_log_term:
            # F4: the log is left as it is; the hint lets the leader skip the whole term.
            self._event("append_rejected", reason="prev term mismatch", prev_index=m.prev_log_index,
                        have_term=prev_term, want_term=m.prev_log_term)
            self._send(self._ae_reject(m, prev_term, log.first_index_of_term(m.prev_log_index)))
            return
        for i, e in enumerate(m.entries):
            have = log.term_at(e.index)
            if have == e.term:
                continue  # C03 / F5: already held; a delayed append never shortens the log
            if have is not None:
                if e.index <= self.commit_index:
                    # Cannot happen with a correct leader; refuse rather than lose committed data.
                    self._event("append_rejected", reason="would truncate committed entry",
                                index=e.index, commit_index=self.commit_index)
                    return
                log.truncate_from(e.index)
                self._mark_unpersisted(e.index)
            for new in m.entries[i:]:
                self._append(new)
            break
        match = m.prev_log_index + len(m.entries)
        # C05 / F10: commitIndex never moves back, and only covers entries proved to match.
        new_commit = min(m.leader_commit, match)
        if new_commit > self.commit_index:
            self.commit_index = new_commit
            self._event("committed", commit_index=new_commit)
        self._send(
            AppendEntriesResponse(
                src=self.id, dst=m.src, term=self.term, success=True, match_index=match, seq=m.seq
            )
        )

    def _on_append_response(self, m: AppendEntriesResponse) -> None:
        if not isinstance(self.role, Leader):
            return
        pr = self.role.progress[m.src]
        last = self.log.last_index
        if m.match_index > last or m.reject_index > last or m.seq > self.role.seq:
            # No correct follower acknowledges what we never sent; do not let it move commit.
            self._event("message_ignored", reason="acknowledges entries never sent", src=m.src,
                        match_index=m.match_index, last_index=last)
            return
        if m.seq > pr.acked_seq:
            pr.acked_seq = m.seq
        if m.success:
            if m.match_index > pr.match_index:
                pr.match_index = m.match_index
            pr.next_index = max(pr.next_index, pr.match_index + 1)
            pr.probing = False
            self._maybe_commit()
        else:
            # C06: a rejection about an index we already moved past is stale; ignore it. One of
            # the append we would send now (prev = next_index - 1) is current, even at or below
            # match_index: then the follower lost entries it had acknowledged.
            current = m.reject_index == pr.next_index - 1
            if not current and (pr.probing or m.reject_index <= pr.match_index):
                pass
            else:
                if m.conflict_term:
                    held = self.log.last_index_of_term(m.conflict_term)
                    hint = held + 1 if held else m.conflict_index
                else:
                    hint = m.conflict_index
                    if 1 <= hint <= pr.match_index:
                        # Its log is now shorter than what it acknowledged: its disk lost data.
                        # Start over from what it has, or we would probe the same index forever.
                        self._event("follower_lost_entries", follower=m.src, had=pr.match_index, has=hint - 1)
                        pr.match_index = hint - 1
                pr.next_index = max(pr.match_index + 1, min(hint, m.reject_index), 1)
                pr.probing = True
                self._send_append(m.src, pr)
        self._release_reads()

    # ---- leader machinery --------------------------------------------------------------------

    def _replicate(self, heartbeat: bool) -> None:
        assert isinstance(self.role, Leader)
        for p, pr in self.role.progress.items():
            sent = False
            if not pr.probing:
                # Stream: keep batches in flight without waiting for each answer.
                while (
                    pr.next_index <= self.log.last_index
                    and pr.next_index - pr.match_index <= self.config.max_inflight_entries
                ):
                    self._send_append(p, pr)
                    sent = True
            if heartbeat and not sent:
                self._send_append(p, pr)

    def _send_append(self, peer: int, pr: Progress) -> None:
        assert isinstance(self.role, Leader)
        prev = pr.next_index - 1
        entries: list[Entry] = []
        size = 0
        end = min(self.log.last_index, prev + self.config.max_append_entries)
        for e in self.log.slice(pr.next_index, end):
            size += len(e.data) + 64
            if entries and size > self.config.max_append_bytes:
                break
            entries.append(e)
        prev_term = self.log.term_at(prev)
        assert prev_term is not None
        self._send(
            AppendEntriesMessage(
                src=self.id,
                dst=peer,
                term=self.term,
                prev_log_index=prev,
                prev_log_term=prev_term,
                entries=tuple(entries),
                leader_commit=self.commit_index,
                seq=self.role.seq,
            )
        )
        if entries and not pr.probing:
            pr.next_index = entries[-1].index + 1

    def _maybe_commit(self) -> None:
        assert isinstance(self.role, Leader)
        # Our own copy counts only once it is durable (see persisted()).
        matches = sorted([self._stable_index, *(pr.match_index for pr in self.role.progress.values())],
                         reverse=True)
        n = matches[self.quorum - 1]
        # 5.4.2: only an entry of the current term is committed by counting replicas.
        if n > self.commit_index and self.log.term_at(n) == self.term:
            self.commit_index = n
            self._event("committed", commit_index=n)
            self._release_reads()

    def _release_reads(self) -> None:
        role = self.role
        if not isinstance(role, Leader) or not role.pending_reads:
            return
        if self.log.term_at(self.commit_index) != self.term:
            return  # a new leader serves no read before its own-term entry commits (C08)
        acks = sorted([role.seq, *(pr.acked_seq for pr in role.progress.values())], reverse=True)
        confirmed = acks[self.quorum - 1]
        keep = []
        for ctx, seq in role.pending_reads:
            if seq <= confirmed:
                self._ready.read_states.append((ctx, self.commit_index))
            else:
                keep.append((ctx, seq))
        role.pending_reads = keep

    # ---- helpers -----------------------------------------------------------------------------

    def _ae_reject(self, m: AppendEntriesMessage, conflict_term: int, conflict_index: int) -> AppendEntriesResponse:
        return AppendEntriesResponse(
            src=self.id,
            dst=m.src,
            term=self.term,
            success=False,
            reject_index=m.prev_log_index,
            conflict_term=conflict_term,
            conflict_index=conflict_index,
            seq=m.seq,
        )

    def _append(self, entry: Entry) -> None:
        self.log.append(entry)
        self._mark_unpersisted(entry.index)

    def _mark_unpersisted(self, index: int) -> None:
        if self._persist_from is None or index < self._persist_from:
            self._persist_from = index
        self._stable_index = min(self._stable_index, index - 1)

    def _reset_election_timer(self) -> None:
        self._elapsed = 0
        self._timeout = self.rng.randint(self.config.election_ticks_min, self.config.election_ticks_max)

    def _send(self, m: RaftMessage) -> None:
        if isinstance(m, AppendEntriesMessage):
            self._ready.early_messages.append(m)  # a leader's append depends on nothing unsynced
        else:
            self._ready.messages.append(m)

    def _event(self, name: str, **fields: Any) -> None:
        self._ready.events.append((name, fields))
