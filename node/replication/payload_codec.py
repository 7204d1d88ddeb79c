"""The payload codec: what the replication adapter does to a command at the propose boundary
and at apply (the raft-log envelope lives behind it).

The adapter hands every proposal to `seal` just before it enters the Raft layer (below any
batching: one entry, one seal), asks `admit_append` on the leader before an entry gets its log
index (the only place that sees forwarded proposals too), and calls `open` with the entry's
index before the state machine decodes it. The default codec is the identity; the encryption
plugin provides one through the optional storage-layer capability `payload_codec()`. This
module imports no pysyncobj.
"""
from __future__ import annotations

from typing import Iterable, Optional, Protocol


class PayloadCodec(Protocol):
    """The adapter's hook around replicated payloads (see the module docstring)."""

    #: Whether the leader must consult `admit_append` (the adapter decodes nothing otherwise).
    gates_appends: bool

    def seal(self, command: bytes, timeout: float) -> bytes:
        """Returns the payload to replicate for `command`.

        Called by `ReplicationAdapter.propose` on the proposing thread (a gRPC worker or a
        plugin thread; any node, leader or follower), never on the tick thread. May wait up to
        `timeout` seconds (an intake barrier); raises a `sealkv.node.errors.SealkvError`
        (`Unavailable`: retryable, nothing was submitted) to refuse.
        """

    def admit_append(self, index: int, payload: bytes) -> Optional[str]:
        """Returns None to let the leader append `payload` at log `index`, or the reason it
        must not (the proposer gets a retryable `Unavailable`).

        Called on the tick thread, on the leader only, for local and forwarded proposals alike,
        in log order. Must be fast and must not block.
        """

    def on_leadership(self, is_leader: bool, unapplied: Iterable[tuple[int, bytes]]) -> None:
        """Called on the tick thread when this node becomes leader (`unapplied` yields
        (index, payload) of its log entries not applied yet) or stops being leader (empty)."""

    def snapshot_taken(self, index: int) -> None:
        """Called on the tick thread once a snapshot covering entries up to `index` is written
        (the log before it is about to be dropped), and once one is loaded: the local dump at
        start, or a snapshot installed from the leader (the log before it is gone)."""

    def open(self, index: int, payload: bytes) -> bytes:
        """Returns the command bytes of entry `index`.

        Called on the tick thread in replicated apply (and replay), before the state machine
        decodes the command. Deterministic; raises `sealkv.node.errors.ApplyHalt` when the
        payload cannot be opened.
        """


class IdentityCodec:
    """The codec of a node without a raft-log envelope: payloads are the commands."""

    gates_appends = False

    def seal(self, command: bytes, timeout: float) -> bytes:
        return command

    def admit_append(self, index: int, payload: bytes) -> Optional[str]:
        return None

    def on_leadership(self, is_leader: bool, unapplied: Iterable[tuple[int, bytes]]) -> None:
        pass

    def snapshot_taken(self, index: int) -> None:
        pass

    def open(self, index: int, payload: bytes) -> bytes:
        return payload
