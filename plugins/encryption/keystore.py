"""The node's unwrapped data keys, held in memory by key id.

Keys come from the replicated wrapped-key table (unwrapped with the node's KEK at apply or at
start) and are never written anywhere. A key id is never reused: installing an id again with
different bytes or another purpose is refused. The store never shows key bytes in a repr.
"""
from __future__ import annotations

import hmac
import threading
from typing import Optional

from .purpose import PURPOSE_NAMES


class KeyConflict(ValueError):
    """An id is already installed with different key bytes or another purpose."""


class KeyStore:
    """Unwrapped data keys by id; thread-safe (installed on the tick thread, read anywhere)."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def install(self, key_id: int, purpose: int, dek: bytes) -> None:
        """Adds a key; a repeat with the same bytes and purpose is a no-op, else `KeyConflict`."""
        if not 0 < key_id <= 0xFFFFFFFF:
            raise ValueError("key id must be in 1..2**32-1")
        if purpose not in PURPOSE_NAMES:
            raise ValueError(f"unknown key purpose {purpose}")
        if len(dek) != 32:
            raise ValueError("a data key must be 32 bytes")
        with self._lock:
            existing = self._keys.get(key_id)
            if existing is not None:
                if existing[0] != purpose or not hmac.compare_digest(existing[1], bytes(dek)):
                    raise KeyConflict(f"key id {key_id} is already installed with other bytes")
                return
            self._keys[key_id] = (purpose, bytes(dek))

    def get(self, key_id: int) -> Optional[bytes]:
        """Returns the key with `key_id`, or None."""
        with self._lock:
            entry = self._keys.get(key_id)
        return None if entry is None else entry[1]

    def get_for(self, key_id: int, purpose: int) -> Optional[bytes]:
        """Returns the key with `key_id` only if it has `purpose`, else None."""
        with self._lock:
            entry = self._keys.get(key_id)
        return entry[1] if entry is not None and entry[0] == purpose else None

    def ids(self, purpose: Optional[int] = None) -> list[int]:
        """Returns the installed ids (of one purpose when given), sorted."""
        with self._lock:
            return sorted(k for k, (p, _) in self._keys.items() if purpose in (None, p))

    def remove(self, key_id: int) -> bool:
        """Forgets one key (a retired key); returns whether it was installed."""
        with self._lock:
            return self._keys.pop(key_id, None) is not None

    def __contains__(self, key_id: object) -> bool:
        with self._lock:
            return key_id in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def __repr__(self) -> str:
        return f"<KeyStore ids={self.ids()}>"
