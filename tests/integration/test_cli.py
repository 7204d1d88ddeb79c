"""The `sealkv` CLI against real clusters: outputs, errors on stderr, and exit codes."""
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sealkv.node.cli.main import register_commands
from tests.cluster import free_port, running_cluster, wait_for

pytestmark = pytest.mark.integration

# The same registration `main()` performs before it runs the group.
cli = register_commands()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("cli-cluster")), 3) as c:
        yield c


@pytest.fixture
def endpoints(cluster):
    return ",".join(n.grpc for n in cluster.nodes.values())


@pytest.fixture
def sealkv(tmp_path, monkeypatch, cluster):
    """Runs the CLI in an empty directory (no ./.sealkv) without SEALKV_ENDPOINTS, as the
    test cluster's `root` identity (SEALKV_CACERT/CERT/KEY)."""
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    files = cluster.tls_files

    def run(*args, env=None):
        merged = {"SEALKV_ENDPOINTS": None, "SEALKV_CACERT": files.cacert,
                  "SEALKV_CERT": files.cert, "SEALKV_KEY": files.key}
        merged.update(env or {})
        return runner.invoke(cli, list(args), env=merged, catch_exceptions=False)

    return run


def test_put_get_del_round_trip(sealkv, endpoints):
    r = sealkv("--endpoints", endpoints, "put", "cli/k1", "hello world")
    assert (r.exit_code, r.stdout) == (0, "OK\n"), r.output
    r = sealkv("--endpoints", endpoints, "get", "cli/k1")
    assert (r.exit_code, r.stdout) == (0, "cli/k1\nhello world\n"), r.output
    r = sealkv("--endpoints", endpoints, "del", "cli/k1")
    assert (r.exit_code, r.stdout) == (0, "1\n"), r.output
    r = sealkv("--endpoints", endpoints, "del", "cli/k1")
    assert (r.exit_code, r.stdout) == (0, "0\n"), r.output


def test_get_missing_key_exits_1_with_error_on_stderr(sealkv, endpoints):
    r = sealkv("--endpoints", endpoints, "get", "cli/never-written")
    assert r.exit_code == 1
    assert "Error: key not found: cli/never-written" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args", [
    ["put"],
    ["put", "k"],                                       # neither VALUE nor --value-file
    ["get", "k", "--prefix", "--from-key"],
    ["-w", "yaml", "get", "k"],
    ["no-such-command"],
])
def test_usage_errors_exit_2(sealkv, endpoints, args):
    r = sealkv("--endpoints", endpoints, *args)
    assert r.exit_code == 2, r.output
    assert "Error" in r.stderr


def test_no_endpoints_anywhere_is_a_usage_error(sealkv):
    r = sealkv("get", "k")
    assert r.exit_code == 2
    assert "Error: no endpoints: pass --endpoints, set SEALKV_ENDPOINTS" in r.stderr


@pytest.mark.parametrize("args", [["get", "k"], ["put", "k", "v"], ["del", "k"],
                                  ["member", "list"], ["endpoint", "status"]])
def test_unreachable_endpoint_exits_3(sealkv, args):
    dead = f"127.0.0.1:{free_port()}"
    r = sealkv("--endpoints", dead, "--timeout", "1", *args)
    assert r.exit_code == 3, r.output
    assert "Error:" in r.stderr


def test_unreachable_endpoint_is_unhealthy_and_exits_3(sealkv, endpoints):
    dead = f"127.0.0.1:{free_port()}"
    r = sealkv("--endpoints", f"{endpoints},{dead}", "--timeout", "1", "-w", "json",
               "endpoint", "health")
    assert r.exit_code == 3, r.output
    health = {h["endpoint"]: h["health"] for h in json.loads(r.stdout)}
    assert health.pop(dead) is False
    assert list(health.values()) == [True, True, True]


def test_json_output_parses(sealkv, endpoints):
    r = sealkv("--endpoints", endpoints, "-w", "json", "put", "cli/json", "v1")
    assert r.exit_code == 0, r.output
    put = json.loads(r.stdout)
    assert put["revision"] > 0
    r = sealkv("--endpoints", endpoints, "-w", "json", "get", "cli/json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["kvs"] == [{"key": "cli/json", "value": "v1", "create_revision": put["revision"],
                           "mod_revision": put["revision"], "version": 1}]
    r = sealkv("--endpoints", endpoints, "-w", "json", "member", "list")
    assert r.exit_code == 0, r.output
    assert {m["name"] for m in json.loads(r.stdout)["members"]} == {"n1", "n2", "n3"}


def test_get_prefix(sealkv, endpoints):
    for key, value in [("cli/pfx/b", "2"), ("cli/pfx/a", "1"), ("cli/pfy", "no"),
                       ("cli/pf", "no")]:
        assert sealkv("--endpoints", endpoints, "put", key, value).exit_code == 0
    r = sealkv("--endpoints", endpoints, "get", "cli/pfx/", "--prefix")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["cli/pfx/a", "1", "cli/pfx/b", "2"]
    r = sealkv("--endpoints", endpoints, "get", "cli/pfx/", "--prefix", "--keys-only")
    assert r.stdout.splitlines() == ["cli/pfx/a", "cli/pfx/b"]


def test_member_list_table_shows_three_voters(sealkv, endpoints, cluster):
    r = sealkv("--endpoints", endpoints, "-w", "table", "member", "list")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[3:-1]]
    assert [r["ROLE"] for r in rows] == ["voter"] * 3
    assert {(r["NAME"], r["RAFT"], r["GRPC"]) for r in rows} == {
        (n.name, n.raft, n.grpc) for n in cluster.nodes.values()}
    assert [r["CONNECTED"] for r in rows] == ["yes"] * 3
    assert [r["LEADER"] for r in rows].count("yes") == 1


def test_endpoint_status_cluster_and_health(sealkv, endpoints, cluster):
    first = next(iter(cluster.nodes.values())).grpc
    r = sealkv("--endpoints", first, "endpoint", "status", "--cluster")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 3
    for node in cluster.nodes.values():
        assert node.grpc in r.stdout
    r = sealkv("--endpoints", endpoints, "-w", "json", "endpoint", "health")
    assert r.exit_code == 0, r.output
    health = json.loads(r.stdout)
    assert [h["health"] for h in health] == [True, True, True]


def test_endpoints_from_environment(sealkv, endpoints):
    r = sealkv("put", "cli/env", "from-env", env={"SEALKV_ENDPOINTS": endpoints})
    assert r.exit_code == 0, r.output
    r = sealkv("get", "cli/env", env={"SEALKV_ENDPOINTS": endpoints})
    assert (r.exit_code, r.stdout) == (0, "cli/env\nfrom-env\n"), r.output


def test_endpoints_flag_beats_environment(sealkv, endpoints):
    dead = f"127.0.0.1:{free_port()}"
    r = sealkv("--endpoints", endpoints, "get", "cli/flag-wins",
               env={"SEALKV_ENDPOINTS": dead})
    assert r.exit_code == 1 and "key not found" in r.stderr, r.output


# -- cluster up / status / down (real subprocesses) ----------------------------------------


def _running(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _sealkv(*args, cwd, timeout=120, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALKV_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_local_cluster_up_status_down(tmp_path):
    data_dir = tmp_path / "local"
    record = data_dir / "cluster.json"
    pids: list[int] = []
    try:
        up = _sealkv("-w", "json", "cluster", "up", "--nodes", "3", "--data-dir", str(data_dir),
                     "--wait", "60", cwd=tmp_path)
        if record.exists():
            pids = [n["pid"] for n in json.loads(record.read_text())["nodes"]]
        assert up.returncode == 0, up.stderr
        started = json.loads(up.stdout)
        assert [n["name"] for n in started["nodes"]] == ["n1", "n2", "n3"]
        assert started["leader"] in {"n1", "n2", "n3"}
        assert sorted(n["pid"] for n in started["nodes"]) == sorted(pids)
        assert all(_running(pid) for pid in pids)
        assert oct(os.stat(data_dir / "secret").st_mode & 0o777) == "0o600"

        status = _sealkv("-w", "json", "cluster", "status", "--data-dir", str(data_dir),
                         cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        rows = json.loads(status.stdout)
        assert [r["running"] for r in rows] == [True, True, True]
        assert len({r["leader"] for r in rows}) == 1
        assert {r["transport_security"] for r in rows} == {"mutual-tls"}
        assert "WARNING" not in status.stderr
        pki_dir = data_dir / "pki"
        for key in ("ca.key", "client.root.key", "node.n1.key", "node.n3.key"):
            assert oct(os.stat(pki_dir / key).st_mode & 0o777) == "0o600", key

        # The recorded endpoints serve a client command run with the `root` identity that
        # `cluster up` made (it prints the exports); without it, TLS refuses the client.
        eps = ",".join(n["grpc"] for n in started["nodes"])
        root = {"SEALKV_CACERT": str(pki_dir / "ca.crt"),
                "SEALKV_CERT": str(pki_dir / "client.root.crt"),
                "SEALKV_KEY": str(pki_dir / "client.root.key")}
        put = _sealkv("--endpoints", eps, "put", "k", "v", cwd=tmp_path, env=root)
        assert put.returncode == 0, put.stderr
        plain = _sealkv("--endpoints", eps, "--timeout", "2", "put", "k", "v", cwd=tmp_path)
        assert plain.returncode != 0

        down = _sealkv("cluster", "down", "--data-dir", str(data_dir), cwd=tmp_path)
        assert down.returncode == 0, down.stderr
        for pid, name in zip(pids, ["n1", "n2", "n3"]):
            assert f"{name} (pid {pid}): stopped" in down.stdout
        wait_for(lambda: not any(_running(pid) for pid in pids), 10, "node processes to exit")

        again = _sealkv("cluster", "status", "--data-dir", str(data_dir), cwd=tmp_path)
        assert again.returncode == 3
    finally:
        if record.exists():
            _sealkv("cluster", "down", "--data-dir", str(data_dir), cwd=tmp_path, timeout=60)
        for pid in pids:  # last resort: only the PIDs this test's `cluster up` started
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_cluster_down_without_a_record_is_a_usage_error(tmp_path):
    down = _sealkv("cluster", "down", "--data-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert down.returncode == 2
    assert "Error: no local cluster recorded in" in down.stderr


def test_global_flags_after_the_subcommand(sealkv, endpoints):
    assert sealkv("put", "cli/anywhere", "v", "--endpoints", endpoints).exit_code == 0
    r = sealkv("get", "cli/anywhere", "-w", "json", "--endpoints", endpoints)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kvs"][0]["value"] == "v"
    r = sealkv("member", "list", "-w", "table", "--endpoints", endpoints)
    assert r.exit_code == 0 and r.stdout.startswith("+"), r.output
    r = sealkv("--endpoints", endpoints, "version", "-w", "json")
    assert r.exit_code == 0, r.output
    servers = json.loads(r.stdout)["servers"]
    assert len(servers) == 3 and all(servers.values())


def test_an_insecure_cluster_is_flagged_in_every_status(tmp_path):
    data_dir = tmp_path / "plain"
    pids: list[int] = []
    try:
        up = _sealkv("cluster", "up", "--nodes", "1", "--insecure", "--data-dir", str(data_dir),
                     cwd=tmp_path)
        record = data_dir / "cluster.json"
        if record.exists():
            pids = [n["pid"] for n in json.loads(record.read_text())["nodes"]]
        assert up.returncode == 0, up.stderr
        assert "WARNING: the cluster serves plaintext gRPC" in up.stderr
        assert not (data_dir / "pki").exists()
        status = _sealkv("-w", "table", "cluster", "status", "--data-dir", str(data_dir),
                         cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "| INSECURE" in status.stdout and "WARNING" in status.stderr
        eps = json.loads(record.read_text())["nodes"][0]["grpc"]
        endpoint = _sealkv("--endpoints", eps, "-w", "json", "endpoint", "status", cwd=tmp_path)
        assert endpoint.returncode == 0, endpoint.stderr
        assert json.loads(endpoint.stdout)[0]["transport_security"] == "insecure"
        assert "WARNING" in endpoint.stderr
        log = (data_dir / "n1.log").read_text()
        assert "WARNING" in log and "INSECURE: node n1 serves plaintext gRPC" in log
    finally:
        _sealkv("cluster", "down", "--data-dir", str(data_dir), cwd=tmp_path, timeout=60)
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
