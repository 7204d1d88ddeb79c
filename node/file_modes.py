"""File modes under a data directory: every directory 0700, every file 0600.

A node calls `restrict_umask()` once at start-up, so everything it (and pysyncobj, LMDB, the
sidecar writer) creates afterwards gets no group or other permission bits whatever the
operator's umask, and `tighten_data_dir(path)` to bring what was already there (a directory
created by hand, files from an older version, a restored backup) to the same modes. Both run on
the start-up thread, before Raft starts or any file is opened.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077


class DataDirModeError(RuntimeError):
    """A path under the data directory cannot be given its private mode; names path and fix."""


@dataclass
class TightenReport:
    """What `tighten_data_dir` changed: paths with their old modes, and skipped symlinks."""

    changed: list[tuple[str, int]] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)


def restrict_umask() -> int:
    """Sets the process umask to 0077 (no group/other bits on anything created); returns the
    previous umask. Process-wide: call it only from a node's own process start-up."""
    return os.umask(UMASK)


def tighten_data_dir(data_dir: str) -> TightenReport:
    """Sets `data_dir` and every directory below it to 0700 and every other entry to 0600.

    Symbolic links are neither followed nor changed (they are reported). Raises
    `DataDirModeError` naming the first path whose mode cannot be changed (another owner, a
    read-only file system), with the fix.
    """
    report = TightenReport()
    _tighten(data_dir, DIR_MODE, report)
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            if stat.S_ISLNK(st.st_mode):
                report.symlinks.append(path)
                continue
            _tighten(path, DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE, report, st)
    return report


def secure_data_dir(data_dir: str) -> TightenReport:
    """Start-up entry point: restricts the umask, creates `data_dir` (0700) if missing,
    tightens what is there, and logs what it changed. Raises `DataDirModeError`."""
    restrict_umask()
    try:
        os.makedirs(data_dir, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise DataDirModeError(f"cannot create data directory {data_dir}: {exc.strerror}") \
            from None
    report = tighten_data_dir(data_dir)
    if report.changed:
        shown = ", ".join(f"{path} ({mode:04o})" for path, mode in report.changed[:5])
        more = f" and {len(report.changed) - 5} more" if len(report.changed) > 5 else ""
        log.warning("tightened the modes of %d paths under %s to 0700 (directories) and 0600 "
                    "(files): %s%s", len(report.changed), data_dir, shown, more)
    else:
        log.info("data directory %s: every directory is 0700 and every file 0600", data_dir)
    for path in report.symlinks:
        log.warning("symbolic link %s under the data directory was left as it is: sealkv does "
                    "not create links; remove it", path)
    return report


def _tighten(path: str, mode: int, report: TightenReport, st: os.stat_result = None) -> None:
    try:
        if st is None:
            st = os.stat(path)
        current = stat.S_IMODE(st.st_mode)
        if current == mode:
            return
        os.chmod(path, mode)
    except OSError as exc:
        owner = ""
        if st is not None and st.st_uid != os.geteuid():
            owner = f" (owned by uid {st.st_uid}, this process runs as uid {os.geteuid()})"
        raise DataDirModeError(
            f"cannot set mode {mode:04o} on {path}{owner}: {exc.strerror}; fix it by hand "
            f"(chown the data directory to this user, chmod {mode:04o} {path}) and start "
            "again") from None
    report.changed.append((path, current))
