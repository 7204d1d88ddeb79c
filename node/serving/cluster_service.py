"""The Cluster gRPC service: status, membership and leadership."""
from __future__ import annotations

import hashlib
from typing import Callable

from sealkv.node.state import commands as cmd
from sealkv.node import config as cfg
from sealkv.node import errors
from sealkv.node.serving.kv_service import KVReplication
from sealkv.node.serving.rpc import as_sealkv_error, deadline, rpc_method
from sealkv.node.replication.membership import MemberRecord, Membership
from sealkv.node.security.revocation import Revocations
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc

# Snapshot pieces are gathered into messages of about this size (a record larger than it
# travels alone: at most a 1 MiB value and a 4 KiB key).
SNAPSHOT_CHUNK_BYTES = 1024 * 1024

ROLE_TO_PB = {cmd.ROLE_VOTER: cluster_pb2.VOTER, cmd.ROLE_LEARNER: cluster_pb2.LEARNER}


def alarm_pb(a) -> cluster_pb2.AlarmMember:
    return cluster_pb2.AlarmMember(member=a.member, alarm=a.kind, cause=a.cause_name,
                                   replicated=a.replicated, message=a.message)


def member_pb(m: dict) -> cluster_pb2.Member:
    return cluster_pb2.Member(name=m["name"], raft_address=m["raft_address"],
                              grpc_address=m["grpc_address"], role=ROLE_TO_PB[m["role"]],
                              connected=m["connected"], is_leader=m["is_leader"],
                              replication_lag=m["replication_lag"])


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """Serves cluster status and membership changes for one node.

    `status()` returns the node's status dict (the fields of Cluster.Status); `membership`
    orchestrates member changes and leadership transfer; `state.digest()` returns (digest,
    keys, applied index), `state.snapshot_view()` a snapshot; `reads` is the proposer:
    `reads.barrier(timeout)` waits for a quorum-confirmed read point, `reads.term` is the
    current term. All are called on gRPC worker threads.
    """

    def __init__(self, member_name: str, request_timeout: float, status: Callable[[], dict],
                 membership: Membership, state, alarms, revocations: Revocations,
                 reads: KVReplication):
        self._member_name = member_name
        self._request_timeout = request_timeout
        self._status = status
        self._membership = membership
        self._state = state
        self._alarms = alarms  # AlarmBoard: alarms(), disarm(timeout)
        self._revocations = revocations
        self._reads = reads

    @rpc_method
    def Status(self, request, context):
        s = self._status()
        return cluster_pb2.StatusResponse(
            node_id=s["name"], raft_address=s["raft_address"], grpc_address=s["grpc_address"],
            role=ROLE_TO_PB[s["role"]], leader=s["leader"],
            leader_grpc_address=s["leader_grpc_address"], term=s["term"],
            commit_index=s["commit_index"], applied_index=s["applied_index"],
            has_quorum=s["has_quorum"], is_leader=s["is_leader"],
            members=[member_pb(m) for m in s["members"]], plugins=s["plugins"],
            version=s["version"], config_version=s["config_version"], log_size=s["log_size"],
            kv_counters=cluster_pb2.KVCounters(**s["kv_counters"]),
            alarms=[alarm_pb(a) for a in s["alarms"]], db_size_in_use=s["db_size_in_use"],
            quota_backend_bytes=s["quota_backend_bytes"],
            db_applied_index_at_start=s["db_applied_index_at_start"],
            replayed_at_start=s["replayed_at_start"],
            transport_security=s["transport_security"])

    def _members(self):
        s = self._status()
        return [member_pb(m) for m in s["members"]], s["config_version"]

    @rpc_method
    def MemberList(self, request, context):
        members, version = self._members()
        return cluster_pb2.MemberListResponse(members=members, config_version=version)

    @rpc_method
    def MemberAdd(self, request, context):
        role = {cluster_pb2.ROLE_UNSPECIFIED: cmd.ROLE_VOTER, cluster_pb2.VOTER: cmd.ROLE_VOTER,
                cluster_pb2.LEARNER: cmd.ROLE_LEARNER}.get(request.role)
        if role is None:
            raise errors.InvalidArgument(f"unknown role {request.role}")
        try:
            cfg.check_name(request.name, "member name")
            cfg.check_member_address(request.grpc_address, "grpc")
            if role == cmd.ROLE_VOTER:
                cfg.check_member_address(request.raft_address, "raft")
            elif request.raft_address:
                raise cfg.ConfigError("a learner has no raft address: leave raft_address empty")
        except cfg.ConfigError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
        member = MemberRecord(request.name, request.raft_address, request.grpc_address, role)
        self._membership.add(member, deadline(context, self._request_timeout * 2))
        members, version = self._members()
        added = [m for m in members if m.name == member.name]
        return cluster_pb2.MemberAddResponse(member=added[0] if added else None,
                                             members=members, config_version=version)

    @rpc_method
    def MemberRemove(self, request, context):
        if not request.name:
            raise errors.InvalidArgument("name must not be empty")
        self._membership.remove(request.name, deadline(context, self._request_timeout * 2))
        members, version = self._members()
        return cluster_pb2.MemberRemoveResponse(members=members, config_version=version)

    @rpc_method
    def TransferLeadership(self, request, context):
        self._membership.transfer_leadership(request.target,
                                             deadline(context, self._request_timeout))
        s = self._status()
        return cluster_pb2.TransferLeadershipResponse(leader=s["leader"], term=s["term"])

    @rpc_method
    def Alarm(self, request, context):
        if request.action == cluster_pb2.AlarmRequest.DISARM:
            self._alarms.disarm(deadline(context, self._request_timeout))
        elif request.action != cluster_pb2.AlarmRequest.LIST:
            raise errors.InvalidArgument(f"unknown alarm action {request.action}")
        return cluster_pb2.AlarmResponse(alarms=[alarm_pb(a) for a in self._alarms.alarms()])

    @rpc_method
    def Digest(self, request, context):
        digest, keys, applied = self._state.digest()
        return cluster_pb2.DigestResponse(node_id=self._member_name, applied_index=applied,
                                          digest=digest, keys=keys)

    @rpc_method
    def RevokeCertificate(self, request, context):
        try:
            serial = int(request.serial.replace(":", ""), 16)
            cmd.serial_bytes(serial)
        except ValueError:
            raise errors.InvalidArgument(f"serial {request.serial!r} is not a certificate serial "
                                         "(1-20 bytes, hexadecimal)") from None
        added = self._revocations.revoke(serial, deadline(context, self._request_timeout))
        return cluster_pb2.RevokeCertificateResponse(added=added, revoked=self._revoked())

    @rpc_method
    def ListRevoked(self, request, context):
        return cluster_pb2.ListRevokedResponse(revoked=self._revoked())

    def Snapshot(self, request, context):
        """Streams the state machine's snapshot from one read view (see `SnapshotChunk`).

        A linearizable read point comes first (as for a Get): every write acknowledged
        before the call began, by any member, is in the snapshot. The view stays open while
        the client reads (HTTP/2 flow control paces the loop, so at most a few chunks are in
        memory); apply goes on meanwhile. A gRPC worker thread is held for the whole transfer.
        """
        try:
            self._reads.barrier(deadline(context, self._request_timeout))
            term = self._reads.term
            digest = hashlib.sha256()
            with self._state.snapshot_view() as (header, pieces):
                first = cluster_pb2.SnapshotChunk(applied_index=header["applied_index"],
                                                  term=term, node_id=self._member_name)
                buffer: list[bytes] = []
                size = 0
                for piece in pieces:
                    buffer.append(piece)
                    size += len(piece)
                    if size >= SNAPSHOT_CHUNK_BYTES:
                        blob = b"".join(buffer)
                        digest.update(blob)
                        chunk, first = first or cluster_pb2.SnapshotChunk(), None
                        chunk.blob = blob
                        yield chunk
                        buffer, size = [], 0
            blob = b"".join(buffer)
            digest.update(blob)
            last = first or cluster_pb2.SnapshotChunk()
            last.blob, last.sha256, last.last = blob, digest.digest(), True
            yield last
        except Exception as exc:
            errors.abort_with(context, as_sealkv_error(exc, "Snapshot"))

    def _revoked(self) -> list[str]:
        return [f"{serial:x}" for serial in self._revocations.revoked()]
