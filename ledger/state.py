"""Ledger state: balances, the transfer rules, de-duplication by transfer id, block building.

Applying is deterministic: the same committed entries give the same balances, results and
block bytes on every node. Rejections are part of the record (they go into the block with
their reason); a transfer id that was already applied is skipped and keeps its first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgpack
from pydantic import ValidationError

from ledger.chain import Block, make_block
from ledger.messages import Entry, EntryKind, Transfer

MAX_AMOUNT = 10**15  # keeps every balance inside SQLite's 64-bit integers


@dataclass(frozen=True)
class TxResult:
    status: str  # "committed" or "rejected"
    reason: str | None
    height: int
    block_hash: str


class StateStore(Protocol):
    """Where applied state goes; written inside the driver's transaction (storage.Storage)."""

    def tx_result(self, tx_id: str) -> TxResult | None: ...
    def put_applied(self, index: int, block: Block | None, results: dict[str, TxResult],
                    balances: dict[str, int]) -> None: ...


def encode_batch(timestamp_ms: int, transfers: Sequence[Transfer]) -> bytes:
    return msgpack.packb(
        [timestamp_ms, [[t.tx_id, t.sender, t.recipient, t.amount] for t in transfers]],
        use_bin_type=True,
    )


def decode_batch(data: bytes) -> tuple[int, list[Transfer | None]]:
    """The leader's timestamp and the transfers; a malformed record decodes to None."""
    ts, rows = msgpack.unpackb(data, raw=False)
    out: list[Transfer | None] = []
    for row in rows:
        try:
            out.append(Transfer(tx_id=row[0], sender=row[1], recipient=row[2], amount=row[3]))
        except (ValidationError, IndexError, TypeError):
            out.append(None)
    return ts, out


def check_transfer(t: Transfer, balances: dict[str, int]) -> str | None:
    """The reason ``t`` must be rejected against ``balances``, or None if it applies."""
    if t.amount <= 0:
        return "amount must be a positive integer"
    if t.amount > MAX_AMOUNT:
        return f"amount exceeds the maximum of {MAX_AMOUNT}"
    if t.sender == t.recipient:
        return "sender and recipient are the same account"
    if t.sender not in balances:
        return f"unknown sender {t.sender}"
    if balances[t.sender] < t.amount:
        return f"insufficient funds: balance {balances[t.sender]}, amount {t.amount}"
    return None


class LedgerState:
    def __init__(self, store: StateStore, balances: dict[str, int], head: Block, applied: int) -> None:
        self.store = store
        self.balances = dict(balances)
        self.head = head
        self.applied = applied

    def apply(self, entry: Entry) -> tuple[Block | None, dict[str, TxResult]]:
        """Apply one committed entry.

        Returns the block it made (None if it held no new transfer) and the result of every
        transfer id it carried; an id applied before keeps, and reports, its first result.
        """
        if entry.index != self.applied + 1:
            raise ValueError(f"entry {entry.index} applied after {self.applied}")
        self.applied = entry.index
        if entry.kind != EntryKind.TXS:
            self.store.put_applied(entry.index, None, {}, {})
            return None, {}
        ts, transfers = decode_batch(entry.data)
        docs: list[dict] = []
        outcomes: list[tuple[str, str | None]] = []
        changed: dict[str, int] = {}
        earlier: dict[str, TxResult] = {}
        seen: set[str] = set()
        for t in transfers:
            if t is None or t.tx_id in seen:
                continue
            seen.add(t.tx_id)
            first = self.store.tx_result(t.tx_id)
            if first is not None:
                earlier[t.tx_id] = first  # a retry of an id already applied: keep its first result
                continue
            reason = check_transfer(t, self.balances)
            if reason is None:
                self.balances[t.sender] -= t.amount
                self.balances[t.recipient] = self.balances.get(t.recipient, 0) + t.amount
                changed[t.sender] = self.balances[t.sender]
                changed[t.recipient] = self.balances[t.recipient]
            status = "committed" if reason is None else "rejected"
            outcomes.append((t.tx_id, reason))
            docs.append({"tx_id": t.tx_id, "sender": t.sender, "recipient": t.recipient,
                         "amount": t.amount, "status": status, "reason": reason})
        if not docs:
            self.store.put_applied(entry.index, None, {}, {})
            return None, earlier
        block = make_block(self.head.height + 1, self.head.hash, entry.term, entry.index, ts, docs)
        self.head = block
        results = {
            tx_id: TxResult("committed" if reason is None else "rejected", reason, block.height, block.hash)
            for tx_id, reason in outcomes
        }
        self.store.put_applied(entry.index, block, results, changed)
        return block, {**earlier, **results}

    def total(self) -> int:
        return sum(self.balances.values())
