"""Damaging files on purpose, as a disk or a crash would; for tests only."""
from __future__ import annotations

import os


def flip_bits(path, offset: int, mask: int) -> None:
    """XORs the byte at `offset` of the file at `path` with `mask` (a negative offset counts
    from the end)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes((byte ^ mask,)))


def middle(path) -> int:
    """The offset of the middle byte of the file at `path`."""
    return os.path.getsize(path) // 2
