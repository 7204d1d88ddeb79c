"""`sealkv bench compare`: sealkv batched and unary, the storage envelope, and optionally etcd,
measured in one invocation on fresh local clusters with the same asyncio load generator.

A fresh 3-node sealkv cluster with the encryption plugin (envelope inactive, every other
setting at its default: TLS and fsync as a user gets them) serves the batched and the unary
rows; a fresh `--insecure` cluster runs the batched Put row in plaintext, the reference of the
TLS target; three fresh clusters like the first, one with no envelope, one with the storage
envelope and one with both envelopes (set before any key is written), then run the envelope
rows side by side in interleaved short runs (`side_by_side`: the median of each, ratios of
medians); a last fresh cluster like the first but with `--fsync never` runs the Put rows
again, to name the cost of durability. With
`--etcd`, a fresh 3-member etcd cluster (default flags) runs the same loads first, and the
target table gives every sealkv figure as a ratio to etcd's from the same run. `--raw` adds
the raw Raft engine rows (`raft_engine`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

from sealkv.node.bench import async_load, side_by_side
from sealkv.node.bench.raft_engine import RaftEngineCluster
from sealkv.node.bench.workload import Result, Workload

ENVELOPE_UNAVAILABLE = ("the envelope rows need the encryption admin service "
                        "(sealkv.v1.encryption_admin_pb2_grpc, RPCs BootstrapEncryption and "
                        "EnableStorageEnvelope) and the `encryption` plugin: {}")


class LocalNodeCluster:
    """A fresh local sealkv cluster in a temporary directory (stopped and removed on exit)."""

    def __init__(self, nodes: int = 3, encryption: bool = True, keep: bool = False,
                 fsync: str = "always", insecure: bool = False):
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
                                         fsync=fsync, insecure=insecure,
                                         certs_dir=None if insecure else os.path.join(base, "pki"))
        for i in range(1, nodes + 1):
            self.record.nodes.append(local.LocalNode(
                f"n{i}", f"127.0.0.1:{local.free_port()}", f"127.0.0.1:{local.free_port()}",
                os.path.join(base, f"n{i}"), os.path.join(base, f"n{i}.log")))
        if self.record.certs_dir:
            local.make_pki(self.record.certs_dir, [(n.name, "127.0.0.1")
                                                   for n in self.record.nodes])
        self.files = self.record.client_files()

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

    @property
    def client_kwargs(self) -> dict:
        """cacert=, cert=, key= of the cluster's `root` client (none when --insecure)."""
        from sealkv.node.security.tls import client_kwargs

        return client_kwargs(self.files)

    def leader_endpoint(self) -> str:
        return leader_endpoint(self.record.endpoints, files=self.files)


def leader_endpoint(endpoints: list[str], timeout: float = 10.0, files=None) -> str:
    """Returns the gRPC address of the current leader, as the endpoints report it."""
    from sealkv.node import errors
    from sealkv.node.client import Client
    from sealkv.node.security.tls import client_kwargs

    deadline = time.monotonic() + timeout
    last = "no endpoint answered"
    with Client(endpoints, timeout=2.0, **client_kwargs(files)) as client:
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


def enable_storage_envelope(endpoint: str, timeout: float = 30.0, files=None) -> None:
    """Bootstraps encryption and activates the storage envelope through the admin RPCs."""
    import grpc

    from sealkv.node.security import tls

    try:
        from sealkv.v1 import encryption_admin_pb2 as pb
        from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc
    except ImportError as exc:
        raise RuntimeError(ENVELOPE_UNAVAILABLE.format(exc)) from None
    with tls.channel(endpoint, files) as ch:
        stub = pb_grpc.EncryptionAdminStub(ch)
        try:
            stub.BootstrapEncryption(pb.BootstrapEncryptionRequest(), timeout=timeout)
            stub.EnableStorageEnvelope(pb.EnableStorageEnvelopeRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise RuntimeError(ENVELOPE_UNAVAILABLE.format(
                f"{exc.code().name}: {exc.details()}")) from None


def enable_raft_envelope(endpoint: str, timeout: float = 30.0, files=None) -> None:
    """Activates the raft-log envelope (after `enable_storage_envelope`)."""
    import grpc

    from sealkv.node.security import tls
    from sealkv.v1 import encryption_admin_pb2 as pb
    from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

    with tls.channel(endpoint, files) as ch:
        try:
            pb_grpc.EncryptionAdminStub(ch).EnableRaftEnvelope(pb.EnableRaftEnvelopeRequest(),
                                                               timeout=timeout)
        except grpc.RpcError as exc:
            raise RuntimeError(f"EnableRaftEnvelope failed: {exc.code().name}: "
                               f"{exc.details()}") from None


def run(base: Workload, *, processes: int = 0, etcd: bool = False, raw: bool = False,
        repeats: int = side_by_side.DEFAULT_REPEATS,
        ab_seconds: float = side_by_side.DEFAULT_SECONDS, envelope_only: bool = False,
        envelope_together: bool = False,
        progress: Callable[[str], Optional[Callable]] = lambda label: None,
        log: Callable[[str], None] = lambda msg: None) -> dict:
    """Runs every row; returns {"rows": [...], "targets": [...], "notes": [...], ...}.

    sealkv rows, batched and unary: Put with 1 and with C clients on the leader, linearizable
    and serializable Gets with C clients over every member; then the envelope rows
    (`side_by_side`): three fresh identical clusters, envelopes off, storage envelope, both
    envelopes, set before any key is written, each measured `repeats` times at C clients in
    short (`ab_seconds`) runs interleaved round by round; each row is the median of its
    runs, and the envelope ratios compare medians; then one Put c=1 run per envelope
    state. With `etcd`, the same four loads run
    against a fresh 3-member etcd cluster (skipped with a note when etcd is not installed);
    with `raw`, the raw Raft engine rows run first. `envelope_only` runs the envelope rows
    alone; `envelope_together` loads their clusters at once in each round.
    """
    C = base.clients
    put = dataclasses.replace(base, op="put")
    one = dataclasses.replace(put, clients=1)
    lin = dataclasses.replace(base, op="get", consistency="linearizable")
    ser = dataclasses.replace(base, op="get", consistency="serializable")
    rows: dict[str, dict] = {}
    notes: list[str] = []

    def add(result: Result, kind: str) -> dict:
        s = result.summary()
        s["kind"] = kind
        rows[s["name"]] = s
        if result.note:
            notes.append(f"{s['name']}: {result.note}")
        return s

    def load(w: Workload, name: str, kind: str, endpoints: list[str], mode: str,
             pids: list[int], **kw) -> dict:
        return add(async_load.run(w, endpoints, name=name, mode=mode, processes=processes,
                                  server_pids=pids, progress=progress(name), **kw), kind)

    def four(prefix: str, kind: str, leader: list[str], every: list[str], mode: str,
             pids: list[int], **kw) -> None:
        load(one, f"{prefix} put c=1", kind, leader, mode, pids, **kw)
        load(put, f"{prefix} put c={C}", kind, leader, mode, pids, **kw)
        load(lin, f"{prefix} get linearizable c={C}", kind, every, mode, pids, **kw)
        load(ser, f"{prefix} get serializable c={C}", kind, every, mode, pids, **kw)

    if envelope_only:
        _envelope_rows(base, rows, notes, repeats, ab_seconds, processes, progress, log,
                       envelope_together)
        return {"workload": dataclasses.asdict(base), "rows": list(rows.values()),
                "targets": [t for t in targets(rows, C, repeats) if t["ratio"] is not None],
                "notes": notes}
    if raw:
        log("raw engine: starting a 3-member raft-only cluster")
        with RaftEngineCluster() as engine:
            add(engine.run(one, "closed", "raft put c=1"), "raft")
            add(engine.run(put, "pipelined", f"raft put pipelined w={C}"), "raft")
    if etcd:
        try:
            from sealkv.node.bench.etcd import EtcdCluster

            with EtcdCluster() as cluster:
                log(f"etcd: a fresh 3-member cluster ({etcd_version()}, default flags: "
                    "WAL fsync on, plaintext)")
                four("etcd", "etcd", [cluster.leader_endpoint()], cluster.endpoints, "etcd",
                     cluster.pids)
        except RuntimeError as exc:
            notes.append(f"etcd rows skipped: {exc}")
    log("sealkv: starting a fresh 3-node cluster with the encryption plugin (defaults)")
    with LocalNodeCluster(encryption=True) as cluster:
        every = list(cluster.record.endpoints)
        pids = [n.pid for n in cluster.record.nodes]
        kw = cluster_client_kwargs(cluster)
        for mode in ("batched", "unary"):
            four(f"sealkv {mode}", mode, [cluster.leader_endpoint()], every, mode, pids, **kw)
        log("sealkv: the TLS reference, a fresh 3-node --insecure cluster (plaintext gRPC)")
        with LocalNodeCluster(encryption=True, insecure=True) as plain:
            load(put, f"sealkv batched put c={C} --insecure", "insecure",
                 [plain.leader_endpoint()], "batched", [n.pid for n in plain.record.nodes])
    _envelope_rows(base, rows, notes, repeats, ab_seconds, processes, progress, log,
                   envelope_together)
    log("sealkv: a fresh 3-node cluster like the first, with --fsync never")
    with LocalNodeCluster(encryption=True, fsync="never") as cluster:
        leader = [cluster.leader_endpoint()]
        pids = [n.pid for n in cluster.record.nodes]
        kw = cluster_client_kwargs(cluster)
        never1 = load(one, "sealkv batched put c=1 fsync=never", "fsync-never", leader,
                      "batched", pids, **kw)
        never = load(put, f"sealkv batched put c={C} fsync=never", "fsync-never", leader,
                     "batched", pids, **kw)
    notes.append(_durability_cost(rows["sealkv batched put c=1"], never1,
                                  rows[f"sealkv batched put c={C}"], never, C))
    return {"workload": dataclasses.asdict(base), "rows": list(rows.values()),
            "targets": targets(rows, C, repeats), "notes": notes}


def _envelope_rows(base: Workload, rows: dict, notes: list, repeats: int, seconds: float,
                   processes: int, progress, log, together: bool = False) -> None:
    """Adds the side-by-side envelope rows (and their notes) to `rows` and `notes`."""
    envelope_rows, envelope_notes = side_by_side.run(
        base, repeats=repeats, seconds=seconds, processes=processes, progress=progress, log=log,
        together=together)
    for row in envelope_rows:
        rows[row["name"]] = row
        if row["note"]:
            notes.append(f"{row['name']}: {row['note']}")
    notes.extend(envelope_notes)


def _durability_cost(always1: dict, never1: dict, always: dict, never: dict, c: int) -> str:
    """One line naming what `--fsync always` costs against `never` on the same workload."""
    def ms(row: dict) -> str:
        return "n/a" if row["p50_ms"] is None else f"{row['p50_ms']:.2f} ms"

    ratio = round(always["ops_per_sec"] / never["ops_per_sec"], 3) if never["ops_per_sec"] \
        else 0.0
    return (f"cost of durability (--fsync always vs never): put c=1 p50 {ms(always1)} vs "
            f"{ms(never1)}; put c={c} {always['ops_per_sec']:.0f} vs "
            f"{never['ops_per_sec']:.0f} ops/s (ratio {ratio})")


def cluster_client_kwargs(cluster: "LocalNodeCluster") -> dict:
    """The load generator's keyword arguments for `cluster`: `client_kwargs` with the TLS
    files (cacert=, cert=, key=) of its `root` client."""
    return {"client_kwargs": dict(cluster.client_kwargs)}


def etcd_version() -> str:
    import subprocess

    from sealkv.node.bench.etcd import etcd_binary

    out = subprocess.run([etcd_binary(), "--version"], capture_output=True, text=True,
                         timeout=10).stdout
    return out.splitlines()[0].strip() if out else "etcd"


# (what, sealkv row, etcd row, field, target on sealkv / etcd, higher is better)
TARGETS = [
    ("Put, C clients, ops/s", "sealkv batched put c={C}", "etcd put c={C}", "ops_per_sec",
     ">= 1"),
    ("Put, 1 client, p50 ms", "sealkv batched put c=1", "etcd put c=1", "p50_ms", "<= 1"),
    ("Get linearizable, C clients, ops/s", "sealkv batched get linearizable c={C}",
     "etcd get linearizable c={C}", "ops_per_sec", ">= 1"),
    ("Get serializable, C clients, ops/s", "sealkv batched get serializable c={C}",
     "etcd get serializable c={C}", "ops_per_sec", ">= 1"),
    ("server CPU per Put at C clients, µs", "sealkv batched put c={C}", "etcd put c={C}",
     "server_cpu_us_per_op", ""),
    ("server CPU per Put at 1 client, µs", "sealkv batched put c=1", "etcd put c=1",
     "server_cpu_us_per_op", ""),
    ("server CPU per Put at 1 client above idle, µs", "sealkv batched put c=1",
     "etcd put c=1", "server_cpu_us_per_op_above_idle", ""),
    ("Put, C clients, ops/s: storage envelope on vs off (medians, side by side)",
     "sealkv storage envelope put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "ops_per_sec", ">= 0.95"),
    ("Put, C clients, ops/s: both envelopes (storage + raft log) vs off (medians, side by "
     "side)", "sealkv both envelopes put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "ops_per_sec", ">= 0.95"),
    ("server CPU per Put at C clients, µs: storage envelope on vs off (medians)",
     "sealkv storage envelope put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "server_cpu_us_per_op", ""),
    ("server CPU per Put at C clients, µs: both envelopes vs off (medians)",
     "sealkv both envelopes put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "server_cpu_us_per_op", ""),
    ("Puts per Raft entry at C clients: storage envelope vs off (medians)",
     "sealkv storage envelope put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "puts_per_entry", ""),
    ("Puts per Raft entry at C clients: both envelopes vs off (medians)",
     "sealkv both envelopes put c={C} median of {R}",
     "sealkv envelopes off put c={C} median of {R}", "puts_per_entry", ""),
    ("Put, C clients, ops/s: batched vs unary", "sealkv batched put c={C}",
     "sealkv unary put c={C}", "ops_per_sec", ""),
    ("Get linearizable, C clients: batched vs unary", "sealkv batched get linearizable c={C}",
     "sealkv unary get linearizable c={C}", "ops_per_sec", ""),
    ("Put, C clients, ops/s: TLS (default) vs --insecure", "sealkv batched put c={C}",
     "sealkv batched put c={C} --insecure", "ops_per_sec", ">= 0.9"),
]


def targets(rows: dict[str, dict], clients: int,
            repeats: int = side_by_side.DEFAULT_REPEATS) -> list[dict]:
    """The issue's target table: each figure, its reference, their ratio and the bar."""
    out = []
    for what, ours, theirs, field, bar in TARGETS:
        ours, theirs = (n.format(C=clients, R=repeats) for n in (ours, theirs))
        a = rows.get(ours, {}).get(field)
        b = rows.get(theirs, {}).get(field)
        ratio = round(a / b, 3) if a is not None and b else None
        holds = None
        if ratio is not None and bar:
            limit = float(bar.split()[1])
            holds = ratio >= limit if bar.startswith(">=") else ratio <= limit
        out.append({"what": what.replace("C clients", f"{clients} clients"),
                    "sealkv": a, "reference": theirs, "reference_value": b,
                    "ratio": ratio, "bar": bar, "holds": holds})
    return out
