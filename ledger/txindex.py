"""The de-duplication index: transfer id -> height of the block that holds it.

Clients choose transfer ids, mostly at random (the CLI takes a UUID). In a B-tree each random
key dirties a page of its own, and SQLite writes every dirty page per commit: past a few
hundred thousand ids that cost 20 us per id and throughput fell to a fifth. An LSM tree turns
the same inserts into sequential writes, so the index lives in RocksDB (``rocksdict``) beside
the node's SQLite database.

The index is derived from the chain, which stays the truth: the ids of the block at height h are
recorded with h. It is written a few thousand ids at a time, without fsync: whatever a crash
takes (the ids recorded since the last write at kill -9, more at a power loss), the node records
again from the chain when it starts (``Storage`` catches the index up from ``height``). An id
recorded above the chain's head (a block whose applied state the power loss took) does not
count: the block is applied again, with the same ids at the same height.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from rbloom import Bloom
from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

_HEIGHT_KEY = b"\x00height"  # not a valid transfer id (see messages.NAME_PATTERN)


class TxIndex(Protocol):
    @property
    def height(self) -> int:
        """Every block up to this height has its ids recorded."""

    def heights(self, tx_ids: Sequence[str]) -> dict[str, int]:
        """The recorded height of each of ``tx_ids`` that has one."""

    def record(self, tx_ids: Sequence[str], height: int) -> None:
        """Record the ids of the block at ``height`` (blocks are recorded in order); in memory
        until a write."""

    def write_if_due(self) -> None:
        """Write the recorded ids once enough have gathered. Not part of ``record``: the node
        calls it after a turn's answers are out (a write takes a few ms, and the transfers
        whose block it fell in waited for it)."""

    def close(self) -> None: ...


class MemoryTxIndex:
    """Dicts, for in-memory storage (the simulator and tests). Like RocksTxIndex it keeps recorded
    ids apart until it "writes" them, so that ``lose_unwritten`` can do to it what kill -9 does
    to that one."""

    def __init__(self, write_every: int = 100) -> None:
        self._written: dict[str, int] = {}
        self._unwritten: dict[str, int] = {}
        self.write_every = write_every  # ids a write
        self.height = 0
        self._written_height = 0

    def heights(self, tx_ids: Sequence[str]) -> dict[str, int]:
        written, unwritten = self._written, self._unwritten
        out = {t: written[t] for t in tx_ids if t in written}
        out.update((t, unwritten[t]) for t in tx_ids if t in unwritten)
        return out

    def record(self, tx_ids: Sequence[str], height: int) -> None:
        self._unwritten.update(dict.fromkeys(tx_ids, height))
        self.height = max(self.height, height)

    def write_if_due(self) -> None:
        if len(self._unwritten) >= self.write_every:
            self._written.update(self._unwritten)
            self._unwritten, self._written_height = {}, self.height

    def lose_unwritten(self) -> None:
        """Forget the ids recorded since the last write, as a crash of the process would."""
        self._unwritten, self.height = {}, self._written_height

    def close(self) -> None:
        pass


class _Filters:
    """Bloom filters in memory over every recorded id (rbloom, 1.2 bytes an id, 1% false
    positives): nearly every id a batch brings is new, and the filters say so in 0.1 us, where
    asking RocksDB took 2 us. A filter for four million ids (4.8 MB) to start with, then one
    twice as large each time the last is full."""

    FIRST = 4_000_000

    def __init__(self) -> None:
        self.filters = [Bloom(self.FIRST, 0.01)]
        self.room = self.FIRST

    def add(self, tx_ids: Sequence[str]) -> None:
        if len(tx_ids) > self.room:
            self.filters.append(Bloom(2 * self.filters[-1].size_in_bits // 10 + len(tx_ids), 0.01))
            self.room = self.filters[-1].size_in_bits // 10
        self.filters[-1].update(tx_ids)
        self.room -= len(tx_ids)

    def maybe(self, tx_ids: Sequence[str]) -> list[str]:
        """Those of ``tx_ids`` that may have been recorded."""
        if len(self.filters) == 1:
            f = self.filters[0]
            return [t for t in tx_ids if t in f]
        return [t for t in tx_ids if any(t in f for f in self.filters)]


class RocksTxIndex:
    """RocksDB with small, fixed memory: two memtables of about 2 MB, a 2 MB block cache holding the
    bloom filters and indexes too, one background job, so a node's RSS stays flat; in front of
    it, Bloom filters of the recorded ids, built when it opens.

    Tuned so its background work stays small and spread out (measured in the cluster, open loop
    at 30k transfers/s): every node records the same ids at the same moments, so with equal
    memtables all three flushed, and every fourth flush compacted (200-250 ms of CPU each), at
    the same instant, and latency rose for the whole cluster; each node's memtable size is
    drawn at random, so they do not. No compression (random ids do not compress, it cost CPU);
    level 1 kept small (8 MB, 2 MB files), or every level-0 compaction rewrites all of level 1,
    more each time as the index grows; writes of flushes and compactions go through a
    self-tuning rate limiter, so a compaction is a trickle rather than a burst, and reach the
    disk as they are written (``bytes_per_sync``).
    """

    def __init__(self, path: Path) -> None:
        opt = Options(raw_mode=True)
        opt.create_if_missing(True)
        opt.set_write_buffer_size(random.randrange(3 << 19, 5 << 19))  # 1.5-2.5 MB
        opt.set_max_write_buffer_number(2)
        opt.set_max_background_jobs(1)
        opt.set_compression_type(DBCompressionType.none())
        opt.set_max_bytes_for_level_base(8 << 20)
        opt.set_target_file_size_base(2 << 20)
        opt.set_auto_tuned_ratelimiter(64 << 20, 100_000, 10)
        # A file being flushed or compacted is handed to the disk every 256 KB as it is written,
        # not all at its closing fsync: an fsync of megabytes on the disk the nodes share is a
        # likely cause of the log fsyncs of tens of ms seen under load (open loop, 38k/s: p99
        # lower in 6 of 7 alternating pairs, 68-196 -> 18-67 ms in the four with stalls).
        opt.set_bytes_per_sync(256 << 10)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)  # most lookups are of new ids: answered by the filter
        table.set_block_cache(Cache(2 << 20))
        table.set_cache_index_and_filter_blocks(True)
        opt.set_block_based_table_factory(table)
        self.db = Rdict(str(path), opt)
        write = WriteOptions()
        write.sync = False
        self.db.set_write_options(write)
        stored = self.db.get(_HEIGHT_KEY)
        self.height = 0 if stored is None else int.from_bytes(stored, "big")
        self.filters = _Filters()
        keys: list[str] = []
        for key in self.db.keys():
            if key != _HEIGHT_KEY:
                keys.append(key.decode())
                if len(keys) == 65536:
                    self.filters.add(keys)
                    keys = []
        self.filters.add(keys)
        # Recorded ids not yet written, id -> height (8 bytes, big-endian).
        self._unwritten: dict[str, bytes] = {}
        # Drawn per node, as the memtable size is: nodes record the same ids at the same moments.
        self._write_every = random.randrange(3000, 5000)

    def heights(self, tx_ids: Sequence[str]) -> dict[str, int]:
        maybe = self.filters.maybe(tx_ids)
        if not maybe:
            return {}
        unwritten = self._unwritten
        out = {t: int.from_bytes(unwritten[t], "big") for t in maybe if t in unwritten}
        ask = [t for t in maybe if t not in out]
        if ask:
            found = self.db.get([t.encode() for t in ask])
            out.update((t, int.from_bytes(h, "big")) for t, h in zip(ask, found) if h is not None)
        return out

    def record(self, tx_ids: Sequence[str], height: int) -> None:
        self.filters.add(tx_ids)
        self._unwritten.update(dict.fromkeys(tx_ids, height.to_bytes(8, "big")))
        self.height = max(self.height, height)

    def write_if_due(self) -> None:
        if len(self._unwritten) >= self._write_every:
            self._write()

    def _write(self) -> None:
        """Write the ids recorded since the last write, sorted, in one atomic batch with the height
        they reach: after a crash the index is as of some block, and the node records the rest
        again from the chain when it starts.

        Thousands of sorted keys at a time, not a block's few hundred random ones: each key
        inserted into RocksDB's memtable (a skiplist of tens of thousands of keys) walked a path of
        its own through memory, cache misses all the way; sorted neighbours share most of it.
        Measured standalone, a block of 150 ids every 5 ms cost 1.9 us an id in the write and
        4.2 us of the process's CPU in all; 3,000 sorted every 100 ms 0.6 and 2.4 us.
        """
        if not self._unwritten:
            return
        batch, unwritten = WriteBatch(raw_mode=True), self._unwritten
        for t in sorted(unwritten):
            batch.put(t.encode(), unwritten[t])
        batch.put(_HEIGHT_KEY, self.height.to_bytes(8, "big"))
        self.db.write(batch)
        self._unwritten.clear()

    def close(self) -> None:
        self._write()
        self.db.close()
