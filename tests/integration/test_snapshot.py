"""Backup and restore: `sealkv snapshot save|status|restore` against real clusters (TLS).

A snapshot saved while a thread writes holds every write acknowledged before the save began;
`status` checks the file's SHA-256 and refuses a damaged one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat

import pytest

from click.testing import CliRunner

from sealkv.node.cli.main import register_commands
from sealkv.node.client import SERIALIZABLE
from sealkv.node.state.storage.lmdb_store import LmdbStore
from tests.cluster import wait_for
from tests.damage import flip_bits, middle
from tests.integration.test_canary import read_all
from tests.load import Writer

pytestmark = pytest.mark.integration

ROOT = register_commands()


def cli(args, cluster, env=None):
    """Runs the `sealkv` CLI as the cluster's `root` (admin) identity."""
    return CliRunner().invoke(ROOT, args, env=dict(cluster.cli_env(), **(env or {})))


def save_under_load(cluster, path, seed: dict[bytes, bytes]):
    """Writes `seed`, then saves a snapshot to `path` while a writer thread runs; returns
    (the CLI result, every pair acknowledged before the save began)."""
    with cluster.client() as c:
        for key, value in seed.items():
            c.put(key, value)
    with Writer(cluster.client(), first=20) as writer:
        before = {**seed, **dict(writer.acked)}
        result = cli(["-w", "json", "--endpoints", cluster.nodes["n2"].grpc, "snapshot", "save",
                      str(path)], cluster)
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
    shutil.copyfile(path, damaged)
    flip_bits(damaged, middle(damaged), 0x01)
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


@contextlib.contextmanager
def restored_cluster(cluster, data_dir):
    """Starts the cluster restored into `data_dir` with `sealkv cluster up`; yields a client
    (root identity of the restored cluster); always stops it (`cluster down`)."""
    from sealkv.node.cli import local
    from sealkv.node.client import Client
    from sealkv.node.security.tls import client_kwargs

    try:
        result = cli(["-w", "json", "cluster", "up", "--data-dir", str(data_dir), "--wait",
                      "90"], cluster)
        assert result.exit_code == 0, result.output
        record = local.LocalCluster.load(str(data_dir))
        with Client(record.endpoints, timeout=10, **client_kwargs(record.client_files())) as c:
            yield c, record
    finally:
        cli(["cluster", "down", "--data-dir", str(data_dir)], cluster)


def test_restore_into_a_new_cluster_reads_back_every_acknowledged_key(make_cluster, tmp_path):
    cluster = make_cluster(3)
    seed = {b"seed/%03d" % i: b"value-%03d" % i for i in range(50)}
    path = tmp_path / "backup.db"
    result, before = save_under_load(cluster, path, seed)
    assert result.exit_code == 0, result.output
    revision = json.loads(result.output)["revision"]

    # A damaged copy is refused and writes nothing.
    damaged = tmp_path / "damaged.db"
    shutil.copyfile(path, damaged)
    flip_bits(damaged, -200, 0x01)
    refused_dir = tmp_path / "refused"
    result = cli(["snapshot", "restore", str(damaged), "--data-dir", str(refused_dir)], cluster)
    assert result.exit_code == 1, result.output
    assert "checksum does not match" in result.output and "nothing was written" in result.output
    assert not refused_dir.exists()
    assert not [p for p in os.listdir(tmp_path) if "restoring" in p]

    restored = tmp_path / "restored"
    result = cli(["-w", "json", "snapshot", "restore", str(path), "--data-dir", str(restored),
                  "--nodes", "3"], cluster)
    assert result.exit_code == 0, result.output
    built = json.loads(result.output)
    assert built["revision"] == revision and len(built["nodes"]) == 3
    with open(cluster.secret_file, "rb") as old, open(restored / "secret", "rb") as new:
        assert old.read() != new.read(), "the restored cluster must have its own secret"

    with restored_cluster(cluster, restored) as (client, record):
        got = read_all(client, b"load/")
        got.update(read_all(client, b"seed/"))
        missing = [k for k in before if got.get(k) != before[k]]
        assert not missing, missing[:10]
        members = client.member_list().members
        assert sorted(m.grpc_address for m in members) == sorted(record.endpoints)
        put = client.put(b"after/restore", b"new")
        assert put.header.revision > revision
        assert client.get(b"after/restore").kv.value == b"new"
        for endpoint in record.endpoints:  # every member applied the new write
            wait_for(lambda: client.get(b"after/restore", consistency=SERIALIZABLE,
                                        endpoint=endpoint).found, 30, f"{endpoint} caught up")
    # The old cluster goes on, unaffected.
    with cluster.client() as c:
        assert c.get(b"seed/001").kv.value == b"value-001"
        assert not c.get(b"after/restore").found


def test_encrypted_backup_restores_under_new_keys_and_never_reuses_a_nonce(make_cluster,
                                                                            tmp_path):
    from sealkv.plugins.encryption import envelope
    from sealkv.plugins.encryption.kek import load_kek_provider
    from sealkv.plugins.encryption.sidecar import read_sidecar
    from tests import canary
    from tests.integration.test_encryption_admin import write_kek
    from tests.integration.test_sidecar_crash import (both_envelopes_cluster, reused_nonces,
                                                       sealed_at_rest, sealed_in_journal)

    cluster = both_envelopes_cluster(make_cluster, tmp_path)
    kek = str(tmp_path / "kek")
    values = canary.make_canaries(600)
    seed = {b"canary/old/%04d" % i: v for i, v in enumerate(values[:200])}
    path = tmp_path / "backup.db"
    result, before = save_under_load(cluster, path, seed)
    assert result.exit_code == 0, result.output

    status = json.loads(cli(["-w", "json", "snapshot", "status", str(path)], cluster).output)
    assert status["encrypted"] is True and status["cleartext_values"] == 0, status
    assert status["plugins"]["encryption"]["wrapped_keys"] == 2
    # Values only as envelopes, keys only wrapped: no canary, no KEK, no data key in the file.
    assert canary.scan([str(tmp_path)]).keys() & set(values) == set()  # (backup.db included)
    raw = path.read_bytes()
    secret_bytes = [open(kek, "rb").read()]
    provider = load_kek_provider("file", path=kek)
    old_keys = read_sidecar(cluster.nodes["n1"].data_dir).keys
    assert sorted(old_keys) == [1, 2]
    for key in old_keys.values():
        assert key.wrapped.hex().encode() in raw  # the header carries plugin states as hex
        secret_bytes.append(provider.unwrap(key.wrapped))
    for secret in secret_bytes:
        assert secret not in raw and secret.hex().encode() not in raw

    # No KEK, or another one: refused, naming the fix; nothing written.
    target = tmp_path / "restored"
    result = cli(["snapshot", "restore", str(path), "--data-dir", str(target)], cluster)
    assert result.exit_code == 1 and "--kek-file" in result.output, result.output
    other = write_kek(tmp_path / "other-kek")
    result = cli(["snapshot", "restore", str(path), "--data-dir", str(target), "--kek-file",
                  other], cluster)
    assert result.exit_code == 1 and "cannot unwrap" in result.output, result.output
    assert not target.exists()

    result = cli(["-w", "json", "snapshot", "restore", str(path), "--data-dir", str(target),
                  "--kek-file", kek], cluster)
    assert result.exit_code == 0, result.output
    keys = json.loads(result.output)["restored"]["encryption"]
    new_storage, new_raft = keys["storage_key"], keys["raft_key"]
    assert {new_storage, new_raft}.isdisjoint({1, 2}) and new_raft == new_storage + 1
    for name in ("n1", "n2", "n3"):
        sidecar = read_sidecar(str(target / name))
        assert sidecar.active == {"storage": new_storage, "raft": new_raft}
        assert {k.local_epoch for k in sidecar.keys.values()} == {0}

    after_old = {b"canary/after-old/%04d" % i: v for i, v in enumerate(values[200:400])}
    after_new = {b"canary/after-new/%04d" % i: v for i, v in enumerate(values[400:500])}
    after_restart = {b"canary/restart/%04d" % i: v for i, v in enumerate(values[500:])}
    with restored_cluster(cluster, target) as (client, record):
        got = read_all(client, b"canary/old/")
        got.update(read_all(client, b"load/"))
        missing = [k for k in before if got.get(k) != before[k]]
        assert not missing, missing[:10]
        # Both clusters keep running and writing.
        for key, value in after_new.items():
            client.put(key, value)
        with cluster.client() as old:
            for key, value in after_old.items():
                old.put(key, value)
        # A restart of the restored cluster: epochs move on (1 -> 2), nothing repeats.
        down = cli(["cluster", "down", "--data-dir", str(target)], cluster)
        assert down.exit_code == 0, down.output
        up = cli(["cluster", "up", "--data-dir", str(target), "--wait", "90"], cluster)
        assert up.exit_code == 0, up.output
        for key, value in after_restart.items():
            client.put(key, value)
        got = read_all(client, b"canary/after-new/")
        got.update(read_all(client, b"canary/restart/"))
        assert got == {**after_new, **after_restart}
        for endpoint in record.endpoints:
            wait_for(lambda: client.get(max(after_restart), consistency=SERIALIZABLE,
                                        endpoint=endpoint).found, 30, f"{endpoint} caught up")
        new_dirs = [n.data_dir for n in record.nodes]
    cluster.stop_all()
    old_dirs = [n.data_dir for n in cluster.nodes.values()]

    at_rest, in_log = [], []
    for data_dir in old_dirs + new_dirs:
        at_rest += sealed_at_rest(data_dir)
        in_log += sealed_in_journal(data_dir, {2, new_raft})
    assert reused_nonces(at_rest) == [] and reused_nonces(in_log) == []
    assert reused_nonces(at_rest + in_log) == []
    # Every write of the restored cluster is sealed under its new keys, never the old ones.
    for data_dir in new_dirs:
        store = LmdbStore(os.path.join(data_dir, "db"))
        store.open()
        try:
            ids = {envelope.parse(e.value).key_id for k, e in store.dump()
                   if k.startswith((b"canary/after-new/", b"canary/restart/"))}
        finally:
            store.close()
        assert ids == {new_storage}, (data_dir, ids)
        assert read_sidecar(data_dir).keys[new_storage].local_epoch == 2  # two starts
        assert {envelope.parse(p).key_id for p in sealed_in_journal(data_dir, {2, new_raft})} \
            == {new_raft}
    assert not canary.scan(new_dirs + old_dirs).keys() & set(values)
