"""Backup and restore: `sealkv snapshot save|status|restore` against real clusters (TLS).

A snapshot saved while a thread writes holds every write acknowledged before the save began;
`status` checks the file's SHA-256 and refuses a damaged one.
"""
from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from click.testing import CliRunner

from sealkv.node import errors
from sealkv.node.cli.main import register_commands

pytestmark = pytest.mark.integration

ROOT = register_commands()


def cli(args, cluster, env=None):
    """Runs the `sealkv` CLI as the cluster's `root` (admin) identity."""
    return CliRunner().invoke(ROOT, args, env=dict(cluster.cli_env(), **(env or {})))


class Writer(threading.Thread):
    """Puts `load/NNNNNN` keys one after another until stopped; records what was
    acknowledged, and when."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: dict[bytes, bytes] = {}
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        with self.cluster.client() as client:
            i = 0
            while not self.stop.is_set():
                key, value = b"load/%06d" % i, os.urandom(16).hex().encode()
                try:
                    client.put(key, value)
                except errors.SealkvError:
                    self.errors += 1
                    continue
                self.acked[key] = value
                i += 1

    def snapshot_of_acked(self) -> dict[bytes, bytes]:
        return dict(self.acked)


def save_under_load(cluster, path, seed: dict[bytes, bytes]):
    """Writes `seed`, then saves a snapshot to `path` while a writer thread runs; returns
    (the CLI result, every pair acknowledged before the save began)."""
    with cluster.client() as c:
        for key, value in seed.items():
            c.put(key, value)
    writer = Writer(cluster)
    writer.start()
    try:
        while len(writer.acked) < 20:
            writer.stop.wait(0.05)
        before = {**seed, **writer.snapshot_of_acked()}
        result = cli(["-w", "json", "--endpoints", cluster.nodes["n2"].grpc, "snapshot", "save",
                      str(path)], cluster)
    finally:
        writer.stop.set()
        writer.join(30)
    return result, before


def test_save_under_load_then_status_and_a_damaged_file(make_cluster, tmp_path):
    cluster = make_cluster(3)
    seed = {b"seed/%03d" % i: b"value-%03d" % i for i in range(50)}
    path = tmp_path / "backup.db"
    result, before = save_under_load(cluster, path, seed)
    assert result.exit_code == 0, result.output
    saved = json.loads(result.output)
    assert saved["file"] == str(path) and saved["node"] == "n2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(str(path) + ".part")
    with open(os.path.join(cluster.nodes["n2"].data_dir, "audit", "audit.log")) as f:
        audited = [json.loads(line) for line in f]
    acts = [(r["event"], r.get("code")) for r in audited
            if r["method"] == "/sealkv.v1.Cluster/Snapshot"]
    assert acts == [("request", ""), ("outcome", "OK")], acts

    result = cli(["-w", "json", "snapshot", "status", str(path)], cluster)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["checksum"] == "ok" and status["sha256"] == saved["sha256"]
    assert status["revision"] == saved["revision"] > 0
    assert status["keys"] >= len(before) and status["total_size"] == os.path.getsize(path)
    assert status["encrypted"] is False and status["format_version"] == 1
    assert status["cleartext_values"] == status["keys"]
    assert sorted(status["members"]) == ["n1", "n2", "n3"]

    table = cli(["-w", "table", "snapshot", "status", str(path)], cluster)
    assert table.exit_code == 0 and saved["sha256"] in table.output, table.output
    assert "| CHECKSUM" in table.output and "ENCRYPTED" in table.output

    damaged = tmp_path / "damaged.db"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    result = cli(["snapshot", "status", str(damaged)], cluster)
    assert result.exit_code == 1
    assert "checksum does not match" in result.output, result.output

    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(path.read_bytes()[:-100])
    result = cli(["snapshot", "status", str(truncated)], cluster)
    assert result.exit_code == 1 and "checksum does not match" in result.output, result.output


def test_save_needs_the_admin_role(make_cluster, tmp_path):
    cluster = make_cluster(1)
    files = cluster.client_files("writer", "readwrite")
    path = tmp_path / "backup.db"
    result = cli(["snapshot", "save", str(path)], cluster, env={
        "SEALKV_ENDPOINTS": cluster.nodes["n1"].grpc, "SEALKV_CACERT": files.cacert,
        "SEALKV_CERT": files.cert, "SEALKV_KEY": files.key})
    assert result.exit_code == 1, result.output
    assert "needs role admin" in result.output
    assert not path.exists() and not os.path.exists(str(path) + ".part")
