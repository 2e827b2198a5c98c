"""Deterministic simulation: the project's own LedgerNodes over an in-memory network.

Everything is drawn from one seed: message loss, duplication, delay and reordering, symmetric
and one-way partitions that come and go, crashes at any instant (restart from what was
committed to storage only), clock drift, and clients that transfer money with retries and read
balances. Invariants are checked after every step; a violation stops the run with the seed and
the last events of the trace.

    python -m ledger.sim --seed S --steps N [--nodes 3|5]     # replay one run exactly
    python -m ledger.sim --seeds 10000 --steps N               # a soak, with a summary table
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ledger.chain import Block, ChainError, verify_block
from ledger.messages import (
    BalanceReply,
    BalanceRequest,
    ClientReply,
    ClientRequest,
    ErrorReply,
    RaftMessage,
    RedirectReply,
    RequestVoteResponse,
    SubmitReply,
    SubmitBatchRequest,
    SubmitRequest,
    SubmitResults,
    Transfer,
)
from ledger.node import LedgerNode
from ledger.raft import RaftConfig
from ledger.storage import Storage
from ledger.txindex import MemoryTxIndex

GENESIS = {"alice": 300, "bob": 200, "carol": 100, "dave": 50}
TICK_MS = 10
REQUEST_TIMEOUT_MS = 300
OP_DEADLINE_MS = 4000
LIVENESS_BOUND_MS = 30_000
TRACE_TAIL = 60
# Per node step: the chance of a crash at that instant (under faults), drawn per seed. Seeds
# that rarely crash keep leaders alive long enough for partitions to depose them.
CRASH_PS = (0.0, 0.0002, 0.001, 0.001)


class Violation(Exception):
    pass


class LaterSyncStorage(Storage):
    """In-memory storage whose syncs (``request_sync``, a leader's own log writes) complete when
    the simulation delivers them, a few ms later and in any order, as the log-sync thread's would;
    a completed ticket covers every earlier one. A crash keeps what was written (kill -9)."""

    def __init__(self, requested: Callable[[int], None], genesis: dict[str, int] = GENESIS) -> None:
        super().__init__(":memory:", genesis)
        self.tickets = 0
        self.done = 0
        self._requested = requested

    def request_sync(self) -> int | None:
        self.tickets += 1
        self._requested(self.tickets)
        return self.tickets

    @property
    def synced(self) -> int:
        return self.done

    def complete(self, ticket: int) -> None:
        """The sync of ``ticket`` is done (and so every earlier one)."""
        self.done = max(self.done, ticket)

    def wait_synced(self, ticket: int) -> None:
        self.complete(ticket)


class _Killed(Exception):
    """A node was killed in the middle of handling its Ready (between sending and its fsync)."""


class _Recorder:
    """A structlog-shaped logger that writes node events into the simulation trace."""

    def __init__(self, sim: Simulation, node_id: int) -> None:
        self.sim = sim
        self.node_id = node_id

    def _log(self, event: str, **fields: Any) -> None:
        if event in ("became_leader", "became_candidate"):
            self.sim.stats[event] += 1
        if event != "committed":
            detail = " ".join(f"{k}={v}" for k, v in fields.items())
            self.sim.trace_line(f"n{self.node_id} {event} {detail}".rstrip())

    info = debug = warning = error = _log


@dataclass
class SimNode:
    id: int
    storage: Storage
    drift: float  # tick period multiplier
    offset_ms: int  # wall-clock offset, for the leader's block timestamps
    ledger: LedgerNode | None = None
    epoch: int = 0  # bumped at every restart; stale timers of a dead incarnation are ignored
    commit_seen: int = 0
    applied_seen: int = 0
    height_seen: int = 0
    chain_ids: set[str] = field(default_factory=set)
    was_leader: bool = False  # at the start of the flush under way
    doomed: bool = False  # crashes when the flush under way is done


@dataclass
class Op:
    client: str
    kind: str  # "transfer" or "read"
    invoke: int
    transfer: Transfer | None = None
    account: str = ""
    response: int | None = None
    status: str | None = None  # transfer: committed / rejected / None = unknown
    value: int | None = None  # read: balance returned


@dataclass
class SimClient:
    name: str
    target: int
    op: Op | None = None
    req_id: str = ""
    deadline: int = 0
    timer: int = 0  # invalidates older timeouts
    ops_left: int = 0
    read_next: str | None = None  # an account to read next: a client checking what it just paid
    reader: bool = False  # only reads balances (an auditor's dashboard)


class Simulation:
    def __init__(self, seed: int, nodes: int = 3, clients: int | None = None, faults: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.now = 0
        self.queue: list[tuple[int, int, str, Any]] = []
        self.seq = itertools.count()
        self.trace_hash = hashlib.sha256()
        self.tail: deque[str] = deque(maxlen=TRACE_TAIL)
        self.full_trace: list[str] | None = None
        self.stats: Counter[str] = Counter()
        self.ids = list(range(nodes))
        # Small append batches on some seeds split what a leader sends, so more interleavings
        # (e.g. an old-term entry acknowledged before the new leader's own entry) occur.
        # Pre-vote and check-quorum are on in production; seeds without them also exercise the
        # plain Figure 2 election, which reaches more of the paper's corner cases.
        extensions = self.rng.random() < 0.5
        self.raft_config = RaftConfig(heartbeat_ticks=5, election_ticks_min=30, election_ticks_max=60,
                                      max_append_entries=self.rng.choice([1, 1, 2, 64]),
                                      pre_vote=extensions, check_quorum=extensions)
        self.crash_p = self.rng.choice(CRASH_PS)
        # The leader's batch interval (0: a batch at every flush), drawn apart from the main
        # stream so the schedules of earlier seeds stay as they were.
        self.batch_interval_ms = random.Random(f"batch-{seed}").choice([0, 2, 5, 20])
        # How often the nemesis strikes (ms between its moves): from relentless to now and then,
        # so that some seeds see long stretches of progress between faults.
        self.nemesis_gap = self.rng.choice([(50, 800), (50, 800), (300, 2000), (1000, 4000)])
        self.hot_crash_p = self.rng.choice([0.02, 0.1, 0.25]) if self.crash_p else self.rng.choice([0.0, 0.02])
        self.nodes: dict[int, SimNode] = {}
        # How many ids each node's index records per write (a crash takes the rest): small, as a
        # run commits a few dozen transfers, so that crashes fall between writes; apart from the
        # main stream too.
        writes = random.Random(f"index-{seed}")
        # Half the seeds run leaders that sync their own log later (LedgerNode.leader_syncs_later,
        # as the server does), with syncs that take 0-8 ms; apart from the main stream too.
        syncs = random.Random(f"sync-{seed}")
        self.leader_syncs_later = syncs.random() < 0.5
        for i in self.ids:
            storage = LaterSyncStorage(lambda ticket, i=i: self.at(syncs.randint(0, 8), "sync", (i, ticket))) \
                if self.leader_syncs_later else Storage(":memory:", GENESIS)
            sn = SimNode(i, storage, drift=self.rng.uniform(0.95, 1.05), offset_ms=self.rng.randint(-50, 50))
            assert isinstance(sn.storage.index, MemoryTxIndex)
            sn.storage.index.write_every = writes.randint(1, 20)
            self.nodes[i] = sn
            self._start(sn)
        self.blocked: set[tuple[str, str]] = set()
        self.partition_until = 0
        self.loss = 0.0
        self.dup = 0.0
        self.max_delay = 5
        n_clients = self.rng.randint(3, 6) if clients is None else clients
        self.clients = {f"c{k}": SimClient(f"c{k}", self.rng.choice(self.ids), reader=k == 0 and n_clients > 1)
                        for k in range(n_clients)}
        self.history: list[Op] = []
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.votes: dict[tuple[int, int], int] = {}  # (voter, term) -> candidate
        self.applied_at: dict[int, tuple[int, bytes]] = {}  # index -> (term, data digest)
        self.chain_at: dict[int, str] = {0: self.nodes[0].storage.head().hash}
        self.blocks: dict[int, Block] = {0: self.nodes[0].storage.head()}
        self.tx_counter = itertools.count()
        self.stopping = False

    # ---- trace ------------------------------------------------------------------------------------

    def trace_line(self, text: str) -> None:
        line = f"{self.now:>7} {text}"
        self.trace_hash.update(line.encode() + b"\n")
        self.tail.append(line)
        if self.full_trace is not None:
            self.full_trace.append(line)

    def fail(self, what: str) -> None:
        tail = "\n".join(self.tail)
        raise Violation(f"seed {self.seed}, t={self.now}ms: {what}\nlast events:\n{tail}")

    # ---- event queue ------------------------------------------------------------------------------

    def at(self, delay: int, kind: str, data: Any) -> None:
        heapq.heappush(self.queue, (self.now + delay, next(self.seq), kind, data))

    def _start(self, sn: SimNode) -> None:
        sn.epoch += 1
        sn.ledger = LedgerNode(sn.id, self.ids, sn.storage, self.raft_config,
                               random.Random(self.rng.random()), _Recorder(self, sn.id),
                               send_now=lambda msgs, i=sn.id: self._send_now(i, msgs),
                               reply_now=lambda replies, i=sn.id: self._reply_now(i, replies),
                               batch_interval_ms=self.batch_interval_ms,
                               leader_syncs_later=self.leader_syncs_later)
        sn.commit_seen = sn.ledger.raft.commit_index
        self.at(self._tick_period(sn), "tick", (sn.id, sn.epoch))

    def _tick_period(self, sn: SimNode) -> int:
        return max(1, round(TICK_MS * sn.drift))

    def crash(self, node_id: int) -> None:
        sn = self.nodes[node_id]
        if sn.ledger is None:
            return
        self.stats["crashes"] += 1
        self.trace_line(f"n{node_id} CRASH")
        sn.ledger = None  # volatile state is gone; storage keeps only committed transactions
        sn.storage.crashed()  # and the id index what it had written (txindex.RocksTxIndex)

    def restart(self, node_id: int) -> None:
        sn = self.nodes[node_id]
        if sn.ledger is not None:
            return
        self.trace_line(f"n{node_id} RESTART")
        self._start(sn)
        self._check_node(sn)

    # ---- network ----------------------------------------------------------------------------------

    def send(self, src: str, dst: str, payload: Any) -> None:
        if (src, dst) in self.blocked:
            self.stats["dropped"] += 1
            return
        if self.rng.random() < self.loss:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            delay = self.rng.randint(1, self.max_delay)
            if self.rng.random() < 0.03:
                delay += self.rng.randint(50, 400)  # a long tail: some messages arrive very late
            self.at(delay, "deliver", (src, dst, payload))

    @staticmethod
    def _moment(sn: SimNode) -> tuple[int, int | None, str, int | None]:
        """What makes an instant interesting for a crash: a new term or vote, a role change, or
        the commit point of a leader that has not yet committed an entry of its own term."""
        raft = sn.ledger.raft  # type: ignore[union-attr]
        settling = raft.is_leader and raft.log.term_at(raft.commit_index) != raft.term
        return (raft.term, raft.voted_for, raft.role.name, raft.commit_index if settling else None)

    def _flush(self, sn: SimNode, before: tuple[int, int | None, str, int | None]) -> None:
        """Handle the node's Ready, check invariants, and send (unless it crashes first)."""
        assert sn.ledger is not None
        sn.was_leader = before[2] == "leader"
        try:
            out = sn.ledger.flush(self.now + sn.offset_ms)
        except _Killed:
            self._bounce(sn.id)  # died in the middle: what it sent is out, its disk has what it wrote so far
            return
        self._check_node(sn)
        if sn.doomed:
            sn.doomed = False
            self._bounce(sn.id)  # a new leader that wrote its first entry and told no one (Figure 8)
            return
        # Crashes are likelier at the instants that matter (BUGGIFY-style).
        p = self.crash_p if self._moment(sn) == before else self.hot_crash_p
        fault = self.rng.random() if self.faults and not self.stopping else 1.0
        if fault < p:
            self._bounce(sn.id)  # crash after the fsync, before the rest of the messages were sent
            return
        self._send_peers(sn.id, out.peers)
        assert not out.clients, "with reply_now, every reply goes out within flush()"
        if p <= fault < 2 * p:
            self._bounce(sn.id)  # crash right after sending

    def _send_peers(self, node_id: int, msgs: list[RaftMessage]) -> None:
        for m in msgs:
            if isinstance(m, RequestVoteResponse) and m.granted and not m.pre_vote:
                # One vote per term, even across crashes (raft-cases C02).
                voted = self.votes.setdefault((node_id, m.term), m.dst)
                if voted != m.dst:
                    self.fail(f"n{node_id} voted for n{voted} and n{m.dst} in term {m.term}")
            self.send(f"n{node_id}", f"n{m.dst}", m)

    def _send_now(self, node_id: int, msgs: list[RaftMessage]) -> None:
        """Messages a node sends in the middle of its flush: a leader's appends before its own
        fsync (a crash right then loses its copy only), acknowledgements before applying."""
        sn = self.nodes[node_id]
        if self.faults and not self.stopping and msgs and not sn.was_leader and sn.ledger is not None \
                and sn.ledger.raft.is_leader and self.rng.random() < self.hot_crash_p:
            # A new leader whose first appends are lost and which dies once its own entry is on
            # its disk: how Figure 8 (raft-cases C01) begins, rare without a nudge.
            sn.doomed = True
            self.trace_line(f"n{node_id} loses its first appends and will die after its fsync")
            return
        self._send_peers(node_id, msgs)
        if msgs and self.faults and not self.stopping and self.rng.random() < self.hot_crash_p / 4:
            raise _Killed

    def _reply_now(self, node_id: int, replies: list[tuple[Hashable, ClientReply]]) -> None:
        """Every answer goes out here, in the middle of a flush: a leader's before the fsync of its
        newest entries, the rest at the end of the turn. A crash right before them leaves applied
        transfers unanswered (the clients retry, de-duplicated by id); right after them, clients
        told "committed" and followers that may not know it yet, so the next leader's
        commitIndex lags what clients saw (raft-cases C08), or a leader's disk without what
        followed."""
        hot = self.faults and not self.stopping and any(isinstance(r, (SubmitReply, SubmitResults))
                                                        for _, r in replies)
        if hot and self.rng.random() < self.hot_crash_p / 8:
            raise _Killed
        self._send_clients(node_id, replies)
        if replies and self.faults and not self.stopping and self.rng.random() < self.hot_crash_p / 4:
            raise _Killed

    def _send_clients(self, node_id: int, replies: list[tuple[Hashable, ClientReply]]) -> None:
        for client, reply in replies:
            self.send(f"n{node_id}", str(client), reply)

    def _bounce(self, node_id: int) -> None:
        """Crash, and mostly come back soon, as a supervised process would."""
        self.crash(node_id)
        if self.rng.random() < 0.7:
            self.at(self.rng.randint(1, 150), "restart", node_id)

    # ---- main loop --------------------------------------------------------------------------------

    def run(self, steps: int, ops_per_client: int = 1_000_000) -> None:
        for c in self.clients.values():
            c.ops_left = ops_per_client
            self.at(self.rng.randint(0, 50), "client", (c.name, 0))
        if self.faults:
            self.at(self.rng.randint(100, 500), "nemesis", None)
        for _ in range(steps):
            if not self.queue:
                break
            self._step()
        self._heal_and_settle()
        self._final_checks()

    def _step(self) -> None:
        t, _, kind, data = heapq.heappop(self.queue)
        self.now = t
        self.stats["steps"] += 1
        if kind == "tick":
            node_id, epoch = data
            sn = self.nodes[node_id]
            if sn.ledger is None or sn.epoch != epoch:
                return
            before = self._moment(sn)
            sn.ledger.tick(self.now / 1000)
            self._flush(sn, before)
            if sn.ledger is not None and sn.epoch == epoch:
                self.at(self._tick_period(sn), "tick", (node_id, epoch))
        elif kind == "deliver":
            src, dst, payload = data
            if dst.startswith("n"):
                self._deliver_to_node(src, int(dst[1:]), payload)
            else:
                self._deliver_to_client(self.clients[dst], payload)
        elif kind == "client":
            name, timer = data
            c = self.clients[name]
            if timer == c.timer:
                self._client_wake(c)
        elif kind == "sync":
            node_id, ticket = data
            sn = self.nodes[node_id]
            assert isinstance(sn.storage, LaterSyncStorage)
            sn.storage.complete(ticket)
            if sn.ledger is not None:
                self._flush(sn, self._moment(sn))
        elif kind == "restart":
            self.restart(data)
        elif kind == "nemesis":
            if not self.stopping:
                self._nemesis()
                self.at(self.rng.randint(*self.nemesis_gap), "nemesis", None)

    def _deliver_to_node(self, src: str, node_id: int, payload: Any) -> None:
        sn = self.nodes[node_id]
        if sn.ledger is None:
            return
        before = self._moment(sn)
        if isinstance(payload, RaftMessage):
            self.trace_line(f"{src}->n{node_id} {_short(payload)}")
            sn.ledger.on_raft(payload)
        else:
            self.trace_line(f"{src}->n{node_id} {payload.type} {payload.req_id}")
            sn.ledger.on_client(src, payload, self.now / 1000)
        if self.faults and not self.stopping and self.rng.random() < self.crash_p:
            self._bounce(node_id)  # crash before the input's effects were persisted
            return
        self._flush(sn, before)

    # ---- nemesis ----------------------------------------------------------------------------------

    def _nemesis(self) -> None:
        r = self.rng.random()
        live = [i for i in self.ids if self.nodes[i].ledger is not None]
        dead = [i for i in self.ids if self.nodes[i].ledger is None]
        self.stats["faults"] += 1
        if r < 0.15 and len(live) > 1:
            leader = next((i for i in live if self.nodes[i].ledger.raft.is_leader), None)  # type: ignore[union-attr]
            victim = leader if leader is not None and self.rng.random() < 0.6 else self.rng.choice(live)
            self._bounce(victim)
        elif r < 0.35 and dead:
            self.restart(self.rng.choice(dead))
        elif r < 0.65 and self.now < self.partition_until:
            pass  # a partition holds for a while: long enough, often, for the majority to elect
        elif r < 0.5:
            self._partition(one_way=self.rng.random() < 0.3)
            self.partition_until = self.now + self.rng.randint(200, 3000)
        elif r < 0.65:
            self.blocked.clear()
            self.trace_line("NEMESIS heal")
        elif r < 0.8:
            self.loss = self.rng.choice([0.0, 0.0, 0.05, 0.2])
            self.dup = self.rng.choice([0.0, 0.05, 0.2])
            self.trace_line(f"NEMESIS loss={self.loss} dup={self.dup}")
        else:
            self.max_delay = self.rng.choice([3, 5, 20, 80])
            self.trace_line(f"NEMESIS max_delay={self.max_delay}")

    def _partition(self, one_way: bool) -> None:
        names = [f"n{i}" for i in self.ids]
        self.rng.shuffle(names)
        cut = self.rng.randint(1, len(names) - 1)
        leaders = [f"n{i}" for i, sn in self.nodes.items() if sn.ledger is not None and sn.ledger.raft.is_leader]
        if leaders and self.rng.random() < 0.5:
            # Jepsen's partition-leader: the leader alone (with some clients) against the rest.
            names.remove(leaders[0])
            names.insert(0, leaders[0])
            cut = 1
        side_a, side_b = names[:cut], names[cut:]
        for c in self.clients:  # clients sit on one side too, so a cut-off leader sees clients
            (side_a if self.rng.random() < 0.5 else side_b).append(c)
        self.blocked.clear()
        for a in side_a:
            for b in side_b:
                self.blocked.add((a, b))
                if not one_way:
                    self.blocked.add((b, a))
        self.trace_line(f"NEMESIS partition {sorted(side_a)} {'->' if one_way else '|'} {sorted(side_b)}")

    # ---- clients ----------------------------------------------------------------------------------

    def _client_wake(self, c: SimClient) -> None:
        if c.op is None:
            if c.ops_left <= 0 or (self.stopping and not c.ops_left):
                return
            c.ops_left -= 1
            accounts = list(GENESIS)
            if c.read_next is not None:
                c.op = Op(c.name, "read", self.now, account=c.read_next)
                c.read_next = None
            elif not c.reader and self.rng.random() < 0.6:
                sender, recipient = self.rng.sample(accounts, 2)
                tx = Transfer(tx_id=f"{c.name}-{next(self.tx_counter)}", sender=sender,
                              recipient=recipient, amount=self.rng.randint(1, 80))
                c.op = Op(c.name, "transfer", self.now, transfer=tx)
            else:
                c.op = Op(c.name, "read", self.now, account=self.rng.choice(accounts))
            self.history.append(c.op)
            c.deadline = self.now + (LIVENESS_BOUND_MS if self.stopping else OP_DEADLINE_MS)
        elif self.now >= c.deadline:
            if self.stopping:
                self.fail(f"liveness: {c.name}'s {c.op.kind} unresolved {LIVENESS_BOUND_MS}ms after healing")
            self.trace_line(f"{c.name} gives up {c.op.kind}")
            self._finish(c, think=True)
            return
        else:
            c.target = self.rng.choice(self.ids)  # timed out: try another node
        self._client_send(c)

    def _client_send(self, c: SimClient) -> None:
        assert c.op is not None
        c.req_id = f"{c.name}.{next(self.seq)}"
        req: ClientRequest
        if c.op.kind == "transfer":
            assert c.op.transfer is not None
            if self.rng.random() < 0.5:
                req = SubmitRequest(req_id=c.req_id, transfer=c.op.transfer)
            else:  # the batch path, sometimes with the transfer twice in it
                rows = [c.op.transfer.row()] * self.rng.choice([1, 1, 2])
                req = SubmitBatchRequest(req_id=c.req_id, transfers=rows)
        else:
            req = BalanceRequest(req_id=c.req_id, account=c.op.account)
        self.send(c.name, f"n{c.target}", req)
        c.timer += 1
        self.at(REQUEST_TIMEOUT_MS, "client", (c.name, c.timer))

    def _deliver_to_client(self, c: SimClient, reply: ClientReply) -> None:
        if c.op is None or reply.req_id != c.req_id:
            return  # an answer to an earlier attempt
        self.trace_line(f"{c.name} got {reply.type}")
        if isinstance(reply, RedirectReply) or isinstance(reply, ErrorReply):
            if isinstance(reply, RedirectReply) and reply.leader_id is not None:
                c.target = reply.leader_id
            else:
                c.target = self.rng.choice(self.ids)
            c.timer += 1
            self.at(self.rng.randint(5, 30), "client", (c.name, c.timer))
            return
        op = c.op
        op.response = self.now
        if isinstance(reply, (SubmitReply, SubmitResults)):
            assert op.transfer is not None
            op.status = reply.status if isinstance(reply, SubmitReply) else \
                next(status for tx_id, status, _, _ in reply.results if tx_id == op.transfer.tx_id)
            if op.status == "committed" and self.rng.random() < 0.5:
                c.read_next = op.transfer.recipient  # read your write, likely from a new leader
        elif isinstance(reply, BalanceReply):
            op.value = reply.balance
        self._finish(c, think=True)

    def _finish(self, c: SimClient, think: bool) -> None:
        c.op = None
        c.timer += 1
        if c.ops_left > 0:
            self.at(self.rng.randint(1, 40) if think else 0, "client", (c.name, c.timer))

    # ---- healing and liveness ---------------------------------------------------------------------

    def _heal_and_settle(self) -> None:
        self.stopping = True
        self.blocked.clear()
        self.loss = self.dup = 0.0
        self.max_delay = 5
        self.trace_line("HEAL: nemesis off, partitions healed, crashed nodes restarted")
        for i in self.ids:
            self.restart(i)
        healed_at = self.now
        for c in self.clients.values():
            # Each client resolves what it has pending, then makes one more transfer.
            c.ops_left = 1
            if c.op is not None:
                c.deadline = self.now + LIVENESS_BOUND_MS
            else:
                c.timer += 1
                self.at(1, "client", (c.name, c.timer))
        while self.queue:
            if self.now - healed_at > LIVENESS_BOUND_MS + 1000:
                self.fail("liveness: not settled within the bound after healing")
            if self._settled():
                return
            self._step()
        self.fail("liveness: the event queue ran dry")

    def _settled(self) -> bool:
        if any(c.op is not None or c.ops_left > 0 for c in self.clients.values()):
            return False
        ledgers = [sn.ledger for sn in self.nodes.values()]
        if any(lg is None for lg in ledgers):
            return False
        leaders = [lg for lg in ledgers if lg is not None and lg.raft.is_leader]
        if len(leaders) != 1:
            return False
        target = leaders[0].raft.log.last_index
        return all(lg is not None and lg.state.applied == target for lg in ledgers)

    # ---- invariants -------------------------------------------------------------------------------

    def _check_node(self, sn: SimNode) -> None:
        lg = sn.ledger
        if lg is None:
            return
        raft = lg.raft
        if raft.is_leader and self.leaders.get(raft.term) != sn.id:
            if raft.term in self.leaders:
                self.fail(f"election safety: nodes {self.leaders[raft.term]} and {sn.id} both lead term {raft.term}")
            self.leaders[raft.term] = sn.id
            # Leader completeness: a new leader holds every entry applied anywhere so far.
            for i, (term, _) in self.applied_at.items():
                if raft.log.term_at(i) != term:
                    self.fail(f"leader completeness: n{sn.id} leads term {raft.term} without applied entry {i}")
        if raft.commit_index < sn.commit_seen:
            self.fail(f"n{sn.id} commitIndex went back from {sn.commit_seen} to {raft.commit_index}")
        sn.commit_seen = raft.commit_index
        applied = lg.state.applied
        if applied < sn.applied_seen:
            self.fail(f"n{sn.id} lastApplied went back from {sn.applied_seen} to {applied}")
        for i in range(sn.applied_seen + 1, applied + 1):
            e = raft.log.entry(i)
            key = (e.term, hashlib.sha256(e.data).digest())
            if i not in self.applied_at:
                self.applied_at[i] = key
                self._check_no_leader_without(i, e.term)
            elif self.applied_at[i] != key:
                self.fail(f"state machine safety: n{sn.id} applied another entry at index {i}")
        sn.applied_seen = applied
        for i in range(max(1, raft.log.last_index - 200), min(applied, raft.log.last_index) + 1):
            if raft.log.term_at(i) != self.applied_at[i][0]:
                self.fail(f"n{sn.id} replaced applied entry {i}")
        if raft.log.last_index < applied:
            self.fail(f"n{sn.id} log ({raft.log.last_index}) shorter than applied ({applied})")
        height = lg.state.head.height
        if height > sn.height_seen:
            prev = self.blocks.get(sn.height_seen) if sn.height_seen in self.blocks else None
            for block in sn.storage.blocks(sn.height_seen + 1, height):
                try:
                    verify_block(block, prev)
                except ChainError as exc:
                    self.fail(f"n{sn.id} chain: {exc}")
                known = self.chain_at.setdefault(block.height, block.hash)
                if known != block.hash:
                    self.fail(f"n{sn.id} chain forks at height {block.height}")
                self.blocks.setdefault(block.height, block)
                for tx in block.txs:
                    if tx["tx_id"] in sn.chain_ids:
                        self.fail(f"n{sn.id} chain holds transfer {tx['tx_id']} twice")
                    sn.chain_ids.add(tx["tx_id"])
                prev = block
            sn.height_seen = height
        if lg.state.total() != sum(GENESIS.values()):
            self.fail(f"n{sn.id} balances sum to {lg.state.total()}, not {sum(GENESIS.values())}")

    def _check_no_leader_without(self, index: int, term: int) -> None:
        """Once an entry is applied, no node lacking it may be able to win an election.

        A node wins with the votes of a majority whose logs are no more up to date than its
        own (5.4.1). Logs are the durable ones: a crashed node keeps what it persisted.
        """
        lasts: dict[int, tuple[int, int]] = {}
        lacking: list[int] = []
        for i, sn in self.nodes.items():
            if sn.ledger is not None:
                log = sn.ledger.raft.log
                lasts[i] = (log.last_term, log.last_index)
                held = log.term_at(index)
            else:
                lasts[i] = sn.storage.last_log_id()
                held = sn.storage.log_term(index)
            if held != term:
                lacking.append(i)
        quorum = len(self.ids) // 2 + 1
        for x in lacking:
            voters = [v for v in self.ids if lasts[v] <= lasts[x]]
            if len(voters) >= quorum:
                self.fail(f"entry {index} (term {term}) was applied, yet n{x}, which lacks it, "
                          f"could win an election with votes from {voters}")

    def _check_log_matching(self) -> None:
        logs = {i: sn.ledger.raft.log for i, sn in self.nodes.items() if sn.ledger is not None}
        seen: dict[tuple[int, int], bytes] = {}
        for i, log in logs.items():
            h = hashlib.sha256()
            for idx in range(1, log.last_index + 1):
                e = log.entry(idx)
                h.update(b"%d:%d:" % (e.index, e.term) + e.data)
                digest = h.digest()
                if seen.setdefault((idx, e.term), digest) != digest:
                    self.fail(f"log matching: n{i} differs before ({idx},{e.term}) from another node")

    def _final_checks(self) -> None:
        self._check_log_matching()
        heights = {sn.ledger.state.head.height for sn in self.nodes.values() if sn.ledger}
        if len(heights) != 1:
            self.fail(f"chains differ in height after settling: {heights}")
        chain_txs = [(h, tx) for h in range(1, max(heights) + 1) for tx in self.blocks[h].txs]
        where = {tx["tx_id"]: (pos, tx) for pos, (_, tx) in enumerate(chain_txs)}
        for op in self.history:
            if op.kind != "transfer" or op.status is None:
                continue
            assert op.transfer is not None
            found = where.get(op.transfer.tx_id)
            if found is None:
                self.fail(f"acknowledged transfer {op.transfer.tx_id} ({op.status}) is not in the chain")
            if found[1]["status"] != op.status:
                self.fail(f"{op.transfer.tx_id}: client saw {op.status}, chain says {found[1]['status']}")
        self.stats["committed"] += sum(1 for _, tx in chain_txs if tx["status"] == "committed")
        self.stats["rejected"] += sum(1 for _, tx in chain_txs if tx["status"] == "rejected")
        problem = check_linearizable(self.history, chain_txs)
        if problem:
            self.fail(f"linearizability: {problem}")


def check_linearizable(history: list[Op], chain_txs: list[tuple[int, dict[str, Any]]]) -> str | None:
    """Check a history of transfers and balance reads against the chain's order of transfers.

    The chain fixes the order of every write (Raft's log order), so the search is only over
    where each read falls: a read must see the balances after some block boundary that includes
    every transfer acknowledged before it began, excludes every transfer invoked after it
    ended, and is not earlier than any read that ended before it began. Taking the earliest
    fitting boundary for reads in invocation order is exact for this model.
    """
    pos = {tx["tx_id"]: k for k, (_, tx) in enumerate(chain_txs)}
    writes = [op for op in history if op.kind == "transfer" and op.transfer and op.transfer.tx_id in pos]
    acked = sorted((op for op in writes if op.response is not None), key=lambda o: o.response or 0)
    # Real-time order among transfers must agree with the chain order.
    for a in acked:
        for b in writes:
            if b.invoke > (a.response or 0) and pos[b.transfer.tx_id] < pos[a.transfer.tx_id]:  # type: ignore[union-attr]
                return f"{b.transfer.tx_id} began after {a.transfer.tx_id} was acknowledged but precedes it"  # type: ignore[union-attr]
    # Balances at each block boundary (prefix length -> balances).
    boundaries: list[tuple[int, dict[str, int]]] = [(0, dict(GENESIS))]
    bal = dict(GENESIS)
    for k, (height, tx) in enumerate(chain_txs):
        if tx["status"] == "committed":
            bal[tx["sender"]] -= tx["amount"]
            bal[tx["recipient"]] = bal.get(tx["recipient"], 0) + tx["amount"]
        if k + 1 == len(chain_txs) or chain_txs[k + 1][0] != height:
            boundaries.append((k + 1, dict(bal)))
    reads = sorted((op for op in history if op.kind == "read" and op.response is not None),
                   key=lambda o: o.invoke)
    done_reads: list[tuple[int, int]] = []  # (response time, chosen prefix)
    for r in reads:
        lo = max([pos[w.transfer.tx_id] + 1 for w in acked if (w.response or 0) < r.invoke]  # type: ignore[union-attr]
                 + [p for t, p in done_reads if t < r.invoke] + [0])
        hi = min([pos[w.transfer.tx_id] for w in writes if w.invoke > (r.response or 0)]  # type: ignore[union-attr]
                 + [len(chain_txs)])
        fit = next((p for p, b in boundaries if lo <= p <= hi and b.get(r.account, 0) == r.value), None)
        if fit is None:
            return (f"read of {r.account} by {r.client} at {r.invoke}-{r.response}ms returned {r.value}, "
                    f"which no state between transfer {lo} and {hi} of the chain had")
        done_reads.append((r.response or 0, fit))
    return None


def _short(m: RaftMessage) -> str:
    kind = m.type
    extra = ""
    if kind == "append_entries":
        extra = f" prev=({m.prev_log_index},{m.prev_log_term}) n={len(m.entries)} commit={m.leader_commit}"  # type: ignore[attr-defined]
    elif kind == "append_entries_response":
        extra = f" ok={m.success} match={m.match_index} rej={m.reject_index}"  # type: ignore[attr-defined]
    elif kind == "request_vote":
        extra = f" last=({m.last_log_index},{m.last_log_term}) pre={m.pre_vote}"  # type: ignore[attr-defined]
    elif kind == "request_vote_response":
        extra = f" granted={m.granted} pre={m.pre_vote}"  # type: ignore[attr-defined]
    return f"{kind} t={m.term}{extra}"


@dataclass
class RunResult:
    seed: int
    stats: Counter[str]
    digest: str
    violation: str | None


def run_seed(seed: int, steps: int, nodes: int = 3, trace: bool = False) -> tuple[RunResult, list[str] | None]:
    sim = Simulation(seed, nodes=nodes)
    if trace:
        sim.full_trace = []
    violation = None
    try:
        sim.run(steps)
    except Violation as exc:
        violation = str(exc)
    return RunResult(seed, sim.stats, sim.trace_hash.hexdigest(), violation), sim.full_trace


def soak(seeds: Iterator[int], steps: int, nodes: list[int]) -> tuple[Counter[str], list[str]]:
    total: Counter[str] = Counter()
    violations = []
    for seed in seeds:
        n = nodes[seed % len(nodes)]
        res, _ = run_seed(seed, steps, n)
        total["runs"] += 1
        total.update(res.stats)
        if res.violation:
            violations.append(res.violation)
    return total, violations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ledger.sim", description="Deterministic simulation of a raftledger cluster.")
    p.add_argument("--seed", type=int, default=1, help="the seed (with --seeds: the first seed)")
    p.add_argument("--seeds", type=int, default=None, help="run this many seeds and print a summary table")
    p.add_argument("--steps", type=int, default=3000, help="simulated events under faults per run")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=None, help="cluster size (soak default: both)")
    p.add_argument("--trace", action="store_true", help="print the whole trace of a single run")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be positive")
    if args.seeds is None:
        res, full = run_seed(args.seed, args.steps, args.nodes or 3, trace=args.trace)
        if full:
            print("\n".join(full))
        s = res.stats
        print(f"seed {args.seed}: {s['steps']} steps, {s['faults']} faults, {s['crashes']} crashes, "
              f"{s['became_leader']} elections won, {s['committed']} committed, {s['rejected']} rejected; "
              f"trace sha256 {res.digest}")
        if res.violation:
            print(f"VIOLATION: {res.violation}")
            return 1
        return 0
    if args.seeds < 1:
        p.error("--seeds must be positive")
    started = time.perf_counter()
    total, violations = soak(iter(range(args.seed, args.seed + args.seeds)), args.steps,
                             [args.nodes] if args.nodes else [3, 5])
    elapsed = time.perf_counter() - started
    rows = [
        ("runs", total["runs"]), ("steps (with settling)", total["steps"]), ("faults injected", total["faults"]),
        ("crashes", total["crashes"]), ("messages dropped", total["dropped"]),
        ("messages duplicated", total["duplicated"]), ("elections won", total["became_leader"]),
        ("transfers committed", total["committed"]), ("transfers rejected", total["rejected"]),
        ("violations", len(violations)), ("steps per second", int(total["steps"] / elapsed)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>12}")
    for v in violations[:5]:
        print(f"\nVIOLATION: {v}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
