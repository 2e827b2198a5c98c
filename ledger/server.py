"""A ledger node process: drives a ``LedgerNode`` with the wall clock, ZeroMQ and SQLite.

One thread runs a Poller loop. Each turn: receive frames, feed Raft messages and client requests
to the node, tick it when a tick is due, then ``flush()`` it (propose, persist with one fsync,
send to peers, apply) and answer the clients.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import random
import signal
import time
from typing import Any, NamedTuple

import zmq

from ledger.config import ClusterConfig
from ledger.logsetup import setup_node_logging
from ledger.messages import (
    ClientReply,
    ClientRequest,
    DecodeError,
    ErrorReply,
    RaftMessage,
    SubmitBatchRequest,
    SubmitResults,
    decode,
    encode,
    encode_batch_reply,
    one_line,
)
from ledger.node import LedgerNode
from ledger.raft import RaftConfig
from ledger.storage import Storage, StorageError
from ledger.transport import ZeroMQServer, peer_identity

BAD_LINES_PER_S = 20  # bad_message_dropped lines a second at most (see Server._warn_bad)
MAX_TICKS_PER_TURN = 5  # after a stall, catch up a few ticks, not a burst that fires elections
# How often freed heap memory goes back to the OS (see _heap_trimmer).
TRIM_INTERVAL_S = 5.0
# Answers packed into one BatchReply frame, counting a SubmitResults row as one: about 1.5 MB,
# well below the frame limit.
ROWS_PER_FRAME = 20_000


def _heap_trimmer() -> Any:
    """glibc's malloc_trim, or None elsewhere.

    glibc keeps memory freed by RocksDB's compaction threads in their arenas: without a trim a
    node's RSS grew by about 12 MB per million transfers (to 92 MB at two million), with one
    every few seconds it stays flat. A trim takes about a millisecond.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class Batched(NamedTuple):
    """The client id of a SubmitBatchRequest's sender: its answers go back in BatchReply frames."""

    identity: bytes


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
        self.id = node_id
        self.node: LedgerNode | None = None
        self.log = setup_node_logging(cfg.log_file(node_id), node_id, self._log_context, console, cfg.log_level)
        # Bind first: a node that cannot (its address is taken, perhaps by itself already
        # running) leaves no data directory behind.
        self.transport = ZeroMQServer(node_id, cfg.nodes, self.log)
        self.storage = Storage(cfg.node_dir(node_id) / "node.db", cfg.genesis)
        height = self.storage.verify_chain()
        self.node = LedgerNode(node_id, list(cfg.nodes), self.storage, raft_config(cfg),
                               random.Random(), self.log, send_now=self._send_peers,
                               reply_now=self._send_replies,  # type: ignore[arg-type]
                               batch_interval_ms=cfg.batch_interval_ms, leader_syncs_later=True)
        if self.storage.sync_signal is not None:  # a completed sync of the leader's log wakes the loop
            self.transport.poller.register(self.storage.sync_signal, zmq.POLLIN)
        self.tick_s = cfg.tick_ms / 1000
        self.running = False
        self._bad_window_start, self._bad_lines, self._bad_left_out = 0.0, 0, 0
        raft = self.node.raft
        self.log.info("started", endpoint=cfg.nodes[node_id], chain_height=height,
                      log_length=raft.log.last_index, applied=raft.applied)

    def _log_context(self) -> dict[str, Any]:
        if self.node is None:
            return {}
        return {"term": self.node.raft.term, "role": self.node.raft.role.name}

    def run(self) -> None:
        assert self.node is not None
        self.running = True
        # Nearly all garbage here is freed by reference counting; the cycle collector's default
        # pace (every 700 allocations, a few per transfer) cost throughput and tail latency.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        next_tick = time.monotonic() + self.tick_s
        trim, next_trim = _heap_trimmer(), time.monotonic() + TRIM_INTERVAL_S
        try:
            while self.running:
                # Rounded up: rounded down, the last millisecond before a tick was a busy loop.
                timeout_ms = max(0, math.ceil((next_tick - time.monotonic()) * 1000))
                due = self.node.proposal_due_ms()  # transfers waiting for the batch interval
                if due is not None:
                    timeout_ms = min(timeout_ms, max(0, due - int(time.time() * 1000)))
                for frames in self.transport.recv(timeout_ms):
                    self._on_frames(frames)
                now = time.monotonic()
                if now >= next_tick:
                    due = min(int((now - next_tick) / self.tick_s) + 1, MAX_TICKS_PER_TURN)
                    for _ in range(due):
                        self.node.tick(now)
                    next_tick = max(next_tick + due * self.tick_s, now)
                self.storage.clear_sync_signal()  # flush() below takes what the syncs completed
                if trim is not None and now >= next_trim:
                    trim(0)
                    next_trim = now + TRIM_INTERVAL_S
                out = self.node.flush(int(time.time() * 1000))  # the leader stamps block time here
                self._send_peers(out.peers)
                self._send_replies(out.clients)  # type: ignore[arg-type]
        except StorageError as exc:
            self.log.error("storage_failed", error=one_line(str(exc)))
            raise
        finally:
            self.close()

    def _send_peers(self, msgs: list[RaftMessage]) -> None:
        for m in msgs:
            self.transport.send_peer(m.dst, encode(m))

    def _send_replies(self, replies: list[tuple[bytes | Batched, ClientReply]]) -> None:
        batched: dict[bytes, list[ClientReply]] = {}
        for client, reply in replies:
            if type(client) is Batched:
                batched.setdefault(client.identity, []).append(reply)
            else:
                self.transport.reply(client, encode(reply))  # type: ignore[arg-type]
        for identity, rs in batched.items():
            frame: list[ClientReply] = []
            rows = 0
            for r in rs:
                frame.append(r)
                rows += len(r.results) if isinstance(r, SubmitResults) else 1
                if rows >= ROWS_PER_FRAME:
                    self.transport.reply(identity, encode_batch_reply(frame))
                    frame, rows = [], 0
            if frame:
                self.transport.reply(identity, encode_batch_reply(frame))

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.transport.close()
        self.storage.close()
        self.log.info("stopped")

    def _on_frames(self, frames: list[bytes]) -> None:
        assert self.node is not None
        identity = frames[0]
        if len(frames) != 2:
            self._bad(identity, f"expected one payload frame, got {len(frames) - 1}")
            return
        try:
            msg = decode(frames[1])
        except DecodeError as exc:
            self._bad(identity, str(exc), exc.req_id)
            return
        if isinstance(msg, RaftMessage):
            if identity != peer_identity(msg.src):
                self._warn_bad(reason="raft message from a non-member socket", claimed_src=msg.src)
                return
            self.node.on_raft(msg)
        elif isinstance(msg, ClientRequest):
            # Answers to a batch go back batched (see _send_replies).
            client = Batched(identity) if isinstance(msg, SubmitBatchRequest) else identity
            try:
                self.node.on_client(client, msg, time.monotonic())
            except Exception as exc:  # a request the checks let through must not take the node down
                self.log.error("request_failed", request=msg.type, error=one_line(f"{type(exc).__name__}: {exc}"))
                self._send_replies([(client, ErrorReply(req_id=msg.req_id, error="the node could not handle "
                                                        "this request"))])
        else:
            self._bad(identity, f"unexpected message type {msg.type}")

    def _bad(self, identity: bytes, reason: str, req_id: str = "") -> None:
        self._warn_bad(reason=reason)
        if not identity.startswith(b"node:"):
            self.transport.reply(identity, encode(ErrorReply(req_id=req_id, error=reason)))

    def _warn_bad(self, **fields: Any) -> None:
        """A ``bad_message_dropped`` line, at most BAD_LINES_PER_S a second: whoever reaches the
        port must not fill the disk with them. The next line says how many were left out."""
        now = time.monotonic()
        if now - self._bad_window_start >= 1.0:
            self._bad_window_start, self._bad_lines = now, 0
        if self._bad_lines >= BAD_LINES_PER_S:
            self._bad_left_out += 1
            return
        self._bad_lines += 1
        if self._bad_left_out:
            fields["left_out"], self._bad_left_out = self._bad_left_out, 0
        self.log.warning("bad_message_dropped", **fields)
