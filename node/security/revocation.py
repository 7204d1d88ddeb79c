"""The replicated certificate revocation list, as the Cluster service changes and reads it.

The list itself lives in the state machine (`StateMachine.revoked`, changed only by the core
REVOKE command, carried in every snapshot); the authorization interceptor reads it through
`StateMachine.is_revoked` on every call. This class is the write path: leader only, one
replicated command per serial. Called on gRPC worker threads.
"""
from __future__ import annotations

from typing import Any, Callable

from sealkv.node.state import commands as cmd


class Revocations:
    """Revokes certificate serials cluster-wide and lists them."""

    def __init__(self, require_leader: Callable[[], None],
                 propose: Callable[[bytes, float], Any], state: Any):
        """`require_leader()` raises NotLeader on a follower; `propose(command, timeout)`
        replicates a command and returns its apply result; `state.revoked` is the list."""
        self._require_leader = require_leader
        self._propose = propose
        self._state = state

    def revoke(self, serial: int, timeout: float) -> bool:
        """Adds `serial` (raising ValueError unless 1-20 bytes); returns False when it was
        revoked already. Raises NotLeader on a follower, OutcomeUnknown on a timeout."""
        command = cmd.encode(cmd.Revoke(serial))
        self._require_leader()
        return self._propose(command, timeout).succeeded

    def revoked(self) -> list[int]:
        """Every revoked serial, ascending."""
        return sorted(self._state.revoked)
