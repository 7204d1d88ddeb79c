"""A separately installed admin plugin (examples/custom_admin) on real node processes.

The example is pip-installed into this interpreter's environment (and uninstalled at the end
when this module installed it); node and CLI processes are new interpreters, so they find its
entry point. Covered: the CheckConsistency RPC through a follower and through the leader, the
`sealkv consistency check` command and its exit codes, `sealkv plugins list`, and the refusal
of a node asked to enable a plugin that is not installed.
"""
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from sealkv.node.client import Client
from tests.cluster import Cluster, running_cluster
from tests.examples import installed_example

pytestmark = pytest.mark.integration

DIST = "sealkv-consistency-admin"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Installs examples/custom_admin; returns its (package, pb, pb_grpc) modules."""
    with installed_example("custom_admin", DIST, tmp_path_factory.mktemp("custom-admin-src"),
                           "sealkv_consistency_admin"):
        package = importlib.import_module("sealkv_consistency_admin")
        pb = importlib.import_module("sealkv_consistency_admin.v1.consistency_pb2")
        pb_grpc = importlib.import_module("sealkv_consistency_admin.v1.consistency_pb2_grpc")
        yield package, pb, pb_grpc


@pytest.fixture(scope="module")
def cluster(example, tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("custom-admin-cluster")), 3,
                         plugins=["consistency"]) as c:
        yield c


@pytest.fixture
def sealkv(tmp_path):
    """Runs the `sealkv` CLI as a new process in an empty directory, without SEALKV_ENDPOINTS."""
    env = {k: v for k, v in os.environ.items() if k != "SEALKV_ENDPOINTS"}

    def run(*args, timeout=60, cluster=None):
        """`cluster`: run as its `root` identity (else plaintext, for the test doubles)."""
        return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], cwd=tmp_path,
                              env=env | (cluster.cli_env() if cluster else {}),
                              capture_output=True, text=True, timeout=timeout)

    return run


def endpoints(c: Cluster, *names: str) -> str:
    return ",".join(c.nodes[n].grpc for n in (names or c.nodes))


def check_via(example, c: Cluster, name: str, wait_ms: int = 10_000):
    """Calls CheckConsistency on the node `name` itself (no failover, no leader following)."""
    _, pb, pb_grpc = example
    address = c.nodes[name].grpc
    with Client([address], timeout=15, **c.client_kwargs) as client:
        return client.call(pb_grpc.ConsistencyAdminStub, "CheckConsistency",
                           pb.CheckConsistencyRequest(wait_ms=wait_ms), endpoint=address,
                           follow_leader=False)


def test_check_sees_every_member_agree_before_and_after_writes(example, cluster):
    _, pb, _ = example
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    # What the leader's state machine has applied before the check: every acknowledged write
    # (Raft's own commit index also counts pysyncobj's no-op entries, which a read index
    # covers without any state machine applying them).
    with Client([cluster.nodes[leader].grpc], **cluster.client_kwargs) as client:
        start_applied = client.digest(endpoint=cluster.nodes[leader].grpc).applied_index

    first = check_via(example, cluster, follower)
    assert first.verdict == pb.CONSISTENT, first
    assert first.checked_by == follower
    assert first.target_index >= start_applied
    assert sorted(m.name for m in first.members) == ["n1", "n2", "n3"]
    assert {m.state for m in first.members} == {pb.AGREES}
    assert {(m.applied_index, m.digest) for m in first.members} == {
        (first.compared_index, first.agreed_digest)}
    assert first.compared_index >= first.target_index
    # The agreed digest is what every node itself reports (the cluster is idle).
    for node in cluster.nodes.values():
        with Client([node.grpc], **cluster.client_kwargs) as client:
            own = client.digest(endpoint=node.grpc)
        assert (own.digest, own.applied_index) == (first.agreed_digest, first.compared_index)

    with cluster.client() as client:
        after_writes = max(client.put(f"consistency/{i}".encode(), b"value-%d" % i)
                           .header.revision for i in range(25))

    second = check_via(example, cluster, leader)
    assert second.verdict == pb.CONSISTENT, second
    assert second.checked_by == leader
    # Every member applied at least every write acknowledged before the check.
    assert second.target_index >= after_writes > first.compared_index
    assert {m.state for m in second.members} == {pb.AGREES}
    assert {m.applied_index for m in second.members} == {second.compared_index}
    assert second.compared_index >= second.target_index
    assert second.agreed_digest != first.agreed_digest
    assert {m.keys for m in second.members} == {first.members[0].keys + 25}


def test_cli_check_prints_every_member_and_exits_0(example, cluster, sealkv):
    r = sealkv("--endpoints", endpoints(cluster), "-w", "json", "consistency", "check",
               cluster=cluster)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] == "consistent"
    assert out["target_index"] <= out["compared_index"]
    assert {m["name"]: m["state"] for m in out["members"]} == {
        "n1": "agrees", "n2": "agrees", "n3": "agrees"}
    assert {m["digest"] for m in out["members"]} == {out["agreed_digest"]}

    r = sealkv("--endpoints", endpoints(cluster), "-w", "table", "consistency", "check",
               cluster=cluster)
    assert r.returncode == 0, r.stderr
    assert "| NAME" in r.stdout and "| STATE" in r.stdout
    assert r.stdout.count("| agrees ") == 3
    assert "consistent: all 3 members agree at index" in r.stdout
    assert r.stderr == ""


def test_plugins_list_shows_the_installed_plugin(example, cluster, sealkv):
    package, _, _ = example
    r = sealkv("--endpoints", endpoints(cluster), "-w", "json", "plugins", "list",
               cluster=cluster)
    assert r.returncode == 0, r.stderr
    rows = [p for p in json.loads(r.stdout) if p["name"] == "consistency"]
    assert rows == [{"kind": "admin", "name": "consistency", "distribution": DIST,
                     "version": package.__version__,
                     "object": "sealkv_consistency_admin.admin:ConsistencyAdminPlugin",
                     "enabled": "yes"}]
    assert "admin:consistency" in cluster.status("n1").plugins


def test_cli_check_exits_3_naming_an_unreachable_member(example, make_cluster, sealkv):
    c = make_cluster(3, plugins=["consistency"])
    c.kill("n3")
    c.wait_leader()
    r = sealkv("--endpoints", endpoints(c, "n1", "n2"), "-w", "json", "consistency", "check",
               "--wait", "3", cluster=c)
    assert r.returncode == 3, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["verdict"] == "incomplete"
    states = {m["name"]: m for m in out["members"]}
    assert (states["n1"]["state"], states["n2"]["state"]) == ("agrees", "agrees")
    assert states["n3"]["state"] == "unreachable"
    assert states["n3"]["reason"]
    assert r.stderr.strip() == "Error: incomplete: n3 could not be compared"


@pytest.fixture
def fake_server(example):
    """Serves a fixed CheckConsistency answer on 127.0.0.1 (a test double, for tests only)."""
    _, pb, pb_grpc = example
    servers = []

    def serve(response=None) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        if response is not None:
            class Fixed(pb_grpc.ConsistencyAdminServicer):
                def CheckConsistency(self, request, context):
                    return response

            pb_grpc.add_ConsistencyAdminServicer_to_server(Fixed(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield serve
    for server in servers:
        server.stop(0)


def test_cli_check_exits_1_when_members_disagree(example, fake_server, sealkv):
    _, pb, _ = example
    response = pb.CheckConsistencyResponse(
        verdict=pb.INCONSISTENT, target_index=7, compared_index=7, checked_by="n1",
        summary="inconsistent at index 7: n2 disagree",
        members=[pb.MemberDigest(name="n1", state=pb.AGREES, applied_index=7, digest="a" * 64),
                 pb.MemberDigest(name="n2", state=pb.DISAGREES, applied_index=7,
                                 digest="b" * 64, reason="digest bbbb differs")])
    r = sealkv("--endpoints", fake_server(response), "consistency", "check")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "n2, -, , disagrees, 7, bbbbbbbbbbbbbbbb, 0, digest bbbb differs" in r.stdout
    assert r.stderr.strip() == "Error: inconsistent at index 7: n2 disagree"


def test_cli_check_tells_how_to_enable_the_plugin_on_a_node_without_it(example, fake_server,
                                                                         sealkv):
    r = sealkv("--endpoints", fake_server(None), "consistency", "check")
    assert r.returncode == 1
    assert r.stderr.strip() == ("Error: the endpoint does not serve the consistency check: "
                                "start its node with --plugins consistency")


def test_node_with_an_unknown_plugin_refuses_to_start_naming_it(example, tmp_path):
    c = Cluster(str(tmp_path), 1, plugins=["nosuchplugin"])
    try:
        node = c.start_node("n1")
        assert node.proc.wait(timeout=60) == 1
    finally:
        c.stop_all()
    log = node.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "plugin 'nosuchplugin' is not installed" in errors[0]
    assert "consistency" in errors[0]  # the installed plugins are listed
    assert "Traceback" not in log
