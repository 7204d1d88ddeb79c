"""The backup file of `sealkv snapshot save|status|restore`.

Layout (integers big-endian)::

    magic "SEALKVBK" (8) | format version (2) | meta length (4) | meta (JSON)
    | body: the state machine's encoded snapshot (`machine.encode_snapshot_header`, one
      `encode_record` per record as stored at rest, `END_RECORD`)
    | SHA-256 (32) of every byte before it

`meta` says where and when the snapshot was taken: `format_version`, `created` (UTC, ISO
8601), `node` (the member that streamed it), `applied_index`, `term`, `sealkv_version`. The
body is what a node writes into its Raft dumps: records stay as they are stored (envelopes
stay envelopes) and plugin states as they are replicated (the encryption plugin's holds its
data keys wrapped by the KEK only), so the file never holds more than a node's disk does.

`BackupWriter` writes a file atomically (a `.part` file created exclusively with mode 0600,
fsync, rename, directory fsync); `BackupReader` reads one front to back, hashing as it goes,
and `verify()` compares the trailing SHA-256 once everything was read. Both run on the CLI's
thread; neither loads a whole file in memory.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from typing import BinaryIO, Iterator, Optional

from sealkv.node import durable
from sealkv.node.state.machine import read_records, read_snapshot_header
from sealkv.node.state.storage.base import VALUE_ENCRYPTED, Entry

MAGIC = b"SEALKVBK"
FORMAT_VERSION = 1
DIGEST_BYTES = 32
_PREFIX = struct.Struct(">8sHI")
_READ_BLOCK = 1 << 20


class BackupError(ValueError):
    """The file is not a usable backup; the message names the file, what is wrong and the fix."""


def utc_now() -> str:
    """The current time as the `created` field of a backup's meta."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class BackupWriter:
    """Writes a backup file at `path` atomically (see the module docstring).

    Call `write_meta` once, `write_body` for each piece of the body in order, then `commit`;
    `abort` (also on leaving the `with` block by an exception) removes the partial file, so
    `path` either keeps what it had or gets the whole new file.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.tmp = self.path + ".part"
        durable.unlink_if_exists(self.tmp)  # left by an earlier save that was killed
        self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                          | getattr(os, "O_CLOEXEC", 0), durable.FILE_MODE)
        self._sha = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> "BackupWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.abort()

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        durable.write_all(self._fd, data)
        self.size += len(data)

    def write_meta(self, meta: dict) -> None:
        raw = json.dumps(dict(meta, format_version=FORMAT_VERSION), sort_keys=True).encode()
        self._write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw)

    def write_body(self, blob: bytes) -> None:
        self._write(blob)

    def commit(self) -> str:
        """Appends the SHA-256, syncs and renames the file into place; returns the digest
        (hex)."""
        digest = self._sha.digest()
        durable.write_all(self._fd, digest)
        self.size += len(digest)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        durable.replace(self.tmp, self.path, durable.FSYNC_ALWAYS)
        return digest.hex()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        durable.unlink_if_exists(self.tmp)


class _HashingReader:
    """Reads at most `limit` bytes of `f`, feeding every byte read into a SHA-256."""

    def __init__(self, f: BinaryIO, limit: int):
        self._f = f
        self.remaining = limit
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self._f.read(max(0, min(n, self.remaining)))
        self.remaining -= len(data)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.remaining > 0 and self.read(_READ_BLOCK):
            pass


class BackupReader:
    """Reads the backup file at `path`: `meta` and `state` (the body's header: applied
    index, members, plugin states as bytes, ...) on open, then `records()` once, then
    `verify()`. Raises `BackupError` for a file that is damaged, truncated, or of another
    format; a damage found while parsing is reported as the checksum mismatch it is when the
    checksum does not match."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")
        try:
            self.file_bytes = os.fstat(self._f.fileno()).st_size
            if self.file_bytes < _PREFIX.size + DIGEST_BYTES:
                raise BackupError(f"{path} is not a sealkv backup (too short: "
                                  f"{self.file_bytes} bytes)")
            self._src = _HashingReader(self._f, self.file_bytes - DIGEST_BYTES)
            magic, version, meta_len = _PREFIX.unpack(self._src.read(_PREFIX.size))
            if magic != MAGIC:
                raise BackupError(f"{path} is not a sealkv backup (no SEALKVBK header)")
            if version != FORMAT_VERSION:
                raise BackupError(f"{path} has backup format version {version}; this sealkv "
                                  f"reads version {FORMAT_VERSION}: use a matching sealkv")
            self.format_version = version
            try:
                self.meta = json.loads(self._src.read(meta_len))
                self.state = read_snapshot_header(self._src)
            except ValueError as exc:
                raise self._damaged(exc) from None
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> "BackupReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def applied_index(self) -> int:
        return int(self.state["applied_index"])

    def records(self) -> Iterator[tuple[bytes, Entry]]:
        """Yields every record as stored at rest, in key order."""
        try:
            yield from read_records(self._src)
        except ValueError as exc:
            raise self._damaged(exc) from None

    def verify(self) -> str:
        """After `records()` was exhausted: raises `BackupError` unless the file ends with
        the SHA-256 of everything before it; returns the digest (hex)."""
        if self._src.remaining:
            raise self._damaged(ValueError(f"{self._src.remaining} bytes after the last record"))
        digest = self._src.sha.digest()
        if self._f.read(DIGEST_BYTES) != digest:
            raise self._mismatch()
        return digest.hex()

    def _mismatch(self) -> BackupError:
        return BackupError(f"{self.path} is damaged: its SHA-256 checksum does not match its "
                           "content (the file was truncated or changed after it was saved); "
                           "use another backup")

    def _damaged(self, exc: Exception) -> BackupError:
        self._src.drain()
        if self._f.read(DIGEST_BYTES) != self._src.sha.digest():
            return self._mismatch()
        return BackupError(f"{self.path} cannot be read ({exc}) although its checksum "
                           "matches: it was written by an incompatible sealkv")


def summarize(path: str) -> dict:
    """Reads a whole backup and returns what `sealkv snapshot status` shows: format version,
    checksum, applied index, term, source, keys, sealed and cleartext values, sizes, members
    and plugin states (raw bytes). Raises `BackupError` for a damaged file."""
    with BackupReader(path) as reader:
        keys = sealed = data_bytes = 0
        for key, entry in reader.records():
            keys += 1
            sealed += entry.state == VALUE_ENCRYPTED
            data_bytes += len(key) + len(entry.value)
        digest = reader.verify()
        return {"file": os.path.abspath(path), "format_version": reader.format_version,
                "checksum": "ok", "sha256": digest, "revision": reader.applied_index,
                "term": reader.meta.get("term", 0), "node": reader.meta.get("node", ""),
                "created": reader.meta.get("created", ""), "keys": keys,
                "sealed_values": sealed, "cleartext_values": keys - sealed,
                "data_bytes": data_bytes, "total_size": reader.file_bytes,
                "members": [m[0] for m in reader.state.get("members", [])],
                "plugins": dict(reader.state["plugins"])}
