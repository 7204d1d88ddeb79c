"""sealkv's Raft journal: checksummed, fsynced before it counts, read from disk, compacted.

pysyncobj 0.3.17 keeps its journal in an mmap that is never flushed (a power loss forgets
acknowledged entries, a full disk is a SIGBUS) and in RAM as a Python list. This module
replaces it behind the replication adapter, keeping the interface pysyncobj (and the
adapter's overrides) use: `add`, `deleteEntriesFrom`, `deleteEntriesTo`, `clear`, indexing
by position (negative and slices), `len`, and the term/vote/commit-index accessors.

Files (in the raft directory):
- `raft.wal`: `SEALKVJ1`, then records: u32 payload length, u64 index, u64 term,
  u32 CRC-32C of those 20 bytes, the payload, u32 CRC-32C of the payload. Indexes are
  contiguous. Only an in-memory index of offsets and terms, plus a bounded cache of the
  most recent entries, is kept in RAM; older entries are read back from the file.
- `raft.meta`: `SEALKVM1`, u32 length, JSON {term, vote, commit}, u32 CRC-32C. Replaced
  atomically (temp, fsync, rename, directory fsync) on every term or vote change, before
  the change takes effect; the commit index is written at most once a second.

Durability contract (policy "always"; "never" skips every fsync but still writes):
- `add` only buffers. `sync()` writes the buffered group with one write() and makes it
  durable with one fdatasync: the caller (the adapter, on the tick thread) calls it before
  the leader counts its own copy and before a follower answers AppendEntries, so a burst of
  entries appended together costs one fdatasync (group commit).
- The file is preallocated `PREALLOCATE_BYTES` at a time (posix_fallocate), so a group is
  written into space the file already has: an fdatasync that does not also have to commit a
  new file size took ~160 µs instead of ~260 µs on the development disk (ext4), and every
  write waits for one on the leader and on a follower. The log ends at the first record
  header that is all zeros with nothing but zeros after it (not damage, no warning); where
  the file system cannot preallocate, records are appended as before.
- Compaction (`deleteEntriesTo`, `clear`) writes the kept records to a new file, fsyncs it,
  renames it over the journal and fsyncs the directory: dropped records never stay on disk
  in the live file, and a crash leaves either the old or the new journal.

Damage found at open: a torn tail (an incomplete last record, or a bad record followed only
by zeros) is truncated with one WARNING naming the file and offset; anything else (a bad
record in the middle, a bad meta file) raises `DamagedFile`, whose one-line message names
the file, the offset and the fix.

Full disk: `sync()` returns False instead of raising and calls `on_disk_full(path)` (the
buffered entries stay in memory and are retried by the next `sync()`); the meta writer
raises `MetaNotDurable` so that no message reflecting an unsaved term or vote leaves.

Threads: everything runs on the pysyncobj tick thread, except `size_bytes` and `len`, which
other threads may read for status (plain attribute reads).
"""
from __future__ import annotations

import array
import json
import logging
import os
import struct
from typing import Callable, Optional

import google_crc32c
from pysyncobj.journal import Journal

from sealkv.node import durable
from sealkv.node.durable import DamagedFile

log = logging.getLogger(__name__)

JOURNAL_FILE = "raft.wal"
META_FILE = "raft.meta"
LEGACY_JOURNAL_FILE = "raft.journal"  # pysyncobj's mmap journal (and its ".meta"), migrated
MAGIC = b"SEALKVJ1"
META_MAGIC = b"SEALKVM1"
_HEAD = struct.Struct("<IQQ")
_U32 = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + 4
RECORD_OVERHEAD = HEADER_SIZE + 4
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024
PREALLOCATE_BYTES = 16 * 1024 * 1024

JOURNAL_FIX = ("this member's log cannot be trusted: remove the member (sealkv member remove), "
               "empty its data directory and add it back so it copies the log from the leader")
META_FIX = ("term and vote are unknown, so this member could vote twice: remove the member "
            "(sealkv member remove), empty its data directory and add it back")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as in iSCSI and etcd's WAL."""
    return google_crc32c.value(data)


def crc32c_extend(crc: int, data: bytes) -> int:
    """The CRC-32C of the bytes behind `crc` followed by `data`."""
    return google_crc32c.extend(crc, data)


def encode_record(command: bytes, idx: int, term: int) -> bytes:
    """One journal record: header, header CRC, payload, payload CRC."""
    head = _HEAD.pack(len(command), idx, term)
    return b"".join((head, _U32.pack(crc32c(head)), command, _U32.pack(crc32c(command))))


class MetaNotDurable(OSError):
    """The term or vote could not be written; nothing reflecting it may be sent."""


class MetaFile:
    """The term, vote and commit index of this member, replaced atomically on each change."""

    def __init__(self, path: str, policy: str):
        self.path = path
        self.policy = policy
        self.values = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        if raw[:len(META_MAGIC)] != META_MAGIC:
            raise DamagedFile(self.path, 0, "not a sealkv meta file", META_FIX)
        start = len(META_MAGIC) + 4
        if len(raw) < start + 4:
            raise DamagedFile(self.path, len(raw), "meta file is truncated", META_FIX)
        (length,) = _U32.unpack_from(raw, len(META_MAGIC))
        body = raw[start:start + length]
        if len(raw) != start + length + 4:
            raise DamagedFile(self.path, len(raw), "meta file has the wrong length", META_FIX)
        if _U32.unpack_from(raw, start + length)[0] != crc32c(body):
            raise DamagedFile(self.path, start, "meta checksum mismatch", META_FIX)
        try:
            values = json.loads(body)
            int(values["term"]), int(values["commit"])
        except (ValueError, KeyError, TypeError):
            raise DamagedFile(self.path, start, "meta content is not valid", META_FIX) from None
        return values

    def store(self, values: dict) -> None:
        """Replaces the file with `values` (durable on return under "always")."""
        body = json.dumps(values, sort_keys=True).encode()
        durable.write_atomically(self.path, b"".join(
            (META_MAGIC, _U32.pack(len(body)), body, _U32.pack(crc32c(body)))), self.policy)
        self.values = dict(values)


class FileJournal(Journal):
    """The Raft log of one member (see the module docstring for format and contract)."""

    def __init__(self, directory: str, policy: str = durable.FSYNC_ALWAYS, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES,
                 fdatasync: Callable[[int], None] = os.fdatasync,
                 on_disk_full: Optional[Callable[[str], None]] = None):
        """Opens (or creates) the journal and meta file in `directory`.

        Raises `DamagedFile` when either cannot be trusted. `fdatasync` is the call that
        makes appended records durable (tests count it); `on_disk_full(path)` is called
        when a write fails because the disk is full.
        """
        durable.check_policy(policy)
        self.directory = directory
        self.path = os.path.join(directory, JOURNAL_FILE)
        self.policy = policy
        self._fdatasync = fdatasync
        self._on_disk_full = on_disk_full or (lambda path: None)
        self._cache_budget = cache_bytes
        # A crash mid-compaction or mid-meta-write leaves a temporary file holding old
        # records: never keep a second copy at rest.
        for leftover in (self.path + ".compact", os.path.join(directory, META_FILE) + ".tmp"):
            durable.unlink_quietly(leftover)
        legacy = os.path.join(directory, LEGACY_JOURNAL_FILE)
        if not os.path.exists(self.path) and os.path.exists(legacy):
            _migrate_legacy(legacy, self.path, os.path.join(directory, META_FILE), policy)
        self.meta = MetaFile(os.path.join(directory, META_FILE), policy)
        self._meta_values = {"term": 0, "vote": None, "commit": 1, **self.meta.values}
        self._meta_dirty = False
        self._offsets = array.array("Q")
        self._terms = array.array("Q")
        self._first_idx = 0
        self._written = 0          # bytes of records in the file
        self._allocated = 0        # bytes of the file (records, then preallocated zeros)
        self._can_preallocate = True
        self._pending = bytearray()  # records added since the last sync, not yet written
        self._dirty = False        # written or truncated since the last fdatasync
        self._cache: list = []     # the most recent entries, for index _cache_lo onwards
        self._cache_lo = 0
        self._cache_size = 0
        self.failing = False       # the last sync could not write (disk full)
        self._durable = 0          # bytes of the file known synced (per the policy)
        self.meta_failing = False  # the last meta write could not be made (disk full)
        self._fd = self._open()
        self._durable = self._written

    # -- open and scan ----------------------------------------------------------------

    def _open(self) -> int:
        if not os.path.exists(self.path):
            durable.write_atomically(self.path, MAGIC, self.policy)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._scan(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _scan(self, fd: int) -> None:
        size = self._allocated = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                if MAGIC.startswith(magic):
                    self._cut_torn_tail(fd, 0, size, reset=True)
                    return
                raise DamagedFile(self.path, 0, "not a sealkv journal", JOURNAL_FIX)
            off = len(MAGIC)
            expected = None
            while off < size:
                head = f.read(HEADER_SIZE)
                if not any(head) and _only_zeros(f, off + len(head), size):
                    break  # preallocated space: the log ends here
                if len(head) < HEADER_SIZE:
                    return self._cut_torn_tail(fd, off, size)
                if _U32.unpack_from(head, _HEAD.size)[0] != crc32c(head[:_HEAD.size]):
                    if _only_zeros(f, off + HEADER_SIZE, size):
                        return self._cut_torn_tail(fd, off, size)
                    raise DamagedFile(self.path, off, "journal record header checksum mismatch",
                                      JOURNAL_FIX)
                length, idx, term = _HEAD.unpack_from(head)
                end = off + RECORD_OVERHEAD + length
                if end > size:
                    return self._cut_torn_tail(fd, off, size)
                payload = f.read(length)
                if _U32.unpack(f.read(4))[0] != crc32c(payload):
                    if end == size or _only_zeros(f, end, size):
                        return self._cut_torn_tail(fd, off, size)
                    raise DamagedFile(self.path, off, "journal record checksum mismatch",
                                      JOURNAL_FIX)
                if expected is not None and idx != expected:
                    raise DamagedFile(self.path, off, f"journal entry {idx} follows entry "
                                      f"{expected - 1}", JOURNAL_FIX)
                if expected is None:
                    self._first_idx = idx
                expected = idx + 1
                self._offsets.append(off)
                self._terms.append(term)
                off = end
            self._written = off

    def _cut_torn_tail(self, fd: int, off: int, size: int, reset: bool = False) -> None:
        log.warning("%s: torn tail at offset %d (%d bytes after the last whole record, a "
                    "write cut short by a crash): truncated", self.path, off, size - off)
        if reset:
            os.ftruncate(fd, 0)
            os.pwrite(fd, MAGIC, 0)  # the scan moved the shared file position
            off = len(MAGIC)
        else:
            os.ftruncate(fd, off)
        self._written = self._allocated = off
        durable.sync_file(fd, self.path, self.policy, self._fdatasync)

    # -- pysyncobj's journal interface ------------------------------------------------

    def add(self, command, idx, term):
        command = bytes(command)
        count = len(self._offsets)
        if count == 0:
            self._first_idx = idx
        elif idx != self._first_idx + count:
            raise ValueError(f"journal entries must be contiguous: got {idx} after "
                             f"{self._first_idx + count - 1}")
        if not self._cache:
            self._cache_lo, self._cache_size = idx, 0
        self._offsets.append(self._written + len(self._pending))
        self._terms.append(term)
        self._pending += encode_record(command, idx, term)
        self._cache.append((command, idx, term))
        self._cache_size += len(command) + RECORD_OVERHEAD
        if self._cache_size > self._cache_budget:
            self._evict()

    def clear(self):
        self._rewrite(len(self._offsets))

    def deleteEntriesFrom(self, entryFrom):
        count = len(self._offsets)
        entryFrom = max(0, entryFrom)
        if entryFrom >= count:
            return
        off = self._offsets[entryFrom]
        if off >= self._written:
            del self._pending[off - self._written:]
        else:
            os.ftruncate(self._fd, off)
            self._written = self._allocated = off
            self._durable = min(self._durable, off)
            self._pending.clear()
            self._dirty = True
        del self._offsets[entryFrom:]
        del self._terms[entryFrom:]
        cut = self._first_idx + entryFrom
        if cut <= self._cache_lo:
            self._cache, self._cache_lo, self._cache_size = [], cut, 0
        else:
            dropped = self._cache[cut - self._cache_lo:]
            del self._cache[cut - self._cache_lo:]
            self._cache_size -= sum(len(e[0]) + RECORD_OVERHEAD for e in dropped)

    def deleteEntriesTo(self, entryTo):
        if entryTo > 0:
            self._rewrite(min(entryTo, len(self._offsets)))

    def __getitem__(self, item):
        count = len(self._offsets)
        if isinstance(item, slice):
            return [self._entry(pos) for pos in range(*item.indices(count))]
        if item < 0:
            item += count
        if not 0 <= item < count:
            raise IndexError("journal index out of range")
        return self._entry(item)

    def __len__(self):
        return len(self._offsets)

    def _destroy(self):
        if self._fd is None:
            return
        try:
            self.sync()
            if self._meta_dirty:
                self._store_meta()
        except OSError as exc:
            log.warning("%s: could not flush at shutdown (%s)", self.path, type(exc).__name__)
        os.close(self._fd)
        self._fd = None

    def setRaftCommitIndex(self, raftCommitIndex):
        if raftCommitIndex != self._meta_values["commit"]:
            self._meta_values["commit"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self):
        commit = self._meta_values["commit"]
        return min(commit, self.last_index) if self._offsets else commit

    def setCurrentTerm(self, term, votedForNodeId):
        self._meta_values["term"] = term
        self._meta_values["vote"] = votedForNodeId
        try:
            self._store_meta()
        except OSError as exc:
            self._meta_dirty = True
            if durable.is_disk_full(exc):
                self.meta_failing = True
                self._on_disk_full(self.meta.path)
            raise MetaNotDurable(exc.errno, f"cannot save term and vote: {exc.strerror}") from exc

    def getCurrentTerm(self):
        return self._meta_values["term"]

    def getVotedForNodeId(self):
        return self._meta_values["vote"]

    def onOneSecondTimer(self):
        if not self._meta_dirty:
            return
        try:
            self._store_meta()
        except OSError as exc:
            if not durable.is_disk_full(exc):
                raise
            self.meta_failing = True
            self._on_disk_full(self.meta.path)

    # -- sealkv's additions -----------------------------------------------------------

    @property
    def first_index(self) -> int:
        """The Raft index of the first entry (position 0)."""
        return self._first_idx

    @property
    def last_index(self) -> int:
        return self._first_idx + len(self._offsets) - 1

    @property
    def size_bytes(self) -> int:
        """Bytes of the journal, including records not yet written (compaction by bytes)."""
        return self._written + len(self._pending)

    @property
    def unsynced_bytes(self) -> int:
        """Bytes of records added but not yet durable (held back while the disk is full)."""
        return self.size_bytes - self._durable

    def entries(self, pos: int, count: Optional[int] = None,
                max_bytes: Optional[int] = None) -> list:
        """Entries from position `pos`: at most `count`, stopping after the entry at which the
        payload total reaches `max_bytes` (pysyncobj's `__getEntries` semantics), read
        one at a time so a long tail is never loaded whole."""
        end = len(self._offsets) if count is None else min(len(self._offsets), pos + count)
        result, total = [], 0
        for p in range(max(0, pos), end):
            entry = self._entry(p)
            result.append(entry)
            total += len(entry[0])
            if max_bytes is not None and total >= max_bytes:
                break
        return result

    def sync(self) -> bool:
        """Writes the buffered records and makes everything durable (one fdatasync).

        Returns False when the disk is full: the records stay buffered, `on_disk_full` has
        been called, and the next call retries. Other OS errors are raised.
        """
        try:
            if self._pending:
                if self._written + len(self._pending) > self._allocated:
                    self._preallocate(self._written + len(self._pending))
                try:
                    written = 0
                    view = memoryview(self._pending)
                    while written < len(view):
                        written += os.pwrite(self._fd, view[written:], self._written + written)
                finally:
                    view.release()
                self._written += len(self._pending)
                self._pending.clear()
                self._dirty = True
            if self._dirty:
                durable.sync_file(self._fd, self.path, self.policy, self._fdatasync,
                                  self._written)
                self._dirty = False
            self._durable = self._written
        except OSError as exc:
            if not durable.is_disk_full(exc):
                raise
            # Drop whatever part of the group reached the file: it is rewritten whole.
            if self._pending:
                os.ftruncate(self._fd, self._written)
                self._allocated = self._written
            self.failing = True
            self._on_disk_full(self.path)
            return False
        self.failing = False
        return True

    # -- internals --------------------------------------------------------------------

    def _preallocate(self, end: int) -> None:
        # Zeros the scan reads as "no record" up to the next PREALLOCATE_BYTES boundary past
        # `end`; a file system that cannot (or has no room) leaves the file as it is and the
        # group is appended (a full disk then fails the write, as without preallocation).
        target = (end // PREALLOCATE_BYTES + 1) * PREALLOCATE_BYTES
        if self._can_preallocate:
            try:
                os.posix_fallocate(self._fd, self._allocated, target - self._allocated)
            except OSError as exc:
                self._can_preallocate = durable.is_disk_full(exc)  # else: never again
        self._allocated = max(end, os.fstat(self._fd).st_size)

    def _store_meta(self) -> None:
        self.meta.store(self._meta_values)
        self._meta_dirty = False
        self.meta_failing = False

    def _entry(self, pos: int):
        idx = self._first_idx + pos
        if idx >= self._cache_lo and idx - self._cache_lo < len(self._cache):
            return self._cache[idx - self._cache_lo]
        off = self._offsets[pos]
        end = self._offsets[pos + 1] if pos + 1 < len(self._offsets) else self.size_bytes
        if off >= self._written:
            raw = bytes(self._pending[off - self._written:end - self._written])
        else:
            raw = os.pread(self._fd, end - off, off)
        length, got_idx, term = _HEAD.unpack_from(raw)
        payload = raw[HEADER_SIZE:HEADER_SIZE + length]
        if (len(raw) != length + RECORD_OVERHEAD or got_idx != idx
                or _U32.unpack_from(raw, HEADER_SIZE + length)[0] != crc32c(payload)):
            raise DamagedFile(self.path, off, "journal record changed on disk while running",
                              JOURNAL_FIX)
        return payload, idx, term

    def _evict(self) -> None:
        # Drop the oldest quarter of the budget at once, so eviction is amortized O(1).
        target = self._cache_budget * 3 // 4
        drop = 0
        while self._cache_size > target and drop < len(self._cache) - 1:
            self._cache_size -= len(self._cache[drop][0]) + RECORD_OVERHEAD
            drop += 1
        del self._cache[:drop]
        self._cache_lo += drop

    def _rewrite(self, keep_from: int) -> None:
        """Replaces the file with one holding the entries from position `keep_from` on."""
        count = len(self._offsets)
        start = self._offsets[keep_from] if keep_from < count else self.size_bytes
        tmp = self.path + ".compact"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, durable.FILE_MODE)
        try:
            durable.write_all(fd, MAGIC)
            pos = start
            while pos < self._written:
                chunk = os.pread(self._fd, min(_COPY_CHUNK, self._written - pos), pos)
                durable.write_all(fd, chunk)
                pos += len(chunk)
            durable.write_all(fd, self._pending[max(0, start - self._written):])
            if self.policy == durable.FSYNC_ALWAYS:
                os.fsync(fd)
            durable.replace(tmp, self.path, self.policy)
        except OSError as exc:
            os.close(fd)
            durable.unlink_quietly(tmp)
            if not durable.is_disk_full(exc):
                raise
            log.warning("%s: compaction needs free space; the journal keeps its old entries",
                        self.path)
            self._on_disk_full(self.path)
            return
        os.close(self._fd)
        self._fd = fd
        shift = start - len(MAGIC)
        self._offsets = array.array("Q", (o - shift for o in self._offsets[keep_from:]))
        self._terms = self._terms[keep_from:]
        self._first_idx += keep_from
        self._written = self._durable = self._allocated = os.fstat(fd).st_size
        self._pending.clear()
        self._dirty = False
        if not self._offsets:
            self._cache, self._cache_lo, self._cache_size = [], 0, 0
        elif self._first_idx > self._cache_lo:
            dropped = self._first_idx - self._cache_lo
            self._cache_size -= sum(len(e[0]) + RECORD_OVERHEAD for e in self._cache[:dropped])
            del self._cache[:dropped]
            self._cache_lo = self._first_idx


def _migrate_legacy(legacy: str, path: str, meta_path: str, policy: str) -> None:
    """Copies pysyncobj's journal and meta into sealkv's files, then deletes the old ones
    (they hold the same commands in clear: no second copy stays at rest)."""
    from pysyncobj.journal import FileJournal as LegacyJournal

    try:
        old = LegacyJournal(legacy)
        entries = [old[i] for i in range(len(old))]
        meta = {"term": old.getCurrentTerm(), "vote": old.getVotedForNodeId(),
                "commit": old.getRaftCommitIndex()}
        old._destroy()
    except Exception:
        raise DamagedFile(legacy, 0, "pysyncobj journal cannot be read for migration",
                          JOURNAL_FIX) from None
    durable.write_atomically(path, MAGIC + b"".join(
        encode_record(bytes(command), idx, term) for command, idx, term in entries), policy)
    MetaFile(meta_path, policy).store(meta)
    for name in (legacy, legacy + ".meta"):
        durable.unlink_quietly(name)
    durable.sync_dir(os.path.dirname(path), policy)
    log.info("migrated %d entries from %s to %s", len(entries), legacy, path)


def _only_zeros(f, start: int, end: int) -> bool:
    """True when bytes [start, end) of the file are all zero (a preallocated, unwritten tail).

    Leaves the file position at `start`."""
    pos = f.tell()
    f.seek(start)
    try:
        remaining = end - start
        while remaining > 0:
            chunk = f.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                return False
            remaining -= len(chunk)
        return True
    finally:
        f.seek(pos)


_DIRECTORY_POLICY: dict[str, str] = {}


def register_directory(directory: str, policy: str) -> None:
    """Tells the durable rename used for pysyncobj's dump files which policy `directory` has."""
    _DIRECTORY_POLICY[os.path.abspath(directory)] = policy


def _durable_dump_replace(tmp: str, final: str) -> None:
    # pysyncobj renames a finished dump (ours, or one received from the leader) over the
    # old one; sync the new file first and the directory after, per the policy.
    policy = _DIRECTORY_POLICY.get(os.path.dirname(os.path.abspath(final)), durable.FSYNC_ALWAYS)
    if policy == durable.FSYNC_ALWAYS:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    durable.replace(tmp, final, policy)


def install() -> None:
    """Makes pysyncobj use a `FileJournal` passed as `SyncObjConf.journalFile`, and durable
    renames for its dump files. Idempotent; the adapter calls it at import."""
    import pysyncobj.serializer
    import pysyncobj.syncobj

    if getattr(pysyncobj.syncobj.createJournal, "sealkv", False):
        return
    original = pysyncobj.syncobj.createJournal

    def create_journal(journal_file=None):
        if isinstance(journal_file, FileJournal):
            return journal_file
        return original(journal_file)

    create_journal.sealkv = True
    pysyncobj.syncobj.createJournal = create_journal
    pysyncobj.serializer.atomicReplace = _durable_dump_replace
