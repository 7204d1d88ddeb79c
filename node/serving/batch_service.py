"""The KV Batch stream: many requests per message, each answered by id, out of order.

One stream is served by two threads: the gRPC worker that runs `serve` (it builds and sends
the answers) and a reader thread that takes each `BatchRequest`, validates every request,
submits writes to the node's `Proposer` (so writes from every stream and unary call share
Raft entries) and lets the linearizable reads of one message share one read barrier. The
proposer's callbacks, on the pysyncobj tick thread, only put the outcome on the stream's
queue; responses are built on the worker.

Each request has its own deadline (its `timeout_ms`, capped by the node's request timeout)
and its own status: a bad request, a failed compare or a refused write answers that request
only. A write whose deadline passes after it was proposed is answered DEADLINE_EXCEEDED
(outcome unknown); one still waiting for the previous entry is withdrawn and answered
UNAVAILABLE (nothing was applied).
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from typing import Callable, Optional

from sealkv.node import errors
from sealkv.node.replication.proposer import BARRIER_RETRY_PAUSE, BARRIER_RETRYABLE, read_timeout
from sealkv.node.security import authz
from sealkv.node.serving.rpc import as_sealkv_error
from sealkv.v1 import kv_pb2

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_MESSAGE = 1024
# Each open stream holds one gRPC worker thread for its lifetime: beyond this many, a new
# stream is refused (RESOURCE_EXHAUSTED; the client library then uses unary calls), so
# unary calls always find a worker.
MAX_STREAMS = 16
# Answer a little before the client's own deadline, so it hears the node's verdict.
_DEADLINE_MARGIN = 0.05
# An idle worker (no deadline in view) still wakes this often, so that a request whose
# deadline lies beyond its next wake-up needs no wake-up of its own (see `_Stream._track`).
IDLE_WAKE = 0.25

_WRITES = ("put", "delete", "compare_and_swap")
_READS = ("get", "range")
# How the authorization names each operation kind in a refusal (built once, not per request).
_BATCH_OPS = {kind: f"/sealkv.v1.KV/Batch {kind}" for kind in _WRITES + _READS}


class BatchCounters:
    """What the Batch streams of a node have carried (for Status and tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages = 0
        self.requests = 0

    def count(self, requests: int) -> None:
        with self._lock:
            self.messages += 1
            self.requests += requests


class BatchService:
    """Serves `KV.Batch` streams for one node (see the module docstring)."""

    def __init__(self, ops, proposer, request_timeout: float,
                 admit_write: Callable[..., None]):
        """`ops` is the node's `KVOps`; `proposer` its `Proposer` (`submit`, `withdraw`,
        `wait_leader`); `admit_write(timeout, delete=...)` the node's write admission (see
        `KVService`)."""
        self.proposer = proposer
        self.request_timeout = request_timeout
        self.admit_write = admit_write
        # The `ops` methods of each operation kind, looked up once rather than per request:
        # a write's (command, response) builders, a read's (check, read).
        self.writes = {kind: (getattr(ops, f"{kind}_command"), getattr(ops, f"{kind}_response"))
                       for kind in _WRITES}
        self.reads = {kind: (getattr(ops, f"check_{kind}"), getattr(ops, kind)) for kind in _READS}
        self.counters = BatchCounters()
        self.max_streams = MAX_STREAMS
        self._open = 0
        self._open_lock = threading.Lock()

    def serve(self, request_iterator, context):
        """The servicer method body: returns the iterator of `BatchResponse` messages.

        Raises `ResourceExhausted` when `max_streams` streams are open already.
        """
        with self._open_lock:
            if self._open >= self.max_streams:
                raise errors.ResourceExhausted(
                    f"this node serves at most {self.max_streams} Batch streams at once; use "
                    "unary calls or retry later")
            self._open += 1
        stream = _Stream(self, context)
        threading.Thread(target=stream.read, args=(request_iterator,), daemon=True,
                         name="kv-batch-reader").start()
        return self._counted(stream.answers())

    def _counted(self, answers):
        try:
            yield from answers
        finally:
            with self._open_lock:
                self._open -= 1


class _Op:
    __slots__ = ("id", "kind", "request", "started", "deadline", "ticket", "answered")

    def __init__(self, op_id: int, kind: str, request, started: float, deadline: float):
        self.id = op_id
        self.kind = kind
        self.request = request
        self.started = started
        self.deadline = deadline
        self.ticket = None  # the proposer's request, while a write waits for its entry
        self.answered = False


class _Stream:
    """The state of one Batch stream, shared by its reader thread and its worker."""

    def __init__(self, service: BatchService, context):
        self.service = service
        self.writes = service.writes
        self.reads = service.reads
        self.proposer = service.proposer
        self.context = context
        # The interceptor let the stream open (readonly at least); each request is
        # authorized by its operation here.
        self.caller = authz.Caller(context)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[int, _Op] = {}   # ids in flight: added by the reader, removed by the worker
        self.deadlines: list = []        # heap of (deadline, seq, op), guarded by _heap_lock
        self._heap_lock = threading.Lock()
        self._seq = 0
        # When the worker wakes at the latest (guarded by _heap_lock): a new deadline before
        # it needs a wake-up, a later one is seen in time anyway.
        self._wake_by = 0.0
        self.reading = True

    # -- reader thread ----------------------------------------------------------------

    def read(self, request_iterator) -> None:
        try:
            for message in request_iterator:
                self.service.counters.count(len(message.requests))
                self._start(message.requests)
        except Exception as exc:  # the stream ended abnormally (cancelled, connection lost)
            log.debug("batch stream ended: %s", type(exc).__name__)
        finally:
            self.inbox.put(("end",))

    def _start(self, requests) -> None:
        now = time.monotonic()
        default = self.service.request_timeout
        barrier_reads: list[_Op] = []
        wake = False
        writes = False
        for index, request in enumerate(requests):
            kind = request.WhichOneof("request")
            timeout = default if not request.timeout_ms else \
                max(0.0, min(default, request.timeout_ms / 1000 - _DEADLINE_MARGIN))
            op = _Op(request.id, kind, getattr(request, kind) if kind else None, now,
                     now + timeout)
            if op.id in self.live:
                self._fail(op, errors.InvalidArgument(f"request id {op.id} is already in flight "
                                                      "on this stream"), register=False)
                continue
            self.live[op.id] = op
            wake = self._track(op) or wake
            try:
                if index >= MAX_REQUESTS_PER_MESSAGE:
                    raise errors.InvalidArgument(
                        f"a batch message carries at most {MAX_REQUESTS_PER_MESSAGE} requests")
                if kind is None:
                    raise errors.InvalidArgument("request carries no operation")
                refusal = self.caller.check_op(kind, _BATCH_OPS[kind])
                if refusal is not None:
                    raise refusal
                if kind in _WRITES:
                    self._submit_write(op, timeout)
                    writes = True
                elif self.reads[kind][0](op.request):
                    barrier_reads.append(op)
                else:
                    self.inbox.put(("reads", [op], None, None))
            except Exception as exc:
                self._fail(op, as_sealkv_error(exc, f"Batch/{kind}"))
        # Only a deadline the worker would otherwise miss wakes it: a lone request's own
        # answer wakes it soon enough, and a useless wake-up costs the GIL on the path.
        if wake:
            self.inbox.put(("wake",))
        if writes:  # the message's writes leave as one entry, after every request was checked
            self.proposer.flush()
        if barrier_reads:
            self._submit_barrier(barrier_reads)

    def _submit_write(self, op: _Op, timeout: float) -> None:
        command = self.writes[op.kind][0](op.request)
        self.service.admit_write(timeout, delete=op.kind == "delete")
        self.proposer.wait_leader(op.deadline)
        inbox = self.inbox
        op.ticket = self.proposer.submit(
            command, lambda result, error: inbox.put(("write", op, result, error)), op.deadline,
            send=False)

    def _submit_barrier(self, reads: list[_Op]) -> None:
        try:
            self.proposer.wait_leader(min(op.deadline for op in reads))
        except errors.SealkvError as exc:
            for op in reads:
                self._fail(op, exc)
            return
        inbox = self.inbox
        self.proposer.submit(None, lambda result, error: inbox.put(("reads", reads, result,
                                                                         error)),
                                  max(op.deadline for op in reads))

    def _track(self, op: _Op) -> bool:
        """Adds `op`'s deadline; returns whether the worker must be woken to see it in time."""
        with self._heap_lock:
            self._seq += 1
            heapq.heappush(self.deadlines, (op.deadline, self._seq, op))
            return op.deadline < self._wake_by

    def _fail(self, op: _Op, error: errors.SealkvError, register: bool = True) -> None:
        self.inbox.put(("failed", op, error, register))

    # -- worker thread (the gRPC handler) ---------------------------------------------

    def answers(self):
        """Yields one `BatchResponse` per wake-up, carrying every answer ready by then."""
        ended = False
        while not (ended and not self.live):
            try:
                item = self.inbox.get(timeout=self._until_next_deadline())
            except queue.Empty:
                item = None
            out: list[kv_pb2.ResponseOp] = []
            while item is not None:
                if item[0] == "end":
                    ended = True
                    if not self.context.is_active():
                        return
                else:
                    self._answer(item, out)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._expire(out)
            if out:
                yield kv_pb2.BatchResponse(responses=out)

    def _until_next_deadline(self) -> float:
        with self._heap_lock:
            while self.deadlines and self.deadlines[0][2].answered:
                heapq.heappop(self.deadlines)
            now = time.monotonic()
            wait = IDLE_WAKE if not self.deadlines else \
                max(0.0, min(IDLE_WAKE, self.deadlines[0][0] - now))
            self._wake_by = now + wait
            return wait

    def _expire(self, out: list) -> None:
        now = time.monotonic()
        expired = []
        with self._heap_lock:
            while self.deadlines and (self.deadlines[0][2].answered
                                      or self.deadlines[0][0] <= now):
                _, _, op = heapq.heappop(self.deadlines)
                if not op.answered:
                    expired.append(op)
        for op in expired:
            if op.ticket is not None and self.proposer.withdraw(op.ticket):
                error = errors.Unavailable("not proposed before its deadline: the previous "
                                           "entry has not committed; nothing was applied")
            elif op.kind in _WRITES:
                error = errors.OutcomeUnknown("outcome unknown: not committed before its "
                                              "deadline (it may still apply)")
            else:
                error = read_timeout(op.deadline - op.started, None)
            out.append(self._error_op(op, error))

    def _answer(self, item, out: list) -> None:
        kind = item[0]
        if kind == "wake":
            return
        if kind == "failed":
            _, op, error, registered = item
            if registered:
                if op.answered:
                    return
                out.append(self._error_op(op, error))
            else:  # a duplicate id: answer it without touching the request in flight
                out.append(_status_op(op.id, error))
            return
        if kind == "write":
            _, op, result, error = item
            if op.answered:
                return
            if error is None:
                try:
                    response = self.writes[op.kind][1](op.request, result)
                except Exception as exc:
                    error = as_sealkv_error(exc, f"Batch/{op.kind}")
                else:
                    out.append(self._ok_op(op, response))
                    return
            out.append(self._error_op(op, error))
            return
        _, reads, _, error = item  # "reads": the barrier passed (or failed), or serializable
        if isinstance(error, BARRIER_RETRYABLE) and not self.proposer.halted:
            # A dropped barrier is a no-op: propose another while the reads' deadlines allow
            # (paced; they expire as ReadTimeout otherwise).
            waiting = [op for op in reads if not op.answered]
            if waiting:
                retry = threading.Timer(BARRIER_RETRY_PAUSE, self._submit_barrier, (waiting,))
                retry.daemon = True
                retry.start()
            return
        for op in reads:
            if op.answered:
                continue
            if error is None:
                try:
                    out.append(self._ok_op(op, self.reads[op.kind][1](op.request)))
                    continue
                except Exception as exc:
                    failure = as_sealkv_error(exc, f"Batch/{op.kind}")
            else:
                failure = error
            out.append(self._error_op(op, failure))

    def _done(self, op: _Op) -> None:
        op.answered = True
        if self.live.get(op.id) is op:
            del self.live[op.id]

    def _ok_op(self, op: _Op, response) -> kv_pb2.ResponseOp:
        self._done(op)
        answer = kv_pb2.ResponseOp(id=op.id)
        getattr(answer, op.kind).CopyFrom(response)
        return answer

    def _error_op(self, op: _Op, error: errors.SealkvError) -> kv_pb2.ResponseOp:
        self._done(op)
        return _status_op(op.id, error)


def _status_op(op_id: int, error: errors.SealkvError) -> kv_pb2.ResponseOp:
    code, message, leader = errors.to_status(error)
    return kv_pb2.ResponseOp(id=op_id, status=kv_pb2.RequestStatus(code=code, message=message,
                                                                   leader=leader))
