"""`sealkv snapshot restore` without processes: what it builds from a backup (record, secret,
per-member database at the backup's index with the new members, a dump whose log continues
after it), and that a refused restore leaves nothing behind."""
import json
import os
import shutil

import pytest

from sealkv.node.cli import local
from sealkv.node.cli.restore import DUMP_NAME, RestoreError, restore
from sealkv.node.replication.dump_file import DUMP_MAGIC
from sealkv.node.state import commands as cmd
from sealkv.node.state.backup_file import BackupError, BackupWriter
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.lmdb_store import LmdbStore
from tests.damage import flip_bits, middle


def make_backup(tmp_path, plugins=None) -> str:
    store = LmdbStore(str(tmp_path / "source"), sync=False)
    store.open()
    try:
        sm = StateMachine(store)
        sm.apply(1, cmd.encode(cmd.MemberSet("old1", "10.0.0.1:1", "10.0.0.1:2",
                                             cmd.ROLE_VOTER)))
        for i in range(2, 60):
            sm.apply(i, cmd.encode(cmd.Put(b"k/%03d" % i, b"v%d" % i)))
        path = str(tmp_path / "backup.db")
        with BackupWriter(path) as out, sm.snapshot_view() as (header, pieces):
            if plugins is not None:
                header["plugins"] = plugins
            out.write_meta({"applied_index": header["applied_index"], "term": 2})
            for piece in pieces:
                out.write_body(piece)
            out.commit()
        return path
    finally:
        store.close()


def run(backup, target, **kw):
    args = dict(nodes=3, base_port=None, insecure=True, fsync="always", plugin_options={},
                kek_record={})
    args.update(kw)
    return restore(backup, str(target), **args)


def test_restore_builds_every_member_at_the_backup_index(tmp_path):
    backup = make_backup(tmp_path)
    done = run(backup, tmp_path / "restored")
    assert done.applied_index == 59 and done.keys == 58
    record = local.LocalCluster.load(str(tmp_path / "restored"))
    assert [n.name for n in record.nodes] == ["n1", "n2", "n3"] and record.plugins == []
    assert os.stat(record.secret_file).st_mode & 0o077 == 0
    for node in record.nodes:
        assert os.stat(node.data_dir).st_mode & 0o777 == 0o700
        store = LmdbStore(os.path.join(node.data_dir, "db"))
        store.open()
        try:
            sm = StateMachine(store)
            assert sm.load() == 59
            members, version = sm.member_directory()
            assert sorted(members) == ["n1", "n2", "n3"] and version == 59
            assert members[node.name].raft_address == node.raft
            assert sm.get(b"k/042")[0].value == b"v42"
        finally:
            store.close()
        with open(os.path.join(node.data_dir, DUMP_NAME), "rb") as f:
            assert f.read(len(DUMP_MAGIC)) == DUMP_MAGIC
            meta = json.loads(f.read(int.from_bytes(f.read(4), "big")))
        assert meta["last"][1:] == [59, 0] and meta["previous"][1:] == [58, 0]
        assert meta["cluster"] == sorted(n.raft for n in record.nodes)


def test_a_refused_restore_writes_nothing(tmp_path):
    backup = make_backup(tmp_path)
    damaged = tmp_path / "damaged.db"
    shutil.copyfile(backup, damaged)
    flip_bits(damaged, middle(damaged), 0x01)
    with pytest.raises(BackupError, match="checksum does not match"):
        run(str(damaged), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("x")
    with pytest.raises(RestoreError, match="not empty"):
        run(backup, tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["keep"]
    (tmp_path / "p").mkdir()
    foreign = make_backup(tmp_path / "p", plugins={"no-such-layer": b"x"})
    with pytest.raises(RestoreError, match="not installed"):
        run(foreign, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b", "backup.db", "damaged.db", "p", "source"]


def test_restore_with_named_members(tmp_path):
    from click.testing import CliRunner

    from sealkv.node.cli.main import register_commands

    backup = make_backup(tmp_path)
    target = tmp_path / "named"
    initial = "a=127.0.0.1:7001/127.0.0.1:7101,b=127.0.0.1:7002/127.0.0.1:7102"
    result = CliRunner().invoke(register_commands(), [
        "-w", "json", "snapshot", "restore", backup, "--data-dir", str(target),
        "--initial-cluster", initial, "--insecure"])
    assert result.exit_code == 0, result.output
    built = json.loads(result.output)
    assert [(n["name"], n["raft"], n["grpc"]) for n in built["nodes"]] == [
        ("a", "127.0.0.1:7001", "127.0.0.1:7101"), ("b", "127.0.0.1:7002", "127.0.0.1:7102")]
    store = LmdbStore(str(target / "b" / "db"))
    store.open()
    try:
        sm = StateMachine(store)
        assert sm.load() == 59
        members, _ = sm.member_directory()
    finally:
        store.close()
    assert sorted(members) == ["a", "b"]
    result = CliRunner().invoke(register_commands(), [
        "snapshot", "restore", backup, "--data-dir", str(tmp_path / "x"),
        "--initial-cluster", "a=learner/127.0.0.1:7101"])
    assert result.exit_code == 1 and "voters only" in result.output
    assert not (tmp_path / "x").exists()
