"""`sealkv bench cutover`: Put latency before, during and after the storage envelope cutover.

For each cluster size N: a fresh local N-node cluster with the encryption plugin (the
`cluster up --encryption` code: real node processes, in a temporary directory, stopped by PID
at the end whatever happens), `BootstrapEncryption` on the leader, then a closed-loop Put load
of C client threads on the leader (the shape of `grpc_load` for C <= 16: one process, one
channel, one request in flight per client; our own loop because each Put's start time is
needed to place it in a window). In the same run:

- `before`: Puts that started after the warm-up and finished before the cutover call began;
- the `EnableStorageEnvelope` call, timed by the client (the server does not report its
  capability fan-out's duration separately: the RPC time covers leadership confirmation, the
  fan-out to every member, the proposal and its apply on the leader);
- `during`: Puts that started while the call was in flight;
- `overlap`: Puts whose [start, end] overlaps the call at all (includes the ones that started
  just before it and waited behind it);
- `after`: Puts that started after the call returned, for --duration-after seconds.
"""
from __future__ import annotations

import array
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from sealkv.node.bench.workload import KeyPicker, Result, Workload

WINDOWS = ("before", "during", "overlap", "after")


@dataclass
class CutoverSettings:
    clients: int = 8
    duration_before: float = 5.0
    duration_after: float = 5.0
    warmup: float = 1.0
    value_size: int = 256
    key_size: int = 16
    keyspace: int = 1000
    timeout: float = 5.0
    admin_timeout: float = 30.0


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turns SIGTERM into SystemExit while benchmarking, so `with` blocks stop the nodes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Load:
    """C closed-loop Put clients on one endpoint; records (start, end, status) per Put."""

    def __init__(self, endpoint: str, s: CutoverSettings, files=None):
        import grpc

        from sealkv.node.client import _OPTIONS
        from sealkv.node.security import tls
        from sealkv.v1 import kv_pb2, kv_pb2_grpc

        self.grpc, self.kv_pb2 = grpc, kv_pb2
        self.channel = tls.channel(endpoint, files, _OPTIONS)
        self.stub = kv_pb2_grpc.KVStub(self.channel)
        self.s = s
        self.stop = threading.Event()
        self.records: list[tuple[array.array, array.array, list]] = []
        self.threads = [threading.Thread(target=self._client, args=(cid,), daemon=True,
                                         name=f"cutover-client-{cid}")
                        for cid in range(s.clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.ident is not None:  # started
                t.join(timeout=self.s.timeout + 5)
        self.channel.close()

    def _client(self, cid: int) -> None:
        w = Workload(op="put", key_size=self.s.key_size, keyspace=self.s.keyspace)
        picker = KeyPicker(w, seed=cid * 7919 + os.getpid())
        value = os.urandom(self.s.value_size)
        starts, ends, statuses = array.array("d"), array.array("d"), []
        self.records.append((starts, ends, statuses))  # list.append is atomic
        put, req, rpc_error = self.stub.Put, self.kv_pb2.PutRequest, self.grpc.RpcError
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                put(req(key=picker.key(), value=value), timeout=self.s.timeout)
                status = None
            except rpc_error as exc:
                status = exc.code().name
            starts.append(began)
            ends.append(time.monotonic())
            statuses.append(status)

    def window(self, name: str, lo: float, hi: float, *, by: str) -> dict:
        """Summarizes the Puts in [lo, hi): by "start", "inside" or "overlap"."""
        r = Result(name, clients=self.s.clients, seconds=max(0.0, hi - lo))
        for starts, ends, statuses in self.records:
            for b, e, st in zip(starts, ends, statuses):
                if by == "start":
                    hit = lo <= b < hi
                elif by == "inside":
                    hit = lo <= b and e < hi
                else:
                    hit = b < hi and e >= lo
                if hit:
                    r.count(b, e, st)
        s = r.summary()
        s["window"] = name
        return s


def _admin(endpoint: str, files=None):
    from sealkv.node.security import tls
    from sealkv.v1 import encryption_admin_pb2 as pb
    from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

    channel = tls.channel(endpoint, files)
    return channel, pb_grpc.EncryptionAdminStub(channel), pb


def run_one(nodes: int, s: CutoverSettings, log: Callable[[str], None] = lambda m: None,
            cluster_factory=None) -> dict:
    """One cluster size: fresh cluster, bootstrap, load, cutover, summaries."""
    from sealkv.node.bench.compare import LocalNodeCluster

    factory = cluster_factory or (lambda n: LocalNodeCluster(nodes=n, encryption=True))
    log(f"cutover N={nodes}: starting a fresh {nodes}-node cluster with --encryption")
    with factory(nodes) as cluster:
        pids = [n.pid for n in cluster.record.nodes]
        leader = cluster.leader_endpoint()
        files = getattr(cluster, "files", None)
        channel, admin, pb = _admin(leader, files)
        load: Optional[_Load] = None
        try:
            t = time.monotonic()
            boot = admin.BootstrapEncryption(pb.BootstrapEncryptionRequest(),
                                             timeout=s.admin_timeout)
            bootstrap_ms = (time.monotonic() - t) * 1000.0
            log(f"cutover N={nodes}: bootstrapped in {bootstrap_ms:.0f} ms; Put load with "
                f"{s.clients} clients on the leader {leader}")
            load = _Load(leader, s, files)
            t0 = time.monotonic()
            load.start()
            time.sleep(s.warmup + s.duration_before)
            call_start = time.monotonic()
            response = admin.EnableStorageEnvelope(pb.EnableStorageEnvelopeRequest(),
                                                   timeout=s.admin_timeout)
            call_end = time.monotonic()
            time.sleep(s.duration_after)
            stop_at = time.monotonic()
            load.finish()
            sidecar = admin.GetSidecarState(pb.GetSidecarStateRequest(), timeout=s.timeout)
        finally:
            if load is not None and not load.stop.is_set():
                load.finish()
            channel.close()
        windows = [
            load.window("before", t0 + s.warmup, call_start, by="inside"),
            load.window("during", call_start, call_end, by="start"),
            load.window("overlap", call_start, call_end, by="overlap"),
            load.window("after", call_end, stop_at, by="start"),
        ]
    rpc_ms = (call_end - call_start) * 1000.0
    before, during, after = windows[0], windows[1], windows[3]

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None

    return {
        "nodes": nodes, "leader": leader, "pids": pids,
        "bootstrap_rpc_ms": round(bootstrap_ms, 3),
        "bootstrap_index": boot.index,
        "enable_rpc_ms": round(rpc_ms, 3),
        "fan_out_ms": None,
        "fan_out_note": "not reported by the server; enable_rpc_ms is the client-measured "
                        "EnableStorageEnvelope duration (leadership check + capability fan-out "
                        "+ propose + apply)",
        "cutover_index": response.cutover_index,
        "was_already_active": response.was_already_active,
        "capability_rows": [{"member": r.member, "ok": r.ok, "reason": r.reason}
                            for r in response.capability_summary],
        "storage_envelope_active": sidecar.storage_envelope_active,
        "windows": windows,
        "ratios": {"during_p50_vs_before": ratio(during["p50_ms"], before["p50_ms"]),
                   "during_p99_vs_before": ratio(during["p99_ms"], before["p99_ms"]),
                   "after_p50_vs_before": ratio(after["p50_ms"], before["p50_ms"]),
                   "after_p99_vs_before": ratio(after["p99_ms"], before["p99_ms"]),
                   "enable_rpc_vs_before_p50": ratio(round(rpc_ms, 3), before["p50_ms"])},
    }


def run(node_counts: Sequence[int], s: CutoverSettings,
        log: Callable[[str], None] = lambda m: None) -> dict:
    """Every cluster size, one after the other; each cluster is stopped before the next."""
    with _sigterm_as_exit():
        runs = [run_one(n, s, log) for n in node_counts]
    return {"settings": s.__dict__, "runs": runs}


HEADERS = ["window", "puts", "ops/s", "p50 ms", "p99 ms", "max ms", "errors", "p50/before",
           "p99/before"]


def table_rows(r: dict) -> list[list]:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    before = r["windows"][0]
    rows = []
    for w in r["windows"]:
        errs = ",".join(f"{k}:{v}" for k, v in w["errors"].items()) or "0"
        p50r = (f"{w['p50_ms'] / before['p50_ms']:.2f}"
                if w["p50_ms"] is not None and before["p50_ms"] else "-")
        p99r = (f"{w['p99_ms'] / before['p99_ms']:.2f}"
                if w["p99_ms"] is not None and before["p99_ms"] else "-")
        rows.append([w["window"], w["ops"], f"{w['ops_per_sec']:.0f}", ms(w["p50_ms"]),
                     ms(w["p99_ms"]), ms(w["max_ms"]), errs, p50r, p99r])
    return rows
