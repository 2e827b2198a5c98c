"""Ledger state: balances, the transfer rules, de-duplication by transfer id, block building.

Applying is deterministic: the same committed entries give the same balances, results and
block bytes on every node. Rejections are part of the record (they go into the block with
their reason); a transfer id that was already applied is skipped and keeps its first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import msgpack

from ledger.chain import Block, make_block, transfer_leaf
from ledger.messages import Entry, EntryKind, Transfer, valid_name

MAX_AMOUNT = 10**15  # keeps every balance inside SQLite's 64-bit integers


@dataclass(frozen=True)
class TxResult:
    status: str  # "committed" or "rejected"
    reason: str | None
    height: int
    block_hash: str
    # "sender>recipient:amount" of the transfer the id was first applied with; a later use of
    # the id for a different transfer is refused with it.
    transfer: str = field(default="", compare=False)


def transfer_key(t: Transfer | _Tx) -> str:
    return f"{t.sender}>{t.recipient}:{t.amount}"


class StateStore(Protocol):
    """Where applied state goes; written inside the driver's transaction (storage.Storage)."""

    def tx_result(self, tx_id: str) -> TxResult | None: ...
    def tx_results(self, tx_ids: Sequence[str]) -> dict[str, TxResult]: ...
    def put_applied(self, index: int, block: Block | None, results: dict[str, TxResult],
                    balances: dict[str, int]) -> None: ...


def encode_batch(timestamp_ms: int, transfers: Sequence[Transfer]) -> bytes:
    return msgpack.packb(
        [timestamp_ms, [[t.tx_id, t.sender, t.recipient, t.amount] for t in transfers]],
        use_bin_type=True,
    )


def _valid_row(row: object) -> bool:
    # The same rules as the Transfer model, checked directly: this runs for every transfer
    # on every node, and pydantic validation was a tenth of the apply time.
    return (
        type(row) is list
        and len(row) == 4
        and valid_name(row[0]) and valid_name(row[1]) and valid_name(row[2])
        and type(row[3]) is int
    )


class _Tx(NamedTuple):
    """A transfer read back from the log (already validated): lighter than the pydantic model."""

    tx_id: str
    sender: str
    recipient: str
    amount: int


def _decode_rows(data: bytes) -> tuple[int, list[_Tx | None]]:
    try:
        ts, rows = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        return 0, []
    if type(ts) is not int or type(rows) is not list:
        return 0, []
    return ts, [_Tx(*r) if _valid_row(r) else None for r in rows]


def decode_batch(data: bytes) -> tuple[int, list[Transfer | None]]:
    """The leader's timestamp and the transfers; a malformed record decodes to None.

    A batch that does not decode at all is empty, the same way on every node."""
    ts, rows = _decode_rows(data)
    return ts, [None if r is None else Transfer.model_construct(**r._asdict()) for r in rows]


def check_transfer(t: Transfer | _Tx, balances: dict[str, int]) -> str | None:
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
        ts, transfers = _decode_rows(entry.data)
        docs: list[dict] = []
        leaves: list[bytes] = []
        outcomes: list[tuple[_Tx, str | None]] = []
        changed: dict[str, int] = {}
        # Retries of ids applied before keep, and report, their first result (one query a batch).
        earlier = self.store.tx_results([t.tx_id for t in transfers if t is not None])
        seen: set[str] = set(earlier)
        for t in transfers:
            if t is None:
                continue
            first = earlier.get(t.tx_id)
            if first is not None and first.transfer != transfer_key(t):
                earlier[t.tx_id] = TxResult(
                    "rejected", f"transfer id {t.tx_id} was already used for {first.transfer}",
                    first.height, first.block_hash, first.transfer)
            if t.tx_id in seen:
                continue
            seen.add(t.tx_id)
            reason = check_transfer(t, self.balances)
            if reason is None:
                self.balances[t.sender] -= t.amount
                self.balances[t.recipient] = self.balances.get(t.recipient, 0) + t.amount
                changed[t.sender] = self.balances[t.sender]
                changed[t.recipient] = self.balances[t.recipient]
            status = "committed" if reason is None else "rejected"
            outcomes.append((t, reason))
            docs.append({"tx_id": t.tx_id, "sender": t.sender, "recipient": t.recipient,
                         "amount": t.amount, "status": status, "reason": reason})
            leaves.append(transfer_leaf(t.tx_id, t.sender, t.recipient, t.amount, status, reason))
        if not docs:
            self.store.put_applied(entry.index, None, {}, {})
            return None, earlier
        block = make_block(self.head.height + 1, self.head.hash, entry.term, entry.index, ts, docs, leaves)
        self.head = block
        results = {
            t.tx_id: TxResult("committed" if reason is None else "rejected", reason, block.height, block.hash,
                              transfer_key(t))
            for t, reason in outcomes
        }
        self.store.put_applied(entry.index, block, results, changed)
        return block, {**earlier, **results}

    def total(self) -> int:
        return sum(self.balances.values())
