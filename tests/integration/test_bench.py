"""`sealkv bench`: the tool runs, measures what it says and reports errors by status.

These tests check the tool, never performance numbers (the machine is shared and noisy).
"""
import json
import os
import subprocess
import sys

import pytest

from sealkv.node.bench.workload import key_for
from tests.cluster import free_port

pytestmark = pytest.mark.integration

SHORT = ["--duration", "1", "--warmup", "0.2"]


def sealkv(*args, endpoints=None, timeout=180):
    env = dict(os.environ)
    env.pop("SEALKV_ENDPOINTS", None)
    cmd = [sys.executable, "-m", "sealkv.node.cli"]
    if endpoints:
        cmd += ["--endpoints", endpoints]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def one_result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["results"]) == 1
    return report["results"][0]


def assert_sane(r: dict, clients: int) -> None:
    assert r["clients"] == clients
    assert r["ops"] > 0 and r["errors"] == {}
    assert r["ops_per_sec"] == pytest.approx(r["ops"] / r["seconds"], rel=0.01)
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]


@pytest.fixture
def endpoints(cluster3, monkeypatch):
    """The cluster's endpoints; the CLI runs as its `root` identity (SEALKV_CACERT/CERT/KEY)."""
    for name, value in cluster3.cli_env().items():
        monkeypatch.setenv(name, value)
    return ",".join(n.grpc for n in cluster3.nodes.values())


def test_put_writes_real_keys_of_the_requested_size(cluster3, endpoints):
    r = one_result(sealkv("-w", "json", "bench", "put", "--clients", "4", "--processes", "2",
                          "--keyspace", "50", "--key-size", "16", "--value-size", "100",
                          *SHORT, endpoints=endpoints))
    assert_sane(r, 4)
    with cluster3.client() as c:
        got = c.range(b"k", prefix=True)
    assert 0 < got.count <= 50
    assert all(len(kv.key) == 16 and len(kv.value) == 100 for kv in got.kvs)


def test_get_prefills_the_keyspace_and_spreads_over_all_endpoints(cluster3, endpoints):
    r = one_result(sealkv("-w", "json", "bench", "get", "--clients", "3", "--keyspace", "30",
                          "--consistency", "s", "--target", "all", *SHORT,
                          endpoints=endpoints))
    assert_sane(r, 3)
    with cluster3.client() as c:
        assert c.range(b"k", prefix=True).count == 30
        assert c.get(key_for(29, 16)).found


def test_mixed_linearizable_prints_a_table(endpoints):
    proc = sealkv("-w", "table", "bench", "mixed", "--clients", "2", "--read-ratio", "0.5",
                  *SHORT, endpoints=endpoints)
    assert proc.returncode == 0, proc.stderr
    assert "OPS/S" in proc.stdout and "mixed c=2 linearizable" in proc.stdout
    assert "[" not in proc.stderr  # no progress bar when stdout is not a terminal


def test_failed_requests_are_counted_by_status():
    nowhere = f"127.0.0.1:{free_port()}"
    r = one_result(sealkv("-w", "json", "--timeout", "0.3", "bench", "put", "--target", "all",
                          *SHORT, endpoints=nowhere))
    assert r["ops"] == 0 and r["p50_ms"] is None
    assert set(r["errors"]) == {"UNAVAILABLE"} and r["errors"]["UNAVAILABLE"] > 0


def test_leader_target_without_a_reachable_endpoint_exits_3():
    proc = sealkv("bench", "put", *SHORT, endpoints=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 3 and proc.stderr.startswith("Error: ")


def test_bad_option_is_a_usage_error():
    proc = sealkv("bench", "put", "--keyspace", "1000", "--key-size", "3",
                  endpoints="127.0.0.1:1")
    assert proc.returncode == 2 and "--key-size" in proc.stderr


@pytest.mark.parametrize("mode", ["pipelined", "closed"])
def test_raft_engine_reference(mode):
    r = one_result(sealkv("-w", "json", "bench", "raft", "--mode", mode, "--clients", "4",
                          *SHORT))
    assert_sane(r, 4)
    assert r["name"] == f"raft put {mode} c=4"


def test_compare_runs_batched_unary_envelope_and_etcd_rows_with_ratios(tmp_path):
    import shutil

    proc = sealkv("-w", "json", "bench", "compare", "--clients", "4", "--duration", "0.5",
                  "--warmup", "0.2", "--etcd", "--repeats", "2", "--envelope-seconds", "0.5",
                  timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names = [row["name"] for row in report["rows"]]
    sealkv_rows = [f"sealkv {mode} {load}" for mode in ("batched", "unary")
                   for load in ("put c=1", "put c=4", "get linearizable c=4",
                                "get serializable c=4")]
    etcd_rows = ["etcd put c=1", "etcd put c=4", "etcd get linearizable c=4",
                 "etcd get serializable c=4"]
    if shutil.which("etcd"):
        assert names[:4] == etcd_rows
    else:
        assert any("etcd-server" in n for n in report["notes"]), report["notes"]
    assert [n for n in names if n.startswith("sealkv") and "envelope" not in n
            and "never" not in n and "insecure" not in n] == sealkv_rows
    # The TLS reference: the same batched Put load on a fresh --insecure cluster.
    assert names[names.index("sealkv unary get serializable c=4") + 1] == \
        "sealkv batched put c=4 --insecure"
    # The envelope rows: one median row per envelope state (side-by-side clusters, runs
    # interleaved), then one c=1 row per enveloped state.
    skipped = any("rows skipped" in n for n in report["notes"])
    envelope = [f"sealkv {s} put c=4 median of 2" for s in
                (["envelopes off"] if skipped else
                 ["envelopes off", "storage envelope", "both envelopes"])]
    if not skipped:
        envelope += ["sealkv storage envelope put c=1", "sealkv both envelopes put c=1"]
    assert names[len(names) - len(envelope) - 2:] == envelope + [
        "sealkv batched put c=1 fsync=never", "sealkv batched put c=4 fsync=never"]
    for name in envelope[:len(envelope) if skipped else 3]:
        row = report["rows"][names.index(name)]
        assert len(row["runs_ops_per_sec"]) == 2 and len(row["runs_server_cpu_us_per_op"]) == 2
        assert row["ops_per_sec"] == pytest.approx(sum(row["runs_ops_per_sec"]) / 2, abs=0.1)
    assert any(n.startswith("cost of durability (--fsync always vs never)")
               for n in report["notes"])
    for row in report["rows"]:
        assert row["ops"] > 0 and row["errors"] == {}, row
        assert row["server_cpu_us_per_op"] > 0 and row["client_cpu_us_per_op"] > 0, row
        assert 0 <= row["server_cpu_us_per_op_above_idle"] <= row["server_cpu_us_per_op"]
    targets = {t["what"]: t for t in report["targets"]}
    put = targets["Put, 4 clients, ops/s"]
    assert put["sealkv"] == report["rows"][names.index("sealkv batched put c=4")]["ops_per_sec"]
    if shutil.which("etcd"):
        assert put["ratio"] == pytest.approx(put["sealkv"] / put["reference_value"], rel=0.01)
        assert isinstance(put["holds"], bool)
    assert targets["Put, 4 clients, ops/s: batched vs unary"]["ratio"] > 0
    if not skipped:
        for what in ("storage envelope on vs off (medians, side by side)",
                     "both envelopes (storage + raft log) vs off (medians, side by side)"):
            row = targets[f"Put, 4 clients, ops/s: {what}"]
            assert row["reference"] == "sealkv envelopes off put c=4 median of 2"
            assert row["ratio"] > 0 and isinstance(row["holds"], bool)
        cpu = targets["server CPU per Put at 4 clients, µs: both envelopes vs off (medians)"]
        assert cpu["ratio"] > 0 and cpu["holds"] is None
    tls_row = targets["Put, 4 clients, ops/s: TLS (default) vs --insecure"]
    assert tls_row["reference"] == "sealkv batched put c=4 --insecure"
    assert tls_row["ratio"] > 0 and isinstance(tls_row["holds"], bool)


def test_put_in_unary_mode_reports_client_cpu(endpoints):
    r = one_result(sealkv("-w", "json", "bench", "put", "--clients", "2", "--mode", "unary",
                          *SHORT, endpoints=endpoints))
    assert_sane(r, 2)
    assert r["name"] == "put c=2 unary" and r["client_cpu_us_per_op"] > 0


def test_envelope_times_seal_and_open_at_each_size_and_names_the_aes_implementation():
    proc = sealkv("-w", "json", "bench", "envelope", "--sizes", "0,100,4096",
                  "--iterations", "50")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["implementation"]["library"].startswith("cryptography ")
    assert "OpenSSL" in report["implementation"]["openssl"]
    assert [r["size"] for r in report["rows"]] == [0, 100, 4096]
    for r in report["rows"]:
        assert r["iterations"] == 50 and r["values_per_sec"] > 0
        for part in ("seal", "open", "seal_open", "aesgcm_only"):
            assert 0 < r[part]["p50_us"] <= r[part]["p99_us"], (part, r)


def test_envelope_table_and_usage_errors():
    proc = sealkv("-w", "table", "bench", "envelope", "--sizes", "64", "--iterations", "10")
    assert proc.returncode == 0, proc.stderr
    assert "cryptography" in proc.stdout and "OpenSSL" in proc.stdout
    assert "SEAL+OPEN P50 US" in proc.stdout and "| 64 " in proc.stdout
    proc = sealkv("bench", "envelope", "--sizes", "a,b")
    assert proc.returncode == 2 and "--sizes" in proc.stderr


def test_cutover_measures_every_window_on_a_fresh_cluster_and_stops_it():
    proc = sealkv("-w", "json", "bench", "cutover", "--nodes", "3", "--clients", "2",
                  "--duration-before", "0.5", "--duration-after", "0.5", "--warmup", "0.2",
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["settings"]["clients"] == 2
    (run,) = report["runs"]
    assert run["nodes"] == 3 and len(run["pids"]) == 3
    assert run["storage_envelope_active"] and not run["was_already_active"]
    assert run["cutover_index"] > run["bootstrap_index"] > 0
    assert run["enable_rpc_ms"] > 0 and run["fan_out_ms"] is None
    assert len(run["capability_rows"]) == 3 and all(r["ok"] for r in run["capability_rows"])
    assert [w["window"] for w in run["windows"]] == ["before", "during", "overlap", "after"]
    for w in (run["windows"][0], run["windows"][3]):
        assert w["ops"] > 0 and w["errors"] == {}, w
        assert 0 < w["p50_ms"] <= w["p99_ms"] <= w["max_ms"]
    for pid in run["pids"]:
        assert not os.path.exists(f"/proc/{pid}") or b"sealkv" not in open(
            f"/proc/{pid}/cmdline", "rb").read(), f"node {pid} still running"


def test_cutover_stops_the_nodes_when_the_run_fails(monkeypatch):
    from sealkv.node.bench import compare, cutover
    from sealkv.node.cli import local

    made = []

    def factory(n):
        made.append(compare.LocalNodeCluster(nodes=n, encryption=True))
        return made[0]

    def boom(self):
        raise RuntimeError("injected failure after the cluster started")

    monkeypatch.setattr(cutover._Load, "start", boom)
    with pytest.raises(RuntimeError, match="injected"):
        cutover.run_one(3, cutover.CutoverSettings(clients=1), cluster_factory=factory)
    nodes = made[0].record.nodes
    assert all(n.pid > 0 for n in nodes)
    assert not any(local.is_our_process(n) for n in nodes)
    assert not os.path.exists(made[0].record.data_dir)


def test_grpc_floor_runs_against_a_no_op_server():
    from click.testing import CliRunner

    from sealkv.node.cli.main import register_commands

    result = CliRunner().invoke(register_commands(), [
        "-w", "json", "bench", "grpc-floor", "--clients", "1,4", "--duration", "0.5",
        "--warmup", "0"])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(result.stdout)["results"]
    assert [r["clients"] for r in rows] == [1, 4]
    assert all(r["ops"] > 0 and not r["errors"] for r in rows), rows


def test_fill_writes_every_key_restarts_the_cluster_and_reads_a_sample_back():
    proc = sealkv("-w", "json", "bench", "fill", "--keys", "3000", "--value-size", "512",
                  "--processes", "1", "--max-seconds", "120", timeout=400)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fill = report["fill"]
    assert (fill["keys_acked"], fill["keys_failed"]) == (3000, 0)
    assert fill["memory"] and all(m["max_rss"] > 0 for m in fill["memory"])
    restart = report["restart"]
    assert restart["sampled_keys_missing"] == 0 and restart["sampled_keys"] == 3000
    for node in restart["nodes"].values():
        assert node["db_applied_index_at_start"] > 0 and node["db_size_in_use"] > 3000 * 512
    assert all(size > 3000 * 512 for size in report["db_file_bytes"].values())
