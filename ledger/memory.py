"""An in-memory network (``MemoryBoard``) and durable store for driving Raft cores in tests.

The board plays the driver's part for every node: it handles each ``Ready`` in the required order
(persist to the node's ``MemoryStorage``, queue the messages, apply the committed entries), and
lets a test deliver, drop, delay or reorder queued messages one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ledger.messages import Entry, RaftMessage
from ledger.raft import HardState, RaftConfig, RaftNode, Ready


@dataclass
class MemoryStorage:
    """What survives a crash of one node: exactly what its Readies asked to persist."""

    hard_state: HardState = HardState()
    entries: list[Entry] = field(default_factory=list)
    applied: list[Entry] = field(default_factory=list)

    def save(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state
        if rd.truncate_from is not None:
            del self.entries[rd.truncate_from - 1 :]
            self.entries.extend(rd.entries)

    def apply(self, rd: Ready) -> None:
        for e in rd.committed:
            if e.index != len(self.applied) + 1:
                raise AssertionError(f"applied {e.index} after {len(self.applied)}: out of order")
            self.applied.append(e)


class MemoryBoard:
    def __init__(self, ids: list[int], *, config: RaftConfig = RaftConfig(), seed: int = 0) -> None:
        self.ids = list(ids)
        self.config = config
        self.rng = random.Random(seed)
        self.storage: dict[int, MemoryStorage] = {i: MemoryStorage() for i in self.ids}
        self.nodes: dict[int, RaftNode] = {}
        self.queue: list[RaftMessage] = []
        self.read_states: dict[int, list[tuple[object, int]]] = {i: [] for i in self.ids}
        self.dropped_reads: dict[int, list[object]] = {i: [] for i in self.ids}
        self.events: dict[int, list[tuple[str, dict]]] = {i: [] for i in self.ids}
        for i in self.ids:
            self.restart(i)

    def restart(self, node_id: int) -> RaftNode:
        """(Re)build a node from its durable state only."""
        st = self.storage[node_id]
        node = RaftNode(
            node_id,
            self.ids,
            hard_state=st.hard_state,
            entries=list(st.entries),
            applied=len(st.applied),
            config=self.config,
            rng=random.Random(self.rng.random()),
        )
        self.nodes[node_id] = node
        return node

    def crash(self, node_id: int) -> None:
        """Lose the node's volatile state and its undelivered outgoing and incoming messages."""
        self.queue = [m for m in self.queue if node_id not in (m.src, m.dst)]
        del self.nodes[node_id]

    def process(self, node_id: int | None = None) -> list[Ready]:
        """Handle pending Readies (of one node, or all), as a real driver would; return them."""
        handled = []
        for i in [node_id] if node_id is not None else list(self.nodes):
            node = self.nodes.get(i)
            if node is None:
                continue
            rd = node.ready()
            st = self.storage[i]
            self.queue.extend(rd.early_messages)
            st.save(rd)
            node.persisted(rd)
            self.queue.extend(rd.messages)
            st.apply(rd)
            self.read_states[i].extend(rd.read_states)
            self.dropped_reads[i].extend(rd.dropped_reads)
            self.events[i].extend(rd.events)
            handled.append(rd)
        return handled

    def take(self, pred: Callable[[RaftMessage], bool]) -> RaftMessage:
        """Remove and return the first queued message matching ``pred``."""
        for k, m in enumerate(self.queue):
            if pred(m):
                return self.queue.pop(k)
        raise LookupError("no queued message matches")

    def deliver(self, m: RaftMessage) -> None:
        node = self.nodes.get(m.dst)
        if node is not None:
            node.step(m)
            self.process(m.dst)

    def deliver_all(self, drop: Callable[[RaftMessage], bool] = lambda m: False, limit: int = 100_000) -> int:
        """Deliver queued messages in order (and those they cause) until none is left."""
        n = 0
        while self.queue and n < limit:
            m = self.queue.pop(0)
            n += 1
            if not drop(m):
                self.deliver(m)
        return n

    def tick(self, node_id: int, times: int = 1) -> None:
        for _ in range(times):
            self.nodes[node_id].tick()
        self.process(node_id)

    def elect(self, node_id: int) -> None:
        """Make ``node_id`` time out and deliver everything, so it (normally) wins."""
        node = self.nodes[node_id]
        self.tick(node_id, node._timeout)
        self.deliver_all()

    def leaders(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.is_leader]
