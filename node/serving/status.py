"""The node's status (the fields of Cluster.Status) and the learners' health probe."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sealkv.node import __version__
from sealkv.node.config import NodeConfig
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.security import tls
from sealkv.node.state import commands as cmd

LEARNER_PROBE_PERIOD = 2.0
LEARNER_PROBE_TIMEOUT = 0.5


class LearnerProbe:
    """Learners' connectivity, from a gRPC health probe refreshed in the background.

    Learners are anonymous to pysyncobj (read-only connections carry no identity), so whether
    one is up is asked over gRPC. `refresh` is called from status requests (gRPC worker
    threads) and starts at most one probe thread every `period` seconds; it never waits.
    """

    def __init__(self, self_name: str, channel: Callable[[str], grpc.Channel],
                 period: float = LEARNER_PROBE_PERIOD):
        self._self_name = self_name
        self._channel = channel
        self._period = period
        self._up: dict[str, bool] = {}
        self._probed_at = 0.0
        self._lock = threading.Lock()

    def is_up(self, name: str) -> bool:
        """Whether the last probe found the learner `name` serving (False if never probed)."""
        return self._up.get(name, False)

    def refresh(self, learners: list[MemberRecord]) -> None:
        """Starts a background health probe of the other learners at most every period."""
        others = [m for m in learners if m.name != self._self_name]
        with self._lock:
            if not others or time.monotonic() - self._probed_at < self._period:
                return
            self._probed_at = time.monotonic()
        threading.Thread(target=self._probe, args=(others,), name="learner-probe",
                         daemon=True).start()

    def _probe(self, learners: list[MemberRecord]) -> None:
        for m in learners:
            try:
                answer = health_pb2_grpc.HealthStub(self._channel(m.grpc_address)).Check(
                    health_pb2.HealthCheckRequest(), timeout=LEARNER_PROBE_TIMEOUT)
                self._up[m.name] = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                self._up[m.name] = False


class NodeStatus:
    """Builds this node's view of the cluster (see Cluster.Status) from its parts.

    `replication` is the replication adapter (`raft_state()`, `leader_raft_address`,
    `is_leader`); `directory` returns the member directory and its configuration version;
    `plugins` returns the "storage:<name>"/"admin:<name>" list. Called on gRPC worker threads.
    """

    def __init__(self, config: NodeConfig, replication,
                 directory: Callable[[], tuple[dict[str, MemberRecord], int]],
                 leader_grpc_address: Callable[[], Optional[str]],
                 plugins: Callable[[], list[str]], probe: LearnerProbe):
        self._config = config
        self._replication = replication
        self._directory = directory
        self._leader_grpc_address = leader_grpc_address
        self._plugins = plugins
        self._probe = probe

    def status(self) -> dict:
        """Returns this node's view of the cluster (see Cluster.Status)."""
        raft = self._replication.raft_state()
        directory, version = self._directory()
        leader = self._replication.leader_raft_address
        members = []
        voters = set(raft["voters"])
        self._probe.refresh([m for m in directory.values() if m.role == cmd.ROLE_LEARNER])
        for m in directory.values():
            is_voter = m.role == cmd.ROLE_VOTER
            connected = m.raft_address in raft["connected"] if is_voter \
                else self._probe.is_up(m.name)
            members.append({
                "name": m.name, "raft_address": m.raft_address, "grpc_address": m.grpc_address,
                "role": m.role,
                "connected": m.name == self._config.name or connected,
                "is_leader": is_voter and m.raft_address == leader,
                "replication_lag": raft["lag"].get(m.raft_address, -1) if is_voter else -1,
            })
        for addr in voters - {m.raft_address for m in directory.values()}:
            members.append({"name": "", "raft_address": addr, "grpc_address": "",
                            "role": cmd.ROLE_VOTER, "connected": addr in raft["connected"],
                            "is_leader": addr == leader,
                            "replication_lag": raft["lag"].get(addr, -1)})
        leader_name = next((m["name"] for m in members if m["is_leader"]), leader or "")
        return {
            "name": self._config.name, "raft_address": self._config.raft or "",
            "grpc_address": self._config.grpc,
            "role": cmd.ROLE_LEARNER if self._config.learner else cmd.ROLE_VOTER,
            "leader": leader_name, "leader_grpc_address": self._leader_grpc_address() or "",
            "term": raft["term"], "commit_index": raft["commit_index"],
            "applied_index": raft["applied_index"], "has_quorum": raft["has_quorum"],
            "is_leader": self._replication.is_leader,
            "members": sorted(members, key=lambda m: m["name"]),
            "plugins": self._plugins(),
            "version": __version__, "config_version": version, "log_size": raft["log_size"],
            "transport_security": tls.security_name(self._config.tls_files),
        }
