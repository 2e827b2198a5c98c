"""ZeroMQ transport (the zguide's "Harmony" pattern).

Each node binds one ROUTER that only receives (from peers and clients; clients get their answers
back through it) and holds one DEALER per peer that only sends. Raft messages are one-way. All
sockets belong to the thread that calls this object.
"""

from __future__ import annotations

from typing import Any

import zmq

from ledger.messages import MAX_MESSAGE_BYTES

# Flags as plain ints: pyzmq's enum flags and its *_multipart helpers cost a few microseconds a
# call, paid once per transfer on the reply path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)

PEER_SNDHWM = 1000  # Raft retransmits, so a small queue to a slow peer is enough
# Answers queued per client connection before more are dropped (the client then retries). A
# load generator multiplexes thousands of requests over one connection; ZeroMQ's default of
# 1000 dropped answers to it. At about 200 bytes an answer this bounds a client at a few MB.
CLIENT_SNDHWM = 20_000
RECV_BATCH = 2000  # frames drained per poll, so timers still run under load


def peer_identity(node_id: int) -> bytes:
    return b"node:%d" % node_id


class ZeroMQServer:
    def __init__(self, node_id: int, endpoints: dict[int, str], log: Any) -> None:
        self.node_id = node_id
        self.log = log
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown or full client -> error, not silence
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its identity
        self.router.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        # Frames a little over the limit reach decode(), which logs and answers them; far bigger
        # ones make ZeroMQ drop the connection before buffering them.
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, 100)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 300)
        self.router.bind(endpoints[node_id])
        self.dealers: dict[int, zmq.Socket] = {}
        for peer, endpoint in endpoints.items():
            if peer == node_id:
                continue
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.IDENTITY, peer_identity(node_id))
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a peer that is not connected
            d.setsockopt(zmq.SNDHWM, PEER_SNDHWM)
            d.setsockopt(zmq.RECONNECT_IVL, 100)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            d.setsockopt(zmq.HEARTBEAT_IVL, 100)
            d.setsockopt(zmq.HEARTBEAT_TIMEOUT, 300)
            d.connect(endpoint)
            self.dealers[peer] = d
        self.unreachable: set[int] = set()
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)

    def recv(self, timeout_ms: int) -> list[list[bytes]]:
        """Frames received within ``timeout_ms``, each as [sender identity, *payload frames]."""
        out: list[list[bytes]] = []
        if not self.poller.poll(timeout_ms):
            return out
        recv, more = self.router.recv, self.router.get
        for _ in range(RECV_BATCH):
            try:
                frames = [recv(_NOBLOCK)]
            except zmq.Again:
                break
            while more(_RCVMORE):  # the rest of a message is there once its first part is
                frames.append(recv(_NOBLOCK))
            out.append(frames)
        return out

    def send_peer(self, peer: int, data: bytes) -> bool:
        try:
            self.dealers[peer].send(data, _NOBLOCK)
        except zmq.Again:
            if peer not in self.unreachable:
                self.unreachable.add(peer)
                self.log.warning("peer_unreachable", peer=peer)
            return False
        if peer in self.unreachable:
            self.unreachable.discard(peer)
            self.log.info("peer_reachable", peer=peer)
        return True

    def reply(self, identity: bytes, data: bytes) -> bool:
        """Answer a client through the ROUTER; False if it is gone or not reading."""
        try:
            # Routing (and the high-water mark) is decided on the first part; the second part
            # of a routed message is always taken.
            self.router.send(identity, _NOBLOCK | _SNDMORE)
        except zmq.ZMQError:  # Again (queue full) or EHOSTUNREACH (client gone)
            return False
        self.router.send(data)
        return True

    def close(self) -> None:
        for d in self.dealers.values():
            d.close(0)
        self.router.close(0)
        self.ctx.term()
