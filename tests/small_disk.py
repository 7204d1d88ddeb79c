"""A small real file system for tests that fill a disk (needs root and tmpfs; else they skip)."""
import contextlib
import errno
import os
import subprocess

import pytest


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """Mounts a tmpfs of `size` (mount's syntax: "64k", "6m") at `path` for the block."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs root and tmpfs to mount a small disk: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory) -> str:
    """Writes a ballast file in `directory` until its disk is full; returns the file's path."""
    path = os.path.join(directory, "ballast")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return path
