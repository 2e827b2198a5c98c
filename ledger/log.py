"""The Raft log as the core sees it: entries in memory, 1-based, with the term lookups Raft needs.

Durability is not here: the core reports what to persist (``Ready``) and the driver writes it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ledger.messages import Entry


class RaftLog:
    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: list[Entry] = []
        for e in entries:
            self.append(e)

    @property
    def last_index(self) -> int:
        return len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else 0

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; 0 for index 0; None past the end."""
        if index == 0:
            return 0
        if 1 <= index <= len(self._entries):
            return self._entries[index - 1].term
        return None

    def entry(self, index: int) -> Entry:
        return self._entries[index - 1]

    def slice(self, start: int, end: int) -> list[Entry]:
        """Entries with start <= index <= end."""
        return self._entries[start - 1 : end]

    def append(self, entry: Entry) -> None:
        if entry.index != self.last_index + 1:
            raise ValueError(f"entry {entry.index} does not follow last index {self.last_index}")
        if entry.term < self.last_term:
            raise ValueError(f"entry term {entry.term} below last term {self.last_term}")
        self._entries.append(entry)

    def truncate_from(self, index: int) -> None:
        """Drop entries with index >= ``index``."""
        del self._entries[index - 1 :]

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries with the same term as the one at ``index``."""
        term = self.term_at(index)
        while index > 1 and self.term_at(index - 1) == term:
            index -= 1
        return index

    def last_index_of_term(self, term: int) -> int:
        """The last index holding ``term``, or 0 if the log has none."""
        for i in range(len(self._entries), 0, -1):
            t = self._entries[i - 1].term
            if t == term:
                return i
            if t < term:
                break
        return 0

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """The election restriction (5.4.1): is (last_term, last_index) at least as new as ours?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)
