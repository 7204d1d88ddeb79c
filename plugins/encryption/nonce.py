"""Deterministic AES-GCM nonces that are never reused (ENCRYPTION.md §4).

A nonce is `node_id16 (2, BE) | local_epoch (2, BE) | counter (8, BE)` with no random bits.
`node_id16` is the low 16 bits of `full_node_id`, the FNV-1a-64 hash of the node's stable raft
id; the writer registry catches two nodes sharing it. `local_epoch` is bumped durably in the
sidecar before the first encryption of each process start, and the counter restarts at 1, so
no (node, epoch, counter) triple is ever produced twice under one data key.
"""
from __future__ import annotations

import itertools
import struct
import sys
import threading

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
MAX_EPOCH = 0xFFFF  # refused: rotation is the way out
MAX_COUNTER = 0xFFFFFFFFFFFFFFFF

_PREFIX = struct.Struct(">HH")  # node_id16 | local_epoch; the counter follows (8, BE)
# Whether one interpreter lock serialises C calls (CPython's default build). A free-threaded
# build takes a Python lock around the counter instead.
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


class NonceExhausted(RuntimeError):
    """The counter reached its limit; the factory stays exhausted (rotate the key or restart)."""


class EpochExhausted(ValueError):
    """The local epoch is 0xFFFF: this node must not encrypt under this key again (rotate)."""


def full_node_id(raft_id: str) -> int:
    """Returns the FNV-1a-64 hash of the UTF-8 raft id; 0 (meaning "not capable") maps to 1."""
    value = FNV64_OFFSET
    for byte in raft_id.encode("utf-8"):
        value = ((value ^ byte) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value or 1


def epoch_in_range(epoch: int) -> bool:
    """Whether `epoch` fits the 16-bit nonce epoch field (0..0xFFFF; 0xFFFF is exhausted)."""
    return 0 <= epoch <= MAX_EPOCH


def node_id16(full_id: int) -> int:
    """Returns the low 16 bits of a full node id, the part that goes into nonces."""
    return full_id & 0xFFFF


class NonceFactory:
    """A thread-safe source of nonces for one (node, data key, process start).

    The counter starts at 1 and latches `NonceExhausted` once `counter_limit` has been used,
    instead of wrapping. `counter_limit` is lowered only by tests.
    """

    def __init__(self, node_id16: int, local_epoch: int, *, counter_limit: int = MAX_COUNTER):
        if not 0 <= node_id16 <= 0xFFFF:
            raise ValueError("node_id16 must fit in 16 bits")
        if not epoch_in_range(local_epoch):
            raise ValueError("local_epoch must fit in 16 bits")
        if local_epoch == MAX_EPOCH:
            raise EpochExhausted("local epoch 0xFFFF is exhausted: rotate the data key")
        if not 1 <= counter_limit <= MAX_COUNTER:
            raise ValueError("counter_limit must be in 1..2**64-1")
        self.node_id16 = node_id16
        self.local_epoch = local_epoch
        self._prefix = _PREFIX.pack(node_id16, local_epoch)
        self._limit = counter_limit
        # Hands out 1, 2, 3, ... each value once, whatever the threads: count's __next__ is
        # one C call that never releases the interpreter lock, so with the GIL no Python lock
        # is needed (it cost as much as the AES-GCM seal of a small value).
        counter = itertools.count(1)
        if _GIL:
            self._take = counter.__next__
        else:
            lock = threading.Lock()

            def take() -> int:
                with lock:
                    return next(counter)

            self._take = take
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        """Whether the counter has run out."""
        return self._exhausted

    def next(self) -> bytes:
        """Returns the next 12-byte nonce; raises `NonceExhausted` once the counter ran out."""
        counter = self._take()
        if counter >= self._limit:
            self._exhausted = True  # latched once the last counter value is handed out
            if counter > self._limit:
                raise NonceExhausted("the nonce counter is exhausted: rotate the data key")
        return self._prefix + counter.to_bytes(8, "big")

    def __repr__(self) -> str:
        return (f"<NonceFactory node_id16=0x{self.node_id16:04x} epoch={self.local_epoch} "
                f"exhausted={self._exhausted}>")
