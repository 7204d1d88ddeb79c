"""Membership: the member records of the replicated directory and the membership snapshot.

Nothing here imports pysyncobj; the replication adapter takes snapshots under its membership
lock and hands them out as `MembershipSnapshot`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
