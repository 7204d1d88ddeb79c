"""The pysyncobj settings a node runs with, in a module that does not import pysyncobj.

The replication adapter translates them into a `SyncObjConf`; configuration code reads and
validates them without loading the Raft engine.
"""
from __future__ import annotations

from dataclasses import dataclass

# The raft port refuses frames above 16 MiB before decrypting them (replication/frames.py); a
# batch, pickled and Fernet-encoded, must stay well below that.
MAX_BATCH_BYTES = 4 * 1024 * 1024


@dataclass
class RaftSettings:
    """The pysyncobj settings a node runs with (validated with exceptions, never assert)."""

    # Send each new entry to followers at once instead of every appendEntriesPeriod: one
    # request at a time takes ~1 ms instead of ~100 ms.
    append_entries_use_batch: bool = False
    append_entries_period: float = 0.05
    auto_tick_period: float = 0.01
    raft_min_timeout: float = 0.6
    raft_max_timeout: float = 1.5
    connection_timeout: float = 3.5
    connection_retry_time: float = 0.5
    # CheckQuorum: a leader that has not heard from a quorum for this long steps down
    # (pysyncobj: 30 s); the maximum election timeout, by which the others elect anew.
    leader_fallback_timeout: float = 1.5
    # Entries at or above the batch size take pysyncobj's chunked path, which is broken;
    # 4 MiB keeps every entry within the value limit on the normal path.
    append_entries_batch_size_bytes: int = 4 * 1024 * 1024
    log_compaction_min_entries: int = 50000
    # Compact (write a dump, drop the log before it) also once the journal holds this many
    # bytes: with 1 MiB values, 50,000 entries would be 50 GiB.
    log_compaction_min_bytes: int = 64 * 1024 * 1024
    log_compaction_min_time: float = 600.0
    commands_queue_size: int = 100000

    def validate(self) -> None:
        """Raises ValueError naming the setting to change when the settings cannot work."""
        if self.raft_min_timeout <= 3 * self.append_entries_period:
            raise ValueError("raft.min_timeout must exceed 3 x raft.append_entries_period")
        if self.raft_max_timeout <= self.raft_min_timeout:
            raise ValueError("raft.max_timeout must exceed raft.min_timeout")
        if self.connection_timeout < self.raft_max_timeout:
            raise ValueError("raft.connection_timeout must be at least raft.max_timeout")
        if self.leader_fallback_timeout <= self.append_entries_period:
            raise ValueError("raft.leader_fallback_timeout must exceed raft.append_entries_period")
        if not 0 < self.append_entries_batch_size_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"raft.append_entries_batch_size_bytes must be 1-{MAX_BATCH_BYTES} "
                             "(the raft port's frame cap is 4 times that)")
        if self.log_compaction_min_entries < 2:
            raise ValueError("raft.log_compaction_min_entries must be at least 2")
        if self.log_compaction_min_bytes < 1024 * 1024:
            raise ValueError("raft.log_compaction_min_bytes must be at least 1 MiB")
        for name in ("append_entries_period", "auto_tick_period", "connection_retry_time",
                     "log_compaction_min_time"):
            if getattr(self, name) <= 0:
                raise ValueError(f"raft.{name} must be positive")
