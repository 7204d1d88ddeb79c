"""`sealkv bench compare`: the raw engine, gRPC cleartext and gRPC through the storage envelope,
measured in one invocation on fresh local clusters, each as a ratio to the raw engine.

The raw engine runs first on a Raft-only cluster (`raft_engine`); then one fresh 3-node sealkv
cluster with the encryption plugin enabled (envelope inactive) serves the cleartext rows; the
same cluster is then bootstrapped and switched to the storage envelope for the envelope rows.
Every node runs with `--fsync always` (the default) except a last fresh cluster, configured like
the cleartext one but with `--fsync never`, whose put rows name the cost of durability.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

from sealkv.node.bench import grpc_load
from sealkv.node.bench.raft_engine import RaftEngineCluster
from sealkv.node.bench.workload import Result, Workload

ENVELOPE_UNAVAILABLE = ("the envelope rows need the encryption admin service "
                        "(sealkv.v1.encryption_admin_pb2_grpc, RPCs BootstrapEncryption and "
                        "EnableStorageEnvelope) and the `encryption` plugin: {}")


class LocalNodeCluster:
    """A fresh local sealkv cluster in a temporary directory (stopped and removed on exit)."""

    def __init__(self, nodes: int = 3, encryption: bool = True, keep: bool = False,
                 fsync: str = "always"):
        from sealkv.node.cli import local

        self.local = local
        self.keep = keep
        base = tempfile.mkdtemp(prefix="sealkv-bench-")
        secret = os.path.join(base, "secret")
        local.write_secret(secret)
        kek = None
        if encryption:
            kek = os.path.join(base, "kek")
            fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        self.record = local.LocalCluster(base, secret, kek_file=kek,
                                         plugins=["encryption"] if encryption else [],
                                         fsync=fsync)
        for i in range(1, nodes + 1):
            self.record.nodes.append(local.LocalNode(
                f"n{i}", f"127.0.0.1:{local.free_port()}", f"127.0.0.1:{local.free_port()}",
                os.path.join(base, f"n{i}"), os.path.join(base, f"n{i}.log")))

    def __enter__(self) -> "LocalNodeCluster":
        from sealkv.node.cli.cluster_cmd import _node_args, _wait_ready

        try:
            for n in self.record.nodes:
                n.pid = self.local.spawn(n, _node_args(self.record, n))
            self.record.save()
            _wait_ready(self.record, 60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for n in self.record.nodes:
            self.local.stop_process(n)
        if not self.keep:
            shutil.rmtree(self.record.data_dir, ignore_errors=True)

    def leader_endpoint(self) -> str:
        return leader_endpoint(self.record.endpoints)


def leader_endpoint(endpoints: list[str], timeout: float = 10.0) -> str:
    """Returns the gRPC address of the current leader, as the endpoints report it."""
    from sealkv.node import errors
    from sealkv.node.client import Client

    deadline = time.monotonic() + timeout
    last = "no endpoint answered"
    with Client(endpoints, timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                s = client.status()
                if s.leader_grpc_address:
                    return s.leader_grpc_address
                last = "no leader is known"
            except errors.SealkvError as exc:
                last = exc.message
            time.sleep(0.1)
    raise RuntimeError(f"cannot find the leader: {last}")


def enable_storage_envelope(endpoint: str, timeout: float = 30.0) -> None:
    """Bootstraps encryption and activates the storage envelope through the admin RPCs."""
    import grpc

    try:
        from sealkv.v1 import encryption_admin_pb2 as pb
        from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc
    except ImportError as exc:
        raise RuntimeError(ENVELOPE_UNAVAILABLE.format(exc)) from None
    with grpc.insecure_channel(endpoint) as ch:
        stub = pb_grpc.EncryptionAdminStub(ch)
        try:
            stub.BootstrapEncryption(pb.BootstrapEncryptionRequest(), timeout=timeout)
            stub.EnableStorageEnvelope(pb.EnableStorageEnvelopeRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise RuntimeError(ENVELOPE_UNAVAILABLE.format(
                f"{exc.code().name}: {exc.details()}")) from None


def run(base: Workload, *, processes: int = 0,
        progress: Callable[[str], Optional[Callable]] = lambda label: None,
        log: Callable[[str], None] = lambda msg: None) -> dict:
    """Runs every row; returns {"rows": [...summaries...], "checks": [...], "notes": [...]}."""
    C = base.clients
    put = dataclasses.replace(base, op="put")
    rows: list[dict] = []
    notes: list[str] = []

    def add(result: Result, kind: str) -> dict:
        s = result.summary()
        s["kind"] = kind
        rows.append(s)
        return s

    log("raw engine: starting a 3-member raft-only cluster")
    with RaftEngineCluster() as raft:
        add(raft.run(dataclasses.replace(put, clients=1), "closed", "raft put c=1"), "raft")
        raw = add(raft.run(put, "pipelined", f"raft put pipelined w={C}"), "raft")
    log("gRPC: starting a fresh 3-node cluster with the encryption plugin")
    envelope_error = None
    with LocalNodeCluster(encryption=True) as cluster:
        leader = [cluster.leader_endpoint()]

        def grpc_row(w: Workload, name: str, kind: str) -> dict:
            return add(grpc_load.run(w, leader, name=name, processes=processes,
                                     progress=progress(name)), kind)

        clear1 = grpc_row(dataclasses.replace(put, clients=1), "grpc put c=1", "cleartext")
        clear = grpc_row(put, f"grpc put c={C}", "cleartext")
        ser = grpc_row(dataclasses.replace(base, op="get", consistency="serializable"),
                       f"grpc get serializable c={C}", "cleartext")
        lin = grpc_row(dataclasses.replace(base, op="get", consistency="linearizable"),
                       f"grpc get linearizable c={C}", "cleartext")
        try:
            enable_storage_envelope(cluster.leader_endpoint())
            leader = [cluster.leader_endpoint()]
        except RuntimeError as exc:
            envelope_error = str(exc)
            notes.append(f"envelope rows skipped: {exc}")
        if envelope_error is None:
            env1 = grpc_row(dataclasses.replace(put, clients=1), "envelope put c=1", "envelope")
            env = grpc_row(put, f"envelope put c={C}", "envelope")
    log("gRPC: starting a fresh 3-node cluster like the cleartext one, with --fsync never")
    with LocalNodeCluster(encryption=True, fsync="never") as cluster:
        leader = [cluster.leader_endpoint()]
        never1 = grpc_row(dataclasses.replace(put, clients=1), "grpc put c=1 fsync=never",
                          "fsync-never")
        never = grpc_row(put, f"grpc put c={C} fsync=never", "fsync-never")
    notes.append(_durability_cost(clear1, never1, clear, never, C))
    for s in rows:
        s["vs_raw"] = round(s["ops_per_sec"] / raw["ops_per_sec"], 3) if raw["ops_per_sec"] else None

    def check(what: str, value, bar: str, holds: bool) -> dict:
        return {"check": what, "value": value, "bar": bar, "holds": holds}

    checks = [check("grpc put c=1 p50 ms (cleartext)", clear1["p50_ms"], "<= 2",
                    clear1["p50_ms"] is not None and clear1["p50_ms"] <= 2)]
    ratio = _ratio(lin, ser)
    if envelope_error is None:
        checks.append(check("envelope put c=1 p50 ms", env1["p50_ms"], "<= 2",
                            env1["p50_ms"] is not None and env1["p50_ms"] <= 2))
        r = _ratio(env, raw)
        checks.append(check(f"envelope put c={C} / raft pipelined", r, ">= 0.5", r >= 0.5))
        r = _ratio(env, clear)
        checks.append(check(f"envelope / cleartext put c={C}", r, ">= 0.9", r >= 0.9))
    else:
        r = _ratio(clear, raw)
        checks.append(check(f"cleartext put c={C} / raft pipelined", r, ">= 0.5", r >= 0.5))
    checks.append(check(f"linearizable / serializable get c={C}", ratio, ">= 0.5", ratio >= 0.5))
    return {"workload": dataclasses.asdict(base), "rows": rows, "checks": checks,
            "notes": notes}


def _durability_cost(always1: dict, never1: dict, always: dict, never: dict, c: int) -> str:
    """One line naming what `--fsync always` costs against `never` on the same workload."""
    def ms(row: dict) -> str:
        return "n/a" if row["p50_ms"] is None else f"{row['p50_ms']:.2f} ms"

    return (f"cost of durability (--fsync always vs never): put c=1 p50 {ms(always1)} vs "
            f"{ms(never1)}; put c={c} {always['ops_per_sec']:.0f} vs "
            f"{never['ops_per_sec']:.0f} ops/s (ratio {_ratio(always, never)})")


def _ratio(a: dict, b: dict) -> float:
    return round(a["ops_per_sec"] / b["ops_per_sec"], 3) if b["ops_per_sec"] else 0.0
