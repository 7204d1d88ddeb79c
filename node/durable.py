"""Durable file operations: the fsync policy, crash-safe replacement, and the power-loss hook.

Every file sealkv must find intact after a power loss (the Raft journal and meta file, the
dumps) is synced through this module, so that one switch (`--fsync`) decides whether anything
is synced and one test hook can tell what each sync covered. The database is the exception:
LMDB flushes its own pages, in the mode the node derives from the same switch (`LmdbStore`),
and the journal and dumps can rebuild it.

- `sync_file(fd, path, policy)`: fdatasync a file we appended to (nothing under "never").
- `replace(tmp, final, policy)`: rename a fully synced temporary file over `final`, then
  fsync the directory, so the new name survives a power loss. Files are never overwritten
  in place: old bytes leave with the old inode.
- `write_atomically(path, data, policy)`: temp file, write, fsync, `replace`.
- `unlink_if_exists(path)`: removes a leftover file (a temp file of a crashed write).

The power-loss test hook: when the environment variable `SEALKV_TEST_FSYNC_RECORD` names a
file, every sync appends one JSON line `{"path": ..., "size": ...}` to it: the size of the
file that the sync made durable. A test that kills a node with SIGKILL cuts each file back
to its last recorded size (and deletes files never recorded) to simulate a power loss. The
hook is for tests only; it costs one `os.write` per sync when set and nothing otherwise.
The cut model fits files that only grow between syncs (the journal) or are replaced whole
(meta, dumps). The database records nothing (LMDB rewrites its meta page in place, which a
cut cannot undo; see `LmdbStore`): a file without any record is deleted by the cut, so the
test's node rebuilds its database from its dump and journal, the stricter case.

Called from the pysyncobj tick thread (journal, meta, dumps) and from the storage layer.
Errors are the `OSError`s of the system calls; `is_disk_full` tells a full disk apart.
"""
from __future__ import annotations

import errno
import json
import os
import time
from typing import Callable, Optional

FSYNC_ALWAYS = "always"
FSYNC_NEVER = "never"
FSYNC_POLICIES = (FSYNC_ALWAYS, FSYNC_NEVER)
RECORD_ENV = "SEALKV_TEST_FSYNC_RECORD"
FILE_MODE = 0o600


class DamagedFile(Exception):
    """A file sealkv needs is damaged; the message names the file, the offset and the fix.

    Raised at start-up; the node refuses to start with this one line rather than guess.
    """

    def __init__(self, path: str, offset: int, what: str, fix: str):
        super().__init__(f"{path}: {what} at offset {offset}; {fix}")
        self.path = path
        self.offset = offset


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` says the disk or the quota is full (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def check_policy(policy: str) -> None:
    """Raises ValueError unless `policy` is one of `FSYNC_POLICIES`."""
    if policy not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)} (got {policy!r})")


def record_synced(path: str, size: int) -> None:
    """Appends what a sync covered to the power-loss test record, when the hook is set."""
    record = os.environ.get(RECORD_ENV)
    if not record:
        return
    line = json.dumps({"path": os.path.abspath(path), "size": size}) + "\n"
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _ignore(seconds: float) -> None:
    pass


# The node's metrics set this to their fsync-duration histogram (one node per process).
observe_fsync: Callable[[float], None] = _ignore


def sync_file(fd: int, path: str, policy: str,
              fdatasync: Callable[[int], None] = os.fdatasync,
              size: Optional[int] = None) -> None:
    """Makes what was written to `fd` durable (fdatasync) under the "always" policy.

    `size` is how many bytes of the file hold data, for the power-loss test record, when the
    file is longer (preallocated); by default its size.
    """
    if policy != FSYNC_ALWAYS:
        return
    started = time.perf_counter()
    fdatasync(fd)
    observe_fsync(time.perf_counter() - started)
    if os.environ.get(RECORD_ENV):  # the fstat is for the test record only (a syscall per sync)
        record_synced(path, os.fstat(fd).st_size if size is None else size)


def sync_dir(path: str, policy: str) -> None:
    """Makes the names in directory `path` durable (fsync of the directory)."""
    if policy != FSYNC_ALWAYS:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: str, final: str, policy: str) -> None:
    """Renames the already-synced `tmp` over `final`, then syncs the directory."""
    os.replace(tmp, final)
    if policy != FSYNC_ALWAYS:
        return
    sync_dir(os.path.dirname(os.path.abspath(final)), policy)
    record_synced(final, os.stat(final).st_size)


def write_atomically(path: str, data: bytes, policy: str) -> None:
    """Writes `data` to a new file and renames it over `path` (never an in-place overwrite)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        write_all(fd, data)
        if policy == FSYNC_ALWAYS:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    replace(tmp, path, policy)


def write_all(fd: int, data) -> None:
    """Writes all of `data` at the current position (os.write may write less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def unlink_if_exists(path: str) -> None:
    """Removes the file `path`; a missing file is not an error (any other failure is)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unlink_quietly(path: str) -> None:
    """Removes the file `path` when cleaning up after a failure or a crash: any OSError is
    ignored (the caller has a better error to report, or nothing depends on the removal)."""
    try:
        os.unlink(path)
    except OSError:
        pass
