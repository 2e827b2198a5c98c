"""The transfer id index: the same answers in memory and in RocksDB, rebuilt from the chain."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from ledger.chain import ChainError
from ledger.messages import Entry, EntryKind
from ledger.state import LedgerState, TxResult, encode_batch
from ledger.storage import Storage, StorageError
from ledger.txindex import MemoryTxIndex, RocksTxIndex, TxIndex

GENESIS = {"alice": 1000, "bob": 0}


@pytest.fixture(params=["memory", "rocksdb"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> TxIndex:
    idx: TxIndex = MemoryTxIndex() if request.param == "memory" else RocksTxIndex(tmp_path / "idx")
    yield idx
    idx.close()


def test_both_indexes_answer_alike(index: TxIndex) -> None:
    assert index.height == 0
    assert index.heights(["a", "b"]) == {}
    index.record(["a", "b"], 1)
    index.record(["c"], 2)
    assert index.heights(["c", "x", "a"]) == {"c": 2, "a": 1}
    assert index.height == 2
    index.record(["b"], 1)  # a block recorded again (applied again after a power loss): same height
    assert (index.heights(["b"]), index.height) == ({"b": 1}, 2)
    ids = [uuid.uuid4().hex for _ in range(5000)]
    index.record(ids, 3)
    assert index.heights(ids[::1000] + ["nope"]) == {i: 3 for i in ids[::1000]}


def test_rocksdb_index_survives_reopening(tmp_path: Path) -> None:
    idx = RocksTxIndex(tmp_path / "idx")
    idx.record(["a"], 4)
    idx.close()
    again = RocksTxIndex(tmp_path / "idx")
    assert (again.heights(["a"]), again.height) == ({"a": 4}, 4)
    again.close()


def test_ids_are_written_in_batches_with_the_height_they_reach(tmp_path: Path) -> None:
    idx = RocksTxIndex(tmp_path / "idx")
    idx._write_every = 100
    idx.record([f"b{k}" for k in range(60)], 1)
    idx.write_if_due()
    idx.record([f"c{k}" for k in range(30)], 2)
    idx.write_if_due()
    assert idx.db.get(b"b1") is None and idx.heights(["b1", "c2"]) == {"b1": 1, "c2": 2}  # not written yet
    idx.record([f"d{k}" for k in range(20)], 3)
    assert idx.db.get(b"b1") is None  # recording never writes: the node writes after its answers are out
    idx.write_if_due()  # 110 ids: written, with height 3
    assert int.from_bytes(idx.db.get(b"b1"), "big") == 1 and int.from_bytes(idx.db.get(b"d0"), "big") == 3
    assert (idx.heights(["b1", "c2", "d19", "e"]), idx.height) == ({"b1": 1, "c2": 2, "d19": 3}, 3)
    idx.close()


def entry(index: int, rows: list[tuple[str, str, str, int]]) -> Entry:
    return Entry(index=index, term=1, kind=EntryKind.TXS, data=encode_batch(1_700_000_000_000 + index, rows))


def apply_all(s: Storage, entries: list[Entry]) -> LedgerState:
    rec = s.load()
    state = LedgerState(s, rec.balances, rec.head, rec.applied)
    with s.transaction():
        s.save_entries(1, entries)
        for e in entries:
            state.apply(e)
            s.write_index_if_due()  # as a node does after each turn (there after the transaction)
    return state


def test_a_lost_index_is_rebuilt_from_the_chain(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    entries = [entry(i, [(f"t{i}-{k}", "alice", "bob", 1) for k in range(50)]) for i in range(1, 7)]
    s = Storage(db, GENESIS)
    apply_all(s, entries)
    first = s.tx_result("t3-7")
    s.close()
    shutil.rmtree(f"{db}.txindex")
    s = Storage(db, GENESIS)
    assert s.index.height == 6
    assert s.tx_result("t3-7") == first == TxResult("committed", None, 3, first.block_hash, "alice>bob:1")
    # a retry of any of them is still answered with its first result and pays nothing
    rec = s.load()
    state = LedgerState(s, rec.balances, rec.head, rec.applied)
    with s.transaction():
        applied = state.apply(entry(7, [("t1-0", "alice", "bob", 1), ("new", "alice", "bob", 1)]))
    assert applied.results()["t1-0"].height == 1
    assert [r[0] for r, _ in applied.outcomes] == ["new"]
    assert state.balances == {"alice": 1000 - 301, "bob": 301}
    s.close()


def test_ids_recorded_above_the_head_do_not_count(tmp_path: Path) -> None:
    """A power loss took applied state whose ids had reached the index: those blocks are applied again."""
    db = tmp_path / "node.db"
    s = Storage(db, GENESIS)
    apply_all(s, [entry(1, [("a", "alice", "bob", 5)])])
    s.record_tx_ids(["b", "c"], 2)  # as if block 2 had been applied and then lost
    assert s.tx_result("b") is None
    rec = s.load()
    state = LedgerState(s, rec.balances, rec.head, rec.applied)
    with s.transaction():
        again = state.apply(entry(2, [("b", "alice", "bob", 1), ("c", "alice", "bob", 2)]))
    assert again.block is not None and again.block.height == 2 and again.earlier == {}
    assert s.tx_result("c") == TxResult("committed", None, 2, again.block.hash, "alice>bob:2")
    s.close()


def test_a_damaged_block_stops_the_rebuild_and_the_node(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    s = Storage(db, GENESIS)
    apply_all(s, [entry(i, [(f"t{i}", "alice", "bob", 1)]) for i in range(1, 4)])
    s.db.execute("UPDATE blocks SET doc = '{\"not\": \"a block\"}' WHERE height = 2")
    s.close()
    shutil.rmtree(f"{db}.txindex")
    s = Storage(db, GENESIS)
    with pytest.raises(ChainError, match="chain invalid at height 2"):
        s.verify_chain()
    with pytest.raises(StorageError, match="index stops at height 0, the chain goes on to 3"):
        s.tx_result("t1")
    s.close()


def test_an_index_in_use_gives_a_one_line_error(tmp_path: Path) -> None:
    s = Storage(tmp_path / "node.db", GENESIS)
    with pytest.raises(StorageError, match=r"node\.db\.txindex is in use by another process \(is this node "
                                           r"running already\?\)$") as info:
        Storage(tmp_path / "node.db", GENESIS)
    assert "\n" not in str(info.value)
    s.close()


def test_ids_not_yet_written_at_a_crash_are_recorded_again_from_the_chain(tmp_path: Path) -> None:
    """kill -9 takes the ids recorded since the index's last write: the node records them again
    from its chain when it starts, so a retry of one is still answered with its first result."""
    db = tmp_path / "node.db"
    child = textwrap.dedent(f"""
        import os
        from ledger.messages import Entry, EntryKind
        from ledger.state import LedgerState, encode_batch
        from ledger.storage import Storage
        s = Storage({str(db)!r}, {GENESIS!r})
        s.index._write_every = 120
        rec = s.load()
        state = LedgerState(s, rec.balances, rec.head, rec.applied)
        entries = [Entry(index=i, term=1, kind=EntryKind.TXS, data=encode_batch(
            1_700_000_000_000 + i, [(f"t{{i}}-{{k}}", "alice", "bob", 1) for k in range(50)])) for i in range(1, 6)]
        with s.transaction():
            s.save_entries(1, entries)
            for e in entries:
                state.apply(e)
                s.write_index_if_due()
        print(s.tx_result("t5-3").block_hash, flush=True)
        os._exit(0)  # as kill -9: nothing is closed
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    # Blocks 1-3 (150 ids) were written at height 3; blocks 4 and 5 were only in memory.
    index = RocksTxIndex(Path(f"{db}.txindex"))
    assert (index.height, index.heights(["t3-0", "t4-0"])) == (3, {"t3-0": 3})
    index.close()
    s = Storage(db, GENESIS)
    assert s.index.height == 5
    assert s.tx_result("t5-3") == TxResult("committed", None, 5, done.stdout.strip(), "alice>bob:1")
    assert s.tx_result("t4-49") is not None and s.tx_result("t1-0") is not None
    s.close()


def test_a_simulated_crash_takes_the_unwritten_ids_and_the_chain_gives_them_back() -> None:
    """The simulator's crashes do to the in-memory index what kill -9 does to RocksDB's."""
    s = Storage(":memory:", GENESIS)
    apply_all(s, [entry(i, [(f"t{i}-{k}", "alice", "bob", 1) for k in range(50)]) for i in range(1, 4)])
    first = s.tx_result("t3-0")
    s.index.lose_unwritten()  # 100 ids a write: blocks 1 and 2 were written, block 3 was not
    assert (s.index.height, s.index.heights(["t2-0", "t3-0"])) == (2, {"t2-0": 2})
    s.crashed()
    assert s.index.height == 3 and s.tx_result("t3-0") == first
    s.close()


def test_catching_up_from_the_chain_writes_the_index_as_it_goes() -> None:
    """At start-up (or after a simulated crash) the ids are recorded again block by block and
    written a few thousand at a time, not gathered for the whole chain in memory."""
    s = Storage(":memory:", GENESIS)
    apply_all(s, [entry(i, [(f"t{i}-{k}", "alice", "bob", 1) for k in range(50)]) for i in range(1, 7)])
    index = s.index
    assert isinstance(index, MemoryTxIndex) and index.write_every == 100
    index._written.clear()  # as if every write had been lost
    index._written_height = 0
    s.crashed()  # records the 300 ids again from the chain
    assert index.height == 6 and len(index._unwritten) < index.write_every
    assert index.heights(["t1-0", "t6-49"]) == {"t1-0": 1, "t6-49": 6}
    s.close()
