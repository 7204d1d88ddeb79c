"""The encryption layer on real node processes: start-up refusals, restarts, late joiners."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from sealkv.node.client import SERIALIZABLE
from tests.cluster import PYTHON, wait_for
from tests.integration.test_encryption_admin import admin, write_compaction_config, write_kek

pytestmark = pytest.mark.integration


def encrypted_cluster(make_cluster, tmp_path, extra=()):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek, *extra])
    with cluster.client() as c:
        c.put(b"before", b"cleartext-value")
        admin(c, "BootstrapEncryption", timeout=15)
        admin(c, "EnableStorageEnvelope", timeout=15)
        c.put(b"after", b"sealed-value")
    return cluster, kek


def start_fails(cluster, name, *extra) -> str:
    """Starts node `name` with changed arguments; it must exit non-zero. Returns its output."""
    node = cluster.nodes[name]
    args = [PYTHON, "-m", "sealkv.node.cli", "node", "start", "--name", name,
            "--data-dir", node.data_dir, "--grpc", node.grpc, "--raft", node.raft,
            "--initial-cluster", cluster.initial_cluster(), "--secret-file",
            cluster.secret_file, "--certs-dir", cluster.certs_dir, *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stderr[-2000:]
    return result.stderr


def test_restarted_nodes_read_and_write_through_the_envelope(make_cluster, tmp_path):
    cluster, _ = encrypted_cluster(make_cluster, tmp_path)
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    cluster.kill(follower, signal.SIGKILL)
    cluster.start_node(follower)
    cluster.kill(leader, signal.SIGKILL)
    cluster.start_node(leader)
    cluster.wait_leader()
    with cluster.client() as c:
        wait_for(lambda: c.put(b"post-restart", b"v"), 30, "writes to be admitted again")
    for name in cluster.nodes:
        with cluster.client(name) as c:
            assert c.get(b"before").kv.value == b"cleartext-value"
            assert c.get(b"after").kv.value == b"sealed-value"
            assert c.get(b"post-restart").kv.value == b"v"
    digests = {cluster.client(n).digest().digest for n in cluster.nodes}
    assert len(digests) == 1


def test_start_up_refusals_name_the_fix(make_cluster, tmp_path):
    cluster, kek = encrypted_cluster(make_cluster, tmp_path)
    victim = next(n for n in cluster.nodes if n != cluster.wait_leader())
    cluster.kill(victim, signal.SIGTERM)
    plugin = ["--plugins", "encryption"]

    wrong = write_kek(tmp_path / "wrong-kek")
    out = start_fails(cluster, victim, *plugin, "--kek-file", wrong)
    assert "cannot unwrap" in out and "start with the KEK this node was bootstrapped with" in out

    loose = tmp_path / "loose-kek"
    shutil.copy(kek, loose)
    os.chmod(loose, 0o644)
    out = start_fails(cluster, victim, *plugin, "--kek-file", str(loose))
    assert str(loose) in out and "chmod 600" in out

    out = start_fails(cluster, victim, *plugin, "--kek-file", str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in out

    out = start_fails(cluster, victim, *plugin)
    assert "kek" in out.lower()

    out = start_fails(cluster, victim)  # no encryption at all on a node holding a sidecar
    assert "encryption is not enabled" in out and "--plugins encryption" in out

    # None of the refusals harmed the node: with its own KEK it starts and serves.
    cluster.start_node(victim)
    with cluster.client(victim) as c:
        wait_for(lambda: c.get(b"after", SERIALIZABLE).found, 30, f"{victim} to serve again")
        assert c.get(b"after").kv.value == b"sealed-value"


def test_a_sidecar_restored_from_an_old_copy_is_refused(make_cluster, tmp_path):
    cluster, _ = encrypted_cluster(make_cluster, tmp_path)
    victim = next(n for n in cluster.nodes if n != cluster.wait_leader())
    node = cluster.nodes[victim]
    sidecar = os.path.join(node.data_dir, "encryption", "keys.json")
    old_copy = tmp_path / "keys.json.old"
    shutil.copy(sidecar, old_copy)
    # A restart bumps the node's nonce epoch and registers it cluster-wide.
    cluster.kill(victim, signal.SIGTERM)
    cluster.start_node(victim)
    with cluster.client(victim) as c:
        wait_for(lambda: c.put(b"epoch-bumped", b"v"), 30, "the restarted node to register")
    leader = cluster.wait_leader()
    with cluster.client(leader) as c:
        c.get(b"epoch-bumped")
    cluster.kill(victim, signal.SIGTERM)
    shutil.copy(old_copy, sidecar)
    out = start_fails(cluster, victim, "--plugins", "encryption", "--kek-file",
                      str(tmp_path / "kek"))
    assert "restored from an old copy" in out and "ResyncSidecar" in out


def test_a_node_added_after_log_compaction_reads_older_envelopes(make_cluster, tmp_path):
    config = write_compaction_config(tmp_path / "compact.toml")
    cluster, kek = encrypted_cluster(make_cluster, tmp_path, extra=("--config", config))
    with cluster.client() as c:
        for i in range(150):  # past the compaction threshold: the log before this is gone
            c.put(b"old/%03d" % i, b"sealed-%03d" % i)
    for node in cluster.nodes.values():
        wait_for(lambda: os.path.exists(os.path.join(node.data_dir, "raft", "raft.dump")), 30,
                 f"{node.name} to compact its log")
    n4 = cluster.add_node("n4")
    wait_for(lambda: cluster.healthy("n4"), 30, "n4 to serve (the capability fence probes it)")
    with cluster.client() as c:
        c.member_add("n4", n4.raft, n4.grpc)
    with cluster.client("n4") as c:
        wait_for(lambda: c.get(b"old/149", SERIALIZABLE).found, 30, "n4 to install the snapshot")
        got = {kv.key: kv.value for kv in c.range(b"old/", prefix=True).kvs}
        assert got == {b"old/%03d" % i: b"sealed-%03d" % i for i in range(150)}
        assert c.get(b"after").kv.value == b"sealed-value"
        assert c.get(b"before").kv.value == b"cleartext-value"
        state = admin(c, "GetSidecarState", endpoint=n4.grpc, follow_leader=False)
        assert state.storage_envelope_active
    with cluster.client("n1") as c:
        reference = c.digest(endpoint=cluster.nodes["n1"].grpc)
    with cluster.client("n4") as c:
        wait_for(lambda: c.digest(endpoint=n4.grpc).digest == reference.digest
                 or c.digest(endpoint=n4.grpc).applied_index > reference.applied_index, 30,
                 "n4's digest to match")
