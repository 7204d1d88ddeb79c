"""Counts of envelope operations in this process, for the node's metrics.

Incremented where values and raft payloads are sealed and opened (storage.py,
raft_envelope.py) and read at scrape time; the storage layer's seals are the exception: apply
counts them in `EncryptionStorage.sealed` without a lock, and the plugin's `metrics` adds
them. Labels are a purpose ("storage", "raft") and a failure reason (the envelope error's
class name): never a key, a value or key material.
"""
from __future__ import annotations

import threading
from collections import Counter


class EnvelopeCounters:
    """Thread-safe monotonic counters of seals, opens and authentication failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, event: str, purpose: str, reason: str = "") -> None:
        """Counts one `event` ("seal", "open" or "failure") for `purpose`."""
        with self._lock:
            self._counts[(event, purpose, reason)] += 1

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        """A copy of every count: {(event, purpose, reason): n}."""
        with self._lock:
            return dict(self._counts)


COUNTERS = EnvelopeCounters()
