"""Client side of the KV Batch stream: one stream per endpoint, shared by every caller.

A caller's request is queued on the stream of its endpoint and leaves with whatever else is
queued when the stream is free to send: a lone request leaves at once (no timer), requests
made while a message is being sent form the next one, and a message carries at most
`MAX_OPS_PER_MESSAGE` requests. Answers come back by id, in any order.

`SyncBatchStream` serves threads (the `Client`): gRPC's own thread pulls the messages and a
receiver thread resolves each waiting caller. `AsyncBatchStream` serves one asyncio loop (the
`AsyncClient`) with a sender and a receiver task. When the stream ends or breaks, every request
still waiting gets the stream's error (`errors.from_rpc_error`: `Unavailable` when the
connection could not be made, else `OutcomeUnknown`), and the owner opens a new stream for
the next request. `StreamUnsupported` means the node predates the Batch RPC (UNIMPLEMENTED):
nothing was submitted, the client falls back to unary calls for that endpoint.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Optional

import grpc

from sealkv.node import errors
from sealkv.v1 import kv_pb2, kv_pb2_grpc

MAX_OPS_PER_MESSAGE = 512


class StreamUnsupported(errors.Unavailable):
    """The endpoint does not serve KV.Batch (an older node) or refused one more stream
    (RESOURCE_EXHAUSTED before any request): nothing was submitted."""


def request_op(op_id: int, kind: str, request, timeout: float) -> kv_pb2.RequestOp:
    """Returns the RequestOp carrying `request` (of field `kind`) with the caller's deadline."""
    op = kv_pb2.RequestOp(id=op_id, timeout_ms=max(1, int(timeout * 1000)))
    getattr(op, kind).CopyFrom(request)
    return op


def unpack(answer: kv_pb2.ResponseOp, kind: str, read: bool):
    """Returns the response inside `answer`, or raises the typed error it carries."""
    status = answer.status
    if status.code:
        raise errors.from_status(status.code, status.message, status.leader, read=read)
    return getattr(answer, kind)


def stream_error(exc: BaseException) -> errors.SealkvError:
    """What a write still waiting on a stream that failed with `exc` gets (see `for_read`)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in (
            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return StreamUnsupported(f"the node serves no Batch stream here: {exc.code().name}")
    if isinstance(exc, grpc.RpcError):
        return errors.from_rpc_error(exc)
    return errors.OutcomeUnknown(f"batch stream failed ({type(exc).__name__}): outcome unknown")


def for_read(error: errors.SealkvError) -> errors.SealkvError:
    """A read changes nothing: a stream lost under it is `Unavailable`, never unknown."""
    if isinstance(error, errors.OutcomeUnknown):
        return errors.Unavailable(f"read not served, connection lost: {error.message}")
    return error


def timed_out(timeout: float, read: bool) -> errors.SealkvError:
    if read:
        return errors.ReadTimeout(f"read timed out: no answer within {timeout:.1f}s")
    return errors.OutcomeUnknown(f"deadline exceeded, outcome unknown: no answer within "
                                 f"{timeout:.1f}s")


_ENDED = errors.OutcomeUnknown("the node ended the batch stream: outcome unknown")


class _Waiter:
    __slots__ = ("event", "answer", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: Optional[kv_pb2.ResponseOp] = None
        self.error: Optional[errors.SealkvError] = None


class SyncBatchStream:
    """One Batch stream to one endpoint, for any number of threads (see the module docstring).

    `call(kind, request, timeout)` may be called from any thread; it blocks up to `timeout`.
    """

    def __init__(self, channel: grpc.Channel):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.error: Optional[errors.SealkvError] = None  # set once the stream is over
        self._responses = kv_pb2_grpc.KVStub(channel).Batch(self._messages())
        threading.Thread(target=self._receive, name="kv-batch-receiver", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.error is None

    def call(self, kind: str, request, timeout: float, read: bool):
        """Sends one request and returns its response, or raises its typed error.

        `read`: the request changes nothing (its timeout is `ReadTimeout`, a lost stream
        `Unavailable`).
        """
        op_id = next(self._ids)
        waiter = _Waiter()
        with self._lock:
            if self.error is not None:
                raise for_read(self.error) if read else self.error
            self._waiting[op_id] = waiter
        self._outbox.put(request_op(op_id, kind, request, timeout))
        if not waiter.event.wait(timeout):
            with self._lock:
                self._waiting.pop(op_id, None)
            raise timed_out(timeout, read)
        if waiter.error is not None:
            raise for_read(waiter.error) if read else waiter.error
        return unpack(waiter.answer, kind, read)

    def close(self) -> None:
        """Half-closes the stream: the node answers what it has, then ends it."""
        self._outbox.put(None)

    def _messages(self):
        # Pulled by gRPC's sending thread, one message at a time: whatever queued up while
        # the previous message was being sent leaves together.
        while True:
            op = self._outbox.get()
            if op is None:
                return
            ops = [op]
            while len(ops) < MAX_OPS_PER_MESSAGE:
                try:
                    op = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    self._outbox.put(None)
                    break
                ops.append(op)
            yield kv_pb2.BatchRequest(requests=ops)

    def _receive(self) -> None:
        error: errors.SealkvError = _ENDED
        try:
            for message in self._responses:
                for answer in message.responses:
                    with self._lock:
                        waiter = self._waiting.pop(answer.id, None)
                    if waiter is not None:
                        waiter.answer = answer
                        waiter.event.set()
        except Exception as exc:
            error = stream_error(exc)
        with self._lock:
            self.error = error
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.error = error
            waiter.event.set()


class AsyncBatchStream:
    """One Batch stream to one endpoint for the callers of one asyncio event loop."""

    def __init__(self, channel: "grpc.aio.Channel"):
        self._call = kv_pb2_grpc.KVStub(channel).Batch()
        self._queue: list[kv_pb2.RequestOp] = []
        self._wake = asyncio.Event()
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self.error: Optional[errors.SealkvError] = None
        self._sender = asyncio.ensure_future(self._send())
        self._receiver = asyncio.ensure_future(self._receive())

    @property
    def alive(self) -> bool:
        return self.error is None

    async def call(self, kind: str, request, timeout: float, read: bool):
        """Sends one request and returns its response, or raises its typed error (as
        `SyncBatchStream.call`)."""
        if self.error is not None:
            raise for_read(self.error) if read else self.error
        op_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[op_id] = future
        self._queue.append(request_op(op_id, kind, request, timeout))
        self._wake.set()
        try:
            answer = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._waiting.pop(op_id, None)
            raise timed_out(timeout, read) from None
        except errors.SealkvError as exc:
            raise for_read(exc) if read else exc
        return unpack(answer, kind, read)

    async def close(self) -> None:
        self._sender.cancel()
        self._call.cancel()
        await asyncio.gather(self._sender, self._receiver, return_exceptions=True)

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                ops = self._queue[:MAX_OPS_PER_MESSAGE]
                del self._queue[:MAX_OPS_PER_MESSAGE]
                try:
                    await self._call.write(kv_pb2.BatchRequest(requests=ops))
                except Exception:  # the call is over; the receiver reports why
                    return

    async def _receive(self) -> None:
        error: errors.SealkvError = _ENDED
        try:
            async for message in self._call:
                for answer in message.responses:
                    future = self._waiting.pop(answer.id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
        except asyncio.CancelledError:
            error = errors.Unavailable("the client closed the batch stream")
        except Exception as exc:
            error = stream_error(exc)
        self.error = error
        self._sender.cancel()
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
