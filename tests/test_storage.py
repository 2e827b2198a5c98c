"""SQLite storage: recovery after restart, log truncation, atomic transactions, tamper detection,
and a writer killed in the middle of a transaction (raft-cases C05, C13)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from polling import wait_until

from ledger.chain import ChainError, genesis_block
from ledger.messages import Entry, EntryKind, Transfer
from ledger.raft import HardState
from ledger.state import LedgerState, TxResult, encode_batch
from ledger.storage import SCHEMA_VERSION, Storage, StorageError

GENESIS = {"alice": 100, "bob": 50}
TS = 1_700_000_000_000


def T(tx_id: str, sender: str, recipient: str, amount: int) -> Transfer:
    return Transfer(tx_id=tx_id, sender=sender, recipient=recipient, amount=amount)


def txs_entry(index: int, transfers: list[Transfer], term: int = 1) -> Entry:
    return Entry(index=index, term=term, kind=EntryKind.TXS, data=encode_batch(TS + index, [t.row() for t in transfers]))


def noop(index: int, term: int = 1) -> Entry:
    return Entry(index=index, term=term, kind=EntryKind.NOOP)


def state_of(storage: Storage) -> LedgerState:
    rec = storage.load()
    return LedgerState(storage, rec.balances, rec.head, rec.applied)


class Boom(Exception):
    pass


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "node-0" / "ledger.db"


def entries_1_to_4() -> list[Entry]:
    return [
        txs_entry(1, [T("t1", "alice", "bob", 10)]),
        noop(2, term=2),
        txs_entry(3, [T("t2", "bob", "carol", 20), T("t3", "carol", "alice", 100)], term=2),
        txs_entry(4, [T("t4", "alice", "dave", 5)], term=2),
    ]


# ---- a fresh store -----------------------------------------------------------------------------------


def storage_with_entries_1_to_4_applied(db_path) -> Storage:
    s = Storage(db_path, GENESIS)
    st = state_of(s)
    with s.transaction():
        s.save_entries(1, entries_1_to_4())
        for e in entries_1_to_4():
            st.apply(e)
    return s


def test_fresh_store_holds_genesis_only(db_path):
    s = Storage(db_path, GENESIS)
    rec = s.load()
    assert rec.hard_state == HardState(0, None)
    assert rec.entries == []
    assert rec.applied == 0
    assert rec.balances == GENESIS
    assert rec.head == genesis_block(GENESIS)
    assert s.verify_chain() == 0
    assert s.blocks(0, 10) == [genesis_block(GENESIS)]
    s.close()
    assert db_path.exists()


# ---- restart -------------------------------------------------------------------------------------------


def test_restart_recovers_everything(db_path):
    entries = entries_1_to_4()
    s = Storage(db_path, GENESIS)
    state = state_of(s)
    with s.transaction():
        s.save_hard_state(HardState(2, 1))
        s.save_entries(1, entries)
    with s.transaction():
        for e in entries[:3]:
            state.apply(e)
    head = state.head
    balances = dict(state.balances)
    assert balances == {"alice": 90, "bob": 40, "carol": 20}  # t3 was rejected
    s.close()

    s2 = Storage(db_path, dict(reversed(list(GENESIS.items()))))  # same genesis, other order
    rec = s2.load()
    assert rec.hard_state == HardState(2, 1)
    assert rec.entries == entries
    assert rec.applied == 3
    assert rec.balances == balances
    assert rec.head == head
    assert rec.head.height == 2
    assert s2.tx_result("t2") == TxResult("committed", None, 2, head.hash, "bob>carol:20")
    assert s2.verify_chain() == 2

    # resume applying where it stopped: entry 4 only, nothing replayed
    state2 = LedgerState(s2, rec.balances, rec.head, rec.applied)
    with s2.transaction():
        block = state2.apply(rec.entries[3]).block
    assert block.height == 3 and block.prev_hash == head.hash
    s2.close()

    s3 = Storage(db_path, GENESIS)
    rec3 = s3.load()
    assert rec3.applied == 4
    assert rec3.balances == {"alice": 85, "bob": 40, "carol": 20, "dave": 5}
    assert rec3.head == block
    assert s3.verify_chain() == 3
    s3.close()


def test_hard_state_overwrites(db_path):
    s = Storage(db_path, GENESIS)
    with s.transaction():
        s.save_hard_state(HardState(1, 2))
    with s.transaction():
        s.save_hard_state(HardState(5, None))
    s.close()
    s = Storage(db_path, GENESIS)
    assert s.load().hard_state == HardState(5, None)
    s.close()


# ---- log ---------------------------------------------------------------------------------------------


def test_save_entries_truncates_conflicting_suffix(db_path):
    s = Storage(db_path, GENESIS)
    with s.transaction():
        s.save_entries(1, [noop(i) for i in range(1, 6)])
    assert [(e.index, e.term) for e in s.load().entries] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    # a new leader overwrites from index 3 with a shorter suffix: 5 must go too
    with s.transaction():
        s.save_entries(3, [noop(3, 2), txs_entry(4, [T("x", "alice", "bob", 1)], 2)])
    s.close()
    s = Storage(db_path, GENESIS)
    got = s.load().entries
    assert [(e.index, e.term) for e in got] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert got[3] == txs_entry(4, [T("x", "alice", "bob", 1)], 2)
    # appending after the end truncates nothing
    with s.transaction():
        s.save_entries(5, [noop(5, 2)])
    assert [e.index for e in s.load().entries] == [1, 2, 3, 4, 5]
    # truncation without new entries
    with s.transaction():
        s.save_entries(2, [])
    assert [e.index for e in s.load().entries] == [1]
    s.close()


def test_load_reports_a_gap_in_the_log(db_path):
    s = Storage(db_path, GENESIS)
    with s.transaction():
        s.save_entries(1, [noop(i) for i in range(1, 4)])
    s.db.execute("DELETE FROM log WHERE idx = 2")
    with pytest.raises(StorageError, match="log has a gap: entry 3 where 2 was expected"):
        s.load()
    s.close()


# ---- transactions ------------------------------------------------------------------------------------


def test_rolled_back_transaction_leaves_nothing(db_path):
    s = Storage(db_path, GENESIS)
    state = state_of(s)
    with pytest.raises(Boom):
        with s.transaction():
            s.save_hard_state(HardState(7, 2))
            s.save_entries(1, [txs_entry(1, [T("t1", "alice", "bob", 10)])])
            state.apply(txs_entry(1, [T("t1", "alice", "bob", 10)]))
            raise Boom
    def check(store: Storage) -> None:
        rec = store.load()
        assert rec.hard_state == HardState(0, None)
        assert rec.entries == []
        assert rec.applied == 0
        assert rec.balances == GENESIS
        assert rec.head == genesis_block(GENESIS)
        # The id index is not part of the transaction: t1 is in it, above the head, so it does not count.
        assert store.index.heights(["t1"]) == {"t1": 1}
        assert store.tx_result("t1") is None
        assert store.verify_chain() == 0

    check(s)  # same connection
    s.close()
    s = Storage(db_path, GENESIS)
    check(s)  # and a fresh one
    # the store is usable after a rollback, and t1 counts once applied
    with s.transaction():
        s.save_hard_state(HardState(1, 0))
        state_of(s).apply(txs_entry(1, [T("t1", "alice", "bob", 10)]))
    assert s.load().hard_state == HardState(1, 0)
    assert s.tx_result("t1") == TxResult("committed", None, 1, s.head().hash, "alice>bob:10")
    s.close()


def test_nested_transaction_joins_the_outer_one(db_path):
    s = Storage(db_path, GENESIS)
    with pytest.raises(Boom):
        with s.transaction():
            with s.transaction():
                s.save_hard_state(HardState(3, 1))
            # the inner block did not commit on its own
            raise Boom
    assert s.load().hard_state == HardState(0, None)
    with pytest.raises(Boom):
        with s.transaction():
            with s.transaction():
                s.save_hard_state(HardState(4, 1))
                raise Boom
    assert s.load().hard_state == HardState(0, None)
    with s.transaction():
        with s.transaction():
            s.save_hard_state(HardState(5, 1))
    assert s.load().hard_state == HardState(5, 1)
    s.close()


def test_c05_applied_index_and_balances_move_together(db_path):
    """A crash (an exception) between applying and COMMIT moves neither the applied index nor the
    balances; a restart then applies the entry exactly once."""
    s = Storage(db_path, GENESIS)
    e1 = txs_entry(1, [T("t1", "alice", "bob", 10)])
    with s.transaction():
        s.save_entries(1, [e1])
    state = state_of(s)
    with pytest.raises(Boom):
        with s.transaction():
            state.apply(e1)
            raise Boom
    s.close()

    s = Storage(db_path, GENESIS)
    rec = s.load()
    assert (rec.applied, rec.balances) == (0, GENESIS)
    assert rec.head.height == 0
    state = LedgerState(s, rec.balances, rec.head, rec.applied)
    with s.transaction():
        state.apply(rec.entries[0])
    s.close()

    s = Storage(db_path, GENESIS)
    rec = s.load()
    assert (rec.applied, rec.balances) == (1, {"alice": 90, "bob": 60})
    assert rec.head.height == 1
    s.close()


def test_c05_reader_never_sees_applied_without_balances(db_path):
    """While the writer is inside its transaction another connection sees the old applied index
    and balances; after COMMIT it sees both new values at once."""
    s = Storage(db_path, GENESIS)
    state = state_of(s)
    reader = sqlite3.connect(str(db_path))

    def snapshot():
        with reader:  # one read transaction for both queries
            reader.execute("BEGIN")
            applied = reader.execute("SELECT v FROM meta WHERE k = 'applied'").fetchone()[0]
            bal = dict(reader.execute("SELECT name, balance FROM accounts").fetchall())
        return applied, bal

    with s.transaction():
        state.apply(txs_entry(1, [T("t1", "alice", "bob", 10)]))
        assert snapshot() == (0, GENESIS)
    assert snapshot() == (1, {"alice": 90, "bob": 60})
    reader.close()
    s.close()


# ---- genesis -----------------------------------------------------------------------------------------


def test_other_genesis_on_existing_dir_is_refused(db_path):
    Storage(db_path, GENESIS).close()
    with pytest.raises(StorageError) as info:
        Storage(db_path, {"alice": 100, "bob": 51})
    assert "another genesis block" in str(info.value)
    assert str(db_path) in str(info.value)
    assert "\n" not in str(info.value)
    # the original config still opens
    s = Storage(db_path, GENESIS)
    assert s.load().balances == GENESIS
    s.close()


def test_store_of_another_format_is_refused(db_path):
    s = Storage(db_path, GENESIS)
    s.db.execute("UPDATE meta SET v = 1 WHERE k = 'schema'")
    s.close()
    with pytest.raises(StorageError, match=rf"has storage format 1; this version reads format {SCHEMA_VERSION}$"):
        Storage(db_path, GENESIS)


def test_unusable_file_gives_storage_error(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="cannot open"):
        Storage(bad, GENESIS)


# ---- tamper detection --------------------------------------------------------------------------------


@pytest.fixture
def chain_db(db_path):
    """A closed store with blocks 0..4."""
    s = Storage(db_path, GENESIS)
    state = state_of(s)
    with s.transaction():
        for i in range(1, 5):
            state.apply(txs_entry(i, [T(f"t{i}", "alice", "bob", i), T(f"u{i}", "bob", "alice", 1)]))
    assert s.verify_chain() == 4
    s.close()
    return db_path


def raw_update(path, sql, *params):
    con = sqlite3.connect(str(path))
    with con:
        cur = con.execute(sql, params)
        assert cur.rowcount == 1
    con.close()


def doc_at(path, height) -> dict:
    con = sqlite3.connect(str(path))
    (doc,) = con.execute("SELECT doc FROM blocks WHERE height = ?", (height,)).fetchone()
    con.close()
    return json.loads(doc)


def verify_error(path) -> ChainError:
    s = Storage(path, GENESIS)
    try:
        with pytest.raises(ChainError) as info:
            s.verify_chain()
    finally:
        s.close()
    return info.value


def test_tampered_amount_in_stored_block(chain_db):
    doc = doc_at(chain_db, 2)
    doc["txs"][0]["amount"] = 1000
    raw_update(chain_db, "UPDATE blocks SET doc = ? WHERE height = 2", json.dumps(doc))
    err = verify_error(chain_db)
    assert err.height == 2
    assert "merkle" in err.reason


def test_tampered_recipient_in_genesis(chain_db):
    doc = doc_at(chain_db, 0)
    doc["txs"][0]["balance"] = 10**6
    raw_update(chain_db, "UPDATE blocks SET doc = ? WHERE height = 0", json.dumps(doc))
    assert verify_error(chain_db).height == 0


def test_tampered_stored_hash_column(chain_db):
    raw_update(chain_db, "UPDATE blocks SET hash = ? WHERE height = 3", "0" * 64)
    err = verify_error(chain_db)
    assert err.height == 3
    assert "stored hash" in err.reason


def test_resealed_block_breaks_the_next_link(chain_db):
    from ledger.chain import make_block

    doc = doc_at(chain_db, 1)
    txs = doc["txs"]
    txs[0]["amount"] = 77
    b = make_block(1, doc["prev_hash"], doc["term"], doc["index"], doc["timestamp"], txs)
    raw_update(chain_db, "UPDATE blocks SET doc = ?, hash = ? WHERE height = 1",
               json.dumps(b.to_doc()), b.hash)
    err = verify_error(chain_db)
    assert err.height == 2
    assert "prev_hash" in err.reason


def test_deleted_block(chain_db):
    raw_update(chain_db, "DELETE FROM blocks WHERE height = 2")
    err = verify_error(chain_db)
    assert err.height == 2
    assert err.reason == "block missing"


def test_unreadable_block_doc(chain_db):
    raw_update(chain_db, "UPDATE blocks SET doc = ? WHERE height = 3", '{"height": 3, "trunc')
    err = verify_error(chain_db)
    assert err.height == 3
    assert err.reason.startswith("unreadable block")
    assert "\n" not in str(err)


def test_doc_claiming_another_height_is_named_by_its_row(chain_db):
    doc = doc_at(chain_db, 2)
    doc["height"] = 9
    raw_update(chain_db, "UPDATE blocks SET doc = ? WHERE height = 2", json.dumps(doc))
    err = verify_error(chain_db)
    assert err.height == 2


def test_first_bad_height_is_named(chain_db):
    for h in (3, 1):
        doc = doc_at(chain_db, h)
        doc["txs"][1]["amount"] = 2
        raw_update(chain_db, "UPDATE blocks SET doc = ? WHERE height = ?", json.dumps(doc), h)
    assert verify_error(chain_db).height == 1


# ---- C13: the writer is killed in the middle of a transaction ----------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    from ledger.messages import Entry, EntryKind
    from ledger.storage import Storage

    path = sys.argv[1]
    s = Storage(path, {"alice": 100, "bob": 50})
    with s.transaction():
        s.save_entries(1, [Entry(index=i, term=1, kind=EntryKind.TXS, data=bytes([i]) * 100)
                           for i in (1, 2, 3)])
    with s.transaction():
        # big enough that SQLite spills part of it into the WAL before COMMIT
        s.save_entries(4, [Entry(index=4, term=1, kind=EntryKind.TXS, data=b"\\x04" * (6 << 20))])
        sys.stdout.write("wrote-4\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.write("committed-4\\n")
""")


def entry(i: int, size: int = 100) -> Entry:
    return Entry(index=i, term=1, kind=EntryKind.TXS, data=bytes([i]) * size)


def test_c13_writer_killed_mid_transaction(tmp_path):
    path = tmp_path / "node-1" / "ledger.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err
    assert out == "wrote-4\n"
    # the scenario is real: uncommitted pages of entry 4 reached the file before the kill
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 1 << 20

    # restart: last index 3, nothing of 4
    s = Storage(path, GENESIS)
    assert [e.index for e in s.load().entries] == [1, 2, 3]
    assert s.load().entries == [entry(1), entry(2), entry(3)]
    # the leader resends 4, then 5: they land right after 3
    with s.transaction():
        s.save_entries(4, [entry(4)])
    with s.transaction():
        s.save_entries(5, [entry(5)])
    s.close()

    s = Storage(path, GENESIS)
    rec = s.load()
    assert rec.entries == [entry(i) for i in range(1, 6)]
    assert rec.applied == 0
    assert rec.balances == GENESIS
    assert s.verify_chain() == 0
    assert s.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    s.close()


# ---- state beside the chain must be the chain's ------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    ("DELETE FROM blocks WHERE height = (SELECT max(height) FROM blocks)", "stored balances differ"),
    ("UPDATE accounts SET balance = 999999 WHERE name = 'carol'", r"stored balances differ from the chain's \(first: carol\)"),
    ("UPDATE meta SET v = 1 WHERE k = 'applied'", "applied index 1 is behind the chain's head"),
])
def test_verify_refuses_state_that_disagrees_with_the_chain(db_path, edit: str, message: str) -> None:
    s = storage_with_entries_1_to_4_applied(db_path)
    assert s.verify_chain() == 3
    s.db.execute(edit)
    with pytest.raises(StorageError, match=message):
        s.verify_chain()


def test_a_damaged_log_entry_is_refused(db_path):
    s = Storage(db_path, GENESIS)
    with s.transaction():
        s.save_entries(1, entries_1_to_4())
    # one flipped bit in an entry's data: SQLite's pages stay well formed
    s.db.execute("UPDATE log SET data = CAST(replace(CAST(data AS TEXT), 'carol', 'caroL') AS BLOB) WHERE idx = 3")
    s.close()
    s = Storage(db_path, GENESIS)
    with pytest.raises(StorageError, match=r"^log entry 3 is damaged \(its checksum does not match\)"):
        s.load()
    with pytest.raises(StorageError, match="log entry 3 is damaged"):
        s.entries(2, 4)
    assert [e.index for e in s.entries(1, 2)] == [1, 2]
    s.close()


def test_an_emptied_database_beside_a_used_index_is_refused(db_path):
    storage_with_entries_1_to_4_applied(db_path).close()
    db_path.write_bytes(b"")  # the database is lost, the index beside it is not
    for suffix in ("-wal", "-shm"):
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    with pytest.raises(StorageError, match=r"is empty, yet the transfer index beside it is not: this node's database "
                                           r"was lost; refusing to start \(remove .* to rejoin as a new node\)"):
        Storage(db_path, GENESIS)
    with pytest.raises(StorageError, match="database was lost"):  # and it stays refused
        Storage(db_path, GENESIS)


def test_checkpoints_run_off_the_loop_and_stop_with_the_storage(db_path) -> None:
    """The write-ahead log is copied into the database by the checkpoint thread, not by the
    writer's commits (those would stall the node's loop), and the thread ends on close()."""
    s = Storage(db_path, GENESIS)
    thread = s._checkpointer._thread
    assert thread.is_alive()
    blob = b"x" * 20_000
    for i in range(1, 101):  # 2 MB of log, far below the size at which the loop checkpoints itself
        with s.transaction():
            s.save_entries(i, [Entry(index=i, term=1, kind=EntryKind.TXS, data=blob)])
    # The pages reach the database file itself.
    wait_until(lambda: db_path.stat().st_size >= 2_000_000, 10, "2 MB of pages in the database file")
    s.close()
    assert not thread.is_alive()
    s2 = Storage(db_path, GENESIS)
    try:
        assert [e.index for e in s2.load().entries] == list(range(1, 101))
    finally:
        s2.close()


def test_a_sync_on_the_storage_thread_signals_and_reaches_its_ticket(db_path, monkeypatch) -> None:
    """A leader's log writes commit without a sync; request_sync() fdatasyncs the write-ahead log
    on a thread: a ticket counts as synced only once a sync that began after it has ended, and
    the signal descriptor turns readable then."""
    import os
    import select
    import threading

    calls: list[str] = []
    gates = [threading.Event(), threading.Event()]
    real = os.fdatasync

    def gated(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        gates[len(calls) - 1].wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", gated)
    s = Storage(db_path, GENESIS)
    thread = s._syncer._thread
    try:
        assert s.synced == 0 and s.sync_signal is not None
        with s.transaction(durable=False):
            s.save_entries(1, [Entry(index=1, term=1, kind=EntryKind.TXS, data=b"z" * 5000)])
        assert s.request_sync() == 1
        wait_until(lambda: len(calls) == 1, 10, "the first sync to begin")
        assert calls[0] == str(db_path) + "-wal"
        assert s.request_sync() == 2  # asked while the first sync runs: it does not cover this one
        assert s.synced == 0 and select.select([s.sync_signal], [], [], 0)[0] == []
        gates[0].set()
        wait_until(lambda: s.synced == 1, 10, "the first ticket synced")
        wait_until(lambda: len(calls) == 2, 10, "a second sync for the second ticket")
        assert s.synced == 1
        assert select.select([s.sync_signal], [], [], 0)[0] == [s.sync_signal]
        s.clear_sync_signal()
        assert select.select([s.sync_signal], [], [], 0)[0] == []
        gates[1].set()
        s.wait_synced(2)
        assert s.synced == 2
    finally:
        for g in gates:
            g.set()
        s.close()
    assert not thread.is_alive()
    assert Storage(":memory:", GENESIS).request_sync() is None  # nothing to sync in memory
