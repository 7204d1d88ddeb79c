"""The Cluster gRPC service: status, membership and leadership."""
from __future__ import annotations

import time

from sealkv.node.state import commands as cmd
from sealkv.node import config as cfg
from sealkv.node import errors
from sealkv.node.serving.rpc import deadline, rpc_method
from sealkv.node.replication.membership import MemberRecord
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc

ROLE_TO_PB = {cmd.ROLE_VOTER: cluster_pb2.VOTER, cmd.ROLE_LEARNER: cluster_pb2.LEARNER}


def member_pb(m: dict) -> cluster_pb2.Member:
    return cluster_pb2.Member(name=m["name"], raft_address=m["raft_address"],
                              grpc_address=m["grpc_address"], role=ROLE_TO_PB[m["role"]],
                              connected=m["connected"], is_leader=m["is_leader"],
                              replication_lag=m["replication_lag"])


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """Serves cluster status and membership changes for one node."""

    def __init__(self, node):
        self.node = node

    @rpc_method
    def Status(self, request, context):
        s = self.node.status()
        return cluster_pb2.StatusResponse(
            node_id=s["name"], raft_address=s["raft_address"], grpc_address=s["grpc_address"],
            role=ROLE_TO_PB[s["role"]], leader=s["leader"],
            leader_grpc_address=s["leader_grpc_address"], term=s["term"],
            commit_index=s["commit_index"], applied_index=s["applied_index"],
            has_quorum=s["has_quorum"], is_leader=s["is_leader"],
            members=[member_pb(m) for m in s["members"]], plugins=s["plugins"],
            version=s["version"], config_version=s["config_version"], log_size=s["log_size"])

    def _members(self):
        s = self.node.status()
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
            cfg.check_address(request.grpc_address, "grpc")
            if role == cmd.ROLE_VOTER:
                cfg.check_address(request.raft_address, "raft")
            elif request.raft_address:
                raise cfg.ConfigError("a learner has no raft address: leave raft_address empty")
        except cfg.ConfigError as exc:
            raise errors.InvalidArgument(str(exc)) from exc
        member = MemberRecord(request.name, request.raft_address, request.grpc_address, role)
        self.node.add_member(member, deadline(context, self.node.config.request_timeout * 2))
        members, version = self._members()
        added = [m for m in members if m.name == member.name]
        return cluster_pb2.MemberAddResponse(member=added[0] if added else None,
                                             members=members, config_version=version)

    @rpc_method
    def MemberRemove(self, request, context):
        if not request.name:
            raise errors.InvalidArgument("name must not be empty")
        self.node.remove_member(request.name,
                                deadline(context, self.node.config.request_timeout * 2))
        members, version = self._members()
        return cluster_pb2.MemberRemoveResponse(members=members, config_version=version)

    @rpc_method
    def TransferLeadership(self, request, context):
        self.node.require_leader()
        timeout = deadline(context, self.node.config.request_timeout)
        target = None
        if request.target:
            directory, _ = self.node.state_machine.member_directory()
            member = directory.get(request.target)
            if member is None or member.role != cmd.ROLE_VOTER:
                raise errors.NotFound(f"no voter named {request.target!r}")
            if member.raft_address == self.node.config.raft:
                raise errors.InvalidArgument(f"{request.target} is already the leader")
            target = member.raft_address
        start = time.monotonic()
        self.node.adapter.transfer_leadership(target, timeout)
        while time.monotonic() - start < timeout:
            leader = self.node.adapter.leader_raft_address
            if leader and leader != self.node.config.raft and (target is None or leader == target):
                s = self.node.status()
                return cluster_pb2.TransferLeadershipResponse(leader=s["leader"], term=s["term"])
            time.sleep(0.02)
        raise errors.OutcomeUnknown("leadership transfer requested but not observed in time")

    @rpc_method
    def Digest(self, request, context):
        digest, keys, applied = self.node.state_machine.digest()
        return cluster_pb2.DigestResponse(node_id=self.node.config.name, applied_index=applied,
                                          digest=digest, keys=keys)
