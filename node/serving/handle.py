"""The narrow node handle that plugins receive.

It exposes what an admin or storage plugin needs and nothing else: identity, status, the
membership snapshot, proposing replicated commands, waiting for an index to apply, compaction,
a pool of gRPC channels to peers, and member-add checks (the capability fence). Methods are
safe to call from gRPC worker threads and plugin threads; none may be called from the
pysyncobj tick thread (apply handlers), since the waiting ones wait for that thread. Failures are `SealkvError`s from the one error table.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import grpc

from sealkv.node import errors
from sealkv.node.replication.membership import MemberCheck, MembershipSnapshot
from sealkv.node.security import tls


class NodeHandle:
    """What a plugin may use of its node."""

    def __init__(self, node: Any):
        self._node = node
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()

    @property
    def name(self) -> str:
        """This member's name (unique in the cluster)."""
        return self._node.config.name

    @property
    def raft_id(self) -> str:
        """The node's stable raft id: its raft address, or "learner:<name>" for a learner."""
        return self._node.raft_id

    @property
    def data_dir(self) -> str:
        """The node's data directory (a plugin keeps its files in `plugin_data_dir`)."""
        return self._node.config.data_dir

    @property
    def grpc_address(self) -> str:
        """The gRPC address this node serves on."""
        return self._node.config.grpc

    @property
    def request_timeout(self) -> float:
        """Seconds a request may wait by default (the node's configuration)."""
        return self._node.config.request_timeout

    def status(self) -> dict:
        """Returns the node's status as a dict (the fields of Cluster.Status)."""
        return self._node.status()

    def membership_snapshot(self) -> MembershipSnapshot:
        """Returns the membership, taken under the membership lock."""
        return self._node.adapter.membership_snapshot()

    @property
    def membership_lock(self) -> threading.RLock:
        """The lock every membership change holds; hold it to keep membership still."""
        return self._node.adapter.membership_lock

    def is_leader(self) -> bool:
        """Whether this node believes it leads: local state, not confirmed by a quorum."""
        return self._node.adapter.is_leader

    def require_leader(self) -> None:
        """Raises `NotLeader` (with the leader's gRPC address when known) on a non-leader."""
        self._node.require_leader()

    def confirm_leadership(self, timeout: float) -> int:
        """Confirms leadership through a quorum (a read index, or a barrier entry where that
        falls back), not just local state, and waits until it is applied here.

        Returns that Raft index: every write acknowledged before the call is at or below it.
        """
        self.require_leader()
        index = self._node.adapter.barrier(timeout)
        self.require_leader()
        return index

    def propose(self, command: bytes, timeout: float) -> Any:
        """Replicates `command` (opcode byte + body) and returns its apply result on this node.

        On return the command is applied here: the result comes from this node's apply.
        """
        return self._node.adapter.propose(command, timeout)

    def applied_index(self) -> int:
        """The index of the last entry this node applied (never waits)."""
        return self._node.state_machine.applied_index

    def wait_applied(self, index: int, timeout: float) -> None:
        """Waits until this node has applied `index`; raises `OutcomeUnknown` on timeout.

        For an index another node's proposal reached (a follower catching up); after this
        node's own `propose` the command is already applied here.
        """
        sm = self._node.state_machine
        if not self._node.adapter.wait_until(lambda: sm.applied_index >= index, timeout):
            raise errors.OutcomeUnknown(f"index {index} not applied within {timeout:.1f}s")

    def stored_records(self, start: bytes, limit: int) -> list:
        """Returns up to `limit` (key, Entry) records as stored at rest with key >= `start`, in
        key order (values as the base store holds them: sealed or cleartext)."""
        return self._node.state_machine.stored_records(start, limit)

    def compact(self, min_index: int, timeout: float) -> dict:
        """Compacts this node: waits until `min_index` is applied here, writes a new snapshot
        and drops the log before it (new files, renamed into place). Returns
        {"snapshot_index", "dump_bytes", "journal_bytes"}; raises `OutcomeUnknown` on timeout.
        The database file is rewritten with only its live pages first (see
        `ReplicationAdapter.compact`)."""
        deadline = time.monotonic() + timeout
        self.wait_applied(min_index, timeout)
        index = self._node.adapter.compact(max(0.1, deadline - time.monotonic()))
        sizes = {"dump_bytes": 0, "journal_bytes": 0}
        raft_dir = os.path.join(self.data_dir, "raft")
        for name in os.listdir(raft_dir):
            path = os.path.join(raft_dir, name)
            if name.endswith(".dump") and os.path.isfile(path):
                sizes["dump_bytes"] += os.path.getsize(path)
            elif ("journal" in name or name.endswith(".wal")) and os.path.isfile(path):
                sizes["journal_bytes"] += os.path.getsize(path)
        return {"snapshot_index": index, **sizes}

    def channel(self, grpc_address: str) -> grpc.Channel:
        """Returns a pooled channel to a peer's gRPC address, as this node (its node
        certificate over mutual TLS; plaintext only when the node runs --insecure)."""
        with self._channels_lock:
            ch = self._channels.get(grpc_address)
            if ch is None:
                ch = self._channels[grpc_address] = tls.channel(
                    grpc_address, self._node.config.tls_files)
            return ch

    def add_member_check(self, check: MemberCheck) -> None:
        """Registers check(member, timeout), run on the leader before a member is added.

        A check raises a `SealkvError` (e.g. `FailedPrecondition`) to refuse the member; it
        runs under the membership lock.
        """
        self._node.membership.add_check(check)

    def storage_layer(self, name: str) -> Optional[Any]:
        """Returns the enabled storage layer plugin named `name`, or None."""
        for plugin in self._node.storage_plugins:
            if plugin.name == name:
                return plugin
        return None

    def close(self) -> None:
        """Closes the pooled channels (the node calls this once at shutdown)."""
        with self._channels_lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    def leader_grpc_address(self) -> Optional[str]:
        """The gRPC address of the leader this node knows, or None."""
        return self._node.leader_grpc_address()
