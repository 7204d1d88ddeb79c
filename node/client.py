"""The sealkv client library: typed calls over gRPC, with endpoint failover.

Errors come back as the typed exceptions of `sealkv.node.errors`. A request that fails with
UNAVAILABLE before reaching a node (connection refused, node stopping) is tried on the next
endpoint; a `NotLeader` answer is followed to the leader it names. A request whose outcome is
unknown (DEADLINE_EXCEEDED) is never retried: that is the caller's decision. A read has no
outcome to be unknown: its timeout is `ReadTimeout` (DEADLINE_EXCEEDED), a connection lost
under it `Unavailable`, and either is tried on the next endpoint.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import grpc

from sealkv.node import errors
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

LINEARIZABLE = kv_pb2.LINEARIZABLE
SERIALIZABLE = kv_pb2.SERIALIZABLE

# A leader can move while a request follows it (e.g. removing the leader hands over first).
MAX_LEADER_HOPS = 3

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 2 * 1024 * 1024)]


class Client:
    """A connection to one or more sealkv endpoints ("host:port")."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0):
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self._preferred = 0

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def channel(self, endpoint: str) -> grpc.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = grpc.insecure_channel(endpoint, options=_OPTIONS)
        return ch

    def call(self, stub_cls, method: str, request, *, endpoint: Optional[str] = None,
             timeout: Optional[float] = None, follow_leader: bool = True,
             idempotent: bool = False):
        """Calls `method` on the first endpoint that answers; returns the response.

        The next endpoint is tried when nothing was submitted (`Unavailable`), and for an
        `idempotent` request (a read, which changes nothing) also when it timed out
        (`ReadTimeout`).
        """
        order = [endpoint] if endpoint else (self.endpoints[self._preferred:]
                                             + self.endpoints[:self._preferred])
        last: Optional[errors.SealkvError] = None
        hops = 0
        i = 0
        while i < len(order):
            target = order[i]
            try:
                stub = stub_cls(self.channel(target))
                response = getattr(stub, method)(request, timeout=timeout or self.timeout)
                if target in self.endpoints:
                    self._preferred = self.endpoints.index(target)
                return response
            except grpc.RpcError as exc:
                last = errors.from_rpc_error(exc, read=idempotent)
            if isinstance(last, errors.NotLeader) and last.leader and follow_leader \
                    and hops < MAX_LEADER_HOPS:
                hops += 1
                order.insert(i + 1, last.leader)
            elif endpoint or not (isinstance(last, errors.Unavailable) or (
                    idempotent and isinstance(last, errors.ReadTimeout))):
                raise last
            i += 1
        raise last

    # -- KV -----------------------------------------------------------------------------

    def _kv(self, method, request, **kw):
        return self.call(kv_pb2_grpc.KVStub, method, request, **kw)

    def put(self, key: bytes, value: bytes, prev_kv: bool = False, **kw) -> kv_pb2.PutResponse:
        return self._kv("Put", kv_pb2.PutRequest(key=key, value=value, prev_kv=prev_kv), **kw)

    def get(self, key: bytes, consistency: int = LINEARIZABLE, **kw) -> kv_pb2.GetResponse:
        return self._kv("Get", kv_pb2.GetRequest(key=key, consistency=consistency),
                        idempotent=True, **kw)

    def delete(self, key: bytes, prev_kv: bool = False, **kw) -> kv_pb2.DeleteResponse:
        return self._kv("Delete", kv_pb2.DeleteRequest(key=key, prev_kv=prev_kv), **kw)

    def range(self, key: bytes, range_end: bytes = b"", prefix: bool = False, limit: int = 0,
              keys_only: bool = False, consistency: int = LINEARIZABLE,
              **kw) -> kv_pb2.RangeResponse:
        return self._kv("Range", kv_pb2.RangeRequest(
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
        return self._kv("CompareAndSwap", request, **kw)

    # -- Cluster ------------------------------------------------------------------------

    def _cluster(self, method, request, **kw):
        return self.call(cluster_pb2_grpc.ClusterStub, method, request, **kw)

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


def health(endpoint: str, timeout: float = 2.0) -> bool:
    """Returns whether the standard gRPC health service at `endpoint` says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(endpoint) as ch:
        try:
            response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
