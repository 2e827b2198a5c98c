"""The comparison ledger for ``python -m ledger.bench --compare pysyncobj``: PySyncObj underneath.

A replicated object whose method applies a transfer (same rules as ours), its journal file
enabled, and a ZeroMQ ROUTER per node that speaks our client protocol, so the very same load
workers drive both systems. PySyncObj's journal is an mmap that is not fsynced per entry.
Benchmark tooling only: pysyncobj is not a dependency of the product.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import zmq
from pysyncobj import SyncObj, SyncObjConf, replicated

from ledger.transport import CLIENT_SNDHWM


class LedgerObj(SyncObj):
    def __init__(self, me: str, others: list[str], journal: Path, genesis: dict[str, int]) -> None:
        # appendEntriesPeriod 0.01 s, not the default 0.1 s: measured here, the default held it
        # to 2k ops/s at 256 clients (every command waited for the next period), 0.01 gave 10k.
        conf = SyncObjConf(autoTick=False, journalFile=str(journal), appendEntriesUseBatch=True,
                           commandsWaitLeader=True, dynamicMembershipChange=False, appendEntriesPeriod=0.01)
        super().__init__(me, others, conf)
        self.balances = dict(genesis)
        self.results: dict[str, tuple[str, str | None]] = {}

    @replicated
    def transfer(self, tx_id: str, sender: str, recipient: str, amount: int) -> tuple[str, str | None]:
        if tx_id in self.results:
            return self.results[tx_id]
        bal = self.balances
        if amount <= 0 or sender == recipient or sender not in bal:
            res = ("rejected", "invalid transfer")
        elif bal[sender] < amount:
            res = ("rejected", "insufficient funds")
        else:
            bal[sender] -= amount
            bal[recipient] = bal.get(recipient, 0) + amount
            res = ("committed", None)
        self.results[tx_id] = res
        return res


def serve(node_id: int, raft_addrs: list[str], client_endpoint: str, data_dir: Path,
          genesis: dict[str, int]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    obj = LedgerObj(raft_addrs[node_id], [a for i, a in enumerate(raft_addrs) if i != node_id],
                    data_dir / f"journal-{node_id}.bin", genesis)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)  # as ours: answers to a busy load worker are not dropped
    router.bind(client_endpoint)
    replies: dict[bytes, list[dict]] = {}  # answers per client, sent batched as ours are

    def answer(identity: bytes, req_id: str, tx_id: str):  # type: ignore[no-untyped-def]
        def cb(result: tuple[str, str | None] | None, error: object) -> None:
            if result is None:
                body = {"v": 1, "type": "error", "req_id": req_id, "error": f"retry: {error}"}
            else:  # one row per answer (ours has one per block): no blocks here
                body = {"v": 1, "type": "submit_results", "req_id": req_id, "height": 0, "block_hash": "",
                        "results": [[tx_id, result[0], result[1], ""]]}
            replies.setdefault(identity, []).append(body)
        return cb

    while True:
        # One thread drives both: PySyncObj's own poller waits up to 1 ms, then clients are served.
        obj.doTick(0.001)
        while True:
            try:
                identity, frame = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            req = msgpack.unpackb(frame)
            if req.get("type") == "status":
                body = {"v": 1, "type": "status_reply", "req_id": req["req_id"], "node_id": node_id,
                        "role": "leader" if obj._isLeader() else "follower", "term": 0, "leader_id": None,
                        "commit_index": obj.raftCommitIndex, "last_applied": obj.raftLastApplied,
                        "last_log_index": 0, "chain_height": 0, "head_hash": ""}
                router.send_multipart([identity, msgpack.packb(body)])
                continue
            for tx_id, sender, recipient, amount in req["transfers"]:  # a submit_batch
                obj.transfer(tx_id, sender, recipient, amount, callback=answer(identity, req["req_id"], tx_id))
        for identity, bodies in replies.items():
            try:
                router.send_multipart([identity, msgpack.packb({"v": 1, "type": "batch_reply", "replies": bodies})],
                                      zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        replies.clear()


def main(argv: list[str]) -> None:
    node_id = int(argv[0])
    raft_addrs = argv[1].split(",")
    client_endpoint = argv[2]
    data_dir = Path(argv[3])
    genesis = {f"acct{i}": 10**12 for i in range(int(argv[4]))}
    serve(node_id, raft_addrs, client_endpoint, data_dir, genesis)


if __name__ == "__main__":
    main(sys.argv[1:])
