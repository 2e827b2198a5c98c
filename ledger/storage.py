"""Durable state of one node in SQLite: Raft term/vote and log, the chain, balances, results.

One database file per node in WAL mode. The driver wraps each Ready's hard state and new log
entries in one fsynced transaction (``with storage.transaction():``, ``synchronous=FULL``), so
they reach disk together, with one fsync (group commit), before any message that depends on
them is sent. A leader's own new entries, on which no message depends, are committed without
the fsync and synced on a thread (``request_sync``, ``synced``). Applying committed entries is
a transaction of its own that is not fsynced: the
entries are durable already, and the write-ahead log keeps commits in order, so a power loss
can only take the latest applied state, which is applied again from the log (the applied index
moves atomically with it). SQLite's journal makes a torn write at a crash roll back to the last
commit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ledger.chain import Block, ChainError, genesis_block, verify_block
from ledger.messages import Entry, EntryKind, one_line, transfer_key
from ledger.raft import HardState
from ledger.state import TxResult
from ledger.txindex import MemoryTxIndex, RocksTxIndex, TxIndex

# 2: a transfer's result no longer repeats its block's hash. 3: it is only the block's height
# (status, reason and transfer are read from the block when a retry asks for them). 4: the
# id -> height index moved to RocksDB (txindex.py). 5: log entries carry a checksum.
SCHEMA_VERSION = 5
# Checkpoints (copying the write-ahead log into the database, with an fsync of the database)
# run on a thread of their own. Run by the node's loop, as SQLite does by default inside the
# commit that fills the log past 1000 pages, one took 5-15 ms: the p99 of a commit with fsync
# went from about 1 ms to 11 ms with three nodes on one disk. The loop checkpoints itself only
# if the thread falls this far behind.
_LOOP_CHECKPOINT_PAGES = 16_384  # 64 MB
_CHECKPOINT_IDLE_S = 0.05
_WAL_FILE_LIMIT = 64 << 20  # the log file is truncated to this after a checkpoint empties it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL,
                                kind TEXT NOT NULL, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (height INTEGER PRIMARY KEY, hash TEXT NOT NULL, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, balance INTEGER NOT NULL) WITHOUT ROWID;
"""


class StorageError(Exception):
    """The data directory cannot be used; the text is a one-line reason."""


@dataclass
class Recovered:
    hard_state: HardState
    entries: list[Entry]
    applied: int
    balances: dict[str, int]
    head: Block


def _crc(index: int, term: int, kind: str, data: bytes) -> int:
    """A log entry's checksum: SQLite checks its pages' structure, not what a flipped bit in a
    blob says, and a damaged entry would be replicated to the other nodes as it is."""
    return zlib.crc32(data, zlib.crc32(b"%d:%d:%s:" % (index, term, kind.encode())))


def _entry(index: int, term: int, kind: str, data: bytes, crc: int) -> Entry:
    if _crc(index, term, kind, data) != crc:
        raise StorageError(f"log entry {index} is damaged (its checksum does not match); refusing to use it")
    return Entry(index=index, term=term, kind=EntryKind(kind), data=data)


def _block_from_row(doc: bytes) -> Block:
    return Block.model_validate(json.loads(doc))


class Storage:
    def __init__(self, path: Path | str, genesis: Mapping[str, int]) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(f"PRAGMA journal_size_limit={_WAL_FILE_LIMIT}")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open {path}: {exc}") from None
        if path != ":memory:" and mode != "wal":  # the log-sync thread syncs the -wal file
            self.db.close()
            raise StorageError(f"cannot open {path}: SQLite could not use a write-ahead log here (journal mode {mode})")
        self._checkpointer: _Checkpointer | None = None
        self._syncer: _Syncer | None = None
        if path != ":memory:":
            self.db.execute(f"PRAGMA wal_autocheckpoint={_LOOP_CHECKPOINT_PAGES}")
        self._in_tx = False
        self._durable = True
        gen = genesis_block(genesis)
        stored = self._meta("genesis_hash")
        index_dir = Path(f"{path}.txindex")
        if stored is None and path != ":memory:" and index_dir.is_dir() and any(index_dir.iterdir()):
            self.db.close()
            # A blank node would forget its term and its vote: unsafe for Raft.
            raise StorageError(f"{path} is empty, yet the transfer index beside it is not: this node's database "
                               f"was lost; refusing to start (remove {Path(path).parent} to rejoin as a new node)")
        if stored is None:
            with self.transaction():
                self._set_meta("schema", SCHEMA_VERSION)
                self._set_meta("genesis_hash", gen.hash)
                self._set_meta("term", 0)
                self._set_meta("voted_for", None)
                self._set_meta("applied", 0)
                self._put_block(gen)
                self.db.executemany("INSERT INTO accounts VALUES (?, ?)", sorted(genesis.items()))
        elif stored != gen.hash:
            raise StorageError(f"{path} holds a chain with another genesis block than this config's")
        elif (schema := self._meta("schema")) != SCHEMA_VERSION:
            raise StorageError(f"{path} has storage format {schema!r}; this version reads format {SCHEMA_VERSION}")
        self.head_height = self.head().height
        self.index = self._open_index(path)
        if path != ":memory:":  # threads last: a store that fails to open leaves none behind
            self._checkpointer = _Checkpointer(str(path))
            self._syncer = _Syncer(f"{path}-wal")

    def _open_index(self, path: Path | str) -> TxIndex:
        """The id index, caught up with the chain (after a power loss, or if it was removed)."""
        if path == ":memory:":
            index: TxIndex = MemoryTxIndex()
        else:
            where = Path(f"{path}.txindex")
            try:
                index = RocksTxIndex(where)
            except Exception as exc:  # rocksdict raises plain Exceptions (lock held, corruption)
                if "lock" in str(exc).lower():
                    raise StorageError(f"{where} is in use by another process (is this node running already?)") \
                        from None
                raise StorageError(one_line(f"cannot open {where}: {exc}")) from None
        self._catch_up(index)
        return index

    def _catch_up(self, index: TxIndex) -> None:
        """Record in ``index`` the ids of the blocks above its height."""
        try:
            for start in range(index.height + 1, self.head_height + 1, 256):
                for block in self.blocks(start, min(start + 255, self.head_height)):
                    index.record([tx["tx_id"] for tx in block.txs], block.height)
                    index.write_if_due()  # a few thousand ids at a time, as when applying
        except ValueError:
            pass  # a damaged block: verify_chain() names it, and the node refuses to start

    def crashed(self) -> None:
        """What a crash of the node's process takes from an in-memory storage (the simulator's
        crashes): the id index's unwritten ids, recorded again from the chain as at a start."""
        assert isinstance(self.index, MemoryTxIndex), "only an in-memory storage is crashed in-process"
        self.index.lose_unwritten()
        self._catch_up(self.index)

    # ---- transactions ------------------------------------------------------------------------

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[None]:
        """One atomic unit of writes, fsynced unless ``durable`` is False. Nested use joins the
        outer transaction.

        A transaction that is not fsynced is still atomic and in order: after a power loss the
        database is as it was after some earlier commit, and the next fsynced commit makes it
        durable along with everything before it (one write-ahead log).
        """
        if self._in_tx:
            yield
            return
        if durable != self._durable:
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        self.db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self.head_height = self.head().height
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_tx = False

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.db.close()
        self.index.close()

    # ---- syncing on a thread (a leader's own log writes) -----------------------------------

    def request_sync(self) -> int | None:
        """Ask for everything committed so far (``transaction(durable=False)`` too) to reach the
        disk, on a thread, without waiting: a ticket that ``synced`` reaches when it has, or None
        for a storage that cannot (in memory: nothing to sync)."""
        return None if self._syncer is None else self._syncer.request()

    @property
    def synced(self) -> int:
        """The last ``request_sync`` ticket whose sync has completed."""
        if self._syncer is None:
            return 0
        self._raise_if_sync_failed()
        return self._syncer.synced

    def wait_synced(self, ticket: int) -> None:
        """Block until ``ticket`` is synced (a node that stops leading does, before it answers
        anyone: every entry in its log is then durable, as a follower's must be)."""
        if self._syncer is not None:
            self._syncer.wait(ticket)
            self._raise_if_sync_failed()

    def _raise_if_sync_failed(self) -> None:
        assert self._syncer is not None
        if self._syncer.error is not None:  # the log cannot be made durable: nothing may go on
            raise StorageError(f"syncing the write-ahead log failed: {self._syncer.error}")

    @property
    def sync_signal(self) -> int | None:
        """A file descriptor that turns readable when a sync completes (for the driver's poll)."""
        return None if self._syncer is None else self._syncer.signal

    def clear_sync_signal(self) -> None:
        if self._syncer is not None:
            self._syncer.clear_signal()

    # ---- Raft ----------------------------------------------------------------------------------

    def save_hard_state(self, hs: HardState) -> None:
        self._set_meta("term", hs.term)
        self._set_meta("voted_for", hs.voted_for)

    def save_entries(self, truncate_from: int, entries: Sequence[Entry]) -> None:
        self.db.execute("DELETE FROM log WHERE idx >= ?", (truncate_from,))
        self.db.executemany(
            "INSERT INTO log VALUES (?, ?, ?, ?, ?)",
            [(e.index, e.term, e.kind.value, e.data, _crc(e.index, e.term, e.kind.value, e.data)) for e in entries],
        )

    # ---- ledger (state.StateStore) -----------------------------------------------------------

    def tx_result(self, tx_id: str) -> TxResult | None:
        return self.tx_results([tx_id]).get(tx_id)

    def tx_results(self, tx_ids: Sequence[str]) -> dict[str, TxResult]:
        """The stored results of those of ``tx_ids`` that were applied."""
        if self.index.height < self.head_height:
            raise StorageError(f"the transfer id index stops at height {self.index.height}, the chain goes "
                               f"on to {self.head_height}: a block in between is damaged")
        heights: dict[int, set[str]] = {}
        for tx_id, height in self.index.heights(tx_ids).items():
            if height <= self.head_height:  # above the head: a block to be applied again (txindex)
                heights.setdefault(height, set()).add(tx_id)
        out: dict[str, TxResult] = {}
        for height, wanted in heights.items():  # only retries get here: read their blocks back
            block = self.blocks(height, height)[0]
            for tx in block.txs:
                if tx["tx_id"] in wanted:
                    out[tx["tx_id"]] = TxResult(tx["status"], tx["reason"], height, block.hash,
                                                transfer_key(tx["sender"], tx["recipient"], tx["amount"]))
        return out

    def record_tx_ids(self, tx_ids: Sequence[str], height: int) -> None:
        self.index.record(tx_ids, height)

    def write_index_if_due(self) -> None:
        """The id index's batched write, if enough ids have gathered (TxIndex.write_if_due)."""
        self.index.write_if_due()

    def put_applied(self, index: int, block: Block | None, balances: dict[str, int]) -> None:
        if block is not None:
            self._put_block(block)
        if balances:
            self.db.executemany(
                "INSERT INTO accounts VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET balance=excluded.balance",
                list(balances.items()),
            )
        # Applied index moves with the balances, atomically (raft-cases C05).
        self._set_meta("applied", index)

    # ---- reading ---------------------------------------------------------------------------------

    def load(self) -> Recovered:
        term = self._meta("term") or 0
        voted = self._meta("voted_for")
        entries = [_entry(*row) for row in self.db.execute("SELECT idx, term, kind, data, crc FROM log ORDER BY idx")]
        for pos, e in enumerate(entries, start=1):
            if e.index != pos:
                raise StorageError(f"log has a gap: entry {e.index} where {pos} was expected")
        balances = dict(self.db.execute("SELECT name, balance FROM accounts").fetchall())
        return Recovered(HardState(term, voted), entries, self._meta("applied") or 0, balances,
                         self.head())

    def entries(self, first: int, last: int) -> list[Entry]:
        """Stored log entries first..last (the Raft log's loader for entries out of memory)."""
        return [_entry(*row) for row in self.db.execute(
            "SELECT idx, term, kind, data, crc FROM log WHERE idx BETWEEN ? AND ? ORDER BY idx", (first, last))]

    def last_log_id(self) -> tuple[int, int]:
        """(term, index) of the last stored log entry; (0, 0) for an empty log."""
        row = self.db.execute("SELECT term, idx FROM log ORDER BY idx DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def log_term(self, index: int) -> int | None:
        row = self.db.execute("SELECT term FROM log WHERE idx = ?", (index,)).fetchone()
        return row[0] if row else None

    def head(self) -> Block:
        row = self.db.execute("SELECT doc FROM blocks ORDER BY height DESC LIMIT 1").fetchone()
        return _block_from_row(row[0])

    def blocks(self, start: int, end: int) -> list[Block]:
        rows = self.db.execute(
            "SELECT doc FROM blocks WHERE height BETWEEN ? AND ? ORDER BY height", (start, end)
        )
        return [_block_from_row(r[0]) for r in rows]

    def verify_chain(self) -> int:
        """Check every stored block's hash, Merkle root and link, and that the balances and the
        applied index stored beside the chain are the ones it implies; return its height.

        Raises ChainError naming the first bad height, or StorageError.
        """
        prev: Block | None = None
        expected = 0
        balances: dict[str, int] = {}
        for height, stored_hash, doc in self.db.execute("SELECT height, hash, doc FROM blocks ORDER BY height"):
            if height != expected:
                raise ChainError(expected, "block missing")
            try:
                block = _block_from_row(doc)
            except ValueError as exc:
                raise ChainError(height, f"unreadable block: {str(exc).splitlines()[0]}") from None
            # Check the row's height first: a doc claiming another height must be reported at
            # the row's height, not at the one the tampered doc names.
            if block.height != height:
                raise ChainError(height, "stored hash or height does not match the block")
            verify_block(block, prev)
            if block.hash != stored_hash:
                raise ChainError(height, "stored hash or height does not match the block")
            if height == 0:
                balances = {tx["account"]: tx["balance"] for tx in block.txs}
            for tx in block.txs if height else ():
                if tx["status"] == "committed":
                    balances[tx["sender"]] = balances.get(tx["sender"], 0) - tx["amount"]
                    balances[tx["recipient"]] = balances.get(tx["recipient"], 0) + tx["amount"]
            prev = block
            expected += 1
        if prev is None:
            raise ChainError(0, "no genesis block")
        stored = dict(self.db.execute("SELECT name, balance FROM accounts").fetchall())
        if stored != balances:
            wrong = sorted(k for k in stored.keys() | balances.keys() if stored.get(k) != balances.get(k))
            raise StorageError(f"stored balances differ from the chain's (first: {wrong[0]})")
        applied = self._meta("applied")
        if type(applied) is not int or applied < prev.index:
            raise StorageError(f"applied index {applied!r} is behind the chain's head (log index {prev.index})")
        return expected - 1

    # ---- internals -------------------------------------------------------------------------------

    def _put_block(self, block: Block) -> None:
        self.head_height = block.height
        self.db.execute(
            "INSERT INTO blocks VALUES (?, ?, ?)",
            (block.height, block.hash, block.to_json().decode()),
        )

    def _meta(self, key: str) -> object:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: object) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, value))


class _Syncer:
    """fdatasync()s the write-ahead log on a thread of its own, so a leader's loop goes on
    (acknowledgements in, answers out) while its own copy of new entries reaches the disk.

    A sync started after a commit returned makes that commit durable, as SQLite's own sync at
    ``synchronous=FULL`` would: the commit's frames (and the log's header) are in the file by
    then. One sync serves every ticket handed out before it started (group commit). A checkpoint
    never overtakes it: the checkpoint thread syncs the log before copying it, and the log starts
    over only after everything in it was copied and the database synced.
    """

    def __init__(self, wal_path: str) -> None:
        self._fd = os.open(wal_path, os.O_RDONLY)  # SQLite made it (and synced its directory)
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_r, False)
        os.set_blocking(self._signal_w, False)  # a full pipe already says "look"
        self._cond = threading.Condition()
        self._requested = 0
        self.synced = 0
        self.error: OSError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-sync", daemon=True)
        self._thread.start()

    @property
    def signal(self) -> int:
        return self._signal_r

    def request(self) -> int:
        with self._cond:
            self._requested += 1
            self._cond.notify()
            return self._requested

    def clear_signal(self) -> None:
        try:
            while os.read(self._signal_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._requested == self.synced and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                target = self._requested
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                with self._cond:
                    self.error = exc
                    self._cond.notify_all()
                self._signal()
                return
            with self._cond:
                self.synced = target
                self._cond.notify_all()
            self._signal()

    def _signal(self) -> None:
        try:
            os.write(self._signal_w, b"s")
        except BlockingIOError:
            pass

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self.synced < ticket and self.error is None:
                self._cond.wait()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        for fd in (self._fd, self._signal_r, self._signal_w):
            os.close(fd)


class _Checkpointer:
    """Copies the write-ahead log into the database on a thread of its own (sqlite3 lets go of
    the GIL while it does I/O), so the node's loop never waits for a checkpoint. A passive
    checkpoint takes no lock a writer needs and only copies what is committed; once it has
    copied everything, the writer's next transaction starts the log from its beginning."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous=FULL")  # the log is fsynced before it is copied
            while not self._stopping.is_set():
                _, pages, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if pages == copied:  # all copied (or -1, -1: busy): nothing to do for a while
                    self._stopping.wait(_CHECKPOINT_IDLE_S)
        except sqlite3.Error:
            pass  # the loop's own checkpoints (past _LOOP_CHECKPOINT_PAGES) take over
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
