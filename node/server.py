"""One sealkv node: storage stack, state machine, Raft member, plugins and gRPC server."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sealkv.node import __version__
from sealkv.node.state import commands as cmd
from sealkv.node import errors, file_modes, plugin_loader
from sealkv.node.serving.cluster_service import ClusterService
from sealkv.node.config import MAX_VALUE_BYTES, NodeConfig
from sealkv.node.serving.handle import NodeHandle
from sealkv.node.serving.kv_service import KVService
from sealkv.node.replication.adapter import ReplicationAdapter
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore
from sealkv.plugins.api import PluginContext, StartupRefused
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

log = logging.getLogger(__name__)

GRPC_WORKERS = 32
LEARNER_PROBE_PERIOD = 2.0
MAX_MESSAGE_BYTES = MAX_VALUE_BYTES + 64 * 1024


class StartupError(RuntimeError):
    """The node cannot start; the message tells the operator what to do."""


class Node:
    """A sealkv node. `start()` brings it up; `stop()` shuts it down gracefully."""

    def __init__(self, config: NodeConfig):
        config.validate()
        self.config = config
        self.raft_id = config.raft or f"learner:{config.name}"
        self._lock_fd: Optional[int] = None
        self.server: Optional[grpc.Server] = None
        self.port: Optional[int] = None
        self.health = health.HealthServicer()
        self.handle = NodeHandle(self)
        self.storage_plugins = []
        self.admin_plugins = []
        self._stopped = threading.Event()
        # Learners are anonymous to pysyncobj (read-only connections carry no identity), so
        # their connectivity comes from a gRPC health probe, refreshed in the background.
        self._learners_up: dict[str, bool] = {}
        self._learner_probe_at = 0.0
        self._learner_probe_lock = threading.Lock()

        stack = MemoryStore()
        handlers = {}
        try:
            for name, cls in plugin_loader.load(config.plugins, plugin_loader.STORAGE_GROUP):
                plugin = cls(PluginContext(config.name, self.raft_id, config.data_dir,
                                           config.plugin_options.get(name, {})))
                stack = plugin.wrap(stack)
                for opcode, handler in plugin.command_handlers().items():
                    if opcode in handlers or opcode in cmd.CORE_OPCODES:
                        raise StartupError(f"plugin {name!r} claims opcode 0x{opcode:02x}, "
                                           "which is already taken")
                    handlers[opcode] = handler
                self.storage_plugins.append(plugin)
            self.admin_plugin_classes = plugin_loader.load(config.plugins,
                                                           plugin_loader.ADMIN_GROUP)
        except (plugin_loader.PluginError, StartupRefused) as exc:
            raise StartupError(str(exc)) from exc
        self.state_machine = StateMachine(
            stack, config.initial_cluster or [self._self_record()], handlers,
            {p.name: p for p in self.storage_plugins})
        try:
            secret = config.read_secret()
            self.adapter = ReplicationAdapter(
                self.state_machine, raft_address=config.raft, partners=config.partners,
                data_dir=os.path.join(config.data_dir, "raft"), secret=secret,
                settings=config.raft_settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc

    def _self_record(self) -> MemberRecord:
        role = cmd.ROLE_LEARNER if self.config.learner else cmd.ROLE_VOTER
        return MemberRecord(self.config.name, self.config.raft or "", self.config.grpc, role)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> int:
        """Starts Raft, replays the log, starts plugins and serves gRPC; returns the port."""
        try:
            file_modes.secure_data_dir(self.config.data_dir)
        except file_modes.DataDirModeError as exc:
            raise StartupError(str(exc)) from exc
        self._lock_data_dir()
        self._refuse_orphaned_sidecar()
        try:
            for plugin in self.storage_plugins:
                plugin.prepare_start()
        except StartupRefused as exc:
            raise StartupError(str(exc)) from exc
        self.adapter.start()
        if not self.adapter.wait_replayed(60):
            raise StartupError("the local raft log did not replay within 60s")
        try:
            for plugin in self.storage_plugins:
                plugin.start(self.handle)
        except StartupRefused as exc:
            self.adapter.stop()
            raise StartupError(str(exc)) from exc
        self.admin_plugins = [cls(self.handle) for _, cls in self.admin_plugin_classes]
        self.server, self.port = self.create_server(self.config.grpc)
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s serving gRPC on %s (raft %s)", self.config.name, self.config.grpc,
                 self.config.raft or "learner")
        return self.port

    def create_server(self, address: str) -> tuple[grpc.Server, int]:
        """Builds the gRPC server with every service; port 0 in `address` picks a free one."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=GRPC_WORKERS * 16,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)])
        kv_pb2_grpc.add_KVServicer_to_server(KVService(self), server)
        cluster_pb2_grpc.add_ClusterServicer_to_server(ClusterService(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name,
                 cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name,
                 health.SERVICE_NAME, reflection.SERVICE_NAME]
        for plugin in self.admin_plugins:
            names.extend(plugin.add_services(server))
        reflection.enable_server_reflection(names, server)
        port = server.add_insecure_port(address)
        if port == 0:
            raise StartupError(f"cannot bind gRPC address {address}")
        return server, port

    def stop(self, grace: float = 2.0) -> None:
        """Health NOT_SERVING, stop gRPC with `grace`, stop plugins, then the Raft member."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        for plugin in self.admin_plugins + self.storage_plugins:
            try:
                plugin.stop()
            except Exception as exc:
                log.error("plugin %s failed to stop: %s", plugin.name, type(exc).__name__)
        self.handle.close()
        self.adapter.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _refuse_orphaned_sidecar(self) -> None:
        sidecar = os.path.join(self.config.data_dir, "encryption", "keys.json")
        if os.path.exists(sidecar) and "encryption" not in [p.name for p in self.storage_plugins]:
            raise StartupError(f"{sidecar} exists but encryption is not enabled: this node holds "
                               "encrypted data; start it with --encryption --kek-file PATH")

    def _lock_data_dir(self) -> None:
        path = os.path.join(self.config.data_dir, "LOCK")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StartupError(f"data directory {self.config.data_dir} is in use by another "
                               "sealkv process")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # -- requests ---------------------------------------------------------------------

    def leader_grpc_address(self) -> Optional[str]:
        leader = self.adapter.leader_raft_address
        if leader is None:
            return None
        directory, _ = self.state_machine.member_directory()
        for m in directory.values():
            if m.raft_address == leader:
                return m.grpc_address
        return None

    def require_leader(self) -> None:
        if not self.adapter.is_leader:
            leader = self.leader_grpc_address()
            where = f"; the leader is {leader}" if leader else "; no leader is known"
            raise errors.NotLeader(f"this node is not the leader{where}", leader=leader)

    def admit_write(self, timeout: float) -> None:
        for plugin in self.storage_plugins:
            plugin.admit_write(timeout)

    def status(self) -> dict:
        """Returns this node's view of the cluster (see Cluster.Status)."""
        raft = self.adapter.raft_state()
        directory, version = self.state_machine.member_directory()
        leader = self.adapter.leader_raft_address
        members = []
        voters = set(raft["voters"])
        self._refresh_learner_probe([m for m in directory.values() if m.role == cmd.ROLE_LEARNER])
        for m in directory.values():
            is_voter = m.role == cmd.ROLE_VOTER
            connected = m.raft_address in raft["connected"] if is_voter \
                else self._learners_up.get(m.name, False)
            members.append({
                "name": m.name, "raft_address": m.raft_address, "grpc_address": m.grpc_address,
                "role": m.role,
                "connected": m.name == self.config.name or connected,
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
            "name": self.config.name, "raft_address": self.config.raft or "",
            "grpc_address": self.config.grpc,
            "role": cmd.ROLE_LEARNER if self.config.learner else cmd.ROLE_VOTER,
            "leader": leader_name, "leader_grpc_address": self.leader_grpc_address() or "",
            "term": raft["term"], "commit_index": raft["commit_index"],
            "applied_index": raft["applied_index"], "has_quorum": raft["has_quorum"],
            "is_leader": self.adapter.is_leader,
            "members": sorted(members, key=lambda m: m["name"]),
            "plugins": [f"storage:{p.name}" for p in self.storage_plugins]
                       + [f"admin:{p.name}" for p in self.admin_plugins],
            "version": __version__, "config_version": version, "log_size": raft["log_size"],
        }

    def _refresh_learner_probe(self, learners: list[MemberRecord]) -> None:
        """Starts a background health probe of the learners at most every 2 s."""
        others = [m for m in learners if m.name != self.config.name]
        with self._learner_probe_lock:
            if not others or time.monotonic() - self._learner_probe_at < LEARNER_PROBE_PERIOD:
                return
            self._learner_probe_at = time.monotonic()

        def probe() -> None:
            from grpc_health.v1 import health_pb2 as hpb

            for m in others:
                try:
                    answer = health_pb2_grpc.HealthStub(self.handle.channel(m.grpc_address)) \
                        .Check(hpb.HealthCheckRequest(), timeout=0.5)
                    self._learners_up[m.name] = answer.status == hpb.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    self._learners_up[m.name] = False

        threading.Thread(target=probe, name="learner-probe", daemon=True).start()

    def add_member(self, member: MemberRecord, timeout: float) -> None:
        """Adds a voter or learner (leader only); rolls the directory back on failure."""
        self.require_leader()
        with self.adapter.membership_lock:
            directory, _ = self.state_machine.member_directory()
            for m in directory.values():
                if m.name == member.name:
                    raise errors.AlreadyExists(f"a member named {member.name!r} exists")
                if member.raft_address and m.raft_address == member.raft_address:
                    raise errors.AlreadyExists(f"member {m.name} already uses raft address "
                                               f"{member.raft_address}")
                if m.grpc_address == member.grpc_address:
                    raise errors.AlreadyExists(f"member {m.name} already uses gRPC address "
                                               f"{member.grpc_address}")
            deadline = time.monotonic() + timeout
            self.handle.run_member_checks(member, timeout)
            self.adapter.propose(cmd.encode(cmd.MemberSet(member.name, member.raft_address,
                                                          member.grpc_address, member.role)),
                                 max(0.1, deadline - time.monotonic()))
            if member.role != cmd.ROLE_VOTER:
                return
            try:
                self.adapter.add_voter(member.raft_address, max(0.1, deadline - time.monotonic()))
            except errors.OutcomeUnknown:
                raise
            except errors.SealkvError:
                self.adapter.propose(cmd.encode(cmd.MemberRemove(member.name)),
                                     self.config.request_timeout)
                raise

    def remove_member(self, name: str, timeout: float) -> None:
        """Removes a member (leader only). Removing the leader hands leadership over first."""
        self.require_leader()
        with self.adapter.membership_lock:
            directory, _ = self.state_machine.member_directory()
            member = directory.get(name)
            if member is None:
                raise errors.NotFound(f"no member named {name!r}")
            deadline = time.monotonic() + timeout
            if member.role == cmd.ROLE_VOTER:
                voters = [m for m in directory.values() if m.role == cmd.ROLE_VOTER]
                if len(voters) <= 1:
                    raise errors.FailedPrecondition("cannot remove the last voter")
                if member.raft_address == self.config.raft:
                    self.adapter.transfer_leadership(None, timeout)
                    while time.monotonic() < deadline:
                        if not self.adapter.is_leader and self.leader_grpc_address():
                            break
                        time.sleep(0.02)
                    leader = self.leader_grpc_address()
                    raise errors.NotLeader(f"{name} was the leader; leadership moved to "
                                           f"{leader or 'another voter'}: retry there",
                                           leader=leader)
                self.adapter.remove_voter(member.raft_address, timeout)
            self.adapter.propose(cmd.encode(cmd.MemberRemove(name)),
                                 max(0.1, deadline - time.monotonic()))


def run(config: NodeConfig) -> int:
    """Runs a node in the foreground until SIGTERM or SIGINT; returns the exit code."""
    try:
        node = Node(config)
        node.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("node %s stopping", config.name)
    node.stop()
    return 0
