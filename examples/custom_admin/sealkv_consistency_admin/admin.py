"""The consistency admin service (`sealkv_consistency_admin.v1.ConsistencyAdmin`).

`ConsistencyAdminPlugin` (entry point `consistency` of `sealkv.admin_services`) serves
`CheckConsistency` on every node where it is enabled. A check:

1. takes the target index: the leader's commit index now, as a linearizable read sees it
   (`target_index`), so every write acknowledged before the check started is covered;
2. asks every member's `Cluster.Digest` through the capability fan-out
   (`sealkv.plugins.fanout.fan_out`: every voter and learner of the membership snapshot,
   concurrently, under one deadline per round), round after round, until every reachable member
   applied the target and all report the same applied index, or the wait runs out;
3. compares the last round's digests (`sealkv_consistency_admin.check.compare`).

It writes no key and, as a linearizable read, no log entry (a read index; a barrier entry
only where the node falls back, see the README's ReadIndex section). Nothing is logged but
the verdict and indexes.
`Cluster.Digest` is a core RPC, so the other members need not enable this plugin.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from sealkv.node import errors
from sealkv.node.serving.rpc import deadline, rpc_method
from sealkv.node.replication.membership import MemberRecord
from sealkv.plugins.api import AdminPlugin
from sealkv.plugins.fanout import CapabilityVerdict, ProbeAnswer, fan_out
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

from . import check
from .v1 import consistency_pb2 as pb
from .v1 import consistency_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConsistencyAdmin"].full_name
DEFAULT_WAIT = 10.0
# One fan-out round may take at most this long; a member that needs longer is unreachable.
ROUND_DEADLINE = 2.0
MIN_ROUND_DEADLINE = 0.2
POLL_INTERVAL = 0.05
# Time kept back from the caller's deadline to build and send the answer.
RESPONSE_RESERVE = 0.3
# Read (never written) only to take the leader's linearizable read point.
READ_POINT_KEY = b"sealkv-consistency-admin/read-point"


def probe_digest(member: MemberRecord, channel: grpc.Channel, timeout: float) -> ProbeAnswer:
    """Asks one member's `Cluster.Digest` (the fan-out probe); its answer goes in `details`."""
    r = cluster_pb2_grpc.ClusterStub(channel).Digest(cluster_pb2.DigestRequest(),
                                                      timeout=timeout)
    return ProbeAnswer(0, True, details={"node_id": r.node_id,
                                         "applied_index": str(r.applied_index),
                                         "digest": r.digest, "keys": str(r.keys)})


def _any_responder(_member: MemberRecord) -> None:
    # Digest answers carry a node name, not a node id: responders are checked by name instead.
    return None


def answer_of(verdict: CapabilityVerdict) -> check.MemberAnswer:
    """Turns one fan-out verdict into the member's answer (a wrong responder is unreachable)."""
    if not verdict.ok:
        return check.MemberAnswer(verdict.member, verdict.address, verdict.role, False,
                                  verdict.reason)
    d = verdict.details
    if d.get("node_id") != verdict.member:
        return check.MemberAnswer(
            verdict.member, verdict.address, verdict.role, False,
            f"node {d.get('node_id')!r} answered at its gRPC address (the member directory "
            "points at another node)")
    return check.MemberAnswer(verdict.member, verdict.address, verdict.role, True, "",
                              int(d["applied_index"]), d["digest"], int(d["keys"]))


class ConsistencyAdminPlugin(AdminPlugin):
    """The consistency admin plugin (see the module docstring).

    Built by the node with its `NodeHandle`; `run_check` runs on gRPC worker threads and blocks
    for at most its `wait`, plus one fan-out round.
    """

    name = "consistency"
    # Every method the plugin serves declares the role it needs (the node refuses to load a
    # plugin that leaves one out). A check makes every member decrypt and hash its whole
    # state: admin only. Its fan-out calls the core Cluster.Digest and KV.Get as this node,
    # with its node certificate, which the core policy allows peers.
    method_roles = {f"/{SERVICE_NAME}/CheckConsistency": "admin"}

    def __init__(self, node: Any):
        super().__init__(node)
        self.handle = node

    def add_services(self, server: Any) -> list[str]:
        """Adds `sealkv_consistency_admin.v1.ConsistencyAdmin`; returns its full name."""
        pb_grpc.add_ConsistencyAdminServicer_to_server(ConsistencyAdminService(self), server)
        return [SERVICE_NAME]

    @classmethod
    def cli_commands(cls) -> list[Any]:
        """Returns the `consistency` command group of the CLI."""
        from .cli import consistency

        return [consistency]

    def target_index(self, timeout: float) -> int:
        """Returns the leader's commit index now, as a linearizable read sees it.

        That is the leader's applied index once a quorum confirmed its leadership (a read
        index, applied), which every write acknowledged before this call precedes. (Raft's own commit index, in
        `Cluster.Status`, also counts pysyncobj's internal no-op entries, which never reach a
        state machine: `Cluster.Digest` could report it only after the next write.) On the
        leader the barrier is local; elsewhere it is a linearizable `KV.Get` on the leader,
        whose header revision is that index. Raises `Unavailable` when no leader answers.
        """
        if self.handle.is_leader():
            try:
                self.handle.confirm_leadership(timeout)
            except (errors.NotLeader, errors.OutcomeUnknown) as exc:
                raise errors.Unavailable(f"this node could not confirm its leadership "
                                         f"({exc.message}): retry") from None
            return self.handle.applied_index()
        leader = self.handle.leader_grpc_address()
        if not leader:
            raise errors.Unavailable("no leader is known, so the check has no target index: "
                                     "retry once the cluster has elected one")
        try:
            r = kv_pb2_grpc.KVStub(self.handle.channel(leader)).Get(
                kv_pb2.GetRequest(key=READ_POINT_KEY, consistency=kv_pb2.LINEARIZABLE),
                timeout=max(0.1, timeout))
        except grpc.RpcError as exc:
            raise errors.Unavailable(f"the leader at {leader} did not confirm a read point "
                                     f"({exc.code().name}): retry") from None
        return r.header.revision

    def run_check(self, wait: float) -> tuple[check.Report, int]:
        """Runs one consistency check; returns the report and the configuration version.

        Raises `Unavailable` when no leader answers or the membership cannot be read or keeps
        changing; every member-level failure is a row of the report instead.
        """
        end = time.monotonic() + wait
        target = self.target_index(min(ROUND_DEADLINE, wait))
        while True:
            budget = max(MIN_ROUND_DEADLINE, min(ROUND_DEADLINE, end - time.monotonic()))
            result = fan_out(self.handle, probe_digest, _any_responder, deadline=budget)
            if result.problem:
                raise errors.Unavailable(f"the consistency check cannot run: {result.problem}")
            answers = [answer_of(v) for v in result.verdicts]
            if check.settled(answers, target) or time.monotonic() + POLL_INTERVAL >= end:
                break
            time.sleep(POLL_INTERVAL)
        report = check.compare(answers, target)
        log.info("consistency check: %s (target index %d)", report.verdict.name, target)
        return report, result.config_version


class ConsistencyAdminService(pb_grpc.ConsistencyAdminServicer):
    """The gRPC servicer of `sealkv_consistency_admin.v1.ConsistencyAdmin`."""

    def __init__(self, plugin: ConsistencyAdminPlugin):
        self.plugin = plugin

    @rpc_method
    def CheckConsistency(self, request, context):
        requested = request.wait_ms / 1000 if request.wait_ms else DEFAULT_WAIT
        wait = deadline(context, requested + RESPONSE_RESERVE) - RESPONSE_RESERVE
        if wait <= 0:
            raise errors.InvalidArgument("the call's deadline leaves no time to wait for the "
                                         "members: give it a longer deadline")
        report, config_version = self.plugin.run_check(wait)
        return response_of(report, config_version, self.plugin.handle.name)


def response_of(report: check.Report, config_version: int,
                checked_by: str) -> pb.CheckConsistencyResponse:
    """Returns the wire form of a report."""
    return pb.CheckConsistencyResponse(
        verdict=report.verdict.value, target_index=report.target_index,
        compared_index=report.compared_index, agreed_digest=report.agreed_digest,
        config_version=config_version, checked_by=checked_by, summary=report.summary(),
        members=[pb.MemberDigest(name=m.answer.name, grpc_address=m.answer.address,
                                 role=m.answer.role, state=m.state.value,
                                 applied_index=m.answer.applied_index if m.answer.reachable
                                 else 0,
                                 digest=m.answer.digest, keys=m.answer.keys, reason=m.reason)
                 for m in report.members])
