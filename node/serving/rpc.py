"""Helpers shared by every servicer: error mapping and request deadlines."""
from __future__ import annotations

import functools
import logging

import grpc

from sealkv.node import errors
from sealkv.node.errors import where

log = logging.getLogger(__name__)


def rpc_method(fn):
    """Wraps a servicer method: `SealkvError` becomes its status, anything else INTERNAL.

    The log line of an unexpected error names the method and the exception type only: a
    message could carry a value.
    """

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:
            error = as_sealkv_error(exc, fn.__name__)
        errors.abort_with(context, error)

    return wrapper


def as_sealkv_error(exc: Exception, what: str) -> errors.SealkvError:
    """Returns `exc` if it is a `SealkvError`, else logs it (type and place) as INTERNAL."""
    if isinstance(exc, errors.SealkvError):
        return exc
    # A bug: answer INTERNAL, never leak details (a message could carry a value).
    log.error("internal error in %s: %s at %s", what, type(exc).__name__, where(exc))
    return errors.Internal(f"internal error in {what}")


def deadline(context: grpc.ServicerContext, default: float) -> float:
    """Seconds this request may wait: the node's default, capped by the client's deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, min(default, remaining - 0.05))
