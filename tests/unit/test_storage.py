"""The in-memory base store and the forwarding storage layer."""
import pytest

from sealkv.node.state.storage.base import (VALUE_ENCRYPTED, Entry, Storage, StorageLayer,
                                      base_store)
from sealkv.node.state.storage.memory import MemoryStore


def e(value: bytes, rev: int = 1) -> Entry:
    return Entry(value, rev, rev, 1)


@pytest.fixture
def store():
    s = MemoryStore()
    for i, key in enumerate([b"d", b"b", b"a", b"c", b"b\x00", b"\xff"], start=1):
        s.put(key, e(key, i))
    return s


def test_memory_store_implements_the_protocol():
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


def test_dump_and_restore_replace_everything(store):
    dumped = list(store.dump())
    assert [k for k, _ in dumped] == [k for k, _ in store.scan(b"", None)]
    other = MemoryStore()
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


def test_base_store_finds_the_innermost():
    base = MemoryStore()
    assert base_store(base) is base
    stack = Upper(StorageLayer(Upper(base)))
    assert base_store(stack) is base
    assert stack.inner.inner.inner is base
