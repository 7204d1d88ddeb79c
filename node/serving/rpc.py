"""Helpers shared by every servicer and interceptor: error mapping, request deadlines and
wrapped method handlers."""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

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


# A method handler's kinds: (attribute, its factory, whether the behaviour yields responses).
HANDLER_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, True))


def rewrap_handler(handler: grpc.RpcMethodHandler,
                   wrap: Callable[[str, bool, Callable], Optional[Callable]]
                   ) -> grpc.RpcMethodHandler:
    """Returns `handler` with its behaviour replaced by `wrap(kind, streams_out, behaviour)`
    (`kind` one of `HANDLER_KINDS`' attributes; `streams_out`: the behaviour yields its
    responses); `handler` itself when `wrap` returns None."""
    for attr, make, streams_out in HANDLER_KINDS:
        behaviour = getattr(handler, attr)
        if behaviour is None:
            continue
        wrapped = wrap(attr, streams_out, behaviour)
        if wrapped is None:
            return handler
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    return handler


class WrappedHandlers:
    """A server interceptor's wrapped handlers, built once per method, not once per call.

    gRPC asks every interceptor for the handler of each call; `get(method, handler)` returns
    `build(method, handler)` as built for the last call of `method`, and builds it again only
    when the inner `handler` is another object (the next interceptor rebuilt its own).
    Any gRPC thread; a race builds twice, harmlessly.
    """

    def __init__(self, build: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]):
        self._build = build
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._build(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped
