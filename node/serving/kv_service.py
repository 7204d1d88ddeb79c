"""The KV gRPC service: validation, proposals and reads."""
from __future__ import annotations

from typing import Callable, Optional, Protocol

from sealkv.node.state import commands as cmd
from sealkv.node import errors
from sealkv.node.config import MAX_KEY_BYTES, MAX_RANGE_BYTES, MAX_RANGE_LIMIT, MAX_VALUE_BYTES
from sealkv.node.serving.batch_service import BatchService
from sealkv.node.serving.rpc import deadline, rpc_method
from sealkv.node.state.alarms import alarm_message
from sealkv.node.state.machine import WriteResult
from sealkv.node.state.storage.base import Entry
from sealkv.v1 import kv_pb2, kv_pb2_grpc


def check_key(key: bytes, what: str = "key") -> None:
    """Raises InvalidArgument unless 1 <= len(key) <= MAX_KEY_BYTES."""
    if not key:
        raise errors.InvalidArgument(f"{what} must not be empty")
    if len(key) > MAX_KEY_BYTES:
        raise errors.InvalidArgument(f"{what} is {len(key)} bytes; the limit is {MAX_KEY_BYTES}")


def check_value(value: bytes) -> None:
    """Raises InvalidArgument when the value exceeds MAX_VALUE_BYTES."""
    if len(value) > MAX_VALUE_BYTES:
        raise errors.InvalidArgument(
            f"value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}")


def prefix_end(prefix: bytes) -> Optional[bytes]:
    """Returns the smallest key greater than every key starting with `prefix` (None: no end)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes((trimmed[-1] + 1,))


def to_kv(key: bytes, entry: Entry, keys_only: bool = False) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=b"" if keys_only else entry.value,
                           create_revision=entry.create_revision,
                           mod_revision=entry.mod_revision, version=entry.version)


class KVReplication(Protocol):
    """What the KV service needs of the replication adapter.

    Called on gRPC worker threads, never on the pysyncobj tick thread. Every wait is bounded
    by `timeout`; failures are `SealkvError`s from the one error table.
    """

    @property
    def term(self) -> int:
        """The current Raft term as this node knows it (for response headers)."""

    def propose(self, command: bytes, timeout: float) -> WriteResult:
        """Replicates the encoded command and returns its apply result on this node.

        Raises `Unavailable` (nothing submitted), `Aborted` (certainly not applied),
        `ResourceExhausted` (queue full) or `OutcomeUnknown` (deadline passed after submission).
        """

    def barrier(self, timeout: float) -> int:
        """Waits for a quorum-confirmed no-op proposed after this call began; returns its index.

        Every write acknowledged before the call started is applied on this node on return.
        """


class KVState(Protocol):
    """What the KV service reads from the state machine (gRPC worker threads, never waits)."""

    def get(self, key: bytes) -> tuple[Optional[Entry], int]:
        """Returns (the cleartext entry or None, the applied index it reflects)."""

    def range(self, start: bytes, end: Optional[bytes], limit: int, keys_only: bool,
              max_bytes: Optional[int] = None) -> tuple[list[tuple[bytes, Entry]], int, int]:
        """Returns (cleartext pairs, the total count, the applied index), from one read view.

        Stops at `limit` pairs or before the pair that would pass `max_bytes` of keys and
        values (at least one pair is returned)."""

    def reveal(self, key: bytes, entry: Optional[Entry]) -> Optional[Entry]:
        """Decodes an entry as stored (a `WriteResult.prev`) to cleartext."""


class KVOps:
    """The KV requests of one node, apart from how they arrive (unary RPC or batch stream).

    `*_command` validates a write request and returns its encoded command (raising
    InvalidArgument); `*_response` builds the answer from the command's apply result;
    `check_get`/`check_range` validate a read and say whether it needs the read barrier;
    `get` and `range` read the local state (the caller has passed the read point first).
    Called from gRPC worker threads, never from the tick thread. `write_refusal()` returns
    the NOSPACE alarm's message (for a write refused at apply), or None.
    """

    def __init__(self, member_name: str, replication: KVReplication, state: KVState,
                 write_refusal: Callable[[], Optional[str]] = lambda: None):
        self._member_name = member_name
        self._replication = replication
        self._state = state
        self._write_refusal = write_refusal

    def _refuse_if_capped(self, result: WriteResult) -> None:
        if result.refused:
            # Admitted before the NOSPACE alarm, refused at apply on every replica alike:
            # nothing was written.
            raise errors.ResourceExhausted(self._write_refusal()
                                           or alarm_message("a member", cmd.CAUSE_DISK_FULL))

    def header(self, revision: int) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(member_id=self._member_name, revision=revision,
                                     raft_term=self._replication.term)

    def _prev_kv(self, response, request, result: WriteResult) -> None:
        if request.prev_kv and result.prev is not None:
            response.prev_kv.CopyFrom(to_kv(request.key,
                                            self._state.reveal(request.key, result.prev)))

    @staticmethod
    def put_command(request) -> bytes:
        check_key(request.key)
        check_value(request.value)
        return cmd.encode(cmd.Put(request.key, request.value))

    def put_response(self, request, result: WriteResult) -> kv_pb2.PutResponse:
        self._refuse_if_capped(result)
        response = kv_pb2.PutResponse(header=self.header(result.revision))
        self._prev_kv(response, request, result)
        return response

    @staticmethod
    def delete_command(request) -> bytes:
        check_key(request.key)
        return cmd.encode(cmd.Delete(request.key))

    def delete_response(self, request, result: WriteResult) -> kv_pb2.DeleteResponse:
        response = kv_pb2.DeleteResponse(header=self.header(result.revision),
                                         deleted=1 if result.prev is not None else 0)
        self._prev_kv(response, request, result)
        return response

    @staticmethod
    def compare_and_swap_command(request) -> bytes:
        check_key(request.key)
        check_value(request.value)
        which = request.WhichOneof("expected")
        if which is None:
            raise errors.InvalidArgument("set expected_mod_revision or must_not_exist")
        if which == "must_not_exist":
            if not request.must_not_exist:
                raise errors.InvalidArgument("must_not_exist, when set, must be true")
            return cmd.encode(cmd.CompareAndSwap(request.key, request.value,
                                                 cmd.CAS_MUST_NOT_EXIST, 0))
        if request.expected_mod_revision <= 0:
            raise errors.InvalidArgument("expected_mod_revision must be positive")
        return cmd.encode(cmd.CompareAndSwap(request.key, request.value, cmd.CAS_BY_REVISION,
                                             request.expected_mod_revision))

    def compare_and_swap_response(self, request,
                                  result: WriteResult) -> kv_pb2.CompareAndSwapResponse:
        self._refuse_if_capped(result)
        response = kv_pb2.CompareAndSwapResponse(header=self.header(result.revision),
                                                 succeeded=result.succeeded)
        if result.current is not None:
            response.kv.CopyFrom(to_kv(request.key, self._state.reveal(request.key,
                                                                       result.current)))
        return response

    @staticmethod
    def check_consistency(consistency: int) -> bool:
        """Returns whether a read needs the read barrier; InvalidArgument when unknown."""
        if consistency == kv_pb2.LINEARIZABLE:
            return True
        if consistency != kv_pb2.SERIALIZABLE:
            raise errors.InvalidArgument(f"unknown consistency {consistency}")
        return False

    @staticmethod
    def check_get(request) -> bool:
        check_key(request.key)
        return KVOps.check_consistency(request.consistency)

    def get(self, request) -> kv_pb2.GetResponse:
        entry, revision = self._state.get(request.key)
        response = kv_pb2.GetResponse(header=self.header(revision), found=entry is not None)
        if entry is not None:
            response.kv.CopyFrom(to_kv(request.key, entry))
        return response

    @staticmethod
    def check_range(request) -> bool:
        range_bounds(request)
        if request.limit < 0:
            raise errors.InvalidArgument("limit must not be negative")
        if request.limit > MAX_RANGE_LIMIT:
            raise errors.InvalidArgument(f"limit is {request.limit}; the maximum is "
                                         f"{MAX_RANGE_LIMIT}")
        return KVOps.check_consistency(request.consistency)

    def range(self, request) -> kv_pb2.RangeResponse:
        start, end = range_bounds(request)
        pairs, total, revision = self._state.range(start, end, request.limit or MAX_RANGE_LIMIT,
                                                   request.keys_only, MAX_RANGE_BYTES)
        return kv_pb2.RangeResponse(header=self.header(revision), count=total,
                                    more=total > len(pairs),
                                    kvs=[to_kv(k, e, request.keys_only) for k, e in pairs])


def range_bounds(request) -> tuple[bytes, Optional[bytes]]:
    """Returns [start, end) of a RangeRequest (end None: no bound); InvalidArgument if bad."""
    if request.prefix:
        if request.range_end:
            raise errors.InvalidArgument("set either prefix or range_end, not both")
        if len(request.key) > MAX_KEY_BYTES:
            check_key(request.key)
        return request.key, prefix_end(request.key)
    if request.range_end == b"\0":
        return request.key, None
    check_key(request.key)
    if not request.range_end:
        return request.key, request.key + b"\0"
    if request.range_end <= request.key:
        raise errors.InvalidArgument("range_end must be greater than key")
    return request.key, request.range_end


class KVService(kv_pb2_grpc.KVServicer):
    """Serves Put, Get, Delete, Range and CompareAndSwap for one node, and the Batch stream.

    Every write (Put, Delete, CompareAndSwap, unary or in a batch) passes
    `admit_write(timeout, delete=...)`, the node's write admission, before it is proposed; it
    raises a `SealkvError` to refuse the write (a delete is never refused for lack of space).
    The Batch stream also needs `replication` to be a `Proposer` (`submit`, `withdraw`,
    `wait_leader`).
    """

    def __init__(self, member_name: str, request_timeout: float, replication: KVReplication,
                 state: KVState, admit_write: Callable[..., None],
                 write_refusal: Callable[[], Optional[str]] = lambda: None):
        self._request_timeout = request_timeout
        self._replication = replication
        self._admit_write = admit_write
        self.ops = KVOps(member_name, replication, state, write_refusal)
        self.batches = BatchService(self.ops, replication, request_timeout,
                                    lambda timeout, **kw: self._admit_write(timeout, **kw))

    def _write(self, command: bytes, context, delete: bool = False):
        timeout = deadline(context, self._request_timeout)
        self._admit_write(timeout, delete=delete)
        return self._replication.propose(command, timeout)

    def _read_point(self, linearizable: bool, context) -> None:
        if linearizable:
            self._replication.barrier(deadline(context, self._request_timeout))

    @rpc_method
    def Put(self, request, context):
        return self.ops.put_response(request, self._write(self.ops.put_command(request), context))

    @rpc_method
    def Get(self, request, context):
        self._read_point(self.ops.check_get(request), context)
        return self.ops.get(request)

    @rpc_method
    def Delete(self, request, context):
        return self.ops.delete_response(
            request, self._write(self.ops.delete_command(request), context, delete=True))

    @rpc_method
    def Range(self, request, context):
        self._read_point(self.ops.check_range(request), context)
        return self.ops.range(request)

    @rpc_method
    def CompareAndSwap(self, request, context):
        return self.ops.compare_and_swap_response(
            request, self._write(self.ops.compare_and_swap_command(request), context))

    def Batch(self, request_iterator, context):
        try:
            return self.batches.serve(request_iterator, context)
        except errors.SealkvError as exc:
            errors.abort_with(context, exc)
