"""The layout of sealkv's Raft dump file (`<data-dir>/raft/raft.dump`), shared by the adapter
that writes and reads it and by `sealkv snapshot restore`, which writes the first one of a
restored member.

Layout: magic `SEALKVD2` | header length (4, big-endian) | header JSON {"last": [command
hex, index, term], "previous": [...], "cluster": [raft addresses]} | the state machine's
encoded snapshot (`machine.encode_snapshot_header`, records, `END_RECORD`) | CRC-32C (4) of
every byte before it. `last` and `previous` are the two log entries pysyncobj keeps at the
base of its log when it loads the dump (its log continues after `last`); `cluster` is the
raft membership it then assumes.
"""
from __future__ import annotations

import json

from pysyncobj.syncobj import _COMMAND_TYPE

from sealkv.node.replication import journal as raft_journal

DUMP_MAGIC = b"SEALKVD2"       # header, snapshot, then a CRC-32C of everything before it
LEGACY_DUMP_MAGIC = b"SEALKVD1"  # the same without the checksum (read, never written)
NO_OP_COMMAND = bytes((_COMMAND_TYPE.NO_OP,))


def dump_header(last, previous, cluster) -> bytes:
    """The magic and header of a dump: `last`/`previous` are (command, index, term) log
    entries, `cluster` the raft addresses of every member."""
    meta = {
        "last": [last[0].hex(), last[1], last[2]],
        "previous": [previous[0].hex(), previous[1], previous[2]],
        "cluster": sorted(cluster),
    }
    raw = json.dumps(meta).encode()
    return DUMP_MAGIC + len(raw).to_bytes(4, "big") + raw


def restored_log_base(applied_index: int) -> tuple[tuple, tuple]:
    """(last, previous) of a new cluster's first dump whose state is at `applied_index`:
    no-op entries of term 0, so the log continues after the state (an entry at or below the
    database's applied index would be skipped as already applied) and the new cluster's first
    election starts its terms from 1 (no entry of the new log ever has a lower term than one
    before it)."""
    last = max(applied_index, 2)
    return (NO_OP_COMMAND, last, 0), (NO_OP_COMMAND, last - 1, 0)


class ChecksumWriter:
    """A write-only file wrapper that keeps the CRC-32C of what went through it."""

    def __init__(self, f):
        self.f = f
        self.crc = 0

    def write(self, data) -> int:
        data = bytes(data)
        self.crc = raft_journal.crc32c_extend(self.crc, data)
        return self.f.write(data)
