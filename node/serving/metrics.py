"""Prometheus metrics of one node, on their own HTTP listener (`--listen-metrics HOST:PORT`).

Names follow etcd's vocabulary where it has one (`sealkv_server_has_leader`, ...,
`sealkv_disk_wal_fsync_duration_seconds`), gRPC's go-grpc-prometheus names for calls
(`grpc_server_handled_total`, `grpc_server_handling_seconds`). One registry per node. Most
values are read at scrape time from what the node already knows (status, the replication
adapter's `stats`, the storage alarm, plugins that `ProvidesMetrics`); histograms are fed by
the adapter's hooks, the journal's fsync hook and the gRPC interceptor. No label ever carries a
key, a value or key material: labels are method names, codes, purposes, key ids and reasons.

The same listener answers `/health`: 200 `{"health": "true"}` when this node serves and knows
a leader, 503 with the reason otherwise.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sealkv.node import durable
from sealkv.node.serving.rpc import WrappedHandlers, rewrap_handler
from sealkv.plugins.api import ProvidesMetrics

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DISK_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                0.512, 1.024, 2.048, 4.096)


class NodeMetrics:
    """The registry of one node and the hooks that feed it.

    `status` returns the node's status dict (see `NodeStatus.status`), `stats` is the
    replication adapter's `ReplicationStats`, `plugins` lists the node's plugins (those that
    `ProvidesMetrics` add theirs), `disk` returns `{"db_size_bytes": n,
    "db_size_in_use_bytes": n, "quota_bytes": n, "alarms": [kinds]}`.
    """

    def __init__(self, status: Callable[[], dict], stats, plugins: Callable[[], Iterable],
                 disk: Callable[[], dict], data_dir: str):
        self.registry = CollectorRegistry()
        self._status, self._stats, self._plugins, self._disk = status, stats, plugins, disk
        self._data_dir = data_dir
        self.apply_seconds = Histogram(
            "sealkv_server_apply_duration_seconds", "Time to apply one committed entry.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.snapshot_seconds = Histogram(
            "sealkv_server_snapshot_duration_seconds", "Time to write one snapshot (dump).",
            buckets=DISK_BUCKETS, registry=self.registry)
        self.fsync_seconds = Histogram(
            "sealkv_disk_wal_fsync_duration_seconds", "Time of one fdatasync of the Raft log.",
            buckets=DISK_BUCKETS, registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by service, method and code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, by service and method.",
            ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        stats.observe_apply = self.apply_seconds.observe
        stats.observe_snapshot = self.snapshot_seconds.observe
        durable.observe_fsync = self.fsync_seconds.observe
        self.registry.register(_ScrapeTimeCollector(self))

    def interceptor(self) -> grpc.ServerInterceptor:
        """The gRPC server interceptor that counts and times every call."""
        return _MetricsInterceptor(self)


class _ScrapeTimeCollector:
    """Reads the node's current state on every scrape (prometheus_client custom collector)."""

    def __init__(self, metrics: NodeMetrics):
        self.m = metrics

    def collect(self):
        m = self.m
        status = m._status()
        known_leader = bool(status.get("leader"))
        yield _gauge("sealkv_server_has_leader", "Whether a leader exists (1) or not (0).",
                     int(known_leader))
        yield _gauge("sealkv_server_is_leader", "Whether this member is the leader.",
                     int(bool(status.get("is_leader"))))
        yield _gauge("sealkv_server_term", "The current Raft term.", status.get("term", 0))
        changes = CounterMetricFamily("sealkv_server_leader_changes_seen",
                                      "Leader changes this member has seen.")
        changes.add_metric([], m._stats.leader_changes)
        yield changes
        committed = status.get("commit_index", 0)
        applied = status.get("applied_index", 0)
        yield _gauge("sealkv_server_proposals_committed_total",
                     "The index of the last committed entry (etcd: proposals committed).",
                     committed)
        yield _gauge("sealkv_server_proposals_applied_total",
                     "The index of the last applied entry.", applied)
        yield _gauge("sealkv_server_proposals_pending",
                     "Committed entries not yet applied on this member.",
                     max(0, committed - applied))
        failed = CounterMetricFamily("sealkv_server_proposals_failed",
                                     "Proposals that failed or whose outcome is unknown.")
        failed.add_metric([], m._stats.proposals_failed)
        yield failed
        yield _gauge("sealkv_server_log_entries", "Entries in the Raft log on this member.",
                     status.get("log_size", 0))
        disk = m._disk()
        yield _gauge("sealkv_mvcc_db_total_size_in_bytes", "Size of the database files.",
                     disk.get("db_size_bytes", _dir_size(os.path.join(m._data_dir, "db"))))
        yield _gauge("sealkv_mvcc_db_total_size_in_use_in_bytes",
                     "Bytes of keys and values the database holds.",
                     disk.get("db_size_in_use_bytes", 0))
        yield _gauge("sealkv_server_quota_backend_bytes", "The database size quota (0: none).",
                     disk.get("quota_bytes", 0))
        alarms = GaugeMetricFamily("sealkv_server_alarm", "Active alarms (1) by type.",
                                   labels=["alarm"])
        for name in ("NOSPACE",):
            alarms.add_metric([name], int(name in disk.get("alarms", ())))
        yield alarms
        for plugin in m._plugins():
            if not isinstance(plugin, ProvidesMetrics):
                continue
            try:
                families = plugin.metrics()
            except Exception as exc:  # a plugin bug must not break the scrape
                log.warning("plugin %s metrics failed: %s", getattr(plugin, "name", "?"),
                            type(exc).__name__)
                continue
            for name, kind, text, samples in families:
                labels = sorted({k for labels, _ in samples for k in labels})
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    name, text, labels=labels)
                for sample_labels, value in samples:
                    family.add_metric([str(sample_labels.get(k, "")) for k in labels], value)
                yield family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts (by code) and times every unary and streaming call."""

    def __init__(self, metrics: NodeMetrics):
        self.m = metrics
        self._wrapped = WrappedHandlers(self._counted)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler)

    def _counted(self, full_method: str, handler):
        _, service, method = full_method.split("/", 2) \
            if full_method.count("/") == 2 else ("", "?", "?")
        handled = self.m.handled
        seconds = self.m.handling_seconds.labels(service, method)
        # This method's counter child per status code: `labels()` validates and looks up the
        # child under a lock each time (~2 µs a call); a racing first use stores the same one.
        counted: dict[grpc.StatusCode, Counter] = {}

        def done(context, started, failed: bool):
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            child = counted.get(code)
            if child is None:
                child = counted[code] = handled.labels(service, method, code.name)
            child.inc()
            seconds.observe(time.perf_counter() - started)

        def wrap(kind, streams_out, behavior):
            if kind == "unary_unary":
                def unary(request, context):
                    started, failed = time.perf_counter(), True
                    try:
                        response = behavior(request, context)
                        failed = False
                        return response
                    finally:
                        done(context, started, failed)

                return unary
            if not streams_out:
                return None  # client streaming (no sealkv service has one): not counted

            def streaming(request, context):
                started, failed = time.perf_counter(), True
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    done(context, started, failed)

            return streaming

        return rewrap_handler(handler, wrap)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


class MetricsListener:
    """The HTTP listener of `/metrics` and `/health`, on its own thread."""

    def __init__(self, metrics: NodeMetrics, address: str,
                 healthy: Callable[[], tuple[bool, str]]):
        host, _, port = address.rpartition(":")
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/health":
                ok, reason = healthy()
                body = json.dumps({"health": "true" if ok else "false", "reason": reason})
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "application/json")])
                return [body.encode()]
            if environ.get("PATH_INFO") in ("/metrics", "/"):
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics or /health\n"]

        self.server = make_server(host.strip("[]") or "127.0.0.1", int(port), app,
                                  server_class=_Server, handler_class=_QuietHandler)
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
