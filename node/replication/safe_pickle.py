"""Hardening of pysyncobj's pickle use: protocol 4 and a whitelist unpickler.

pysyncobj pickles every peer message, journal entry and membership change. Peer traffic is
authenticated by the cluster secret (the AES-GCM peer wire of `peer_wire`, or Fernet), and on
top of that this module replaces the unpickler pysyncobj uses with one that resolves only the
few globals pysyncobj itself needs, so a forged pickle can construct no other object and
execute nothing. It also raises the pickle protocol from 2 to 4, which stores bytes as bytes
(protocol 2 spells them as a call to `_codecs.encode`, inflating random bytes by about half).
Every node of a cluster must run sealkv, which installs this before pysyncobj starts.

Only `sealkv.node.replication.adapter` imports this module (it is part of the pysyncobj boundary).
"""
from __future__ import annotations

import io
import logging
import pickle

import pysyncobj.journal
import pysyncobj.pickle

log = logging.getLogger(__name__)

PROTOCOL = 4

ALLOWED_GLOBALS = frozenset({
    ("pysyncobj.node", "TCPNode"),
    ("pysyncobj.node", "Node"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    # Protocol-2 pickles of bytes (a journal written before this module was installed).
    ("_codecs", "encode"),
})


class ForbiddenPickle(pickle.UnpicklingError):
    """A pickle asked for a global outside the whitelist."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        # pysyncobj drops the connection silently; say why, once per refusal.
        log.warning("refused a raft message: forbidden global in pickle: %s.%s", module, name)
        raise ForbiddenPickle(f"forbidden global in pickle: {module}.{name}")


def safe_loads(data) -> object:
    """Unpickles `data` (bytes or str) with `SafeUnpickler`."""
    return SafeUnpickler(io.BytesIO(pysyncobj.pickle.to_bytes(data))).load()


def safe_load(file) -> object:
    """Unpickles one object from a binary file with `SafeUnpickler`."""
    return SafeUnpickler(file).load()


def _dumps(obj, protocol=None) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


def _dump(obj, file, protocol=None) -> None:
    pickle.dump(obj, file, PROTOCOL)


def install() -> None:
    """Makes pysyncobj use the whitelist unpickler and protocol 4 (idempotent)."""
    pysyncobj.pickle.loads = safe_loads
    pysyncobj.pickle.load = safe_load
    pysyncobj.pickle.dumps = _dumps
    pysyncobj.pickle.dump = _dump
    pysyncobj.journal.loads = safe_loads
    pysyncobj.journal.dumps = _dumps
