"""A ledger node without I/O: the Raft core plus storage, ledger state and client bookkeeping.

``LedgerNode`` is what both the real server (``server.py``: ZeroMQ, wall clock) and the
deterministic simulator drive. Inputs: Raft messages, client requests, ticks, and the current
time passed in. ``flush()`` proposes the pending transfers and handles the core's Ready in the
order Raft needs: a leader's appends out; hard state and new entries persisted with one fsync
(with ``leader_syncs_later``, a leader's new entries are written and synced on the storage's
thread, and count for it once that sync is done); votes and acknowledgements out; committed
entries applied; clients answered. A leader applies
and answers what was committed before that fsync: those entries are on its disk already. Peer
messages go out through ``send_now`` as soon as they may, and client replies through
``reply_now``, all of them within ``flush()``; without them they are returned in the Outbox.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ledger.chain import MAX_BLOCKS_PER_REPLY
from ledger.messages import (
    PROTOCOL_VERSION,
    BalanceReply,
    BalanceRequest,
    ChainReply,
    ChainRequest,
    ClientReply,
    ClientRequest,
    Entry,
    EntryKind,
    ErrorReply,
    RaftMessage,
    RedirectReply,
    StatusReply,
    StatusRequest,
    SubmitBatchRequest,
    SubmitReply,
    SubmitRequest,
    SubmitResults,
    TransferRow,
    transfer_key,
    trusted,
)
from ledger.raft import RaftConfig, RaftNode, Ready
from ledger.state import Applied, LedgerState, Row, TxResult, encode_batch
from ledger.storage import Storage

MAX_BATCH = 2000  # transfers per log entry (one block)
# A leader waits for the batch interval only while the batches it proposes are at least this
# big: then transfers keep coming and a wait fills the next batch. Smaller batches (a few
# clients, each waiting for its answer before it sends again) go at once, as waiting would
# only slow them. An entry costs the cluster about as much CPU as 35-45 transfers do.
LINGER_MIN_BATCH = 64
MAX_PENDING = 50_000  # transfers waiting to be proposed; beyond this, clients are told to retry
CLIENT_WAIT_S = 10.0  # how long an answer is owed to a client before the request is dropped
EXPIRY_SCAN_S = 0.5  # how often requests past that are looked for
CHAIN_REPLY_BYTES = 4 * 1024 * 1024

ClientId = Hashable
ResultRow = tuple[str, str, str | None, str]  # a SubmitResults row: tx_id, status, reason, transfer


@dataclass
class Waiter:
    client: ClientId
    req_id: str
    deadline: float
    batch: bool = False  # answered with SubmitResults, block by block


@dataclass
class Outbox:
    peers: list[RaftMessage] = field(default_factory=list)
    clients: list[tuple[ClientId, ClientReply]] = field(default_factory=list)


class LedgerNode:
    def __init__(self, node_id: int, members: list[int], storage: Storage, raft_config: RaftConfig,
                 rng: random.Random, log: Any,
                 send_now: Callable[[list[RaftMessage]], None] | None = None,
                 reply_now: Callable[[list[tuple[ClientId, ClientReply]]], None] | None = None,
                 batch_interval_ms: int = 0, leader_syncs_later: bool = False) -> None:
        self.id = node_id
        # Sends peer messages in the middle of flush(): a leader's appends before its own fsync,
        # acknowledgements right after it, before the entries are applied. Without it they wait
        # in the Outbox until flush() returns.
        self.send_now = send_now
        # Sends client replies from within flush(): a leader's answers before the fsync of the
        # entries it proposed in the same turn, every other reply (those queued since the last
        # flush too) before the id index's write at its end, so Outbox.clients stays empty.
        # Without it they wait in the Outbox.
        self.reply_now = reply_now
        # Under load a leader proposes at most one batch (log entry, block) per interval, unless
        # a full batch is waiting: every entry costs every node the same fixed work (a durable
        # commit, a block, messages) whatever it holds, so proposing at every turn spent the
        # machine on entries of a few dozen transfers (see LINGER_MIN_BATCH).
        self.batch_interval_ms = batch_interval_ms
        # A leader writes its new entries without waiting for their sync, which the storage
        # does on a thread (Storage.request_sync): its loop takes acknowledgements and answers
        # clients meanwhile, and it counts its own copy towards a commit once the sync is done
        # (the followers' copies may make the majority first). Its messages never depend on its
        # own log being durable (dissertation 10.2.1); a Ready with a new term or vote, or any
        # Ready of a follower or candidate, is still fsynced before its messages go out.
        self.leader_syncs_later = leader_syncs_later
        self.unsynced: list[tuple[int, Ready]] = []  # (sync ticket, Ready written without sync)
        self._last_proposal_ms: int | None = None
        self._last_batch = 0  # transfers in the last proposal
        self.storage = storage
        self.log = log
        rec = storage.load()
        self.raft = RaftNode(node_id, members, hard_state=rec.hard_state, entries=rec.entries,
                             applied=rec.applied, config=raft_config, rng=rng, loader=storage.entries)
        self.state = LedgerState(storage, rec.balances, rec.head, rec.applied)
        self.out = Outbox()
        self.pending: list[TransferRow] = []
        self.proposed: set[str] = set()  # tx ids this leader proposed that are not yet applied
        # The batches this leader proposed, by log index, as it validated them: applied from
        # here, not decoded from the entry again (what decoding gives, as the followers do;
        # tests/test_state.py checks that). Dropped when applied, or at a step-down.
        self.own_batches: dict[int, tuple[bytes, tuple[int, list[TransferRow]]]] = {}
        # Who waits for each tx id, with the row each sent: two senders of one id may have sent
        # different transfers, and only one of them can be what the id is applied with.
        self.waiters: dict[str, list[tuple[Waiter, TransferRow]]] = {}
        self.next_expiry = 0.0
        self.reads: dict[int, tuple[Waiter, str]] = {}
        self.reads_waiting_apply: list[tuple[int, int]] = []  # (ctx, index)
        self.read_ids = itertools.count(1)
        self.was_leader = False

    # ---- inputs ----------------------------------------------------------------------------------

    def on_raft(self, msg: RaftMessage) -> None:
        self.raft.step(msg)

    def tick(self, now: float) -> None:
        self.raft.tick()
        self._expire(now)

    def on_client(self, client: ClientId, req: ClientRequest, now: float) -> None:
        if isinstance(req, SubmitBatchRequest):
            self._on_submit(client, req.req_id, req.transfers, now, batch=True)
        elif isinstance(req, SubmitRequest):
            self._on_submit(client, req.req_id, [req.transfer.row()], now, batch=False)
        elif isinstance(req, BalanceRequest):
            self._on_balance(client, req, now)
        elif isinstance(req, StatusRequest):
            self._reply(client, self.status(req.req_id))
        elif isinstance(req, ChainRequest):
            self._on_chain(client, req)
        else:
            self._reply(client, ErrorReply(req_id=req.req_id, error=f"unexpected request {req!r}"))

    def proposal_due_ms(self) -> int | None:
        """The wall time (ms) at which waiting transfers are due to be proposed, if some wait for
        the batch interval: the driver's next ``flush()`` should not come much later."""
        if not self.pending or not self.raft.is_leader or not self._lingering():
            return None
        assert self._last_proposal_ms is not None
        return self._last_proposal_ms + self.batch_interval_ms

    def _lingering(self) -> bool:
        """Whether pending transfers wait for the batch interval (under load, no full batch)."""
        return (self._last_proposal_ms is not None and self.batch_interval_ms > 0
                and self._last_batch >= LINGER_MIN_BATCH and len(self.pending) < MAX_BATCH)

    def _batch_due(self, wall_ms: int) -> bool:
        if not self._lingering():
            return True
        assert self._last_proposal_ms is not None
        # A wall clock that stepped back counts as the interval having passed: never wait on it.
        return not 0 <= wall_ms - self._last_proposal_ms < self.batch_interval_ms

    def flush(self, wall_ms: int) -> Outbox:
        """Propose pending transfers (stamped ``wall_ms``) if they are due, handle the Ready,
        return what to send."""
        if self.pending and self.raft.is_leader and self._batch_due(wall_ms):
            self._last_proposal_ms, self._last_batch = wall_ms, len(self.pending)
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                entry = self.raft.propose(EntryKind.TXS, encode_batch(wall_ms, batch))
                self.own_batches[entry.index] = (entry.data, (wall_ms, batch))
        done = self.storage.synced
        while self.unsynced and self.unsynced[0][0] <= done:
            self.raft.persisted(self.unsynced.pop(0)[1])  # may commit: the Ready below applies it
        rd = self.raft.ready()
        if rd:
            self._handle_ready(rd)
        # The id index's batched write (3-16 ms of wall time every few thousand ids, in a busy
        # cluster) comes after this turn's answers are out, not inside the apply their
        # transfers waited for.
        self._replies_out()
        self.storage.write_index_if_due()
        out, self.out = self.out, Outbox()
        return out

    # ---- client requests -----------------------------------------------------------------------

    def _on_submit(self, client: ClientId, req_id: str, rows: list[TransferRow], now: float, batch: bool) -> None:
        # No lookup of the ids here: a retry of an applied transfer goes through the log once
        # more and is answered with its first result when applied (state.LedgerState.apply).
        if not self.raft.is_leader:
            self._reply(client, RedirectReply(req_id=req_id, leader_id=self.raft.leader_id))
            return
        if len(self.pending) + len(rows) > MAX_PENDING:
            self._reply(client, ErrorReply(req_id=req_id, error="leader overloaded, retry"))
            return
        waiter = Waiter(client, req_id, now + CLIENT_WAIT_S, batch)  # one for all the rows: they share it
        proposed, waiters = self.proposed, self.waiters
        for row in rows:
            tx_id = row[0]
            if tx_id not in proposed:
                self.pending.append(row)
                proposed.add(tx_id)
            ws = waiters.get(tx_id)
            if ws is None:
                waiters[tx_id] = [(waiter, row)]
            else:
                ws.append((waiter, row))

    def _on_balance(self, client: ClientId, req: BalanceRequest, now: float) -> None:
        if not self.raft.is_leader:
            self._reply(client, RedirectReply(req_id=req.req_id, leader_id=self.raft.leader_id))
            return
        ctx = next(self.read_ids)
        self.reads[ctx] = (Waiter(client, req.req_id, now + CLIENT_WAIT_S), req.account)
        self.raft.read_index(ctx)

    def _on_chain(self, client: ClientId, req: ChainRequest) -> None:
        head = self.state.head.height
        end = head if req.end is None else min(req.end, head)
        end = min(end, req.start + MAX_BLOCKS_PER_REPLY - 1)
        docs: list[dict] = []
        size = 0
        for block in self.storage.blocks(req.start, end):
            size += sum(len(tx) * 24 for tx in block.txs) + 512  # rough bound of the encoded size
            if docs and size > CHAIN_REPLY_BYTES:
                break
            docs.append(block.to_doc())
        self._reply(client, ChainReply(req_id=req.req_id, blocks=docs, height=head))

    def status(self, req_id: str = "") -> StatusReply:
        n = self.raft
        return StatusReply(
            req_id=req_id, node_id=self.id, role=n.role.name, term=n.term, leader_id=n.leader_id,
            commit_index=n.commit_index, last_applied=self.state.applied,
            last_log_index=n.log.last_index, chain_height=self.state.head.height,
            head_hash=self.state.head.hash,
        )

    # ---- Ready -----------------------------------------------------------------------------------

    def _handle_ready(self, rd: Ready) -> None:
        if self.unsynced and not self.raft.is_leader:
            # No longer leading: whatever it says from now on may vouch for any entry in its log
            # (an acknowledgement, a vote), so its own unsynced writes become durable first.
            self.storage.wait_synced(self.unsynced[-1][0])
            for _, written in self.unsynced:
                self.raft.persisted(written)
            self.unsynced.clear()
        self._send(rd.early_messages)  # a leader's appends depend on nothing unsynced
        committed = rd.committed
        if committed and self.raft.is_leader and committed[-1].index <= self.raft.stable_index:
            # Durable here already: a leader applies them and answers their clients first, so
            # they need not wait for the fsync of the entries it has just proposed.
            self._apply(committed)
            self._replies_out()
            committed = []
        if rd.hard_state is None and rd.truncate_from is not None and self.leader_syncs_later \
                and self.raft.is_leader:
            with self.storage.transaction(durable=False):
                self.storage.save_entries(rd.truncate_from, rd.entries)
            ticket = self.storage.request_sync()
            if ticket is None:  # a storage with nothing to sync (in memory)
                self.raft.persisted(rd)
            else:
                self.unsynced.append((ticket, rd))
        elif rd.hard_state is not None or rd.truncate_from is not None:
            with self.storage.transaction():  # one fsync, before anything that depends on it is sent
                if rd.hard_state is not None:
                    self.storage.save_hard_state(rd.hard_state)
                if rd.truncate_from is not None:
                    self.storage.save_entries(rd.truncate_from, rd.entries)
            self.raft.persisted(rd)
        # Votes and acknowledgements go before applying: a follower busy applying a big block
        # must not hold up the leader's next commit.
        self._send(rd.messages)
        if committed:
            self._apply(committed)
        for name, fields in rd.events:
            (self.log.debug if name == "committed" else self.log.info)(name, **fields)
        self._on_reads(rd)
        self._on_role()

    def _apply(self, entries: list[Entry]) -> None:
        # Not fsynced on its own: the entries are durable already, and what a power loss
        # takes from the applied state is applied again from them (the applied index moves
        # with it). The next fsync of the log covers it as well (one write-ahead log).
        with self.storage.transaction(durable=False):
            applied = [self.state.apply(entry, self._own_rows(entry)) for entry in entries]
        for a in applied:
            self._on_applied(a)

    def _own_rows(self, entry: Entry) -> tuple[int, list[TransferRow]] | None:
        """The timestamp and rows of ``entry`` as this leader proposed them, if it still leads
        and it is that very entry (the same bytes): a leader that has just learnt of a new term
        may, in the same turn, apply entries of the new leader that replaced its own (test_node:
        a stalled leader)."""
        own = self.own_batches.pop(entry.index, None)
        if own is None or not self.raft.is_leader or own[0] is not entry.data:
            return None
        return own[1]

    def _replies_out(self) -> None:
        """Send the replies gathered so far through ``reply_now``, if the driver gave one."""
        if self.reply_now is not None and self.out.clients:
            self.reply_now(self.out.clients)
            self.out.clients = []

    def _send(self, msgs: list[RaftMessage]) -> None:
        if self.send_now is not None:
            self.send_now(msgs)
        else:
            self.out.peers.extend(msgs)

    def _on_applied(self, a: Applied) -> None:
        block = a.block
        if block is not None:
            self.log.info("block_appended", height=block.height, hash=block.hash,
                          tx_count=len(block.txs), index=block.index)
            for row, reason in a.outcomes:
                if reason is not None:
                    self.log.info("transaction_rejected", tx_id=row[0], reason=reason)
        if not self.waiters and not self.proposed:
            return  # a follower: nobody to answer
        batches: dict[tuple[ClientId, str, int, str], list[ResultRow]] = {}
        for tx_id, res in a.earlier.items():
            self._answer(tx_id, (tx_id, res.status, res.reason, res.transfer), res.height, res.block_hash, batches)
        if block is not None:
            waiters, proposed = self.waiters, self.proposed
            for row, reason in a.outcomes:
                tx_id = row[0]
                if tx_id in waiters:
                    self._answer(tx_id, (tx_id, "committed" if reason is None else "rejected", reason,
                                         transfer_key(row[1], row[2], row[3])), block.height, block.hash, batches,
                                 row)
                else:
                    proposed.discard(tx_id)
        for (client, req_id, height, block_hash), results in batches.items():
            self._reply(client, trusted(SubmitResults, {
                "v": PROTOCOL_VERSION, "type": "submit_results", "req_id": req_id, "height": height,
                "block_hash": block_hash, "results": results}))

    def _answer(self, tx_id: str, result: ResultRow, height: int, block_hash: str,
                batches: dict[tuple[ClientId, str, int, str], list[ResultRow]], row: Row | None = None) -> None:
        """Answer everyone waiting for ``tx_id`` with ``result``, the id's result in the block at
        ``height`` (applied now, from ``row``, or before), or, to whoever sent the id with another
        transfer than it was applied with, a refusal naming that one. Rows for batch waiters are
        gathered in ``batches``; this runs for every transfer a leader answers."""
        self.proposed.discard(tx_id)
        applied = result[3]
        for w, sent in self.waiters.pop(tx_id, ()):
            answer = result
            # ``sent is row``: the row this leader proposed for this sender (own_batches), applied as is.
            if sent is not row and transfer_key(sent[1], sent[2], sent[3]) != applied:
                answer = (tx_id, "rejected", _reused(tx_id, applied), applied)
            if w.batch:
                key = (w.client, w.req_id, height, block_hash)
                if (rows := batches.get(key)) is None:
                    batches[key] = [answer]
                else:
                    rows.append(answer)
            else:
                self._reply(w.client, _submit_reply(w.req_id, tx_id, TxResult(answer[1], answer[2], height,
                                                                               block_hash, applied)))

    def _on_reads(self, rd: Ready) -> None:
        for ctx in rd.dropped_reads:
            entry = self.reads.pop(ctx, None)
            if entry is not None:
                self._reply(entry[0].client, RedirectReply(req_id=entry[0].req_id, leader_id=self.raft.leader_id))
        self.reads_waiting_apply.extend(rd.read_states)
        still: list[tuple[int, int]] = []
        for ctx, index in self.reads_waiting_apply:
            if index > self.state.applied:
                still.append((ctx, index))
                continue
            entry = self.reads.pop(ctx, None)
            if entry is not None:
                w, account = entry
                self._reply(w.client, BalanceReply(
                    req_id=w.req_id, account=account, balance=self.state.balances.get(account, 0),
                    exists=account in self.state.balances, applied_index=self.state.applied))
        self.reads_waiting_apply = still

    def _on_role(self) -> None:
        leader = self.raft.is_leader
        if self.was_leader and not leader:
            # Every open request goes back to its client, to be retried at the new leader, once
            # (a batch's rows share one Waiter). Proposed transfers may still commit; the retry
            # is de-duplicated by transfer id.
            for w in {id(w): w for ws in self.waiters.values() for w, _ in ws}.values():
                self._reply(w.client, RedirectReply(req_id=w.req_id, leader_id=self.raft.leader_id))
            self.waiters.clear()
            self.pending.clear()
            self.proposed.clear()
            self.own_batches.clear()
        self.was_leader = leader

    def _expire(self, now: float) -> None:
        if now < self.next_expiry:
            return  # a scan of every waiter at every tick was 4% of a busy leader's time
        self.next_expiry = now + EXPIRY_SCAN_S
        for tx_id in [k for k, ws in self.waiters.items() if all(w.deadline < now for w, _ in ws)]:
            del self.waiters[tx_id]
        for ctx in [c for c, (w, _) in self.reads.items() if w.deadline < now]:
            del self.reads[ctx]

    def _reply(self, client: ClientId, msg: ClientReply) -> None:
        self.out.clients.append((client, msg))


def _reused(tx_id: str, applied: str) -> str:
    """The reason a transfer is refused whose id was applied with another transfer."""
    return f"transfer id {tx_id} was already used for {applied}"


def _submit_reply(req_id: str, tx_id: str, r: TxResult) -> SubmitReply:
    # Built from our own stored result: no validation needed on this hot path.
    return trusted(SubmitReply, {"v": PROTOCOL_VERSION, "type": "submit_reply", "req_id": req_id, "tx_id": tx_id,
                                 "status": r.status, "reason": r.reason, "height": r.height,
                                 "block_hash": r.block_hash, "transfer": r.transfer})
