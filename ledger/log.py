"""The Raft log as the core sees it: 1-based entries and the term lookups Raft needs.

Durability is not here: the core reports what to persist (``Ready``) and the driver writes it.
Every entry's term stays in memory (8 bytes each); the entries themselves only for a recent
window once the driver supplies a ``loader`` that reads older ones back from its storage, so a
node's memory does not grow with the length of its log.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable

from ledger.messages import Entry

Loader = Callable[[int, int], list[Entry]]  # (first index, last index) -> entries, from storage


class RaftLog:
    def __init__(self, entries: Iterable[Entry] = (), loader: Loader | None = None) -> None:
        self._terms = array("q")
        self._mem: list[Entry] = []  # entries mem_start .. last_index
        self._mem_start = 1
        self.mem_bytes = 0  # data bytes of the entries in memory
        self.loader = loader
        for e in entries:
            self.append(e)

    @property
    def last_index(self) -> int:
        return len(self._terms)

    @property
    def last_term(self) -> int:
        return self._terms[-1] if self._terms else 0

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; 0 for index 0; None past the end."""
        if index == 0:
            return 0
        if 1 <= index <= len(self._terms):
            return self._terms[index - 1]
        return None

    def entry(self, index: int) -> Entry:
        return self.slice(index, index)[0]

    def slice(self, start: int, end: int) -> list[Entry]:
        """Entries with start <= index <= end."""
        end = min(end, self.last_index)
        if start > end:
            return []
        if start >= self._mem_start:
            return self._mem[start - self._mem_start : end - self._mem_start + 1]
        assert self.loader is not None, "entries were released without a loader"
        older = self.loader(start, min(end, self._mem_start - 1))
        return older + self._mem[: max(0, end - self._mem_start + 1)]

    def append(self, entry: Entry) -> None:
        if entry.index != self.last_index + 1:
            raise ValueError(f"entry {entry.index} does not follow last index {self.last_index}")
        if entry.term < self.last_term:
            raise ValueError(f"entry term {entry.term} below last term {self.last_term}")
        self._terms.append(entry.term)
        self._mem.append(entry)
        self.mem_bytes += len(entry.data)

    def truncate_from(self, index: int) -> None:
        """Drop entries with index >= ``index``."""
        del self._terms[index - 1 :]
        if index >= self._mem_start:
            gone = self._mem[index - self._mem_start :]
            del self._mem[index - self._mem_start :]
        else:
            gone, self._mem = self._mem, []
            self._mem_start = index
        self.mem_bytes -= sum(len(e.data) for e in gone)

    def release(self, upto: int, keep_bytes: int) -> None:
        """Forget in-memory copies of entries up to ``upto`` (they stay in storage), oldest
        first, while the entries in memory hold more than ``keep_bytes`` of data."""
        if self.loader is None:
            return
        upto = min(upto, self.last_index)
        drop = 0
        while self._mem_start + drop <= upto and self.mem_bytes > keep_bytes:
            self.mem_bytes -= len(self._mem[drop].data)
            drop += 1
        del self._mem[:drop]
        self._mem_start += drop

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries with the same term as the one at ``index``."""
        return bisect_left(self._terms, self._terms[index - 1], 0, index) + 1

    def last_index_of_term(self, term: int) -> int:
        """The last index holding ``term``, or 0 if the log has none."""
        i = bisect_right(self._terms, term)
        return i if i and self._terms[i - 1] == term else 0

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """The election restriction (5.4.1): is (last_term, last_index) at least as new as ours?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)
