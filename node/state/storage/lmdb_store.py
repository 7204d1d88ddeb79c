"""The LMDB base store: the node's data on disk, under `<data-dir>/db/`.

LMDB is a copy-on-write B+tree with one writer and MVCC readers. The state machine applies
entries inside one write transaction (`begin_write` ... `commit`) that carries the data, the
applied index and the replicated plugin state together, so the database is always a state
the log reached. Readers (`read_view`) see the last committed state and never block the writer
nor wait for it.

Durability (`sync`): "commit" fsyncs each commit with one fdatasync (LMDB's meta page is
written without its own flush, so a power loss may undo the last commit, which the log
replays); "deferred" flushes nothing per commit, for a node whose fsynced Raft log and dump
can rebuild the database (etcd's bbolt is likewise not synced per request): while the
database may hold unflushed commits, an `unsynced` file in its directory names the boot it
was opened in (written and fsynced before the first commit). A process crash loses nothing
(the kernel holds the writes); after an operating-system crash or power loss the pages may
be torn, so `open()` discards a database whose `unsynced` file names another boot, and the
node rebuilds it from its dump and log (`discarded_at_open`). `close()` flushes and
removes the file. "never" flushes nothing and keeps nothing (`--fsync never`).

Threading contract: exactly one thread (the pysyncobj tick thread, or the start-up thread
before it runs) writes, between `begin_write` and `commit`/`abort`. Any thread may read: inside
`read_view()` every call of that thread uses one read transaction (a consistent snapshot);
outside it each call uses a short read transaction of its own. The thread that holds the
write transaction reads through it (it sees its own uncommitted writes).

Keys longer than LMDB's 511-byte key limit: keys of at most `SHORT_KEY` bytes are LMDB keys
as they are. A longer key lives in the `long` table under its first `SHORT_KEY` bytes plus the
SHA-256 of the rest, and a marker `prefix + b"\\0"` in the main table holds its place in key
order (every key that starts with a `SHORT_KEY`-byte prefix P is either P itself or long, so
the marker sorts exactly where those keys belong). A scan sorts the keys of one marker's group
in memory (keys only, values are read one by one).

Errors: `StorageFull` when the disk or the map is full (the write transaction is aborted and
nothing of it is kept); anything else from LMDB is a bug or a damaged database.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import lmdb

from sealkv.node import durable
from sealkv.node.state.storage.base import Entry, StorageFull

log = logging.getLogger(__name__)

SYNC_COMMIT = "commit"
SYNC_DEFERRED = "deferred"
SYNC_NEVER = "never"
SYNC_MODES = (SYNC_COMMIT, SYNC_DEFERRED, SYNC_NEVER)
UNSYNCED_FILE = "unsynced"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"

SHORT_KEY = 400
_MARKER = b"\x00"
_RECORD = struct.Struct(">BQQQ")
_SUFFIX_LEN = struct.Struct(">H")
# Per-record bookkeeping counted against the quota besides key and value (LMDB node header).
RECORD_OVERHEAD = 16
META_DATA_BYTES = b"data_bytes"
MIN_MAP_SIZE = 64 * 1024 * 1024
# An LMDB write error of EIO on a disk with less room than this is a full disk (a short write).
SHORT_WRITE_ROOM = 4 * 1024 * 1024


def _decode(raw: bytes) -> Entry:
    header, create, mod, version = _RECORD.unpack_from(raw)
    return Entry(bytes(raw[_RECORD.size:]), create, mod, version, header)


class _ReaderGate:
    """Readers pass together; `compact` waits until none is inside and holds new ones back."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._closed = False

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float):
        with self._cond:
            self._closed = True
            if not self._cond.wait_for(lambda: self._readers == 0, timeout):
                self._closed = False
                self._cond.notify_all()
                raise TimeoutError(f"readers still inside after {timeout:.1f}s")
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


def _long_key(key: bytes) -> bytes:
    return key[:SHORT_KEY] + hashlib.sha256(key[SHORT_KEY:]).digest()


class LmdbStore:
    """An ordered map on LMDB implementing `Storage`, plus transactions and named metadata."""

    mvcc = True

    def __init__(self, path: str, *, map_size: int = 4 * 1024 ** 3, sync: str = SYNC_COMMIT,
                 max_readers: int = 512):
        """Describes the store; `open()` opens it. `map_size` is the most the file may grow to
        (address space only: the file grows with the data). `sync` is one of `SYNC_MODES`
        (see the module docstring); True and False mean "commit" and "never".

        The power-loss test's fsync record does not cover LMDB's own fsyncs, so it treats
        the database as never synced and deletes it: the node then recovers from its dump
        and journal alone, the stricter case. (Recording sizes after each commit would be
        wrong: LMDB rewrites its meta page in place, which cutting a file back cannot undo.)
        """
        if isinstance(sync, bool):
            sync = SYNC_COMMIT if sync else SYNC_NEVER
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)} (got {sync!r})")
        self.path = path
        self.map_size = max(MIN_MAP_SIZE, map_size)
        self.sync = sync
        self.max_readers = max_readers
        self.discarded_at_open = False
        self._env: Optional[lmdb.Environment] = None
        self._local = threading.local()
        self._write: Optional[lmdb.Transaction] = None
        self._gate = _ReaderGate()
        # The quota's byte count (META_DATA_BYTES), kept in memory: as last committed, and
        # the open write transaction's running total, written to the metadata once at its
        # commit rather than read, parsed and rewritten per record (a Put's hot path).
        self._bytes_committed = 0
        self._bytes_txn: Optional[int] = None

    # -- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Opens (creating if needed) the database directory, mode 0700, files 0600.

        Under "deferred" sync, first discards a database left unflushed by another boot (a
        WARNING; `discarded_at_open` is then True) and marks this one unsynced.
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if self.sync == SYNC_DEFERRED:
            self._mark_unsynced()
        try:
            self._env = lmdb.open(self.path, map_size=self.map_size, max_dbs=4,
                                  sync=self.sync == SYNC_COMMIT, metasync=False,
                                  max_readers=self.max_readers, mode=0o600, readahead=False)
        except lmdb.Error as exc:
            _raise_full(exc)
            raise
        self._kv = self._env.open_db(b"kv")
        self._long = self._env.open_db(b"long")
        self._meta = self._env.open_db(b"meta")
        with self._env.begin() as txn:
            raw = txn.get(META_DATA_BYTES, db=self._meta)
        self._bytes_committed = int(raw) if raw else 0

    def _mark_unsynced(self) -> None:
        marker = os.path.join(self.path, UNSYNCED_FILE)
        current = boot_id()
        try:
            with open(marker, "rb") as f:
                previous = f.read().decode("ascii", "replace").strip()
        except FileNotFoundError:
            previous = None
        # An unknown boot ("") never matches: the marker may be from another boot.
        stale = previous is not None and (previous != current or not current)
        if stale:
            log.warning("the database in %s was not flushed before the system restarted (an "
                        "operating-system crash or power loss): discarding it; this node "
                        "rebuilds it from its dump and Raft log", self.path)
            for name in ("data.mdb", "lock.mdb"):
                durable.unlink_if_exists(os.path.join(self.path, name))
            self.discarded_at_open = True
        if previous is None or stale:
            durable.write_atomically(marker, current.encode("ascii") + b"\n",
                                     durable.FSYNC_ALWAYS)

    def close(self) -> None:
        """Closes the database; under "deferred" sync flushes it first and removes the
        `unsynced` file (it stays when the flush fails: the next boot then rebuilds)."""
        if self._env is not None:
            if self._write is not None:
                self.abort()
            flushed = False
            if self.sync == SYNC_DEFERRED:
                try:
                    self._env.sync(True)
                    flushed = True
                except lmdb.Error as exc:
                    log.warning("could not flush the database in %s at close (%s): the next "
                                "start after a system restart rebuilds it", self.path,
                                type(exc).__name__)
            self._env.close()
            self._env = None
            if flushed:
                os.unlink(os.path.join(self.path, UNSYNCED_FILE))
                durable.sync_dir(self.path, durable.FSYNC_ALWAYS)

    @property
    def is_open(self) -> bool:
        return self._env is not None

    # -- transactions -------------------------------------------------------------------

    def begin_write(self) -> None:
        """Opens the write transaction the calling thread's next writes go into."""
        if self._write is not None:
            raise RuntimeError("a write transaction is already open")
        self._write = self._env.begin(write=True)
        self._local.txn = self._write
        self._bytes_txn = self._bytes_committed

    @property
    def in_write(self) -> bool:
        return self._write is not None

    def commit(self) -> None:
        """Commits the open write transaction (fdatasynced under "commit" sync); raises
        StorageFull."""
        txn, self._write = self._write, None
        self._local.txn = None
        total, self._bytes_txn = self._bytes_txn, None
        if txn is None:
            return
        try:
            if total != self._bytes_committed:
                txn.put(META_DATA_BYTES, b"%d" % total, db=self._meta)
            txn.commit()
        except lmdb.Error as exc:
            txn.abort()
            _raise_full(exc, self.path)
            raise
        self._bytes_committed = total

    def abort(self) -> None:
        """Drops the open write transaction and everything written in it."""
        txn, self._write = self._write, None
        self._local.txn = None
        self._bytes_txn = None
        if txn is not None:
            txn.abort()

    def begin_read(self) -> lmdb.Transaction:
        """Opens a read transaction to hand to `read_view(txn)`, possibly on another thread.

        The caller aborts it when done (LMDB keeps the pages it sees until then).
        """
        return self._env.begin(buffers=True)

    @contextmanager
    def read_view(self, txn: Optional[lmdb.Transaction] = None):
        """Makes every read of this thread inside the block use one read transaction.

        `txn` (from `begin_read`) is used and left open; without it a new one is opened and
        closed at the end of the block. Nested views share the outer transaction.
        """
        if getattr(self._local, "txn", None) is not None:
            yield self
            return
        if txn is not None:  # a view handed over by begin_read: the caller owns it
            self._local.txn = txn
            try:
                yield self
            finally:
                self._local.txn = None
            return
        with self._gate.shared():
            txn = self._env.begin(buffers=True)
            self._local.txn = txn
            try:
                yield self
            finally:
                self._local.txn = None
                txn.abort()

    @contextmanager
    def _reading(self):
        txn = getattr(self._local, "txn", None)
        if txn is not None:
            yield txn
            return
        with self._gate.shared(), self._env.begin(buffers=True) as txn:
            yield txn

    @contextmanager
    def _writing(self):
        txn = getattr(self._local, "txn", None)
        if txn is not None:
            if txn is not self._write:
                raise RuntimeError("a write inside a read view")
            yield txn
            return
        self.begin_write()
        try:
            yield self._write
        except BaseException:
            self.abort()
            raise
        self.commit()

    def __len__(self) -> int:
        return self.count(b"", None)

    # -- Storage ------------------------------------------------------------------------

    def get(self, key: bytes) -> Optional[Entry]:
        with self._reading() as txn:
            raw = self._get_raw(txn, key)
            return None if raw is None else _decode(raw)

    def _get_raw(self, txn, key: bytes):
        if len(key) <= SHORT_KEY:
            return txn.get(key, db=self._kv)
        raw = txn.get(_long_key(key), db=self._long)
        if raw is None:
            return None
        (n,) = _SUFFIX_LEN.unpack_from(raw)
        if bytes(raw[2:2 + n]) != key[SHORT_KEY:]:
            return None
        return raw[2 + n:]

    def put(self, key: bytes, entry: Entry) -> None:
        self.put_record(key, entry.value, entry.create_revision, entry.mod_revision,
                        entry.version, entry.header)

    def put_record(self, key: bytes, value: bytes, create_revision: int, mod_revision: int,
                   version: int, header: int) -> None:
        """`put(key, Entry(value, create_revision, mod_revision, version, header))` without
        building the `Entry` (the optional capability `PutsRecords` of `storage.base`)."""
        record = _RECORD.pack(header, create_revision, mod_revision, version) + value
        with self._writing() as txn:
            try:
                if len(key) <= SHORT_KEY:
                    old = txn.replace(key, record, db=self._kv)
                else:
                    suffix = key[SHORT_KEY:]
                    old = txn.replace(_long_key(key), _SUFFIX_LEN.pack(len(suffix)) + suffix
                                      + record, db=self._long)
                    if old is not None:
                        old = old[2 + len(suffix):]
                    txn.put(key[:SHORT_KEY] + _MARKER, b"", db=self._kv)
            except lmdb.Error as exc:
                _raise_full(exc, self.path)
                raise
            delta = len(record) - (len(old) if old is not None else -len(key) - RECORD_OVERHEAD)
            self._add_data_bytes(delta)

    def delete(self, key: bytes) -> bool:
        with self._writing() as txn:
            if len(key) <= SHORT_KEY:
                old = txn.pop(key, db=self._kv)
            else:
                if self._get_raw(txn, key) is None:
                    return False
                old = txn.pop(_long_key(key), db=self._long)
                old = old[2 + len(key) - SHORT_KEY:]
                prefix = key[:SHORT_KEY]
                cursor = txn.cursor(db=self._long)
                if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
                    txn.delete(prefix + _MARKER, db=self._kv)
            if old is None:
                return False
            self._add_data_bytes(-(len(old) + len(key) + RECORD_OVERHEAD))
            return True

    def scan(self, start: bytes, end: Optional[bytes]) -> Iterator[tuple[bytes, Entry]]:
        """Yields entries in key order from the calling thread's transaction.

        Call it inside `read_view()` (or the write transaction): outside, the scan holds its
        own read transaction until the generator is exhausted or closed.
        """
        with self._reading() as txn:
            yield from self._scan(txn, start, end)

    def _scan(self, txn, start: bytes, end: Optional[bytes]):
        cursor = txn.cursor(db=self._kv)
        # A long start key: its group's marker sorts after its SHORT_KEY-byte prefix.
        if not cursor.set_range(start[:SHORT_KEY]):
            return
        for raw_key, raw in cursor:
            lkey = bytes(raw_key)
            if len(lkey) == SHORT_KEY + 1:
                yield from self._scan_group(txn, lkey[:SHORT_KEY], start, end)
                continue
            if lkey < start:
                continue
            if end is not None and lkey >= end:
                return
            yield lkey, _decode(raw)

    def _scan_group(self, txn, prefix: bytes, start: bytes, end: Optional[bytes]):
        cursor = txn.cursor(db=self._long)
        suffixes = []
        if cursor.set_range(prefix):
            for raw_key, raw in cursor:
                if not bytes(raw_key).startswith(prefix):
                    break
                (n,) = _SUFFIX_LEN.unpack_from(raw)
                suffixes.append((bytes(raw[2:2 + n]), bytes(raw_key)))
        for suffix, lkey in sorted(suffixes):
            key = prefix + suffix
            if key < start:
                continue
            if end is not None and key >= end:
                return
            raw = txn.get(lkey, db=self._long)
            yield key, _decode(raw[2 + len(suffix):])

    def count(self, start: bytes, end: Optional[bytes]) -> int:
        if start == b"" and end is None:
            with self._reading() as txn:
                stat_kv = txn.stat(self._kv)["entries"]
                if stat_kv == 0:
                    return 0
                markers = 0
                if txn.stat(self._long)["entries"]:
                    markers = sum(1 for k in txn.cursor(db=self._kv).iternext(values=False)
                                  if len(k) == SHORT_KEY + 1)
                return stat_kv - markers + txn.stat(self._long)["entries"]
        return sum(1 for _ in self._keys(start, end))

    def _keys(self, start: bytes, end: Optional[bytes]) -> Iterator[bytes]:
        with self._reading() as txn:
            cursor = txn.cursor(db=self._kv)
            if not cursor.set_range(start[:SHORT_KEY]):
                return
            for raw_key in cursor.iternext(values=False):
                lkey = bytes(raw_key)
                if len(lkey) == SHORT_KEY + 1:
                    for key, _ in self._scan_group(txn, lkey[:SHORT_KEY], start, end):
                        yield key
                    continue
                if lkey < start:
                    continue
                if end is not None and lkey >= end:
                    return
                yield lkey

    def dump(self) -> Iterator[tuple[bytes, Entry]]:
        return self.scan(b"", None)

    def restore(self, records: Iterable[tuple[bytes, Entry]]) -> None:
        """Replaces every record (not the metadata) with `records`, streamed in."""
        with self._writing() as txn:
            txn.drop(self._kv, delete=False)
            txn.drop(self._long, delete=False)
            self._bytes_txn = 0
            for key, entry in records:
                self.put(key, entry)

    # -- metadata and size --------------------------------------------------------------

    def get_meta(self, name: bytes) -> Optional[bytes]:
        """Returns the metadata value stored under `name` (applied index, members, ...)."""
        with self._reading() as txn:
            raw = txn.get(name, db=self._meta)
            return None if raw is None else bytes(raw)

    def put_meta(self, name: bytes, value: bytes) -> None:
        with self._writing() as txn:
            try:
                txn.put(name, value, db=self._meta)
            except lmdb.Error as exc:
                _raise_full(exc)
                raise

    def _add_data_bytes(self, delta: int) -> None:
        self._bytes_txn = max(0, self._bytes_txn + delta)

    def data_bytes(self) -> int:
        """Keys, values and per-record overhead in use: what the quota counts (as committed;
        inside the open write transaction, on its thread, as written so far)."""
        write = self._write  # read once: the writer thread may commit meanwhile
        if write is not None and getattr(self._local, "txn", None) is write:
            return self._bytes_txn
        return self._bytes_committed

    def file_bytes(self) -> int:
        """The database file's high-water mark in bytes (LMDB reuses freed pages)."""
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    def compact(self, timeout: float) -> tuple[int, int]:
        """Rewrites the database file with only its live pages; returns (bytes before, after).

        Like etcd's defrag: LMDB reuses freed pages but never shrinks its file, and freed
        pages keep old bytes (a value overwritten by its envelope, say) until reused. The
        writer thread calls it with no write transaction open; readers wait while the live
        pages are copied into a new file that is synced and renamed over the old one, then
        the database is reopened. Raises `TimeoutError` (nothing changed) when readers stay
        longer than `timeout`, `StorageFull` when the copy finds no space (nothing changed).
        Callers must not hold a `begin_read` view meanwhile.
        """
        if self._write is not None:
            raise RuntimeError("compact with a write transaction open")
        data = os.path.join(self.path, "data.mdb")
        before = os.path.getsize(data)
        work = os.path.join(self.path, "compact")
        shutil.rmtree(work, ignore_errors=True)
        os.mkdir(work, 0o700)
        try:
            with self._gate.exclusive(timeout):
                try:
                    self._env.copy(work, compact=True)
                except lmdb.Error as exc:
                    _raise_full(exc)
                    raise
                copied = os.path.join(work, "data.mdb")
                policy = durable.FSYNC_NEVER if self.sync == SYNC_NEVER else durable.FSYNC_ALWAYS
                fd = os.open(copied, os.O_RDONLY)
                try:
                    os.fchmod(fd, 0o600)
                    if policy == durable.FSYNC_ALWAYS:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                self._env.close()
                self._env = None
                os.replace(copied, data)
                durable.sync_dir(self.path, policy)
                self.open()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return before, os.path.getsize(data)


def boot_id() -> str:
    """This boot of the operating system ("" where the kernel does not say: every restart of
    the node then counts as a new boot)."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def _raise_full(exc: lmdb.Error, path: Optional[str] = None) -> None:
    if isinstance(exc, lmdb.MapFullError):
        raise StorageFull(errno.ENOSPC, "the database map is full") from exc
    text = str(exc)
    full = "No space left" in text or "ENOSPC" in text or "Disk quota" in text
    # LMDB reports a write that came up short as EIO: on a disk with (almost) no room left
    # that is the disk filling up in the middle of the write, not a failing device.
    if not full and path is not None and "Input/output error" in text:
        try:
            stat = os.statvfs(path)
            full = stat.f_bavail * stat.f_frsize < SHORT_WRITE_ROOM
        except OSError:
            pass
    if full:
        raise StorageFull(errno.ENOSPC, "no space left on the database's disk") from exc


def dump_json(value) -> bytes:
    """Deterministic JSON bytes for metadata."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
