"""The in-memory base store: a dict for lookups plus a sorted key list for ranges.

For unit tests: nodes use `LmdbStore`. It has the transactional capability's methods so the
state machine has one code path, but neither isolation nor rollback: callers serialise reads
and writes with the state machine's lock.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator, Optional

from sealkv.node.state.storage.base import Entry


class MemoryStore:
    """An ordered in-memory map implementing the `Storage` protocol."""

    def __init__(self) -> None:
        self._entries: dict[bytes, Entry] = {}
        self._keys: list[bytes] = []
        self._meta: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Optional[Entry]:
        return self._entries.get(key)

    def put(self, key: bytes, entry: Entry) -> None:
        if key not in self._entries:
            bisect.insort(self._keys, key)
        self._entries[key] = entry

    def delete(self, key: bytes) -> bool:
        if self._entries.pop(key, None) is None:
            return False
        del self._keys[bisect.bisect_left(self._keys, key)]
        return True

    def _bounds(self, start: bytes, end: Optional[bytes]) -> tuple[int, int]:
        lo = bisect.bisect_left(self._keys, start)
        hi = len(self._keys) if end is None else bisect.bisect_left(self._keys, end)
        return lo, max(lo, hi)

    def scan(self, start: bytes, end: Optional[bytes]) -> Iterator[tuple[bytes, Entry]]:
        lo, hi = self._bounds(start, end)
        for key in self._keys[lo:hi]:
            yield key, self._entries[key]

    def count(self, start: bytes, end: Optional[bytes]) -> int:
        lo, hi = self._bounds(start, end)
        return hi - lo

    def dump(self) -> Iterator[tuple[bytes, Entry]]:
        return self.scan(b"", None)

    def restore(self, records: Iterable[tuple[bytes, Entry]]) -> None:
        self._entries = dict(records)
        self._keys = sorted(self._entries)

    # -- the transactional capability, without isolation (unit tests only) ---------------

    mvcc = False

    def begin_write(self) -> None:
        self._in_write = True

    @property
    def in_write(self) -> bool:
        return getattr(self, "_in_write", False)

    def commit(self) -> None:
        self._in_write = False

    def abort(self) -> None:
        """Ends the write; the memory store cannot undo what was written (tests only)."""
        self._in_write = False

    def get_meta(self, name: bytes) -> Optional[bytes]:
        return self._meta.get(name)

    def put_meta(self, name: bytes, value: bytes) -> None:
        self._meta[name] = value

    def data_bytes(self) -> int:
        return sum(len(k) + len(e.value) for k, e in self._entries.items())
