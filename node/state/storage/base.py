"""The storage protocol every store and storage layer implements.

A store holds `Entry` records by key. Layers (the encryption envelope is one) wrap an inner
store, change what they need to and forward the rest, like `io` streams do; each layer exposes
the store it wraps as `inner`.

Threading contract: writes and restore come from the pysyncobj tick thread with the state
lock held. Reads come from gRPC worker threads: on a base store with `mvcc = True` (LMDB) they
run inside the store's read view without the state lock, so a layer's read path must not
depend on that lock; on other stores they hold the state lock. A store must never block on
the network or on Raft.

Optional capabilities of a base store (checked with getattr, see `StateMachine`): the
transactional methods `begin_write`, `commit`, `abort`, `in_write`, `read_view`,
`get_meta`/`put_meta`, `data_bytes`, and `compact(timeout)`; and `PutsRecords` (below), which
a layer that builds a new record for every value it writes (the encryption envelope) uses to
skip building an `Entry` it would only hand down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Protocol, runtime_checkable

# Stored value header: the low two bits of `Entry.header` say what `Entry.value` holds.
# Readers dispatch on these bits only, never on the value bytes.
VALUE_CLEARTEXT = 0x00
VALUE_ENCRYPTED = 0x01
VALUE_STATE_MASK = 0x03
VALUE_KNOWN_STATES = (VALUE_CLEARTEXT, VALUE_ENCRYPTED)


class StorageFull(OSError):
    """A store could not write: its disk or map is full. Nothing of the transaction is kept."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored key-value record.

    `value` is what is stored: plaintext when `header` says cleartext, an envelope when it
    says encrypted. Revisions are Raft log indexes, so they are identical on every replica.
    """

    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    header: int = VALUE_CLEARTEXT

    @property
    def state(self) -> int:
        """The cleartext/encrypted state bits of the header."""
        return self.header & VALUE_STATE_MASK


@runtime_checkable
class Storage(Protocol):
    """An ordered map from byte-string keys to `Entry` records.

    Errors: a layer that cannot authenticate or decode a stored record raises
    `sealkv.node.errors.IntegrityError` (reported to clients as DATA_LOSS, never as "not
    found"); any other exception from a write is a bug and halts the node (writes happen in
    replicated apply).
    """

    def get(self, key: bytes) -> Optional[Entry]:
        """Returns the entry stored under `key`, or None."""

    def put(self, key: bytes, entry: Entry) -> None:
        """Stores `entry` under `key`, replacing any previous entry."""

    def delete(self, key: bytes) -> bool:
        """Removes `key`; returns whether it existed. Deletes carry no plaintext."""

    def scan(self, start: bytes, end: Optional[bytes]) -> Iterator[tuple[bytes, Entry]]:
        """Yields entries with start <= key < end (end None: no upper bound) in key order.

        The caller holds one view for the whole iteration: a read view on an MVCC store
        (or the write transaction, at apply), the state lock on any other.
        """

    def count(self, start: bytes, end: Optional[bytes]) -> int:
        """Returns the number of keys with start <= key < end."""

    def dump(self) -> Iterator[tuple[bytes, Entry]]:
        """Yields every record as stored at rest (for snapshots), in key order."""

    def restore(self, records: Iterable[tuple[bytes, Entry]]) -> None:
        """Replaces the whole content with `records` (from a snapshot), as stored at rest."""


@runtime_checkable
class PutsRecords(Protocol):
    """The optional capability of a store that writes a record from its fields.

    `put_record(key, value, create_revision, mod_revision, version, header)` does exactly what
    `put(key, Entry(value, create_revision, mod_revision, version, header))` does, for the same
    callers, thread and errors. A layer must not offer it unless it applies its own `put`
    transformation there too (`StorageLayer` does not offer it).
    """

    def put_record(self, key: bytes, value: bytes, create_revision: int, mod_revision: int,
                   version: int, header: int) -> None: ...


def record_writer(store: Storage):
    """Returns `put_record` of `store` when it offers `PutsRecords`, else a function with the
    same signature that builds the `Entry` and calls `store.put`."""
    put_record = getattr(store, "put_record", None)
    if put_record is not None:
        return put_record

    def put_entry(key: bytes, value: bytes, create_revision: int, mod_revision: int,
                  version: int, header: int) -> None:
        store.put(key, Entry(value, create_revision, mod_revision, version, header))

    return put_entry


class StorageLayer:
    """Base class for a layer: forwards every call to `inner`. Override what you change."""

    def __init__(self, inner: Storage):
        self.inner = inner

    def get(self, key: bytes) -> Optional[Entry]:
        entry = self.inner.get(key)
        return None if entry is None else self.decode_entry(key, entry)

    def put(self, key: bytes, entry: Entry) -> None:
        self.inner.put(key, entry)

    def delete(self, key: bytes) -> bool:
        return self.inner.delete(key)

    def scan(self, start: bytes, end: Optional[bytes]) -> Iterator[tuple[bytes, Entry]]:
        for key, entry in self.inner.scan(start, end):
            yield key, self.decode_entry(key, entry)

    def count(self, start: bytes, end: Optional[bytes]) -> int:
        return self.inner.count(start, end)

    def dump(self) -> Iterator[tuple[bytes, Entry]]:
        return self.inner.dump()

    def restore(self, records: Iterable[tuple[bytes, Entry]]) -> None:
        self.inner.restore(records)

    def decode_entry(self, key: bytes, entry: Entry) -> Entry:
        """Turns a record read from `inner` into what this layer returns (identity here).

        Layers that transform values override this and `put`; `get` and `scan` share it.
        """
        return entry


@runtime_checkable
class WrappingLayer(Protocol):
    """The optional capability of a storage layer that wraps another store (checked at runtime).

    `inner` is the store it wraps; `decode_entry(key, entry)` turns a record as read from
    `inner` into what the layer returns (the decode path of `get`/`scan`, also used for records
    read around the layers, like `WriteResult.prev`). Same threads and lock as `Storage`;
    `decode_entry` raises `IntegrityError` for a record it cannot trust. `StorageLayer`
    implements it.
    """

    inner: Storage

    def decode_entry(self, key: bytes, entry: Entry) -> Entry: ...


def layers_of(storage: Storage) -> list[WrappingLayer]:
    """Returns the wrapping layers of a storage stack, outermost first."""
    layers = []
    while isinstance(storage, WrappingLayer):
        layers.append(storage)
        storage = storage.inner
    return layers


def base_store(storage: Storage) -> Storage:
    """Returns the innermost store under any number of layers."""
    while isinstance(storage, WrappingLayer):
        storage = storage.inner
    return storage
