"""Membership: member records, the membership snapshot, the raft-id rule, add and remove.

Nothing here imports pysyncobj; the replication adapter takes snapshots under its membership
lock and hands them out as `MembershipSnapshot`, and `Membership` orchestrates member changes
through the adapter's narrow `MembershipReplication` side.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from sealkv.node import errors
from sealkv.node.state import commands as cmd


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member of the replicated member directory."""

    name: str
    raft_address: str
    grpc_address: str
    role: int


@dataclass(frozen=True)
class MembershipSnapshot:
    """The replication membership at one instant, taken under the membership lock.

    `voters` come from the Raft configuration; `learners` from the replicated member
    directory, disconnected ones included. A voter the directory does not know has an empty
    name and gRPC address (a malformed row that capability checks refuse).
    """

    voters: tuple[MemberRecord, ...]
    learners: tuple[MemberRecord, ...]
    leader: Optional[str]
    term: int
    commit_index: int
    applied_index: int
    config_version: int
    connected: frozenset[str] = field(default_factory=frozenset)

    @property
    def members(self) -> tuple[MemberRecord, ...]:
        return self.voters + self.learners


def raft_id(name: str, raft_address: Optional[str]) -> str:
    """Returns a member's stable raft id: its raft address, or "learner:<name>" for a learner.

    This is the one rule: the node's own id, the encryption plugin's node ids and the
    capability fan-out's expected responders are all derived from it.
    """
    return raft_address or f"learner:{name}"


def member_raft_id(member: MemberRecord) -> str:
    """Returns the raft id of a directory row (a learner row never uses its raft address)."""
    return raft_id(member.name, None if member.role == cmd.ROLE_LEARNER else member.raft_address)


MemberCheck = Callable[[MemberRecord, float], None]


class MembershipReplication(Protocol):
    """What membership orchestration needs of the replication adapter.

    Every method is called on a gRPC worker thread, never on the pysyncobj tick thread, and
    waits at most `timeout` seconds. Failures are `SealkvError`s: `OutcomeUnknown` when the
    deadline passed after the change was submitted, `FailedPrecondition`/`NotLeader` when the
    Raft layer refused it, `Unavailable` when no leader is known.
    """

    membership_lock: threading.RLock

    @property
    def is_leader(self) -> bool:
        """Whether this node believes it leads (local state, not quorum-confirmed)."""

    @property
    def leader_raft_address(self) -> Optional[str]:
        """The raft address of the leader this node knows, or None."""

    def propose(self, command: bytes, timeout: float) -> Any:
        """Replicates `command` and returns its apply result on this node."""

    def add_voter(self, raft_address: str, timeout: float) -> None:
        """Adds a voter to the Raft configuration and waits until the change commits."""

    def remove_voter(self, raft_address: str, timeout: float) -> None:
        """Removes a voter from the Raft configuration and waits until the change commits."""

    def transfer_leadership(self, raft_address: Optional[str], timeout: float) -> None:
        """Asks this leader to hand over to `raft_address` (None: the most caught-up voter)."""

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Waits until `condition()` holds, re-checked when the leader, term or applied index
        changes; returns False if it did not within `timeout`."""


class Membership:
    """Member add and remove on the leader, and where the leader serves gRPC.

    It owns the order of a membership change: refuse duplicates, run the registered member
    checks (the capability fence), record the member in the replicated directory, then change
    the Raft configuration, rolling the directory back when that fails; all of it under the
    adapter's membership lock so no `membership_snapshot()` interleaves. Methods run on gRPC
    worker threads (never the pysyncobj tick thread) and wait at most their `timeout`.
    """

    def __init__(self, replication: MembershipReplication,
                 directory: Callable[[], tuple[dict[str, MemberRecord], int]],
                 self_raft_address: Optional[str], request_timeout: float):
        self._replication = replication
        self._directory = directory
        self._self_raft = self_raft_address
        self._request_timeout = request_timeout
        self._checks: list[MemberCheck] = []

    def add_check(self, check: MemberCheck) -> None:
        """Registers check(member, timeout), run on the leader before a member is added.

        A check raises a `SealkvError` (e.g. `FailedPrecondition`) to refuse the member; it
        runs under the membership lock.
        """
        self._checks.append(check)

    def run_checks(self, member: MemberRecord, timeout: float) -> None:
        """Runs every registered member check, in registration order."""
        for check in list(self._checks):
            check(member, timeout)

    def leader_grpc_address(self) -> Optional[str]:
        """Returns the gRPC address of the leader this node knows, or None."""
        leader = self._replication.leader_raft_address
        if leader is None:
            return None
        directory, _ = self._directory()
        for m in directory.values():
            if m.raft_address == leader:
                return m.grpc_address
        return None

    def require_leader(self) -> None:
        """Raises `NotLeader` (with the leader's gRPC address when known) on a non-leader."""
        if not self._replication.is_leader:
            leader = self.leader_grpc_address()
            where = f"; the leader is {leader}" if leader else "; no leader is known"
            raise errors.NotLeader(f"this node is not the leader{where}", leader=leader)

    def add(self, member: MemberRecord, timeout: float) -> None:
        """Adds a voter or learner (leader only); rolls the directory back on failure."""
        self.require_leader()
        rep = self._replication
        with rep.membership_lock:
            directory, _ = self._directory()
            for m in directory.values():
                if m.name == member.name:
                    raise errors.AlreadyExists(f"a member named {member.name!r} exists")
                if member.raft_address and m.raft_address == member.raft_address:
                    raise errors.AlreadyExists(f"member {m.name} already uses raft address "
                                               f"{member.raft_address}")
                if m.grpc_address == member.grpc_address:
                    raise errors.AlreadyExists(f"member {m.name} already uses gRPC address "
                                               f"{member.grpc_address}")
            deadline = time.monotonic() + timeout
            self.run_checks(member, timeout)
            rep.propose(cmd.encode(cmd.MemberSet(member.name, member.raft_address,
                                                 member.grpc_address, member.role)),
                        max(0.1, deadline - time.monotonic()))
            if member.role != cmd.ROLE_VOTER:
                return
            try:
                rep.add_voter(member.raft_address, max(0.1, deadline - time.monotonic()))
            except errors.OutcomeUnknown:
                raise
            except errors.SealkvError:
                rep.propose(cmd.encode(cmd.MemberRemove(member.name)), self._request_timeout)
                raise

    def remove(self, name: str, timeout: float) -> None:
        """Removes a member (leader only). Removing the leader hands leadership over first."""
        self.require_leader()
        rep = self._replication
        with rep.membership_lock:
            directory, _ = self._directory()
            member = directory.get(name)
            if member is None:
                raise errors.NotFound(f"no member named {name!r}")
            deadline = time.monotonic() + timeout
            if member.role == cmd.ROLE_VOTER:
                voters = [m for m in directory.values() if m.role == cmd.ROLE_VOTER]
                if len(voters) <= 1:
                    raise errors.FailedPrecondition("cannot remove the last voter")
                if member.raft_address == self._self_raft:
                    rep.transfer_leadership(None, timeout)
                    rep.wait_until(lambda: not rep.is_leader and bool(self.leader_grpc_address()),
                                   deadline - time.monotonic())
                    leader = self.leader_grpc_address()
                    raise errors.NotLeader(f"{name} was the leader; leadership moved to "
                                           f"{leader or 'another voter'}: retry there",
                                           leader=leader)
                rep.remove_voter(member.raft_address, timeout)
            rep.propose(cmd.encode(cmd.MemberRemove(name)), max(0.1, deadline - time.monotonic()))

    def transfer_leadership(self, target: str, timeout: float) -> None:
        """Hands leadership to the voter named `target` ("": the most caught-up voter).

        Returns once another voter (the target, when named) is seen leading; raises
        `OutcomeUnknown` when the hand-over was requested but not observed in time.
        """
        self.require_leader()
        raft_target = None
        if target:
            directory, _ = self._directory()
            member = directory.get(target)
            if member is None or member.role != cmd.ROLE_VOTER:
                raise errors.NotFound(f"no voter named {target!r}")
            if member.raft_address == self._self_raft:
                raise errors.InvalidArgument(f"{target} is already the leader")
            raft_target = member.raft_address
        start = time.monotonic()
        rep = self._replication
        rep.transfer_leadership(raft_target, timeout)

        def moved() -> bool:
            leader = rep.leader_raft_address
            return bool(leader) and leader != self._self_raft and (raft_target is None
                                                                    or leader == raft_target)

        if not rep.wait_until(moved, timeout - (time.monotonic() - start)):
            raise errors.OutcomeUnknown("leadership transfer requested but not observed in time")
