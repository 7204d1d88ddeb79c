"""`sealkv bench peer-wire`: one raft peer message encoded and decoded, per wire format.

In-process, no sockets: each iteration is what the leader's connection does to send one
message (`frames.WireCodec.encode`: pickle, then Fernet over zlib as pysyncobj does, or the
AES-GCM peer wire) plus what the follower's connection does to take it in (`decode`: format
check, authenticate and decrypt, inflate when flagged, the whitelist unpickle). Both codecs
are the ones a node runs, keyed from one cluster secret, one connection per format.

Messages, as pysyncobj builds them for sealkv:

- `put`: an AppendEntries carrying one entry, a Put of a 16-byte key and a 256-byte random
  value (the entry is pysyncobj's pickled call of the one replicated method);
- `batch64`: an AppendEntries carrying one BATCH entry of 64 such Puts;
- `reply`: the follower's answer (`next_node_idx`).
"""
from __future__ import annotations

import os
import pickle
import time

from sealkv.node.replication.peer_wire import FORMATS

WARMUP_ITERATIONS = 200
HEADERS = ["message", "bytes (pickled)", "format", "frame bytes", "p50 µs", "p99 µs",
           "mean µs", "messages/s"]


def _entry(command: bytes, index: int) -> tuple:
    regular = b"\x00"  # pysyncobj's _COMMAND_TYPE.REGULAR
    return regular + pickle.dumps((0, (command,)), 4), index, 7


def messages() -> dict:
    """The three messages of the module docstring, freshly drawn (random values)."""
    from sealkv.node.state import commands as cmd

    def put(i):
        return cmd.encode(cmd.Put(b"key-%012d" % i, os.urandom(256)))

    def append(command):
        return {"type": "append_entries", "term": 7, "commit_index": 1000,
                "entries": [_entry(command, 1001)], "prevLogIdx": 1000, "prevLogTerm": 7}

    return {
        "put": append(put(1)),
        "batch64": append(cmd.encode_batch([put(i) for i in range(64)])),
        "reply": {"type": "next_node_idx", "next_node_idx": 1002, "reset": False,
                  "success": True},
    }


def measure(message, send_format: str, iterations: int) -> dict:
    """Times `iterations` encode+decode round trips of `message` on one connection."""
    from pysyncobj.encryptor import getEncryptor

    from sealkv.node.bench.envelope import _stats
    from sealkv.node.replication import adapter  # noqa: F401  (the whitelist unpickler)
    from sealkv.node.replication import peer_wire
    from sealkv.node.replication.frames import WireCodec

    secret = os.urandom(32).hex()
    wire = peer_wire.PeerWire(getEncryptor(secret), peer_wire.root_key(secret), send_format)
    sender = WireCodec(wire, peer_wire.ROLE_DIALER)
    receiver = WireCodec(wire, peer_wire.ROLE_LISTENER)
    wrapped = (os.urandom(32), message)  # pysyncobj adds the peer's random key
    for _ in range(WARMUP_ITERATIONS):
        receiver.decode(sender.encode(wrapped))
    clock = time.perf_counter_ns
    samples: list[int] = []
    frame_bytes = 0
    for _ in range(iterations):
        start = clock()
        data = sender.encode(wrapped)
        receiver.decode(data)
        samples.append(clock() - start)
        frame_bytes = len(data)
    if receiver.decode(sender.encode(wrapped)) != wrapped:
        raise RuntimeError("the peer wire did not return the message it was given")
    stats = _stats(samples)
    return {"format": send_format, "frame_bytes": frame_bytes, **stats,
            "per_second": round(1e6 / stats["mean_us"])}


def run(iterations: int) -> dict:
    """Every message in every format; returns {"rows": [...]} for the CLI."""
    from sealkv.node.bench.envelope import implementation

    rows = []
    for name, message in messages().items():
        for send_format in FORMATS:
            row = measure(message, send_format, iterations)
            row.update(message=name, pickled_bytes=len(pickle.dumps((b"k" * 32, message), 4)))
            rows.append(row)
    return {"iterations": iterations, "implementation": implementation(), "rows": rows}


def table_rows(report: dict) -> list[list]:
    return [[r["message"], r["pickled_bytes"], r["format"], r["frame_bytes"], r["p50_us"],
             r["p99_us"], r["mean_us"], r["per_second"]] for r in report["rows"]]
