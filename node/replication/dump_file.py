"""The layout of sealkv's Raft dump file (`<data-dir>/raft/raft.dump`), shared by the adapter
that writes and reads it and by `sealkv snapshot restore`, which writes the first one of a
restored member. Writing: `dump_header`, then the snapshot through a `ChecksumWriter`, then
its CRC; reading: `read_dump_start`, then the snapshot.

Layout: magic `SEALKVD2` | header length (4, big-endian) | header JSON {"last": [command
hex, index, term], "previous": [...], "cluster": [raft addresses]} | the state machine's
encoded snapshot (`machine.encode_snapshot_header`, records, `END_RECORD`) | CRC-32C (4) of
every byte before it. `last` and `previous` are the two log entries pysyncobj keeps at the
base of its log when it loads the dump (its log continues after `last`); `cluster` is the
raft membership it then assumes.
"""
from __future__ import annotations

import json
import os

from pysyncobj.node import TCPNode
from pysyncobj.syncobj import _COMMAND_TYPE

from sealkv.node import durable
from sealkv.node.replication import journal as raft_journal

DUMP_MAGIC = b"SEALKVD2"       # header, snapshot, then a CRC-32C of everything before it
LEGACY_DUMP_MAGIC = b"SEALKVD1"  # the same without the checksum (read, never written)
NO_OP_COMMAND = bytes((_COMMAND_TYPE.NO_OP,))
DUMP_FIX = ("the dump (snapshot) cannot be loaded: remove the member (sealkv member remove), "
            "empty its data directory and add it back so it receives a snapshot from the "
            "leader")


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


def read_dump_start(filename: str, src) -> tuple[tuple, tuple, list]:
    """Checks the dump `src` (opened at its start) and reads its header; returns (last,
    previous, cluster as pysyncobj `TCPNode`s) and leaves `src` at the encoded snapshot.

    A SEALKVD2 dump's trailing CRC-32C is verified first (one read of the whole file); a
    legacy SEALKVD1 dump has none. Raises `durable.DamagedFile` (naming `filename`, the
    offset and `DUMP_FIX`) for a file that is not a dump, or is damaged or truncated.
    """
    magic = src.read(len(DUMP_MAGIC))
    if magic == DUMP_MAGIC:
        _verify_checksum(filename, src)
    elif magic != LEGACY_DUMP_MAGIC:
        raise durable.DamagedFile(filename, 0, "not a sealkv dump", DUMP_FIX)
    try:
        meta = json.loads(src.read(int.from_bytes(src.read(4), "big")))
        last = (bytes.fromhex(meta["last"][0]), meta["last"][1], meta["last"][2])
        previous = (bytes.fromhex(meta["previous"][0]), meta["previous"][1],
                    meta["previous"][2])
        cluster = [TCPNode(address) for address in meta["cluster"]]
    except (ValueError, KeyError, TypeError, IndexError):
        raise durable.DamagedFile(filename, len(DUMP_MAGIC), "dump header is not valid",
                                  DUMP_FIX) from None
    return last, previous, cluster


def _verify_checksum(filename: str, src) -> None:
    """Checks the dump's trailing CRC-32C before anything is restored from it; leaves the
    position just after the magic."""
    size = os.fstat(src.fileno()).st_size
    if size < 2 * len(DUMP_MAGIC):
        raise durable.DamagedFile(filename, size, "dump is truncated", DUMP_FIX)
    src.seek(0)
    crc, remaining = 0, size - 4
    while remaining > 0:
        chunk = src.read(min(1 << 20, remaining))
        crc = raft_journal.crc32c_extend(crc, chunk)
        remaining -= len(chunk)
    if int.from_bytes(src.read(4), "big") != crc:
        raise durable.DamagedFile(filename, size - 4, "dump checksum mismatch (the file is "
                                  "damaged or truncated)", DUMP_FIX)
    src.seek(len(DUMP_MAGIC))
