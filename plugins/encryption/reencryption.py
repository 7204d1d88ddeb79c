"""Online re-encryption: the replicated job, its commands and its deterministic apply rules.

The job rewrites every stored value that is in cleartext or sealed under a storage key other
than the active one. The leader drives it through the log (`reencryption_driver.py`): it reads
the next keys after the replicated cursor from its own store and proposes a BATCH naming them
with the `mod_revision` it saw. Values never enter the log: every replica re-seals its own
copy at apply, with its own nonces, and only when the record still has that `mod_revision`.
A client write that landed in between wins (it is newer, and already sealed under the active
key): the rewrite is skipped and counted. Revisions are not changed by a rewrite.

The job (cursor, counts, settings) is part of the replicated encryption state and of its
snapshots, so it survives a leader change and a restart and resumes where it was.

Opcode 0x06 REENCRYPT, body = 0x01 | sub-op | fields (big-endian, exact lengths):

    0x01 START   rate(4) batch_size(2) compact(1) total(8)
    0x02 BATCH   job_id(8) scanned(4) cursor_from(key) cursor_to(key) count(4)
                 count x (key, mod_revision(8))                key = length(2) bytes
    0x03 FINISH  job_id(8) cursor_from(key) again(1) total(8)
                 (again = 1: a rotation left values behind; start another pass from the top)
    0x04 COMPACTED job_id(8) ok(1)   the cluster-wide compaction that ends a finished job
                 ran (ok = 1) or failed (0); a leader that finds a finished job not yet
                 compacted runs it, so a leader change between the two does not lose it

A BATCH or FINISH whose job id or cursor does not match the replicated job is stale (a
retry, or a proposal of a former leader) and is consumed without effect.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

from sealkv.node.state.storage.base import VALUE_CLEARTEXT, VALUE_ENCRYPTED, Entry

from .commands import BodyReader, CommandDecodeError

OP_REENCRYPT = 0x06
BODY_VERSION = 0x01
SUB_START = 0x01
SUB_BATCH = 0x02
SUB_FINISH = 0x03
SUB_COMPACTED = 0x04

COMPACTION_PENDING = 0
COMPACTION_DONE = 1
COMPACTION_FAILED = 2

MAX_BATCH = 4096
MAX_KEY = 4096
DEFAULT_RATE = 2000
DEFAULT_BATCH = 256
MAX_PASSES = 16

RUNNING = "running"
DONE = "done"


@dataclass(frozen=True, slots=True)
class ReencryptStart:
    rate: int
    batch_size: int
    compact: bool
    total: int


@dataclass(frozen=True, slots=True)
class ReencryptBatch:
    job_id: int
    scanned: int
    cursor_from: bytes
    cursor_to: bytes
    items: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True, slots=True)
class ReencryptFinish:
    job_id: int
    cursor_from: bytes
    again: bool
    total: int


@dataclass(frozen=True, slots=True)
class ReencryptCompacted:
    job_id: int
    ok: bool


Command = Union[ReencryptStart, ReencryptBatch, ReencryptFinish, ReencryptCompacted]


@dataclass(frozen=True, slots=True)
class ReencryptJob:
    """The replicated job. `cursor` is the last key examined (b"": none yet)."""

    job_id: int
    state: str
    target_key: int
    cursor: bytes
    total: int
    done: int
    rewritten: int
    skipped: int
    started_index: int
    finished_index: int
    rate: int
    batch_size: int
    compact: bool
    passes: int
    compaction: int = COMPACTION_PENDING

    @property
    def needs_compaction(self) -> bool:
        """A finished job that asked for compaction and has not had it yet."""
        return self.state == DONE and self.compact and self.compaction == COMPACTION_PENDING

    def to_bytes(self) -> bytes:
        return (self.job_id.to_bytes(8, "big") + bytes((1 if self.state == DONE else 0,))
                + self.target_key.to_bytes(4, "big") + _key(self.cursor)
                + b"".join(v.to_bytes(8, "big") for v in (
                    self.total, self.done, self.rewritten, self.skipped, self.started_index,
                    self.finished_index))
                + self.rate.to_bytes(4, "big") + self.batch_size.to_bytes(2, "big")
                + bytes((int(self.compact), self.passes, self.compaction)))

    @classmethod
    def read(cls, reader: BodyReader) -> "ReencryptJob":
        job_id = reader.u64("job id")
        done_flag = reader.u8("job state")
        if done_flag > 1:
            raise CommandDecodeError("unknown re-encryption job state")
        target = reader.u32("job target key")
        cursor = _read_key(reader, "job cursor")
        total, done, rewritten, skipped, started, finished = (
            reader.u64(what) for what in ("total", "done", "rewritten", "skipped", "started",
                                          "finished"))
        rate = reader.u32("rate")
        batch = reader.u16("batch size")
        compact = reader.u8("compact")
        passes = reader.u8("passes")
        compaction = reader.u8("compaction")
        if compaction > COMPACTION_FAILED:
            raise CommandDecodeError("unknown re-encryption compaction state")
        return cls(job_id, DONE if done_flag else RUNNING, target, cursor, total, done,
                   rewritten, skipped, started, finished, rate, batch, bool(compact), passes,
                   compaction)


# ---- codec --------------------------------------------------------------------------------

def _key(key: bytes) -> bytes:
    if len(key) > MAX_KEY:
        raise ValueError(f"a key is at most {MAX_KEY} bytes")
    return len(key).to_bytes(2, "big") + bytes(key)


def _read_key(reader: BodyReader, what: str) -> bytes:
    length = reader.u16(f"{what} length")
    if length > MAX_KEY:
        raise CommandDecodeError(f"{what} is longer than {MAX_KEY} bytes")
    return reader.take(length, what)


def encode_command(command: Command) -> bytes:
    """Returns opcode 0x06 + body; raises ValueError for an invalid command."""
    head = bytes((OP_REENCRYPT, BODY_VERSION))
    if isinstance(command, ReencryptStart):
        if not (1 <= command.rate <= 0xFFFFFFFF and 1 <= command.batch_size <= MAX_BATCH):
            raise ValueError("rate must be positive and batch size in 1..4096")
        return (head + bytes((SUB_START,)) + command.rate.to_bytes(4, "big")
                + command.batch_size.to_bytes(2, "big") + bytes((int(command.compact),))
                + command.total.to_bytes(8, "big"))
    if isinstance(command, ReencryptBatch):
        if len(command.items) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} keys per batch")
        return (head + bytes((SUB_BATCH,)) + command.job_id.to_bytes(8, "big")
                + command.scanned.to_bytes(4, "big") + _key(command.cursor_from)
                + _key(command.cursor_to) + len(command.items).to_bytes(4, "big")
                + b"".join(_key(k) + rev.to_bytes(8, "big") for k, rev in command.items))
    if isinstance(command, ReencryptFinish):
        return (head + bytes((SUB_FINISH,)) + command.job_id.to_bytes(8, "big")
                + _key(command.cursor_from) + bytes((int(command.again),))
                + command.total.to_bytes(8, "big"))
    if isinstance(command, ReencryptCompacted):
        return (head + bytes((SUB_COMPACTED,)) + command.job_id.to_bytes(8, "big")
                + bytes((int(command.ok),)))
    raise TypeError(f"not a re-encryption command: {type(command).__name__}")


def decode_body(body: bytes) -> Command:
    """Decodes the body after the opcode; raises `CommandDecodeError`."""
    reader = BodyReader(body)
    if reader.u8("body version") != BODY_VERSION:
        raise CommandDecodeError("unsupported re-encryption body version")
    sub = reader.u8("sub-op")
    if sub == SUB_START:
        command: Command = ReencryptStart(reader.u32("rate"), reader.u16("batch size"),
                                          bool(reader.u8("compact")), reader.u64("total"))
        if command.rate == 0 or not 1 <= command.batch_size <= MAX_BATCH:
            raise CommandDecodeError("re-encryption rate or batch size out of range")
    elif sub == SUB_BATCH:
        job_id, scanned = reader.u64("job id"), reader.u32("scanned")
        cursor_from, cursor_to = _read_key(reader, "cursor"), _read_key(reader, "cursor")
        count = reader.u32("count")
        if count > MAX_BATCH or count * 10 > reader.remaining():
            raise CommandDecodeError(f"re-encryption batch count {count} is out of range")
        items = tuple((_read_key(reader, "key"), reader.u64("mod revision"))
                      for _ in range(count))
        command = ReencryptBatch(job_id, scanned, cursor_from, cursor_to, items)
    elif sub == SUB_FINISH:
        job_id = reader.u64("job id")
        cursor = _read_key(reader, "cursor")
        again = reader.u8("again")
        if again > 1:
            raise CommandDecodeError("re-encryption finish flag out of range")
        command = ReencryptFinish(job_id, cursor, bool(again), reader.u64("total"))
    elif sub == SUB_COMPACTED:
        job_id = reader.u64("job id")
        ok = reader.u8("ok")
        if ok > 1:
            raise CommandDecodeError("re-encryption compaction flag out of range")
        command = ReencryptCompacted(job_id, bool(ok))
    else:
        raise CommandDecodeError(f"unknown re-encryption sub-op 0x{sub:02x}")
    reader.end()
    return command


# ---- rules --------------------------------------------------------------------------------

def envelope_key_id(entry: Entry) -> int:
    """The storage key id a sealed record names (0 for cleartext or a malformed header)."""
    if entry.state != VALUE_ENCRYPTED or len(entry.value) < 6:
        return 0
    return int.from_bytes(entry.value[2:6], "big")


def needs_rewrite(entry: Entry, active_storage_id: int) -> bool:
    """Whether a record as stored is cleartext or sealed under a key that is not active."""
    if entry.state == VALUE_CLEARTEXT:
        return True
    return envelope_key_id(entry) != active_storage_id


@dataclass
class Rewriter:
    """What apply needs of the storage layer: `raw(key)` the record as stored,
    `reseal(key, raw_entry)` decode and store it again under the active key (same revisions)."""

    raw: Callable[[bytes], Optional[Entry]]
    reseal: Callable[[bytes, Entry], None]


def apply_command(job: Optional[ReencryptJob], index: int, command: Command,
                  active_storage_id: int, storage_active: bool,
                  rewriter: Rewriter) -> tuple[Optional[ReencryptJob], bool]:
    """Applies one REENCRYPT entry; returns (the new job, whether it took effect).

    Deterministic: the same job, entry and store give the same result on every replica. A
    START while a job runs, or before the storage envelope is active, and every stale BATCH
    or FINISH are consumed without effect (the leader checks before proposing).
    """
    if isinstance(command, ReencryptStart):
        if not storage_active or (job is not None and job.state == RUNNING):
            return job, False
        return ReencryptJob(index, RUNNING, active_storage_id, b"", command.total, 0, 0, 0,
                            index, 0, command.rate, command.batch_size, command.compact,
                            1), True
    if isinstance(command, ReencryptCompacted):
        if job is None or not job.needs_compaction or command.job_id != job.job_id:
            return job, False
        return dataclasses.replace(job, compaction=COMPACTION_DONE if command.ok
                                   else COMPACTION_FAILED), True
    if job is None or job.state != RUNNING or command.job_id != job.job_id \
            or command.cursor_from != job.cursor:
        return job, False
    if isinstance(command, ReencryptBatch):
        rewritten = skipped = 0
        for key, revision in command.items:
            entry = rewriter.raw(key)
            if entry is None or entry.mod_revision != revision:
                skipped += 1  # deleted or written by a client since the leader looked
                continue
            if needs_rewrite(entry, active_storage_id):
                rewriter.reseal(key, entry)
                rewritten += 1
        return dataclasses.replace(
            job, cursor=command.cursor_to, done=job.done + command.scanned,
            rewritten=job.rewritten + rewritten, skipped=job.skipped + skipped,
            target_key=active_storage_id), True
    if command.again and job.passes < MAX_PASSES:
        return dataclasses.replace(job, cursor=b"", done=0, total=command.total,
                                   passes=job.passes + 1, target_key=active_storage_id), True
    return dataclasses.replace(job, state=DONE, finished_index=index), True


def key_after(key: bytes) -> bytes:
    """The smallest key strictly greater than `key` (scans start there)."""
    return key + b"\x00"
