"""The in-memory base store: a dict for lookups plus a sorted key list for ranges.

Durability comes from the Raft journal and snapshots (dump files), not from this store.
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
