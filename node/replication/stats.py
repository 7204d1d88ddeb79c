"""What the replication adapter counts and times, for the node's metrics.

Plain Python, no metrics library: the adapter updates these on the tick thread (and on the
proposing threads for failures); the metrics listener reads them at scrape time, and sets the
`observe_*` callables to feed its histograms.
"""
from __future__ import annotations

from typing import Callable, Optional


def _ignore(seconds: float) -> None:
    pass


class ReplicationStats:
    """Leader changes seen, failed proposals, ReadIndex outcomes, and hooks for apply and
    snapshot durations."""

    def __init__(self) -> None:
        self.leader_changes = 0
        self.proposals_failed = 0
        # ReadIndex (tick thread): read points confirmed without an entry, and those that
        # fell back to a barrier entry.
        self.read_index_reads = 0
        self.read_index_fallbacks = 0
        self.observe_apply: Callable[[float], None] = _ignore
        self.observe_snapshot: Callable[[float], None] = _ignore
        self._leader: Optional[str] = None

    def leader_seen(self, leader: Optional[str]) -> None:
        """Counts a change to a new known leader (tick thread); losing the leader is not one."""
        if leader is not None and leader != self._leader:
            self.leader_changes += 1
        if leader is not None:
            self._leader = leader
