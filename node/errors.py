"""The one error table of sealkv: domain errors, their gRPC status codes, and back.

Servers raise a `SealkvError` subclass; `abort_with(context, error)` answers the RPC with the
error's status code, its message, and the known leader's address in trailing metadata
(`sealkv-leader`) when the request must go to the leader. Clients call `from_rpc_error` to
turn a `grpc.RpcError` back into the same typed exception.
"""
from __future__ import annotations

from typing import Optional

import grpc

LEADER_METADATA_KEY = "sealkv-leader"
# Set on every error a sealkv server answers with, so a client can tell "the node said
# UNAVAILABLE: nothing was submitted" from "the connection broke: the outcome is unknown".
SERVER_METADATA_KEY = "sealkv-error"


class SealkvError(Exception):
    """Base of every sealkv error that reaches a client. `code` is its gRPC status code."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, leader: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.leader = leader


class InvalidArgument(SealkvError):
    """The request is malformed or breaks a documented limit; nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SealkvError):
    """A named member or resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SealkvError):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SealkvError):
    """The cluster is not in a state that allows the request (for example: not the leader)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotLeader(FailedPrecondition):
    """The request must be sent to the leader, whose gRPC address is in `leader` if known."""


class Unavailable(SealkvError):
    """No leader, no quorum, a full queue, or the node is stopping: retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(SealkvError):
    """The proposal was discarded by a leader change and was certainly not applied: retry."""

    code = grpc.StatusCode.ABORTED


class OutcomeUnknown(SealkvError):
    """The deadline passed before the outcome was known: the write may or may not apply."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ReadTimeout(SealkvError):
    """A read found no quorum-confirmed read point before its deadline. A read changes
    nothing, so there is no outcome to be unknown: retry it."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(SealkvError):
    """The node's proposal queue is full (retry later), or a NOSPACE alarm refuses writes
    (the message says which disk or quota; `sealkv alarm disarm` after freeing space)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class IntegrityError(SealkvError):
    """A stored value failed authentication or decoding. Never reported as "not found"."""

    code = grpc.StatusCode.DATA_LOSS


class PermissionDenied(SealkvError):
    """The caller's verified identity may not perform the request (its role is too low)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(SealkvError):
    """The caller has no verified identity: no client certificate, or a revoked one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(SealkvError):
    """The node does not serve this RPC or feature (a plugin not enabled there, or not yet
    built); retrying the same node will not help."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SealkvError):
    """A bug or an unexpected failure in the node."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unavailable,
                Aborted, OutcomeUnknown, ResourceExhausted, IntegrityError, PermissionDenied,
                Unauthenticated, Unimplemented, Internal)
}


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _never_sent(details: str) -> bool:
    # gRPC's wording when no connection could be established (the request never left).
    details = (details or "").lower()
    return "failed to connect" in details or "connection refused" in details \
        or "dns resolution failed" in details or "name resolution" in details


def abort_with(context: grpc.ServicerContext, error: SealkvError) -> None:
    """Ends the RPC with `error`'s status and message (and the leader in metadata)."""
    metadata = [(SERVER_METADATA_KEY, error.code.name.lower())]
    if error.leader:
        metadata.append((LEADER_METADATA_KEY, error.leader))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(error.code, error.message)


def to_status(error: SealkvError) -> tuple[int, str, str]:
    """Returns (gRPC code number, message, leader or "") for one request of a batch stream."""
    return error.code.value[0], error.message, error.leader or ""


def from_status(code: int, message: str, leader: str = "", *,
                read: bool = False) -> SealkvError:
    """Returns the typed exception for one failed request of a batch stream.

    The inverse of `to_status`: the node answered, so UNAVAILABLE means nothing was
    submitted and DEADLINE_EXCEEDED means the outcome is unknown (`ReadTimeout` for a `read`).
    """
    status = _CODE_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if read and status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ReadTimeout(message, leader=leader or None)
    if status == grpc.StatusCode.FAILED_PRECONDITION and leader:
        return NotLeader(message or "not the leader", leader=leader)
    cls = _BY_CODE.get(status, SealkvError)
    result = cls(message or status.name, leader=leader or None)
    result.code = status
    return result


def from_rpc_error(error: grpc.RpcError, *, read: bool = False) -> SealkvError:
    """Returns the typed exception for a failed RPC.

    UNAVAILABLE means "nothing was submitted" only when the node said so or the connection
    could not be made; a connection that broke while the request was in flight is
    `OutcomeUnknown`, since the node may have applied it. For a `read` (a request that
    changes nothing) there is no outcome to be unknown: DEADLINE_EXCEEDED is `ReadTimeout`
    and a broken connection `Unavailable`.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    leader = None
    from_server = False
    try:
        for key, value in error.trailing_metadata() or ():
            if key == LEADER_METADATA_KEY:
                leader = value
            elif key == SERVER_METADATA_KEY:
                from_server = True
    except AttributeError:  # an RpcError raised locally carries no trailing metadata
        pass
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and not from_server \
            and "handshake failed" in (message or "").lower():
        # This client refused the server's certificate (not signed by --cacert, or not
        # naming the address dialled): nothing was sent.
        return Unauthenticated(f"TLS handshake failed: the node's certificate is not trusted "
                               f"by --cacert or does not name the address dialled ({message})")
    if read and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ReadTimeout(message if from_server else f"read timed out: {message}",
                           leader=leader)
    if read and code == grpc.StatusCode.UNAVAILABLE and not from_server:
        return Unavailable(f"read not served, connection lost: {message}", leader=leader)
    if code == grpc.StatusCode.UNAVAILABLE and not from_server and not _never_sent(message):
        return OutcomeUnknown(f"connection lost, outcome unknown: {message}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not from_server:
        return OutcomeUnknown(f"deadline exceeded, outcome unknown: {message}")
    if code == grpc.StatusCode.FAILED_PRECONDITION and leader:
        return NotLeader(message or "not the leader", leader=leader)
    cls = _BY_CODE.get(code, SealkvError)
    result = cls(message or code.name, leader=leader)
    result.code = code
    return result


class ApplyHalt(Exception):
    """Raised by a replicated command handler when an entry cannot be applied.

    The node then halts: it logs one line, stops serving and exits non-zero, without advancing
    its applied index, rather than diverge from the other replicas.
    """


def where(exc: BaseException) -> str:
    """Returns "file:line" of the frame that raised `exc` (for logs that must not quote it)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
