"""Ledger state: balances, the transfer rules, de-duplication by transfer id, block building.

Applying is deterministic: the same committed entries give the same balances, results and
block bytes on every node. Rejections are part of the record (they go into the block with
their reason); a transfer id that was already applied is skipped and keeps its first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import msgpack

from ledger.chain import Block, make_block, transfer_leaf
from ledger.messages import NAME_FULLMATCH, Entry, EntryKind, Transfer, TransferRow, transfer_key

MAX_AMOUNT = 10**15  # keeps every balance inside SQLite's 64-bit integers


class TxResult(NamedTuple):
    status: str  # "committed" or "rejected"
    reason: str | None
    height: int
    block_hash: str
    # "sender>recipient:amount" of the transfer the id was first applied with; a later use of
    # the id for a different transfer is refused with it.
    transfer: str = ""


class StateStore(Protocol):
    """Where applied state goes; written inside the driver's transaction (storage.Storage)."""

    def record_tx_ids(self, tx_ids: Sequence[str], height: int) -> None: ...
    def tx_results(self, tx_ids: Sequence[str]) -> dict[str, TxResult]: ...
    def put_applied(self, index: int, block: Block | None, balances: dict[str, int]) -> None: ...


def encode_batch(timestamp_ms: int, transfers: Sequence[TransferRow]) -> bytes:
    """A log entry's data: the leader's timestamp and the transfers as rows."""
    return msgpack.packb([timestamp_ms, transfers], use_bin_type=True)


class _Tx(NamedTuple):
    """A transfer read back from the log (already validated): lighter than the pydantic model."""

    tx_id: str
    sender: str
    recipient: str
    amount: int


Row = Sequence  # a validated batch row: [tx_id, sender, recipient, amount] (a tuple from a leader)

# Account names recur (a ledger has far fewer accounts than transfers): names already seen to
# match the pattern are kept, so most rows cost one pattern match (the id's) instead of three.
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 100_000  # then it starts again: a bound on memory, not a rule of the ledger


def _decode_rows(data: bytes, keep_bad: bool) -> tuple[int, list[list | None]]:
    """The leader's timestamp and the rows of a batch; a malformed row is left out, or is
    None with ``keep_bad``.

    The same rules as the Transfer model, checked directly: this runs for every transfer on
    every node, and pydantic validation was a tenth of the apply time. A batch that does not
    decode at all is empty, the same way on every node.
    """
    try:
        ts, rows = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        return 0, []
    if type(ts) is not int or type(rows) is not list:
        return 0, []
    ok, good = NAME_FULLMATCH, _GOOD_NAMES
    if len(good) > _GOOD_NAMES_MAX:
        good.clear()
    out: list[list | None] = []
    for r in rows:
        if type(r) is list and len(r) == 4 and type(r[3]) is int:
            tx_id, sender, recipient = r[0], r[1], r[2]
            if type(tx_id) is str and type(sender) is str and type(recipient) is str and ok(tx_id):
                # A name that matches is remembered (set.add returns None, so the test goes on).
                if sender in good or (ok(sender) and not good.add(sender)):
                    if recipient in good or (ok(recipient) and not good.add(recipient)):
                        out.append(r)
                        continue
        if keep_bad:
            out.append(None)
    return ts, out


def decode_rows(data: bytes) -> tuple[int, list[Row]]:
    """The leader's timestamp and the well-formed rows of a batch, as every node applies them."""
    return _decode_rows(data, False)  # type: ignore[return-value]


def decode_batch(data: bytes) -> tuple[int, list[Transfer | None]]:
    """The leader's timestamp and the transfers; a malformed record decodes to None."""
    ts, rows = _decode_rows(data, True)
    return ts, [None if r is None else Transfer.model_construct(**_Tx(*r)._asdict()) for r in rows]


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


class Applied(NamedTuple):
    """What applying one entry did."""

    block: Block | None  # None if the entry held no transfer that was not applied before
    # The transfers applied now, as rows in block order, with the reason each was rejected (or None).
    outcomes: list[tuple[Row, str | None]]
    # The first results of ids this entry carried that were applied before (whoever sent one of
    # them with another transfer is told so by the node: node.LedgerNode._on_applied).
    earlier: dict[str, TxResult]

    def result(self, row: Row, reason: str | None) -> TxResult:
        """The result of ``row``, one of ``outcomes``."""
        assert self.block is not None
        _, sender, recipient, amount = row
        return TxResult("committed" if reason is None else "rejected", reason, self.block.height, self.block.hash,
                        transfer_key(sender, recipient, amount))

    def results(self) -> dict[str, TxResult]:
        """The result of every transfer id the entry carried."""
        return {**self.earlier, **{row[0]: self.result(row, reason) for row, reason in self.outcomes}}


class LedgerState:
    def __init__(self, store: StateStore, balances: dict[str, int], head: Block, applied: int) -> None:
        self.store = store
        self.balances = dict(balances)
        self.head = head
        self.applied = applied

    def apply(self, entry: Entry, decoded: tuple[int, Sequence[Row]] | None = None) -> Applied:
        """Apply one committed entry: check each transfer, move the money, build the block.

        A transfer id applied before (in an earlier entry, or earlier in this one) is skipped
        and keeps its first result. ``decoded``, if given, is what ``decode_rows(entry.data)``
        gives (the leader passes the rows it proposed, valid all of them, saving the decode).
        """
        if entry.index != self.applied + 1:
            raise ValueError(f"entry {entry.index} applied after {self.applied}")
        self.applied = entry.index
        if entry.kind != EntryKind.TXS:
            self.store.put_applied(entry.index, None, {})
            return Applied(None, [], {})
        ts, rows = decode_rows(entry.data) if decoded is None else decoded
        # Retries of ids applied before keep, and report, their first result (one lookup a batch).
        earlier = self.store.tx_results([r[0] for r in rows])
        seen: set[str] = set(earlier)
        bal = self.balances
        docs: list[dict] = []
        leaves: list[bytes] = []
        outcomes: list[tuple[Row, str | None]] = []
        changed: set[str] = set()
        for r in rows:
            tx_id, sender, recipient, amount = r
            if tx_id in seen:
                continue  # applied before, or earlier in this entry: it keeps its first result
            seen.add(tx_id)
            if 0 < amount <= MAX_AMOUNT and sender != recipient and bal.get(sender, -1) >= amount:
                reason = None  # the common case, without check_transfer's calls
                status = "committed"
                bal[sender] -= amount
                bal[recipient] = bal.get(recipient, 0) + amount
                changed.add(sender)
                changed.add(recipient)
            else:
                reason = check_transfer(_Tx(*r), bal)
                assert reason is not None
                status = "rejected"
            outcomes.append((r, reason))
            docs.append({"tx_id": tx_id, "sender": sender, "recipient": recipient, "amount": amount,
                         "status": status, "reason": reason})
            leaves.append(transfer_leaf(tx_id, sender, recipient, amount, status, reason))
        if not docs:
            self.store.put_applied(entry.index, None, {})
            return Applied(None, [], earlier)
        height = self.head.height + 1
        self.store.record_tx_ids([r[0] for r, _ in outcomes], height)
        block = make_block(height, self.head.hash, entry.term, entry.index, ts, docs, leaves)
        self.head = block
        self.store.put_applied(entry.index, block, {a: bal[a] for a in changed})
        return Applied(block, outcomes, earlier)

    def total(self) -> int:
        return sum(self.balances.values())
