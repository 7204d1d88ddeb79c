"""The backup file: written atomically from a state machine's snapshot pieces, read back
record by record, and refused when a byte changed or it was cut short."""
import os
import stat

import pytest

from sealkv.node.state import commands as cmd
from sealkv.node.state.backup_file import BackupError, BackupReader, BackupWriter, summarize
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.lmdb_store import LmdbStore
from tests.damage import flip_bits


class _Opaque:
    """A plugin state that keeps bytes as they are (for tests only)."""

    def __init__(self, data: bytes = b""):
        self.data = data

    def snapshot_state(self) -> bytes:
        return self.data

    def restore_state(self, data: bytes) -> None:
        self.data = data


@pytest.fixture
def machine(tmp_path):
    store = LmdbStore(str(tmp_path / "db"), sync=False)
    store.open()
    sm = StateMachine(store, plugin_states={"demo": _Opaque(b"\x01\x02")})
    for i in range(1, 200):
        sm.apply(i, cmd.encode(cmd.Put(b"k/%03d" % i, os.urandom(40))))
    sm.apply(200, cmd.encode(cmd.Put(b"L" * 600, b"long key")))
    yield sm
    store.close()


def save(sm, path) -> str:
    with BackupWriter(str(path)) as out, sm.snapshot_view() as (header, pieces):
        out.write_meta({"applied_index": header["applied_index"], "term": 3, "node": "n1"})
        for piece in pieces:
            out.write_body(piece)
        return out.commit()


def test_round_trip_holds_every_record_and_the_state(machine, tmp_path):
    path = tmp_path / "b.db"
    digest = save(machine, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(str(path) + ".part")
    with BackupReader(str(path)) as reader:
        assert reader.applied_index == 200 and reader.meta["term"] == 3
        assert reader.state["plugins"] == {"demo": b"\x01\x02"}
        records = dict(reader.records())
        assert reader.verify() == digest
    with machine.read_view():
        assert records == dict(machine.base.scan(b"", None))
    summary = summarize(str(path))
    assert summary["keys"] == 200 and summary["checksum"] == "ok"
    assert summary["cleartext_values"] == 200 and summary["sealed_values"] == 0


@pytest.mark.parametrize("where", [12, 40, 0.5, -40, -1])
def test_a_changed_byte_is_a_checksum_mismatch(machine, tmp_path, where):
    path = tmp_path / "b.db"
    save(machine, path)
    at = int(path.stat().st_size * where) if isinstance(where, float) else where
    flip_bits(path, at, 0x20)
    with pytest.raises(BackupError, match="checksum does not match"):
        summarize(str(path))


def test_truncated_and_foreign_files_are_refused(machine, tmp_path):
    path = tmp_path / "b.db"
    save(machine, path)
    cut = tmp_path / "cut.db"
    cut.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(BackupError, match="checksum does not match"):
        summarize(str(cut))
    other = tmp_path / "other.db"
    other.write_bytes(b"not a backup at all, but long enough to have a header and a digest")
    with pytest.raises(BackupError, match="not a sealkv backup"):
        summarize(str(other))


def test_an_aborted_save_leaves_the_old_file(machine, tmp_path):
    path = tmp_path / "b.db"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with BackupWriter(str(path)) as out:
            out.write_meta({})
            raise RuntimeError("stream broke")
    assert path.read_bytes() == b"previous"
    assert not os.path.exists(str(path) + ".part")
