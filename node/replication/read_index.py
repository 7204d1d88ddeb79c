"""ReadIndex bookkeeping: linearizable read points confirmed without writing the Raft log.

A linearizable read needs an index that covers every write acknowledged before the read
began, confirmed by a leader that was still the leader after that moment (Ongaro's thesis
§6.4, etcd-io/raft `ReadOnlySafe`). The leader takes its commit index as the read index
(once it has committed an entry of its own term), then sends a round of `read_index_ping`
messages and waits until a quorum of the current voters, counting itself, echoes the round's
sequence number in the same term. A follower or learner asks the leader for a read index
(`read_index_request`) and is answered once the leader's round confirmed it. The caller then
waits until its own applied index reaches the read index and reads its state machine.

This module holds the pure part, with no clock, socket or pysyncobj: `LeaderRounds` (which
reads share which round, which voters answered, when a round is confirmed or too old) and
`FollowerRequests` (one request to the leader at a time, the reads that share it). The tick
thread of `raft_rules.RaftRulesSyncObj` drives both; everything here runs on that thread.

Coalescing: every read waiting when a round (or request) starts shares it; reads that arrive
meanwhile share the next one, which starts when the current one ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class ReadIndexFallback(Exception):
    """The read index cannot be confirmed this way right now (no entry of the leader's term
    committed yet, a membership change in flight, peers that do not answer the new message
    types): the caller confirms the read with a barrier entry through the log instead.
    Never reaches a client."""


# What a waiting read is told: (index, None) once confirmed, else (None, the error).
OnReadIndex = Callable[[Optional[int], Optional[BaseException]], None]


@dataclass
class Round:
    """One confirmation round of the leader (or one request of a follower to its leader).

    `seq` numbers it, `index` is the read index it confirms (the leader's commit index when
    it started; 0 for a follower's request), `term` the term it was started in, `voters` the
    other voters whose answers count (the leader's; empty for a follower), `target` the node
    asked (a follower's leader), `started` when it started (the caller's monotonic clock),
    `waiters` the reads that share it, `acks` the voters that answered it.
    """

    seq: int
    index: int
    term: int
    started: float
    waiters: list
    voters: frozenset = frozenset()
    target: Any = None
    acks: set = field(default_factory=set)

    @property
    def confirmed(self) -> bool:
        """Whether a quorum of the voters (this leader counted) answered in the round's term."""
        return len(self.acks) + 1 > (len(self.voters) + 1) / 2


class _Coalescer:
    """Reads waiting for the next round, and the one round in flight."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.pending: list = []
        self.current: Optional[Round] = None
        self._seq = 0

    def add(self, waiter) -> None:
        """Queues a read for the next round."""
        self.pending.append(waiter)

    def _start(self, now: float, **fields) -> Optional[Round]:
        if self.current is not None or not self.pending:
            return None
        self._seq += 1
        self.current = Round(self._seq, started=now, waiters=self.pending, **fields)
        self.pending = []
        return self.current

    def expired(self, now: float) -> Optional[Round]:
        """Ends and returns the round in flight when it is older than `timeout`."""
        current = self.current
        if current is None or now - current.started < self.timeout:
            return None
        self.current = None
        return current

    def drain(self) -> list:
        """Ends everything: returns the waiters of the round in flight and the pending ones."""
        waiters = (self.current.waiters if self.current is not None else []) + self.pending
        self.current = None
        self.pending = []
        return waiters

    @property
    def idle(self) -> bool:
        return self.current is None and not self.pending


class LeaderRounds(_Coalescer):
    """The leader's confirmation rounds (tick thread only).

    A waiter is whatever the driver needs to answer it later (a local callback, or the
    follower node and request id of a `read_index_request`).
    """

    def start(self, now: float, index: int, term: int, voters) -> Optional[Round]:
        """Starts a round for every pending read, unless one is in flight or none waits.

        The caller sends the round's ping to every voter in `voters` (the other voters of
        the current configuration) and answers the waiters once `ack` returns the round. A
        round with no other voter is confirmed (and ended) at once: check `confirmed`.
        """
        started = self._start(now, index=index, term=term, voters=frozenset(voters))
        if started is not None and started.confirmed:
            self.current = None  # a single voter: this leader is the quorum
        return started

    def ack(self, node, seq: int, term: int) -> Optional[Round]:
        """Counts `node`'s answer to round `seq` of `term`; returns the round (now ended)
        when that answer completed a quorum, else None. Answers to another round, from
        another term, or from a node that was not a voter when the round started are
        ignored."""
        current = self.current
        if (current is None or seq != current.seq or term != current.term
                or node not in current.voters):
            return None
        current.acks.add(node)
        if not current.confirmed:
            return None
        self.current = None
        return current


class FollowerRequests(_Coalescer):
    """A follower's (or learner's) read-index requests to its leader (tick thread only)."""

    def start(self, now: float, leader, term: int) -> Optional[Round]:
        """Starts a request for every pending read, unless one is in flight or none waits;
        the caller sends it to `leader` with the returned round's `seq` as request id."""
        return self._start(now, index=0, term=term, target=leader)

    def answer(self, seq: int) -> Optional[Round]:
        """Ends and returns the request `seq` when it is the one in flight (else None: a late
        answer to a request already given up)."""
        current = self.current
        if current is None or current.seq != seq:
            return None
        self.current = None
        return current

    def leader_gone(self, leader) -> Optional[Round]:
        """Ends and returns the request in flight when it was sent to another node than
        `leader` (the leader changed, or none is known: it may never answer)."""
        current = self.current
        if current is None or current.target == leader:
            return None
        self.current = None
        return current
