"""Blocks: the hash-linked, tamper-evident record of every applied batch of transfers.

Encoding (documented in the README so anyone can recompute it):

* ``canonical(x)`` is JSON with sorted keys, no whitespace, UTF-8.
* A block's transaction leaf is ``canonical(tx)``; the Merkle root follows RFC 6962:
  leaf hash ``SHA-256(0x00 || leaf)``, inner node ``SHA-256(0x01 || left || right)``, split at
  the largest power of two below the leaf count; the empty tree hashes to ``SHA-256("")``.
* The block hash is ``SHA-256(canonical(header))`` with header fields height, index,
  merkle_root, prev_hash, term, timestamp, tx_count; hashes are lowercase hex.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

ZERO_HASH = "0" * 64
MAX_BLOCKS_PER_REPLY = 200


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def merkle_root(leaves: Iterable[bytes]) -> str:
    """RFC 6962's Merkle tree hash of ``leaves``, as hex.

    Computed level by level: pairing neighbours and carrying an odd last node up unchanged gives
    the same tree as RFC 6962's split at the largest power of two below n (tests check both),
    without a Python call per node.
    """
    sha = hashlib.sha256
    level = [sha(b"\x00" + leaf).digest() for leaf in leaves]
    if not level:
        return sha(b"").hexdigest()
    while len(level) > 1:
        odd = level[-1] if len(level) % 2 else None
        level = [sha(b"\x01" + a + b).digest() for a, b in zip(level[::2], level[1::2])]
        if odd is not None:
            level.append(odd)
    return level[0].hex()


def transfer_leaf(tx_id: str, sender: str, recipient: str, amount: int, status: str, reason: str | None) -> bytes:
    """``canonical()`` of a transfer record, written out directly because it is on the hot path.

    Only for ids and names that match messages.NAME_PATTERN and reasons without quotes or
    backslashes, which need no JSON escaping (tests check it against ``canonical``).
    """
    r = "null" if reason is None else f'"{reason}"'
    return (f'{{"amount":{amount},"reason":{r},"recipient":"{recipient}","sender":"{sender}",'
            f'"status":"{status}","tx_id":"{tx_id}"}}').encode()


class Block(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    height: int
    prev_hash: str
    term: int
    index: int  # the Raft log index of the entry this block was built from
    timestamp: int  # milliseconds since the epoch, stamped by the leader at proposal
    merkle_root: str
    hash: str
    # Transfers with their results; for the genesis block, {"account", "balance"} records.
    txs: list[dict[str, Any]]

    def header(self) -> dict[str, Any]:
        return header_of(self.height, self.prev_hash, self.term, self.index, self.timestamp,
                         self.merkle_root, len(self.txs))

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump()

    def to_json(self) -> bytes:
        """``canonical(to_doc())``, assembled from the leaves when make_block built them."""
        if self._leaves is None:
            return canonical(self.to_doc())
        head = canonical({"hash": self.hash, "height": self.height, "index": self.index,
                          "merkle_root": self.merkle_root, "prev_hash": self.prev_hash, "term": self.term,
                          "timestamp": self.timestamp})
        return head[:-1] + b',"txs":[' + b",".join(self._leaves) + b"]}"

    # The canonical leaves, kept by make_block so storing the block does not encode them again.
    _leaves: list[bytes] | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # Equal blocks have equal fields, however they were built (the cache does not count).
        return isinstance(other, Block) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


def header_of(height: int, prev_hash: str, term: int, index: int, timestamp: int,
              root: str, tx_count: int) -> dict[str, Any]:
    return {
        "height": height,
        "prev_hash": prev_hash,
        "term": term,
        "index": index,
        "timestamp": timestamp,
        "merkle_root": root,
        "tx_count": tx_count,
    }


def make_block(height: int, prev_hash: str, term: int, index: int, timestamp: int,
               txs: list[dict[str, Any]], leaves: list[bytes] | None = None) -> Block:
    """Build and hash a block; ``leaves``, if given, must be ``[canonical(tx) for tx in txs]``."""
    if leaves is None:
        leaves = [canonical(tx) for tx in txs]
    root = merkle_root(leaves)
    digest = hashlib.sha256(canonical(header_of(height, prev_hash, term, index, timestamp, root,
                                                len(txs)))).hexdigest()
    block = Block.model_construct(height=height, prev_hash=prev_hash, term=term, index=index,
                                  timestamp=timestamp, merkle_root=root, hash=digest, txs=txs)
    block._leaves = leaves
    return block


def genesis_block(balances: Mapping[str, int]) -> Block:
    txs = [{"account": a, "balance": balances[a]} for a in sorted(balances)]
    return make_block(0, ZERO_HASH, 0, 0, 0, txs)


class ChainError(Exception):
    def __init__(self, height: int, reason: str) -> None:
        super().__init__(f"chain invalid at height {height}: {reason}")
        self.height = height
        self.reason = reason


def verify_block(block: Block, prev: Block | None) -> None:
    """Raise ChainError unless ``block`` is internally consistent and links to ``prev``."""
    expected_prev = prev.hash if prev is not None else ZERO_HASH
    expected_height = prev.height + 1 if prev is not None else 0
    if block.height != expected_height:
        raise ChainError(block.height, f"height {block.height} follows {expected_height - 1}")
    if block.prev_hash != expected_prev:
        raise ChainError(block.height, "prev_hash does not match the previous block's hash")
    if prev is not None and block.index <= prev.index:
        raise ChainError(block.height, f"log index {block.index} not above {prev.index}")
    root = merkle_root(canonical(tx) for tx in block.txs)
    if root != block.merkle_root:
        raise ChainError(block.height, "merkle root does not match the transactions")
    if hashlib.sha256(canonical(block.header())).hexdigest() != block.hash:
        raise ChainError(block.height, "block hash does not match its header")


def verify_chain(blocks: Iterable[Block], prev: Block | None = None) -> Block | None:
    """Verify blocks in order (continuing after ``prev``); return the last one."""
    for block in blocks:
        verify_block(block, prev)
        prev = block
    return prev
