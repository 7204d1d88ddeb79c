"""The base stores (in-memory and LMDB) and the forwarding storage layer."""
import itertools

import pytest

from sealkv.node.state.storage.base import (VALUE_ENCRYPTED, Entry, PutsRecords, Storage,
                                      StorageLayer, base_store, record_writer)
from sealkv.node.state.storage import lmdb_store as lmdb_module
from sealkv.node.state.storage.lmdb_store import LmdbStore
from sealkv.node.state.storage.memory import MemoryStore


def e(value: bytes, rev: int = 1) -> Entry:
    return Entry(value, rev, rev, 1)


@pytest.fixture(params=["memory", "lmdb"])
def new_store(request, tmp_path):
    """Makes empty stores of the parametrised kind (LMDB ones are closed at the end)."""
    opened = []
    counter = itertools.count()

    def make():
        if request.param == "memory":
            return MemoryStore()
        s = LmdbStore(str(tmp_path / f"db{next(counter)}"), map_size=64 * 1024 * 1024)
        s.open()
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(new_store):
    s = new_store()
    for i, key in enumerate([b"d", b"b", b"a", b"c", b"b\x00", b"\xff"], start=1):
        s.put(key, e(key, i))
    return s


def test_memory_store_implements_the_protocol(store):
    assert isinstance(store, Storage)
    assert isinstance(MemoryStore(), Storage)
    assert isinstance(StorageLayer(MemoryStore()), Storage)


def test_scan_is_in_key_order_whatever_the_insert_order(store):
    assert [k for k, _ in store.scan(b"", None)] == [b"a", b"b", b"b\x00", b"c", b"d", b"\xff"]


@pytest.mark.parametrize("start, end, keys", [
    (b"b", b"c", [b"b", b"b\x00"]),
    (b"b\x00", b"d", [b"b\x00", b"c"]),
    (b"bb", None, [b"c", b"d", b"\xff"]),
    (b"c", b"c", []),
    (b"d", b"a", []),   # end before start: empty, never negative
    (b"zz", None, [b"\xff"]),
    (b"\xff\x00", None, []),
])
def test_scan_and_count_bounds(store, start, end, keys):
    assert [k for k, _ in store.scan(start, end)] == keys
    assert store.count(start, end) == len(keys)


def test_get_put_replace(store):
    assert store.get(b"a") == e(b"a", 3)
    store.put(b"a", e(b"new", 9))
    assert store.get(b"a") == e(b"new", 9)
    assert len(store) == 6
    assert store.count(b"", None) == 6
    assert store.get(b"missing") is None


def test_delete_removes_from_lookups_and_ranges(store):
    assert store.delete(b"b") is True
    assert store.delete(b"b") is False
    assert store.get(b"b") is None
    assert [k for k, _ in store.scan(b"a", b"c")] == [b"a", b"b\x00"]
    assert store.count(b"", None) == 5 and len(store) == 5
    store.put(b"b", e(b"again"))
    assert [k for k, _ in store.scan(b"a", b"c")] == [b"a", b"b", b"b\x00"]


def test_dump_and_restore_replace_everything(store, new_store):
    dumped = list(store.dump())
    assert [k for k, _ in dumped] == [k for k, _ in store.scan(b"", None)]
    other = new_store()
    other.put(b"stale", e(b"x"))
    other.restore(reversed(dumped))
    assert other.get(b"stale") is None
    assert list(other.scan(b"", None)) == dumped
    assert other.count(b"b", b"c") == 2
    other.put(b"bb", e(b"bb"))
    assert [k for k, _ in other.scan(b"b", b"c")] == [b"b", b"b\x00", b"bb"]


class Upper(StorageLayer):
    """A layer that stores values upper-cased and marks them, for tests only."""

    def put(self, key, entry):
        self.inner.put(key, Entry(entry.value.upper(), entry.create_revision,
                                  entry.mod_revision, entry.version, VALUE_ENCRYPTED))

    def decode_entry(self, key, entry):
        return Entry(entry.value.lower(), entry.create_revision, entry.mod_revision,
                     entry.version, 0)


def test_storage_layer_forwards_everything_it_does_not_change():
    base = MemoryStore()
    layer = StorageLayer(base)
    layer.put(b"a", e(b"1"))
    layer.put(b"b", e(b"2"))
    assert base.get(b"a") == e(b"1")
    assert layer.get(b"a") == e(b"1")
    assert list(layer.scan(b"", None)) == list(base.scan(b"", None))
    assert layer.count(b"a", b"b") == 1
    assert list(layer.dump()) == list(base.dump())
    assert layer.delete(b"a") is True and base.get(b"a") is None
    layer.restore([(b"z", e(b"9"))])
    assert list(base.scan(b"", None)) == [(b"z", e(b"9"))]


def test_layer_transforms_on_the_way_in_and_out_but_dump_is_at_rest():
    base = MemoryStore()
    layer = Upper(base)
    layer.put(b"k", e(b"hello"))
    assert base.get(b"k").value == b"HELLO" and base.get(b"k").state == VALUE_ENCRYPTED
    assert layer.get(b"k").value == b"hello"
    assert [en.value for _, en in layer.scan(b"", None)] == [b"hello"]
    assert [en.value for _, en in layer.dump()] == [b"HELLO"]


@pytest.mark.parametrize("key", [b"short", b"long" * 200])
def test_a_record_written_by_its_fields_is_the_record_put_writes(new_store, key):
    by_entry, by_fields = new_store(), new_store()
    entry = Entry(b"sealed bytes", 3, 7, 2, VALUE_ENCRYPTED)
    by_entry.put(key, entry)
    record_writer(by_fields)(key, b"sealed bytes", 3, 7, 2, VALUE_ENCRYPTED)
    assert by_fields.get(key) == by_entry.get(key) == entry
    assert list(by_fields.dump()) == list(by_entry.dump())
    if isinstance(by_fields, LmdbStore):
        assert isinstance(by_fields, PutsRecords)
        assert by_fields.data_bytes() == by_entry.data_bytes()


def test_a_layer_never_offers_put_record_past_its_own_put():
    # A layer's put may transform the value: writing by fields below it would skip that.
    layer = Upper(MemoryStore())
    assert not isinstance(layer, PutsRecords)
    record_writer(layer)(b"k", b"hello", 1, 1, 1, 0)
    assert layer.inner.get(b"k").value == b"HELLO"


def test_base_store_finds_the_innermost():
    base = MemoryStore()
    assert base_store(base) is base
    stack = Upper(StorageLayer(Upper(base)))
    assert base_store(stack) is base
    assert stack.inner.inner.inner is base


# -- LMDB specifics -------------------------------------------------------------------------

@pytest.fixture
def lmdb_store(tmp_path):
    s = LmdbStore(str(tmp_path / "db"), map_size=64 * 1024 * 1024)
    s.open()
    yield s
    s.close()


def test_long_keys_keep_key_order_beside_short_ones(new_store):
    store = new_store()
    prefix = b"p" * 400
    keys = [prefix, prefix + b"\x00", prefix + b"b" * 600, prefix + b"a", prefix + b"a" * 3000,
            b"p" * 399 + b"q", b"p" * 399, b"o" + b"z" * 1000, b"q"]
    for i, key in enumerate(keys, start=1):
        store.put(key, e(key[-8:], i))
    assert [k for k, _ in store.scan(b"", None)] == sorted(keys)
    assert [k for k, _ in store.scan(prefix + b"a", prefix + b"b")] == [
        prefix + b"a", prefix + b"a" * 3000]
    assert store.count(b"", None) == len(keys) and store.count(prefix, prefix + b"\xff") == 5
    assert store.get(prefix + b"a" * 3000) == e(b"aaaaaaaa", 5)
    assert store.get(prefix + b"a" * 2999) is None
    assert store.delete(prefix + b"b" * 600) and not store.delete(prefix + b"b" * 600)
    assert store.delete(prefix + b"a") and store.delete(prefix + b"a" * 3000)
    assert [k for k, _ in store.scan(prefix, None)] == [prefix, prefix + b"\x00",
                                                         b"p" * 399 + b"q", b"q"]


def test_a_write_transaction_is_invisible_to_readers_until_commit(lmdb_store):
    lmdb_store.put(b"a", e(b"old"))
    lmdb_store.begin_write()
    lmdb_store.put(b"a", e(b"new", 2))
    lmdb_store.put_meta(b"applied_index", b"2")
    assert lmdb_store.get(b"a") == e(b"new", 2)   # the writer sees its own writes

    seen = []
    import threading
    t = threading.Thread(target=lambda: seen.append((lmdb_store.get(b"a"),
                                                     lmdb_store.get_meta(b"applied_index"))))
    t.start()
    t.join()
    assert seen == [(e(b"old"), None)]
    lmdb_store.commit()
    assert lmdb_store.get(b"a") == e(b"new", 2)
    assert lmdb_store.get_meta(b"applied_index") == b"2"


def test_an_aborted_write_transaction_leaves_nothing(lmdb_store):
    lmdb_store.begin_write()
    lmdb_store.put(b"a", e(b"x"))
    lmdb_store.put_meta(b"applied_index", b"9")
    lmdb_store.abort()
    assert lmdb_store.get(b"a") is None and lmdb_store.get_meta(b"applied_index") is None
    assert lmdb_store.data_bytes() == 0


def test_a_read_view_is_a_stable_snapshot_while_writes_commit(lmdb_store):
    for i in range(100):
        lmdb_store.put(b"k%03d" % i, e(b"v"))
    txn = lmdb_store.begin_read()
    lmdb_store.delete(b"k000")
    lmdb_store.put(b"k999", e(b"late"))
    with lmdb_store.read_view(txn):
        keys = [k for k, _ in lmdb_store.scan(b"", None)]
    txn.abort()
    assert len(keys) == 100 and keys[0] == b"k000" and b"k999" not in keys
    assert lmdb_store.count(b"", None) == 100  # 99 old + k999


def test_data_bytes_follow_puts_replacements_and_deletes(lmdb_store):
    lmdb_store.put(b"k", e(b"x" * 100))
    first = lmdb_store.data_bytes()
    assert first >= 101
    lmdb_store.put(b"k", e(b"x" * 300))
    assert lmdb_store.data_bytes() == first + 200
    lmdb_store.put(b"L" * 500, e(b"y"))
    lmdb_store.delete(b"L" * 500)
    lmdb_store.delete(b"k")
    assert lmdb_store.data_bytes() == 0


def test_data_bytes_are_kept_per_transaction_and_survive_reopening(tmp_path):
    # The count lives in memory between commits: the writer sees its own transaction's
    # total, every other thread the committed one, an abort drops it, a reopen reads it back.
    import threading
    path = str(tmp_path / "db")
    s = LmdbStore(path, map_size=64 * 1024 * 1024)
    s.open()
    s.put(b"a", e(b"x" * 100))
    committed = s.data_bytes()
    s.begin_write()
    s.put(b"b", e(b"y" * 50))
    inside = s.data_bytes()
    seen = []
    reader = threading.Thread(target=lambda: seen.append(s.data_bytes()))
    reader.start()
    reader.join()
    assert inside > committed and seen == [committed]
    s.abort()
    assert s.data_bytes() == committed
    s.begin_write()
    s.put(b"b", e(b"y" * 50))
    s.commit()
    assert s.data_bytes() == inside
    s.restore([(b"c", e(b"z"))])
    after_restore = s.data_bytes()
    s.close()
    again = LmdbStore(path, map_size=64 * 1024 * 1024)
    again.open()
    assert again.data_bytes() == after_restore and 0 < after_restore < committed
    again.close()


def test_data_bytes_read_by_another_thread_while_the_writer_commits_is_a_number(lmdb_store):
    # The fault campaign (seed 14) saw a gRPC thread's admission get None here: it read
    # "a write is open" just before the writer committed, and "no read view" matched the
    # then-closed transaction. A tiny switch interval makes that interleaving frequent.
    import sys
    import threading
    import time
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop = time.monotonic() + 2.0
    seen: list = []

    def writer() -> None:
        while time.monotonic() < stop and not seen:
            lmdb_store.begin_write()
            lmdb_store.commit()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while time.monotonic() < stop and not seen:
            value = lmdb_store.data_bytes()
            if not isinstance(value, int):
                seen.append(value)
    finally:
        thread.join()
        sys.setswitchinterval(previous)
    assert seen == []


def test_data_survives_reopening(tmp_path):
    path = str(tmp_path / "db")
    s = LmdbStore(path, map_size=64 * 1024 * 1024)
    s.open()
    s.put(b"a", e(b"1"))
    s.put(b"L" * 450, e(b"2"))
    s.close()
    s = LmdbStore(path, map_size=64 * 1024 * 1024)
    s.open()
    assert [k for k, _ in s.scan(b"", None)] == [b"L" * 450, b"a"]
    s.close()


def crash(s: LmdbStore) -> None:
    """Ends `s` as a process crash would: no flush and no clean close, so its `unsynced`
    marker stays."""
    s._env.close()
    s._env = None


def deferred(path: str) -> LmdbStore:
    s = LmdbStore(path, map_size=64 * 1024 * 1024, sync=lmdb_module.SYNC_DEFERRED)
    s.open()
    return s


def test_deferred_sync_keeps_the_database_across_a_clean_close_and_a_process_crash(
        tmp_path, monkeypatch):
    path = str(tmp_path / "db")
    monkeypatch.setattr(lmdb_module, "boot_id", lambda: "boot-1")
    s = deferred(path)
    assert (tmp_path / "db" / "unsynced").read_text().strip() == "boot-1"
    s.put(b"a", e(b"1"))
    s.close()
    assert not (tmp_path / "db" / "unsynced").exists()  # flushed: safe in any later boot
    monkeypatch.setattr(lmdb_module, "boot_id", lambda: "boot-2")
    s = deferred(path)
    assert s.get(b"a") == e(b"1") and not s.discarded_at_open
    s.put(b"b", e(b"2"))
    crash(s)  # the kernel has the pages
    s = deferred(path)  # the same boot
    assert s.get(b"b") == e(b"2") and not s.discarded_at_open
    s.close()


def test_deferred_sync_discards_a_database_left_unflushed_by_another_boot(tmp_path, monkeypatch,
                                                                        caplog):
    path = str(tmp_path / "db")
    monkeypatch.setattr(lmdb_module, "boot_id", lambda: "boot-1")
    s = deferred(path)
    s.put(b"a", e(b"1"))
    crash(s)  # then the machine restarts
    monkeypatch.setattr(lmdb_module, "boot_id", lambda: "boot-2")
    s = deferred(path)
    assert s.discarded_at_open and s.get(b"a") is None and s.count(b"", None) == 0
    assert "rebuilds it from its dump and Raft log" in caplog.text
    assert (tmp_path / "db" / "unsynced").read_text().strip() == "boot-2"
    s.close()


def test_deferred_sync_without_a_known_boot_discards_after_any_unclean_stop(tmp_path,
                                                                           monkeypatch):
    path = str(tmp_path / "db")
    monkeypatch.setattr(lmdb_module, "boot_id", lambda: "")
    s = deferred(path)
    s.put(b"a", e(b"1"))
    crash(s)
    s = deferred(path)
    assert s.discarded_at_open and s.get(b"a") is None
    s.close()


def test_an_unknown_sync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync must be one of"):
        LmdbStore(str(tmp_path / "db"), sync="sometimes")


def test_compact_rewrites_the_file_without_old_bytes_and_keeps_every_record(tmp_path):
    s = LmdbStore(str(tmp_path / "db"), map_size=64 * 1024 * 1024)
    s.open()
    secret = b"PLAINTEXT-CANARY-" * 64
    for i in range(200):
        s.put(b"k%03d" % i, e(secret))
    for i in range(200):
        s.put(b"k%03d" % i, e(b"sealed-%03d" % i))  # the old pages are freed, not wiped
    data = tmp_path / "db" / "data.mdb"
    assert secret[:32] in data.read_bytes()
    before, after = s.compact(5.0)
    assert after < before and secret[:32] not in data.read_bytes()
    assert [en.value for _, en in s.scan(b"", None)] == [b"sealed-%03d" % i for i in range(200)]
    s.put(b"after", e(b"x"))
    s.close()
    s = LmdbStore(str(tmp_path / "db"), map_size=64 * 1024 * 1024)
    s.open()
    assert s.count(b"", None) == 201 and s.get(b"after") == e(b"x")
    s.close()


def test_compact_waits_for_readers_and_gives_up_after_its_timeout(tmp_path):
    import threading

    s = LmdbStore(str(tmp_path / "db"), map_size=64 * 1024 * 1024)
    s.open()
    s.put(b"a", e(b"1"))
    inside, release = threading.Event(), threading.Event()

    def reader():
        with s.read_view():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    inside.wait(5)
    with pytest.raises(TimeoutError):
        s.compact(0.2)
    release.set()
    t.join()
    assert s.get(b"a") == e(b"1")
    s.compact(5.0)
    assert s.get(b"a") == e(b"1")
    s.close()
def test_wrapping_layers_are_found_by_their_declared_capability():
    from sealkv.node.state.storage.base import base_store, layers_of

    store = MemoryStore()
    inner_layer = StorageLayer(store)
    outer_layer = StorageLayer(inner_layer)
    assert layers_of(outer_layer) == [outer_layer, inner_layer]
    assert base_store(outer_layer) is store and layers_of(store) == []


def test_an_lmdb_eio_is_a_full_disk_only_when_the_disk_has_almost_no_room(tmp_path):
    # LMDB reports a write that came up short as EIO. With room left on the disk that is a
    # failing device: not StorageFull (the node halts rather than retry). The full-disk side
    # runs on a real full tmpfs in tests/integration/test_disk_full_log.py.
    import lmdb

    from sealkv.node.state.storage.base import StorageFull

    eio = lmdb.Error("mdb_txn_commit: Input/output error")
    lmdb_module._raise_full(eio, str(tmp_path))  # room: nothing raised here
    lmdb_module._raise_full(eio)  # no path to look at: never guessed full
    with pytest.raises(StorageFull):
        lmdb_module._raise_full(lmdb.Error("mdb_put: No space left on device"), str(tmp_path))
