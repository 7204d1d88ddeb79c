"""Alarms of this node (etcd's vocabulary): NOSPACE is raised when a write finds the disk full.

The minimal registry the journal needs to report a full disk; the storage layer (issue #9,
point 4) builds on it: refusing writes with RESOURCE_EXHAUSTED while NOSPACE is active,
`--quota-backend-bytes`, `sealkv alarm list|disarm`, and the status field.

Contract: `raise_alarm` is called from any thread (the journal calls it on the pysyncobj tick
thread) and must stay quick: it only records. `active()` returns a copy. An alarm stays until
`disarm` is called (an operator's decision, as in etcd), not when the disk frees up.
"""
from __future__ import annotations

import threading

NOSPACE = "NOSPACE"

_lock = threading.Lock()
_active: dict[str, set[str]] = {}


def raise_alarm(kind: str, member: str) -> None:
    """Records that `member` (a member name) has alarm `kind`; idempotent."""
    with _lock:
        _active.setdefault(kind, set()).add(member)


def active() -> dict[str, frozenset[str]]:
    """The active alarms: kind -> the members that raised it."""
    with _lock:
        return {kind: frozenset(members) for kind, members in _active.items() if members}


def disarm(kind: str) -> None:
    """Clears alarm `kind` for every member."""
    with _lock:
        _active.pop(kind, None)
