"""RaftLog: term lookups, truncation, and entries released from memory but read back from storage."""

from __future__ import annotations

from ledger.log import RaftLog
from ledger.messages import Entry, EntryKind

TERMS = [1, 1, 2, 2, 2, 5, 5, 7]


def build(loader: bool = True) -> tuple[RaftLog, dict[int, Entry], list[tuple[int, int]]]:
    store: dict[int, Entry] = {}
    reads: list[tuple[int, int]] = []

    def load(first: int, last: int) -> list[Entry]:
        reads.append((first, last))
        return [store[i] for i in range(first, last + 1)]

    log = RaftLog([], load if loader else None)
    for i, t in enumerate(TERMS, start=1):
        store[i] = Entry(index=i, term=t, kind=EntryKind.TXS, data=b"%d" % i)
        log.append(store[i])
    return log, store, reads


def test_term_runs() -> None:
    log, _, _ = build()
    assert [log.first_index_of_term(i) for i in range(1, 9)] == [1, 1, 3, 3, 3, 6, 6, 8]
    assert [log.last_index_of_term(t) for t in (1, 2, 3, 5, 7, 9)] == [2, 5, 0, 7, 8, 0]
    assert (log.term_at(0), log.term_at(8), log.term_at(9)) == (0, 7, None)


def test_released_entries_come_back_from_storage() -> None:
    log, store, reads = build()
    log.release(4, keep_bytes=0)
    assert reads == []
    assert log.slice(2, 6) == [store[i] for i in range(2, 7)]
    assert reads == [(2, 4)]
    assert log.entry(7) == store[7] and reads == [(2, 4)]  # still in memory
    assert log.term_at(1) == 1  # terms never leave memory


def test_truncation_below_the_memory_window() -> None:
    log, store, _ = build()
    log.release(5, keep_bytes=0)
    log.truncate_from(3)
    assert (log.last_index, log.last_term) == (2, 1)
    store[3] = Entry(index=3, term=8, kind=EntryKind.NOOP)
    log.append(store[3])
    assert [e.term for e in log.slice(1, 3)] == [1, 1, 8]


def test_without_a_loader_nothing_is_released() -> None:
    log, store, _ = build(loader=False)
    log.release(6, keep_bytes=0)
    assert log.slice(1, 8) == [store[i] for i in range(1, 9)]


def test_memory_is_bounded_by_bytes() -> None:
    log, store, reads = build()
    assert log.mem_bytes == 8  # one byte of data each
    log.release(8, keep_bytes=3)  # oldest first, until 3 bytes are left
    assert log.mem_bytes == 3
    assert log.slice(6, 8) == [store[6], store[7], store[8]] and reads == []
    assert log.slice(5, 5) == [store[5]] and reads == [(5, 5)]
    log.release(8, keep_bytes=3)  # nothing more to do
    assert log.mem_bytes == 3
    log.truncate_from(7)
    assert log.mem_bytes == 1
    big = Entry(index=7, term=9, kind=EntryKind.TXS, data=b"x" * 100)
    log.append(big)
    log.release(6, keep_bytes=0)  # never beyond what is applied: entry 7 stays
    assert log.mem_bytes == 100 and log.slice(7, 7) == [big]
