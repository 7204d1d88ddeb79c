"""The proposer: one Raft entry for every group of concurrent key-value writes.

Every write of the node (unary handlers and batch streams alike) and every linearizable read
goes through one `Proposer`. A lone request leaves at once, with no timer; requests that
arrive while an entry is in flight wait and leave together, as one BATCH entry, when it
completes (group commit); the writes of one batch message leave together (`flush`). An entry carries at most `max_commands` commands and about
`max_bytes` bytes (a larger single command travels alone). A linearizable read asks the
adapter for a read index (`read_index_async`: no log entry, concurrent reads share one
confirmation round); when that falls back (see `read_index.ReadIndexFallback`), reads waiting
for a barrier share the next entry: with writes in it, it is their barrier; without, a
BARRIER is proposed.

Threading contract: `submit`, `propose` and `barrier` are called from gRPC worker threads,
never from the pysyncobj tick thread. A request that finds no entry in flight is proposed on
its own thread; the entries that form while one is in flight are proposed by the proposer's
thread, woken by the tick thread's callback (so sealing and encoding never run on the tick
thread). When the tick thread is idle in its poll, the proposing thread also appends, sends
and syncs the entry itself (`_RaftObject.submit`). `on_done` callbacks run on the tick
thread, or on a proposing thread (nothing could be submitted, or it ran the tick's work for
its entry and resolved earlier ones), and must be short: hand the result to another thread,
never block, never take a lock the proposing thread may hold.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, NamedTuple, Optional

from sealkv.node import errors
from sealkv.node.errors import where
from sealkv.node.replication.read_index import ReadIndexFallback
from sealkv.node.state import commands as cmd

log = logging.getLogger(__name__)

OnDone = Callable[[object, Optional[errors.SealkvError]], None]

MAX_ENTRY_COMMANDS = 512
# A bound on what one entry carries (pysyncobj chunks large AppendEntries slowly).
MAX_ENTRY_BYTES = 32 * 1024
MAX_IN_FLIGHT = 1
# --no-batch-entries: one write per entry (never a BATCH), pipelined instead of grouped.
UNBATCHED_ENTRIES = {"max_commands": 1, "max_in_flight": 64}
# A read barrier that failed with one of these is proposed again while its deadline allows
# (leader changed, discarded, no leader yet, not committed in its time): it is a no-op.
BARRIER_RETRYABLE = (errors.Aborted, errors.OutcomeUnknown, errors.Unavailable)
BARRIER_RETRY_PAUSE = 0.02
_BARRIER = cmd.encode(cmd.Barrier())


class ReadPoint(NamedTuple):
    """What a read answered by a read index (no entry) gets: `revision`, the read index."""

    revision: int


class _Request:
    __slots__ = ("command", "on_done", "deadline", "state")

    def __init__(self, command: Optional[bytes], on_done: OnDone, deadline: float):
        self.command = command  # None: a read waiting for the next entry
        self.on_done = on_done
        self.deadline = deadline
        self.state = "pending"  # -> "sent" or "withdrawn"


class _Entry:
    __slots__ = ("requests", "lost_at", "live")

    def __init__(self, requests: list[_Request], lost_after: float):
        self.requests = requests
        # Once every request in it has passed its deadline, nobody waits for the entry any
        # more: a missing callback then no longer holds back the entries after it.
        self.lost_at = min(time.monotonic() + lost_after, max(r.deadline for r in requests))
        self.live = True  # False once abandoned as lost (an orphaned pysyncobj callback)


class Proposer:
    """Coalesces concurrent proposals into Raft entries (see the module docstring)."""

    def __init__(self, adapter, *, max_commands: int = MAX_ENTRY_COMMANDS,
                 max_bytes: int = MAX_ENTRY_BYTES, max_in_flight: int = MAX_IN_FLIGHT,
                 lost_after: float = 10.0):
        """`adapter` is the `ReplicationAdapter` (`propose_async`, `read_index_async`,
        `wait_leader`).

        An entry whose callback has not come after `lost_after` seconds is taken as lost
        (pysyncobj can orphan callbacks): its requests time out on their own deadlines and
        new entries may leave.
        """
        self.adapter = adapter
        self.max_commands = max_commands
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.lost_after = lost_after
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._in_flight: list[_Entry] = []
        self._wake = threading.Event()
        self._closed = False
        threading.Thread(target=self._run, name="kv-proposer", daemon=True).start()
        # Counters, for Status and tests: entries proposed and commands they carried.
        self.entries = 0
        self.commands = 0

    @property
    def term(self) -> int:
        """The current Raft term as this node knows it (the KV service's response headers)."""
        return self.adapter.term

    @property
    def halted(self) -> bool:
        """Whether this node halted (nothing it proposes will apply here)."""
        return getattr(self.adapter, "halted", False)

    def wait_leader(self, deadline: float) -> None:
        """Waits until a leader is known; raises `Unavailable` when none is by `deadline`."""
        self.adapter.wait_leader(deadline)

    # -- submitting -------------------------------------------------------------------

    def submit(self, command: Optional[bytes], on_done: OnDone, deadline: float,
               send: bool = True) -> _Request:
        """Queues `command` (None: wait for the next entry, as a read barrier).

        `on_done(result, error)` is called exactly once unless the request is withdrawn:
        `result` is the command's apply result (for a barrier, a result whose `revision` is
        the entry's index), `error` the `SealkvError` that `ReplicationAdapter.propose` would
        raise. `deadline` (monotonic) is when the caller stops waiting. The caller waits for
        a leader first (`adapter.wait_leader`). With `send=False` a write only joins the
        queue: the caller submits the rest of its batch and then calls `flush`, so that the
        batch leaves as one entry.
        """
        request = _Request(command, on_done, deadline)
        if command is None:
            # A read point without an entry (ReadIndex): it never waits behind writes.
            request.state = "sent"
            self.adapter.read_index_async(
                lambda index, error: self._read_done(request, index, error), deadline)
            return request
        with self._lock:
            self._pending.append(request)
            entry = self._take_locked() if send else None
        if entry is not None:
            self._send(entry)
        return request

    def flush(self) -> None:
        """Proposes what `submit(..., send=False)` queued, unless an entry is in flight (then
        it leaves when that entry completes)."""
        with self._lock:
            entry = self._take_locked()
        if entry is not None:
            self._send(entry)

    def _read_done(self, request: _Request, index: Optional[int], error) -> None:
        """A read index's answer (tick thread): answer the read, or, when ReadIndex falls
        back, let it wait for the next entry (a BARRIER when no write shares it), proposed
        by the proposer's thread."""
        if isinstance(error, ReadIndexFallback):
            with self._lock:
                request.state = "pending"
                self._pending.append(request)
            self._wake.set()
            return
        _answer(request, None if error is not None else ReadPoint(index), error)

    def withdraw(self, request: _Request) -> bool:
        """Removes a request not yet proposed; returns False when it already left."""
        with self._lock:
            if request.state != "pending":
                return False
            request.state = "withdrawn"
            self._pending.remove(request)
            return True

    def propose(self, command: bytes, timeout: float):
        """Replicates `command` in the next entry and returns its apply result (blocking).

        Errors as `ReplicationAdapter.propose`; a request still waiting for the previous
        entry when the deadline passes is withdrawn and answered `Unavailable` (nothing
        was proposed).
        """
        return self._wait(command, timeout)

    def barrier(self, timeout: float) -> int:
        """Waits until a read point fixed after this call (a read index, else an entry
        proposed after it) has applied here; returns its index.

        A read point dropped by a leader change (or not confirmed in its time) is sought again
        while the deadline allows, so a read never has an unknown outcome. Raises
        `ReadTimeout` when none is confirmed within `timeout`, `Unavailable` when no leader
        was known until then (or the node halted), `ResourceExhausted` when the queue is full.
        """
        return retry_barrier(lambda remaining: self._wait(None, remaining).revision, timeout,
                             lambda: self.halted)

    def _wait(self, command: Optional[bytes], timeout: float):
        deadline = time.monotonic() + timeout
        self.wait_leader(deadline)
        done = threading.Event()
        box: list = []

        def on_done(result, error):
            box.append((result, error))
            done.set()

        request = self.submit(command, on_done, deadline)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            if self.withdraw(request):
                raise errors.Unavailable(f"not proposed within {timeout:.1f}s: the previous "
                                         "entry has not committed; nothing was applied")
            what = "read barrier not confirmed" if command is None else \
                "outcome unknown: not committed"
            raise errors.OutcomeUnknown(f"{what} within {timeout:.1f}s (it may still apply)")
        result, error = box[0]
        if error is not None:
            raise error
        return result

    # -- entries ----------------------------------------------------------------------

    def _take_locked(self) -> Optional[_Entry]:
        if not self._pending:
            return None
        if len(self._in_flight) >= self.max_in_flight:
            oldest = self._in_flight[0]
            if time.monotonic() < oldest.lost_at:
                return None
            oldest.live = False
            self._in_flight.pop(0)
        # Two writes to one key never share an entry: they would share its index as their
        # mod_revision, and a compare-and-swap by revision must name exactly one version. The
        # later ones wait for the next entry, in order.
        taken: list[_Request] = []
        waiting: list[_Request] = []
        keys: set = set()
        size = 0
        full = False
        for request in self._pending:
            if request.command is None:  # a read riding along: no bytes, no command
                taken.append(request)
                continue
            n = len(request.command)
            full = full or (bool(keys) and (len(keys) + 1 > self.max_commands
                                            or size + n > self.max_bytes))
            key = cmd.key_of(request.command)
            if full or key in keys:
                waiting.append(request)
                continue
            keys.add(key)
            size += n
            taken.append(request)
        self._pending = waiting
        for request in taken:
            request.state = "sent"
        entry = _Entry(taken, self.lost_after)
        self._in_flight.append(entry)
        return entry

    def _send(self, entry: _Entry) -> None:
        writes = [r.command for r in entry.requests if r.command is not None]
        if not writes:
            payload = _BARRIER
        elif len(writes) == 1:
            payload = writes[0]
        else:
            payload = cmd.encode_batch(writes)
        self.entries += 1
        self.commands += len(writes)
        # A paused intake (the raft envelope cutover) may hold the entry as long as its last
        # request still waits, as it would hold a unary proposal.
        seal_timeout = max(0.0, max(r.deadline for r in entry.requests) - time.monotonic())
        try:
            self.adapter.propose_async(payload, lambda result, error: self._done(entry, result,
                                                                                 error),
                                       seal_timeout)
        except errors.SealkvError as exc:
            self._done(entry, None, exc)

    def close(self) -> None:
        """Stops the proposer's thread (requests still pending then time out)."""
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                entry = self._take_locked()
            if entry is not None:
                self._send(entry)

    def _done(self, entry: _Entry, result, error: Optional[errors.SealkvError]) -> None:
        """The entry's callback (tick thread): wake the proposer's thread, answer everyone."""
        with self._lock:
            if entry.live:
                entry.live = False
                self._in_flight.remove(entry)
            if self._pending:
                self._wake.set()
        if error is not None:
            for request in entry.requests:
                _answer(request, None, error)
            return
        results = iter(result if isinstance(result, tuple) else (result,))
        barrier_result = None
        for request in entry.requests:
            if request.command is not None:
                r = next(results)
                barrier_result = barrier_result or r
                _answer(request, r, None)
        if barrier_result is None:
            barrier_result = result if not isinstance(result, tuple) else result[0]
        for request in entry.requests:
            if request.command is None:
                _answer(request, barrier_result, None)


def retry_barrier(attempt: Callable[[float], int], timeout: float,
                  halted: Callable[[], bool]) -> int:
    """Runs `attempt(remaining)` (one read barrier: returns its index or raises) until one
    succeeds, proposing again after a `BARRIER_RETRYABLE` failure while `timeout` allows;
    then raises `read_timeout`. A failure on a `halted` node, or another error, is raised."""
    deadline = time.monotonic() + timeout
    last: Optional[errors.SealkvError] = None
    dropped = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return attempt(remaining)
        except BARRIER_RETRYABLE as exc:
            if halted():
                raise
            last = exc
            dropped += 1
        # Pacing only: the next barrier waits for a leader first.
        time.sleep(min(BARRIER_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
    raise read_timeout(timeout, last, dropped)


def read_timeout(timeout: float, last: Optional[errors.SealkvError],
                 dropped: int = 0) -> errors.SealkvError:
    """The error of a read whose barrier was not confirmed in `timeout` (last failure `last`)."""
    if isinstance(last, errors.Unavailable) and "no leader" in last.message:
        return errors.Unavailable(f"read not served: no leader within {timeout:.1f}s (the "
                                  "cluster has no quorum or is electing); retry")
    why = f"; a leader change dropped {dropped} barrier(s)" if dropped else ""
    return errors.ReadTimeout(f"read timed out: no quorum-confirmed read point within "
                              f"{timeout:.1f}s{why}; a read changes nothing, retry")


def _answer(request: _Request, result, error) -> None:
    try:
        request.on_done(result, error)
    except Exception as exc:  # never raise into pysyncobj's tick thread
        log.error("proposer callback failed: %s at %s", type(exc).__name__, where(exc))
