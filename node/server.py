"""One sealkv node: storage stack, state machine, Raft member, plugins and gRPC server."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sealkv.node import durable, errors, file_modes, plugin_loader
from sealkv.node.config import MAX_VALUE_BYTES, NodeConfig
from sealkv.node.data_dir import DataDirError, DataDirLock, refuse_disabled_plugin_data
from sealkv.node.replication.adapter import ReplicationAdapter
from sealkv.node.replication.proposer import UNBATCHED_ENTRIES, Proposer
from sealkv.node.replication.membership import MemberRecord, Membership, raft_id
from sealkv.node.serving import reflection
from sealkv.node.serving.audit import AuditDamaged, AuditInterceptor, AuditLog
from sealkv.node.serving.cluster_service import ClusterService
from sealkv.node.serving.handle import NodeHandle
from sealkv.node.serving.kv_service import KVService
from sealkv.node.serving.metrics import MetricsListener, NodeMetrics
from sealkv.node.serving.status import LearnerProbe, NodeStatus
from sealkv.node.state import commands as cmd
from sealkv.node.state.alarms import WRITE_DISK_READING_AGE, AlarmBoard
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.lmdb_store import SYNC_DEFERRED, SYNC_NEVER, LmdbStore
from sealkv.node.security import authz, tls
from sealkv.node.security.revocation import Revocations
from sealkv.plugins.api import PluginContext, ProvidesPayloadCodec, StartupRefused
from sealkv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc

log = logging.getLogger(__name__)

GRPC_WORKERS = 32
# A stopping leader's hand-over to a caught-up voter: its bound, and the longest pause between
# attempts while no voter is caught up (a retry also follows any progress of the log).
HANDOVER_TIMEOUT = 3.0
HANDOVER_RETRY = 0.05
MAX_MESSAGE_BYTES = MAX_VALUE_BYTES + 64 * 1024


class StartupError(RuntimeError):
    """The node cannot start; the message tells the operator what to do."""


class Node:
    """A sealkv node. `start()` brings it up; `stop()` shuts it down gracefully."""

    def __init__(self, config: NodeConfig):
        config.validate()
        self.config = config
        self.raft_id = raft_id(config.name, config.raft)
        self._data_dir_lock = DataDirLock(config.data_dir)
        self.server: Optional[grpc.Server] = None
        self.audit: Optional[AuditLog] = None
        self.port: Optional[int] = None
        self.health = health.HealthServicer()
        self.handle = NodeHandle(self)
        self.storage_plugins = []
        self.admin_plugins = []
        self._stopped = threading.Event()
        self.db_index_at_start = 0
        self.replayed_at_start = 0

        # Under --fsync always the journal and the dumps are fsynced and can rebuild the
        # database: its commits are not flushed one by one (no second fsync per write).
        self.store = LmdbStore(config.db_dir, map_size=config.db_map_bytes,
                               sync=SYNC_DEFERRED if config.fsync == durable.FSYNC_ALWAYS
                               else SYNC_NEVER)
        stack = self.store
        handlers = {}
        try:
            for name, cls in plugin_loader.load(config.plugins, plugin_loader.STORAGE_GROUP):
                plugin = cls(PluginContext(config.name, self.raft_id, config.data_dir,
                                           config.plugin_options.get(name, {})))
                stack = plugin.wrap(stack)
                plugin_handlers = plugin.command_handlers()
                cmd.claim_opcodes(handlers, f"plugin {name!r}", plugin_handlers)
                handlers.update(plugin_handlers)
                self.storage_plugins.append(plugin)
            self.admin_plugin_classes = plugin_loader.load(config.plugins,
                                                           plugin_loader.ADMIN_GROUP)
        except (plugin_loader.PluginError, StartupRefused, cmd.OpcodeClash) as exc:
            raise StartupError(str(exc)) from exc
        self.state_machine = StateMachine(
            stack, config.initial_cluster or [self._self_record()], handlers,
            {p.name: p for p in self.storage_plugins})
        self.alarms = AlarmBoard(config.name, self.state_machine,
                                 lambda command, timeout: self.adapter.propose(command, timeout),
                                 db_dir=config.db_dir, data_bytes=self.store.data_bytes,
                                 quota_bytes=config.quota_backend_bytes)
        try:
            raft_dir = os.path.join(config.data_dir, "raft")
            secret = config.read_secret(existing=os.path.isdir(raft_dir)
                                        and bool(os.listdir(raft_dir)))
            self.adapter = ReplicationAdapter(
                self.state_machine, raft_address=config.raft, partners=config.partners,
                data_dir=os.path.join(config.data_dir, "raft"), secret=secret,
                settings=config.raft_settings, payload_codec=self._payload_codec(),
                fsync=config.fsync, on_disk_full=self._on_disk_full,
                peer_wire_format=config.peer_wire)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self.membership = Membership(self.adapter, self.state_machine.member_directory,
                                     config.raft, config.request_timeout)
        # Every KV write and linearizable read goes through the proposer: concurrent ones
        # share Raft entries.
        self.proposer = Proposer(self.adapter, lost_after=2 * config.request_timeout,
                                 **({} if config.batch_entries else UNBATCHED_ENTRIES))
        self.kv_service = KVService(config.name, config.request_timeout, self.proposer,
                                    self.state_machine, self.admit_write,
                                    self.alarms.write_refusal)
        self.status_view = NodeStatus(config, self.adapter, self.state_machine.member_directory,
                                      self.membership.leader_grpc_address, self.plugin_names,
                                      LearnerProbe(config.name, self.handle.channel))
        self.metrics = NodeMetrics(self.status, self.adapter.stats,
                                   lambda: self.storage_plugins + self.admin_plugins,
                                   self._disk_facts, config.data_dir)
        self.metrics_listener: Optional[MetricsListener] = None

    def _payload_codec(self):
        """The payload codec of the first storage layer offering one (the optional capability
        `payload_codec()`: the encryption plugin's raft-log envelope), else None."""
        for plugin in self.storage_plugins:
            if isinstance(plugin, ProvidesPayloadCodec):
                return plugin.payload_codec()
        return None

    def _on_disk_full(self, path: str) -> None:
        """Raises the NOSPACE alarm (called on the tick thread when a log write finds the
        disk full)."""
        self.alarms.raise_alarm(cmd.CAUSE_DISK_FULL)

    def _self_record(self) -> MemberRecord:
        role = cmd.ROLE_LEARNER if self.config.learner else cmd.ROLE_VOTER
        return MemberRecord(self.config.name, self.config.raft or "", self.config.grpc, role)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> int:
        """Starts Raft, replays the log, starts plugins and serves gRPC; returns the port."""
        try:
            file_modes.secure_data_dir(self.config.data_dir)
            self._data_dir_lock.acquire()
            refuse_disabled_plugin_data(
                self.config.data_dir, [p.name for p in self.storage_plugins],
                [p.name for p in plugin_loader.installed()
                 if p.group == plugin_loader.STORAGE_GROUP])
        except (file_modes.DataDirModeError, DataDirError) as exc:
            raise StartupError(str(exc)) from exc
        try:
            for plugin in self.storage_plugins:
                plugin.prepare_start()
        except StartupRefused as exc:
            raise StartupError(str(exc)) from exc
        self._open_database()
        started = time.monotonic()
        try:
            self.adapter.start()
        except durable.DamagedFile as exc:
            raise StartupError(str(exc)) from None
        if not self.adapter.wait_replayed(60):
            raise StartupError("the local raft log did not replay within 60s")
        self.replayed_at_start = self.state_machine.applied_entries
        log.info("replayed %d log entries after the database's applied index %d (%d already "
                 "in the database skipped) in %.2fs", self.replayed_at_start,
                 self.db_index_at_start, self.state_machine.skipped_entries,
                 time.monotonic() - started)
        self.alarms.start()
        try:
            for plugin in self.storage_plugins:
                plugin.start(self.handle)
        except StartupRefused as exc:
            self.adapter.stop()
            raise StartupError(str(exc)) from exc
        self.admin_plugins = [cls(self.handle) for _, cls in self.admin_plugin_classes]
        try:
            self.audit = AuditLog(self.config.data_dir, self.config.name,
                                  self.config.read_secret())
        except (AuditDamaged, OSError) as exc:
            self.adapter.stop()
            raise StartupError(f"audit log: {exc}") from exc
        self.server, self.port = self.create_server(self.config.grpc)
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.config.listen_metrics:
            try:
                self.metrics_listener = MetricsListener(self.metrics, self.config.listen_metrics,
                                                        self._healthy)
            except OSError as exc:
                self.stop()
                raise StartupError(f"cannot listen for metrics on {self.config.listen_metrics}: "
                                   f"{exc.strerror}") from exc
            self.metrics_listener.start()
            log.info("metrics and /health on http://%s", self.config.listen_metrics)
        if self.config.insecure:
            log.warning("INSECURE: node %s serves plaintext gRPC on %s with no client "
                        "identities: anyone who reaches the port may read, write and change "
                        "membership. Use it for one-host experiments only.", self.config.name,
                        self.config.grpc)
        log.info("node %s serving gRPC (%s) on %s (raft %s)", self.config.name,
                 tls.security_name(self.config.tls_files), self.config.grpc,
                 self.config.raft or "learner")
        return self.port

    def create_server(self, address: str) -> tuple[grpc.Server, int]:
        """Builds the gRPC server with every service; port 0 in `address` picks a free one.

        Unless the node runs --insecure, every call passes the authorization interceptor,
        whose policy is the core table plus what each admin plugin declares (complete before
        the server starts; a plugin leaving a method undeclared stops start-up).
        """
        policy = dict(authz.CORE_POLICY)
        # The audit and metrics interceptors are outside the authorization, so they record
        # and count its refusals.
        interceptors = ([AuditInterceptor(self.audit)] if self.audit else []) \
            + [self.metrics.interceptor()]
        if not self.config.insecure:
            interceptors.append(authz.AuthorizationInterceptor(policy,
                                                               self.state_machine.is_revoked))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
            interceptors=interceptors,
            maximum_concurrent_rpcs=GRPC_WORKERS * 16,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)])
        kv_pb2_grpc.add_KVServicer_to_server(self.kv_service, server)
        cluster_pb2_grpc.add_ClusterServicer_to_server(
            ClusterService(self.config.name, self.config.request_timeout, self.status,
                           self.membership, self.state_machine, self.alarms,
                           Revocations(self.membership.require_leader, self.adapter.propose,
                                       self.state_machine), self.proposer), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name,
                 cluster_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name,
                 health.SERVICE_NAME]
        for plugin in self.admin_plugins:
            services = plugin.add_services(server)
            try:
                policy.update(plugin_loader.method_rules(plugin.name, plugin, services))
            except plugin_loader.PluginError as exc:
                raise StartupError(str(exc)) from None
            names.extend(services)
        reflection.enable(names, server)
        try:
            port = tls.bind(server, address, self.config.tls_files)
        except tls.TLSFilesError as exc:
            raise StartupError(str(exc)) from None
        if port == 0:
            raise StartupError(f"cannot bind gRPC address {address}")
        return server, port

    def stop(self, grace: float = 2.0) -> None:
        """Health NOT_SERVING, stop gRPC with `grace`, stop plugins, then the Raft member."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        if self.metrics_listener is not None:
            self.metrics_listener.stop()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        for plugin in self.admin_plugins + self.storage_plugins:
            try:
                plugin.stop()
            except Exception as exc:
                log.error("plugin %s failed to stop: %s", plugin.name, type(exc).__name__)
        self.handle.close()
        self.proposer.close()
        self.alarms.stop()
        self._hand_over_leadership(HANDOVER_TIMEOUT)
        self.adapter.stop()
        self.adapter.wait_dump_written(10)
        self.store.close()
        if self.audit is not None:
            self.audit.close()
        self._data_dir_lock.release()

    def _hand_over_leadership(self, timeout: float) -> None:
        """A leader that stops hands leadership to its most caught-up voter first (etcd's
        leader does the same on a graceful stop), so the others need not wait an election
        timeout to notice it is gone: a rolling restart then costs one quick, orderly leader
        change instead of an election. Called by `stop` after gRPC stopped (no new local
        proposals); best effort within `timeout`: on failure the others elect as after a
        crash."""
        adapter = self.adapter
        if adapter.halted or not adapter.is_leader or not adapter.partners:
            return
        deadline = time.monotonic() + timeout
        while True:
            applied = adapter.raft_state()["applied_index"]
            try:
                self.membership.transfer_leadership("", max(0.1, deadline - time.monotonic()))
                log.info("handed the leadership over before stopping")
                return
            except errors.FailedPrecondition:
                if len(adapter.raft_state()["connected"]) < 2:
                    log.info("no other voter is connected: stopping without a hand-over")
                    return
                # no connected voter is caught up yet: try again once the log moved
            except errors.SealkvError as exc:
                log.warning("could not hand the leadership over before stopping (%s); the "
                            "others elect a leader after their election timeout", exc)
                return
            if not adapter.is_leader:
                return
            if time.monotonic() >= deadline:
                log.warning("no voter caught up within %.1fs to hand the leadership over; "
                            "the others elect a leader after their election timeout", timeout)
                return
            adapter.wait_until(lambda: adapter.raft_state()["applied_index"] != applied
                               or not adapter.is_leader,
                               min(HANDOVER_RETRY, deadline - time.monotonic()))

    def _open_database(self) -> None:
        try:
            self.store.open()
        except OSError as exc:
            raise StartupError(f"cannot open the database in {self.config.db_dir}: "
                               f"{exc.strerror or exc}") from exc
        except Exception as exc:
            raise StartupError(f"cannot open the database in {self.config.db_dir}: "
                               f"{type(exc).__name__}: {exc}; restore the data directory "
                               "from a backup or remove it and rejoin the cluster") from exc
        try:
            self.db_index_at_start = self.state_machine.load()
        except errors.ApplyHalt as exc:  # a stored plugin state cannot be restored or persisted
            raise StartupError(f"cannot load the database in {self.config.db_dir}: {exc}") \
                from exc
        log.info("database %s opened at applied index %d", self.config.db_dir,
                 self.db_index_at_start)

    # -- requests ---------------------------------------------------------------------

    def leader_grpc_address(self) -> Optional[str]:
        return self.membership.leader_grpc_address()

    def require_leader(self) -> None:
        self.membership.require_leader()

    def admit_write(self, timeout: float, *, delete: bool = False) -> None:
        """Refuses a write while a NOSPACE alarm is (or would be) on, then runs every storage
        layer's write admission (a gRPC thread, before proposing). A delete frees space: the
        alarm never refuses it (as in etcd)."""
        if not delete:
            self.alarms.check_space(max_age=WRITE_DISK_READING_AGE)
            refusal = self.alarms.write_refusal()
            if refusal is not None:
                raise errors.ResourceExhausted(refusal)
        for plugin in self.storage_plugins:
            plugin.admit_write(timeout)

    def status(self) -> dict:
        """Returns this node's view of the cluster (see Cluster.Status)."""
        counters = self.kv_service.batches.counters
        return {**self.status_view.status(), "kv_counters": {
            "batch_messages": counters.messages, "batch_requests": counters.requests,
            "entries": self.proposer.entries, "entry_commands": self.proposer.commands,
            "read_index_reads": self.adapter.stats.read_index_reads,
            "read_index_fallbacks": self.adapter.stats.read_index_fallbacks,
            "read_index_rounds": self.adapter.read_index_rounds},
            "alarms": self.alarms.alarms(), "db_size_in_use": self.store.data_bytes(),
            "quota_backend_bytes": self.config.quota_backend_bytes,
            "db_applied_index_at_start": self.db_index_at_start,
            "replayed_at_start": self.replayed_at_start}

    def _disk_facts(self) -> dict:
        """What the metrics show of the disk (metrics thread)."""
        return {"alarms": sorted({a.kind for a in self.alarms.alarms()}),
                "db_size_bytes": self.store.file_bytes(), "db_size_in_use_bytes": self.store.data_bytes(),
                "quota_bytes": self.config.quota_backend_bytes}

    def _healthy(self) -> tuple[bool, str]:
        """Whether this node serves with a known leader, for the metrics listener's /health."""
        if self._stopped.is_set():
            return False, "stopping"
        if not self.status().get("leader"):
            return False, "no leader"
        return True, ""

    def plugin_names(self) -> list[str]:
        return [f"storage:{p.name}" for p in self.storage_plugins] \
            + [f"admin:{p.name}" for p in self.admin_plugins]


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
    stop.wait()  # a signal interrupts the wait, and its handler sets the event
    log.info("node %s stopping", config.name)
    node.stop()
    return 0
