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
        except errors.SealkvError as exc:
            error = exc
        except Exception as exc:  # a bug: answer INTERNAL, never leak details
            log.error("internal error in %s: %s at %s", fn.__name__, type(exc).__name__,
                      where(exc))
            error = errors.Internal(f"internal error in {fn.__name__}")
        errors.abort_with(context, error)

    return wrapper


def deadline(context: grpc.ServicerContext, default: float) -> float:
    """Seconds this request may wait: the node's default, capped by the client's deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, min(default, remaining - 0.05))
