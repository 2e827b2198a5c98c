"""A ledger node process: drives the Raft core with the clock, ZeroMQ and SQLite.

One thread runs a Poller loop. Each turn: receive frames, feed Raft messages to the core and
answer clients, tick the core when a tick is due, propose the pending transfers as one batch,
then handle the core's Ready: persist (one fsynced transaction), send, apply, answer.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

from ledger.chain import MAX_BLOCKS_PER_REPLY, Block
from ledger.config import ClusterConfig
from ledger.logsetup import setup_node_logging
from ledger.messages import (
    AppendEntriesMessage,
    BalanceReply,
    BalanceRequest,
    ChainReply,
    ChainRequest,
    ClientReply,
    DecodeError,
    EntryKind,
    ErrorReply,
    RaftMessage,
    RedirectReply,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    Transfer,
    decode,
    encode,
)
from ledger.raft import RaftConfig, RaftNode, Ready
from ledger.state import LedgerState, TxResult, encode_batch
from ledger.storage import Storage
from ledger.transport import ZeroMQServer, peer_identity

MAX_BATCH = 2000  # transfers per log entry (one block)
MAX_PENDING = 50_000  # transfers waiting to be proposed; beyond this, clients are told to retry
CLIENT_WAIT_S = 10.0  # how long an answer is owed to a client before the request is dropped
CHAIN_REPLY_BYTES = 4 * 1024 * 1024


@dataclass
class Waiter:
    identity: bytes
    req_id: str
    deadline: float


def raft_config(cfg: ClusterConfig) -> RaftConfig:
    lo, hi = cfg.election_timeout_ms
    return RaftConfig(
        heartbeat_ticks=max(1, cfg.heartbeat_ms // cfg.tick_ms),
        election_ticks_min=max(2, lo // cfg.tick_ms),
        election_ticks_max=max(2, hi // cfg.tick_ms),
    )


class Server:
    def __init__(self, cfg: ClusterConfig, node_id: int, console: bool = True) -> None:
        cfg.require_node(node_id)
        self.cfg = cfg
        self.id = node_id
        self.node: RaftNode | None = None
        self.log = setup_node_logging(cfg.log_file(node_id), node_id, self._log_context, console)
        self.storage = Storage(cfg.node_dir(node_id) / "node.db", cfg.genesis)
        height = self.storage.verify_chain()
        rec = self.storage.load()
        self.node = RaftNode(
            node_id,
            list(cfg.nodes),
            hard_state=rec.hard_state,
            entries=rec.entries,
            applied=rec.applied,
            config=raft_config(cfg),
            rng=random.Random(),
        )
        self.state = LedgerState(self.storage, rec.balances, rec.head, rec.applied)
        self.transport = ZeroMQServer(node_id, cfg.nodes, self.log)
        self.tick_s = cfg.tick_ms / 1000
        self.running = False
        self.pending: list[Transfer] = []
        self.proposed: set[str] = set()  # tx ids in entries this leader proposed, not yet applied
        self.waiters: dict[str, list[Waiter]] = {}
        self.reads: dict[int, tuple[Waiter, str]] = {}
        self.reads_waiting_apply: list[tuple[int, int]] = []  # (ctx, index)
        self.read_ids = itertools.count(1)
        self.was_leader = False
        self.log.info("started", endpoint=cfg.nodes[node_id], chain_height=height,
                      term=rec.hard_state.term, log_length=len(rec.entries), applied=rec.applied)

    def _log_context(self) -> dict[str, Any]:
        if self.node is None:
            return {}
        return {"term": self.node.term, "role": self.node.role.name}

    # ---- main loop -----------------------------------------------------------------------------

    def run(self) -> None:
        self.running = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        next_tick = time.monotonic() + self.tick_s
        try:
            while self.running:
                timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                for frames in self.transport.recv(timeout_ms):
                    self._on_frames(frames)
                now = time.monotonic()
                if now >= next_tick:
                    # Tick once per elapsed interval (bounded), so a stall does not fire a burst.
                    due = min(int((now - next_tick) / self.tick_s) + 1, 5)
                    for _ in range(due):
                        self.node.tick()
                    next_tick = max(next_tick + due * self.tick_s, now)
                    self._expire(now)
                self._propose()
                self._handle_ready()
        finally:
            self.close()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.transport.close()
        self.storage.close()
        self.log.info("stopped")

    # ---- input -----------------------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._bad(identity, f"expected one payload frame, got {len(frames) - 1}")
            return
        try:
            msg = decode(frames[1])
        except DecodeError as exc:
            self._bad(identity, str(exc))
            return
        if isinstance(msg, RaftMessage):
            if identity != peer_identity(msg.src):
                self.log.warning("bad_message_dropped", reason="raft message from a non-member socket",
                                 claimed_src=msg.src)
                return
            self.node.step(msg)
        elif isinstance(msg, SubmitRequest):
            self._on_submit(identity, msg)
        elif isinstance(msg, BalanceRequest):
            self._on_balance(identity, msg)
        elif isinstance(msg, StatusRequest):
            self._reply(identity, self._status(msg.req_id))
        elif isinstance(msg, ChainRequest):
            self._on_chain(identity, msg)
        else:
            self._bad(identity, f"unexpected message type {msg.type}")

    def _bad(self, identity: bytes, reason: str) -> None:
        self.log.warning("bad_message_dropped", reason=reason)
        if not identity.startswith(b"node:"):
            self._reply(identity, ErrorReply(req_id="", error=reason))

    def _on_submit(self, identity: bytes, req: SubmitRequest) -> None:
        t = req.transfer
        done = self.storage.tx_result(t.tx_id)
        if done is not None:
            self._reply(identity, self._submit_reply(req.req_id, t.tx_id, done))
            return
        if not self.node.is_leader:
            self._reply(identity, RedirectReply(req_id=req.req_id, leader_id=self.node.leader_id))
            return
        if t.tx_id not in self.proposed:
            if len(self.pending) >= MAX_PENDING:
                self._reply(identity, ErrorReply(req_id=req.req_id, error="leader overloaded, retry"))
                return
            self.pending.append(t)
            self.proposed.add(t.tx_id)
        self.waiters.setdefault(t.tx_id, []).append(
            Waiter(identity, req.req_id, time.monotonic() + CLIENT_WAIT_S))

    def _on_balance(self, identity: bytes, req: BalanceRequest) -> None:
        if not self.node.is_leader:
            self._reply(identity, RedirectReply(req_id=req.req_id, leader_id=self.node.leader_id))
            return
        ctx = next(self.read_ids)
        self.reads[ctx] = (Waiter(identity, req.req_id, time.monotonic() + CLIENT_WAIT_S), req.account)
        self.node.read_index(ctx)

    def _on_chain(self, identity: bytes, req: ChainRequest) -> None:
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
        self._reply(identity, ChainReply(req_id=req.req_id, blocks=docs, height=head))

    def _status(self, req_id: str) -> StatusReply:
        n = self.node
        return StatusReply(
            req_id=req_id, node_id=self.id, role=n.role.name, term=n.term, leader_id=n.leader_id,
            commit_index=n.commit_index, last_applied=self.state.applied,
            last_log_index=n.log.last_index, chain_height=self.state.head.height,
            head_hash=self.state.head.hash,
        )

    # ---- leader work -----------------------------------------------------------------------------

    def _propose(self) -> None:
        if not self.pending or not self.node.is_leader:
            return
        now_ms = int(time.time() * 1000)  # the leader stamps the block time at proposal
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            self.node.propose(EntryKind.TXS, encode_batch(now_ms, batch))

    # ---- Ready ----------------------------------------------------------------------------------

    def _handle_ready(self) -> None:
        rd = self.node.ready()
        if not rd:
            return
        answers: list[tuple[Block | None, dict[str, TxResult]]] = []
        if rd.hard_state is not None or rd.truncate_from is not None or rd.committed:
            with self.storage.transaction():  # one fsync for all of it, before anything is sent
                if rd.hard_state is not None:
                    self.storage.save_hard_state(rd.hard_state)
                if rd.truncate_from is not None:
                    self.storage.save_entries(rd.truncate_from, rd.entries)
                for entry in rd.committed:
                    answers.append(self.state.apply(entry))
        for m in rd.messages:
            self.transport.send_peer(m.dst, encode(m))
        for name, fields in rd.events:
            self._log_event(name, fields)
        for block, results in answers:
            self._on_applied(block, results)
        self._on_reads(rd)
        self._on_role()

    def _log_event(self, name: str, fields: dict[str, Any]) -> None:
        if name in ("append_rejected", "vote_denied", "message_ignored"):
            self.log.info(name, **fields)
        elif name == "committed":
            self.log.debug(name, **fields)
        else:
            self.log.info(name, **fields)

    def _on_applied(self, block: Block | None, results: dict[str, TxResult]) -> None:
        if block is not None:
            self.log.info("block_appended", height=block.height, hash=block.hash,
                          tx_count=len(block.txs), index=block.index)
            for tx in block.txs:
                if tx["status"] == "rejected":
                    self.log.info("transaction_rejected", tx_id=tx["tx_id"], reason=tx["reason"])
        for tx_id, res in results.items():
            self.proposed.discard(tx_id)
            for w in self.waiters.pop(tx_id, ()):
                self._reply(w.identity, self._submit_reply(w.req_id, tx_id, res))

    def _on_reads(self, rd: Ready) -> None:
        for ctx in rd.dropped_reads:
            entry = self.reads.pop(ctx, None)
            if entry is not None:
                self._reply(entry[0].identity, RedirectReply(req_id=entry[0].req_id, leader_id=self.node.leader_id))
        self.reads_waiting_apply.extend(rd.read_states)
        still: list[tuple[int, int]] = []
        for ctx, index in self.reads_waiting_apply:
            if index > self.state.applied:
                still.append((ctx, index))
                continue
            entry = self.reads.pop(ctx, None)
            if entry is not None:
                w, account = entry
                self._reply(w.identity, BalanceReply(
                    req_id=w.req_id, account=account, balance=self.state.balances.get(account, 0),
                    exists=account in self.state.balances, applied_index=self.state.applied))
        self.reads_waiting_apply = still

    def _on_role(self) -> None:
        leader = self.node.is_leader
        if self.was_leader and not leader:
            # Transfers not yet proposed go back to the client, to be retried at the new leader;
            # proposed ones may still commit, and the retry is de-duplicated by transfer id.
            for t in self.pending:
                for w in self.waiters.pop(t.tx_id, ()):
                    self._reply(w.identity, RedirectReply(req_id=w.req_id, leader_id=self.node.leader_id))
            for waiters in self.waiters.values():
                for w in waiters:
                    self._reply(w.identity, RedirectReply(req_id=w.req_id, leader_id=self.node.leader_id))
            self.waiters.clear()
            self.pending.clear()
            self.proposed.clear()
        self.was_leader = leader

    def _expire(self, now: float) -> None:
        for tx_id in [k for k, ws in self.waiters.items() if all(w.deadline < now for w in ws)]:
            del self.waiters[tx_id]
        for ctx in [c for c, (w, _) in self.reads.items() if w.deadline < now]:
            del self.reads[ctx]

    # ---- replies ----------------------------------------------------------------------------------

    @staticmethod
    def _submit_reply(req_id: str, tx_id: str, r: TxResult) -> SubmitReply:
        return SubmitReply(req_id=req_id, tx_id=tx_id, status=r.status, reason=r.reason,
                           height=r.height, block_hash=r.block_hash)

    def _reply(self, identity: bytes, msg: ClientReply) -> None:
        self.transport.reply(identity, encode(msg))
