"""`AsyncClient`: the sealkv client for asyncio, with the methods of `Client` as coroutines.

Import it as `sealkv.node.client.AsyncClient`. Every KV call made concurrently on one client
shares one Batch stream per endpoint (see `sealkv.node.batch_stream`); failover, leader
following, deadlines and "outcome unknown" are per call, exactly as in `Client`. Use it from
one event loop; `await client.close()` when done (or `async with`).
"""
from __future__ import annotations

from typing import Awaitable, Callable, Optional

import grpc

from sealkv.node import errors
from sealkv.node.batch_stream import AsyncBatchStream, StreamUnsupported
from sealkv.node.client import (_OPTIONS, LINEARIZABLE, SERIALIZABLE, UNARY_METHOD,
                                ClientMethods, Route, explain)
from sealkv.node.security import tls
from sealkv.v1 import cluster_pb2_grpc, kv_pb2_grpc

__all__ = ["AsyncClient", "LINEARIZABLE", "SERIALIZABLE"]


class AsyncClient(ClientMethods):
    """A connection to one or more sealkv endpoints for one asyncio event loop.

    The same arguments as `Client` (`ClientMethods.__init__`).
    """

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        channels, self._channels = list(self._channels.values()), {}
        for stream in streams:
            await stream.close()
        for ch in channels:
            await ch.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = tls.aio_channel(endpoint, self.tls_files, _OPTIONS)
        return ch

    def _stream(self, endpoint: str) -> AsyncBatchStream:
        stream = self._streams.get(endpoint)
        if stream is None or not stream.alive:
            stream = self._streams[endpoint] = AsyncBatchStream(self.channel(endpoint))
        return stream

    async def _route(self, attempt: Callable[[str], Awaitable], endpoint: Optional[str],
                     follow_leader: bool, idempotent: bool):
        route = Route(self.endpoints, self._preferred, endpoint, follow_leader, idempotent)
        while True:
            target = route.next_target()
            try:
                response = await attempt(target)
            except errors.SealkvError as exc:
                route.failed(explain(exc, self.tls_files))
                continue
            self._prefer(target)
            return response

    async def call(self, stub_cls, method: str, request, *, endpoint: Optional[str] = None,
                   timeout: Optional[float] = None, follow_leader: bool = True,
                   idempotent: bool = False):
        """Calls the unary `method` on the first endpoint that answers; returns the response."""
        return await self._route(
            lambda target: self._unary(target, stub_cls, method, request, timeout, idempotent),
            endpoint, follow_leader, idempotent)

    async def _unary(self, target: str, stub_cls, method: str, request,
                     timeout: Optional[float], read: bool):
        try:
            return await getattr(stub_cls(self.channel(target)), method)(
                request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, read=read) from None

    async def _kv(self, kind: str, request, *, endpoint: Optional[str] = None,
                  timeout: Optional[float] = None, follow_leader: bool = True,
                  idempotent: bool = False):
        if not self.batching:
            return await self.call(kv_pb2_grpc.KVStub, UNARY_METHOD[kind], request,
                                   endpoint=endpoint, timeout=timeout,
                                   follow_leader=follow_leader, idempotent=idempotent)

        async def attempt(target):
            if target not in self._unary_only:
                try:
                    return await self._stream(target).call(kind, request,
                                                           timeout or self.timeout, idempotent)
                except StreamUnsupported:  # an older node: nothing was submitted
                    self._unary_only.add(target)
            return await self._unary(target, kv_pb2_grpc.KVStub, UNARY_METHOD[kind], request,
                                     timeout, idempotent)

        return await self._route(attempt, endpoint, follow_leader, idempotent)

    async def _cluster(self, method, request, **kw):
        return await self.call(cluster_pb2_grpc.ClusterStub, method, request, **kw)
