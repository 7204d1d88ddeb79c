"""The sealkv client library: typed calls over gRPC, with endpoint failover.

`Client` serves threads, `AsyncClient` (same methods, as coroutines) one asyncio loop. Both
put the KV calls (put, get, delete, range, compare_and_swap) made concurrently in one process
on one Batch stream per endpoint (see `sealkv.node.batch_stream`): a lone call leaves at
once, calls made while a message is being sent leave together. `batching=False` makes one
unary RPC per call instead (older nodes without the Batch RPC get that automatically).

Errors come back as the typed exceptions of `sealkv.node.errors`, per call, batched or not. A
request that fails with UNAVAILABLE before reaching a node (connection refused, node stopping)
is tried on the next endpoint; a `NotLeader` answer is followed to the leader it names. A
write whose outcome is unknown (DEADLINE_EXCEEDED, a connection lost mid-request) is never
retried: that is the caller's decision. A read has no outcome to be unknown: its timeout is
`ReadTimeout` (DEADLINE_EXCEEDED), a connection lost under it `Unavailable`, and either is
tried on the next endpoint.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator, Optional, Sequence

import grpc

from sealkv.node import errors
from sealkv.node.batch_stream import StreamUnsupported, SyncBatchStream
from sealkv.node.security import tls
from sealkv.node.security.pki import CertFiles
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

LINEARIZABLE = kv_pb2.LINEARIZABLE
SERIALIZABLE = kv_pb2.SERIALIZABLE

# A leader can move while a request follows it (e.g. removing the leader hands over first).
MAX_LEADER_HOPS = 3

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 2 * 1024 * 1024)]


class Route:
    """The endpoints one request tries, in order, and when it moves on (both clients).

    The next endpoint is tried when nothing was submitted (`Unavailable`), and for an
    `idempotent` request (a read, which changes nothing) also when it timed out
    (`ReadTimeout`); a `NotLeader` answer naming the leader is followed (at most
    MAX_LEADER_HOPS times) when `follow_leader`.
    """

    def __init__(self, endpoints: list[str], preferred: int, endpoint: Optional[str],
                 follow_leader: bool, idempotent: bool):
        self.order = [endpoint] if endpoint else endpoints[preferred:] + endpoints[:preferred]
        self.pinned = endpoint is not None
        self.follow_leader = follow_leader
        self.idempotent = idempotent
        self.hops = 0
        self.i = 0
        self.last: Optional[errors.SealkvError] = None

    def next_target(self) -> str:
        """Returns the endpoint to try now; raises the last error when none is left."""
        if self.i >= len(self.order):
            raise self.last
        return self.order[self.i]

    def failed(self, error: errors.SealkvError) -> None:
        """Records a failed try; raises `error` when the request must not move on."""
        self.last = error
        if isinstance(error, errors.NotLeader) and error.leader and self.follow_leader \
                and self.hops < MAX_LEADER_HOPS:
            self.hops += 1
            self.order.insert(self.i + 1, error.leader)
        elif self.pinned or not (isinstance(error, errors.Unavailable) or (
                self.idempotent and isinstance(error, errors.ReadTimeout))):
            raise error
        self.i += 1


class ClientMethods:
    """The typed calls both clients offer; each goes through `_kv` or `_cluster`.

    Keyword arguments of every call: `timeout` (seconds), `endpoint` (only that one, no
    failover), `follow_leader`.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, *,
                 cacert: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None, batching: bool = True):
        """The connection settings both clients share: `timeout` (seconds per call),
        `cacert`, `cert` and `key` (PEM paths for mutual TLS; none: plaintext), `batching`
        (False: one unary RPC per call)."""
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.batching = batching
        self.tls_files: Optional[CertFiles] = tls.files_from(cacert, cert, key)
        self._channels: dict = {}
        self._streams: dict = {}
        self._unary_only: set[str] = set()
        self._preferred = 0

    def _prefer(self, target: str) -> None:
        """Remembers the endpoint that answered: the next request tries it first."""
        if target in self.endpoints:
            self._preferred = self.endpoints.index(target)

    # -- KV -----------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, prev_kv: bool = False, **kw) -> kv_pb2.PutResponse:
        return self._kv("put", kv_pb2.PutRequest(key=key, value=value, prev_kv=prev_kv), **kw)

    def get(self, key: bytes, consistency: int = LINEARIZABLE, **kw) -> kv_pb2.GetResponse:
        return self._kv("get", kv_pb2.GetRequest(key=key, consistency=consistency),
                        idempotent=True, **kw)

    def delete(self, key: bytes, prev_kv: bool = False, **kw) -> kv_pb2.DeleteResponse:
        return self._kv("delete", kv_pb2.DeleteRequest(key=key, prev_kv=prev_kv), **kw)

    def range(self, key: bytes, range_end: bytes = b"", prefix: bool = False, limit: int = 0,
              keys_only: bool = False, consistency: int = LINEARIZABLE,
              **kw) -> kv_pb2.RangeResponse:
        return self._kv("range", kv_pb2.RangeRequest(
            key=key, range_end=range_end, prefix=prefix, limit=limit, keys_only=keys_only,
            consistency=consistency), idempotent=True, **kw)

    def compare_and_swap(self, key: bytes, value: bytes, *,
                         expected_mod_revision: Optional[int] = None,
                         must_not_exist: bool = False, **kw) -> kv_pb2.CompareAndSwapResponse:
        request = kv_pb2.CompareAndSwapRequest(key=key, value=value)
        if must_not_exist:
            request.must_not_exist = True
        elif expected_mod_revision is not None:
            request.expected_mod_revision = expected_mod_revision
        return self._kv("compare_and_swap", request, **kw)

    # -- Cluster ------------------------------------------------------------------------

    def status(self, **kw) -> cluster_pb2.StatusResponse:
        return self._cluster("Status", cluster_pb2.StatusRequest(), idempotent=True, **kw)

    def member_list(self, **kw) -> cluster_pb2.MemberListResponse:
        return self._cluster("MemberList", cluster_pb2.MemberListRequest(), idempotent=True,
                             **kw)

    def member_add(self, name: str, raft_address: str, grpc_address: str,
                   learner: bool = False, **kw) -> cluster_pb2.MemberAddResponse:
        return self._cluster("MemberAdd", cluster_pb2.MemberAddRequest(
            name=name, raft_address=raft_address, grpc_address=grpc_address,
            role=cluster_pb2.LEARNER if learner else cluster_pb2.VOTER), **kw)

    def member_remove(self, name: str, **kw) -> cluster_pb2.MemberRemoveResponse:
        return self._cluster("MemberRemove", cluster_pb2.MemberRemoveRequest(name=name), **kw)

    def transfer_leadership(self, target: str = "", **kw):
        return self._cluster("TransferLeadership",
                             cluster_pb2.TransferLeadershipRequest(target=target), **kw)

    def digest(self, **kw) -> cluster_pb2.DigestResponse:
        return self._cluster("Digest", cluster_pb2.DigestRequest(), idempotent=True, **kw)

    def alarm_list(self, **kw) -> cluster_pb2.AlarmResponse:
        return self._cluster("Alarm", cluster_pb2.AlarmRequest(), idempotent=True, **kw)

    def alarm_disarm(self, **kw) -> cluster_pb2.AlarmResponse:
        return self._cluster("Alarm", cluster_pb2.AlarmRequest(
            action=cluster_pb2.AlarmRequest.DISARM), **kw)
    def revoke_certificate(self, serial: int, **kw) -> cluster_pb2.RevokeCertificateResponse:
        """Adds a certificate serial to the cluster's replicated revocation list (admin)."""
        return self._cluster("RevokeCertificate",
                             cluster_pb2.RevokeCertificateRequest(serial=f"{serial:x}"), **kw)

    def list_revoked(self, **kw) -> cluster_pb2.ListRevokedResponse:
        """The revoked certificate serials (hex strings in `revoked`)."""
        return self._cluster("ListRevoked", cluster_pb2.ListRevokedRequest(), idempotent=True,
                             **kw)


# The unary KV method of each batch request kind.
UNARY_METHOD = {"put": "Put", "get": "Get", "delete": "Delete", "range": "Range",
                "compare_and_swap": "CompareAndSwap"}


class Client(ClientMethods):
    """A connection to one or more sealkv endpoints ("host:port"), safe to share by threads.

    Mutual TLS with `cacert` (the cluster CA), `cert` and `key` (this client's identity, e.g.
    from `sealkv cert create-client`); with none of the three the channel is plaintext, which
    only a node started with --insecure accepts.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, **options):
        super().__init__(endpoints, timeout, **options)
        self._lock = threading.Lock()  # guards the channel and stream maps

    def close(self) -> None:
        with self._lock:
            for stream in self._streams.values():
                stream.close()
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._streams.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def channel(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = self._channels[endpoint] = tls.channel(endpoint, self.tls_files, _OPTIONS)
            return ch

    def _stream(self, endpoint: str) -> SyncBatchStream:
        channel = self.channel(endpoint)
        with self._lock:
            stream = self._streams.get(endpoint)
            if stream is None or not stream.alive:
                stream = self._streams[endpoint] = SyncBatchStream(channel)
            return stream

    def _route(self, attempt: Callable[[str], object], endpoint: Optional[str],
               follow_leader: bool, idempotent: bool):
        route = Route(self.endpoints, self._preferred, endpoint, follow_leader, idempotent)
        while True:
            target = route.next_target()
            try:
                response = attempt(target)
            except errors.SealkvError as exc:
                route.failed(explain(exc, self.tls_files))
                continue
            self._prefer(target)
            return response

    def call(self, stub_cls, method: str, request, *, endpoint: Optional[str] = None,
             timeout: Optional[float] = None, follow_leader: bool = True,
             idempotent: bool = False):
        """Calls the unary `method` on the first endpoint that answers; returns the response."""
        return self._route(
            lambda target: self._unary(target, stub_cls, method, request, timeout, idempotent),
            endpoint, follow_leader, idempotent)

    def _unary(self, target: str, stub_cls, method: str, request, timeout: Optional[float],
               read: bool):
        try:
            return getattr(stub_cls(self.channel(target)), method)(
                request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc, read=read) from None

    def _kv(self, kind: str, request, *, endpoint: Optional[str] = None,
            timeout: Optional[float] = None, follow_leader: bool = True,
            idempotent: bool = False):
        if not self.batching:
            return self.call(kv_pb2_grpc.KVStub, UNARY_METHOD[kind], request, endpoint=endpoint,
                             timeout=timeout, follow_leader=follow_leader, idempotent=idempotent)

        def attempt(target):
            if target not in self._unary_only:
                try:
                    return self._stream(target).call(kind, request, timeout or self.timeout,
                                                     idempotent)
                except StreamUnsupported:  # an older node: nothing was submitted
                    self._unary_only.add(target)
            return self._unary(target, kv_pb2_grpc.KVStub, UNARY_METHOD[kind], request, timeout,
                               idempotent)

        return self._route(attempt, endpoint, follow_leader, idempotent)

    def _cluster(self, method, request, **kw):
        return self.call(cluster_pb2_grpc.ClusterStub, method, request, **kw)

    def snapshot(self, *, endpoint: Optional[str] = None,
                 timeout: Optional[float] = None) -> Iterator[cluster_pb2.SnapshotChunk]:
        """Streams a consistent snapshot (`Cluster.Snapshot`, admin) from the first endpoint
        that answers, or only `endpoint`; `timeout` bounds the whole transfer (None: no
        bound). Returns an iterator of the chunks; an error before the first chunk moves on
        to the next endpoint, one after it is raised (typed) from the iterator."""
        route = Route(self.endpoints, self._preferred, endpoint, follow_leader=False,
                      idempotent=True)
        while True:
            target = route.next_target()
            stream = cluster_pb2_grpc.ClusterStub(self.channel(target)).Snapshot(
                cluster_pb2.SnapshotRequest(), timeout=timeout)
            try:
                first = next(stream)
            except grpc.RpcError as exc:
                route.failed(explain(errors.from_rpc_error(exc, read=True), self.tls_files))
                continue
            except StopIteration:
                raise errors.Internal(f"{target} ended the snapshot stream at once") from None
            return _typed_stream(first, stream)


def _typed_stream(first, stream) -> Iterator:
    yield first
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc, read=True) from None


def __getattr__(name: str):
    # AsyncClient lives in its own module (it imports this one); import it on first use.
    if name == "AsyncClient":
        from sealkv.node.aio_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)


def explain(error: errors.SealkvError, files: Optional[CertFiles]) -> errors.SealkvError:
    """Adds what a connection closed while connecting usually means to the message.

    A node refuses a client certificate inside the TLS handshake (another CA, expired, not a
    client certificate; a plaintext client too), before gRPC can answer with a status: the
    client only sees the socket close while connecting.
    """
    if isinstance(error, errors.Unavailable) and "socket closed" in error.message.lower():
        how = ("this client's certificate (signed by another CA, expired, or not a client "
               "certificate)") if files else "a plaintext client (give --cacert, --cert and --key)"
        return errors.Unavailable(f"{error.message}: the node closed the connection while "
                                  f"connecting; a sealkv node does that to {how}",
                                  leader=error.leader)
    return error


def health(endpoint: str, timeout: float = 2.0, files: Optional[CertFiles] = None) -> bool:
    """Returns whether the standard gRPC health service at `endpoint` says SERVING.

    `files` are the caller's TLS files (None: plaintext, for an --insecure node).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tls.channel(endpoint, files) as ch:
        try:
            response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
