"""Tests of the sidecar: validation, round trip, crash-safe replacement, the fsync probe."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption import sidecar as sidecar_module
from sealkv.plugins.encryption.sidecar import (
    Sidecar, SidecarError, SidecarKey, probe_directory_fsync, read_sidecar, sidecar_path,
    write_sidecar,
)


def _sample(epoch=3) -> Sidecar:
    return Sidecar(
        raft_applied_index=12, storage_envelope_active=True,
        storage_envelope_cutover_index=10, raft_envelope_cutover_index=0,
        active={"storage": 1, "raft": 2},
        keys={1: SidecarKey("storage", b"\x01" * 60, 7, epoch),
              2: SidecarKey("raft", b"\x02" * 60, 7, 1)})


def test_round_trip_and_mode(tmp_path):
    write_sidecar(str(tmp_path), _sample())
    assert read_sidecar(str(tmp_path)) == _sample()
    mode = stat.S_IMODE(os.stat(sidecar_path(str(tmp_path))).st_mode)
    assert mode == 0o600
    document = json.loads(open(sidecar_path(str(tmp_path))).read())
    assert set(document["keys"]) == {"1", "2"} and document["active"] == {"storage": 1, "raft": 2}


def test_missing_sidecar_reads_as_none(tmp_path):
    assert read_sidecar(str(tmp_path)) is None


def _mutated(change):
    document = json.loads(_sample().to_json())
    change(document)
    return json.dumps(document).encode()


@pytest.mark.parametrize("change", [
    lambda d: d["keys"].update({"0": d["keys"]["1"]}),
    lambda d: d["keys"].update({"01": d["keys"]["1"]}),
    lambda d: d["keys"].update({"x": d["keys"]["1"]}),
    lambda d: d["keys"]["1"].update(purpose="backup"),
    lambda d: d["keys"]["1"].update(wrapped="***"),
    lambda d: d["keys"]["1"].update(local_epoch=0x10000),
    lambda d: d["active"].update(storage=5),
    lambda d: d["active"].update(storage=2),
    lambda d: d["active"].pop("raft"),
    lambda d: d.update(version=2),
    lambda d: d.update(raft_applied_index=-1),
    lambda d: d.update(storage_envelope_active=False),
    lambda d: d.update(extra=1),
])
def test_invalid_content_is_refused_on_read(tmp_path, change):
    directory = tmp_path / "encryption"
    directory.mkdir()
    (directory / "keys.json").write_bytes(_mutated(change))
    with pytest.raises(SidecarError):
        read_sidecar(str(tmp_path))


def test_invalid_content_is_refused_before_write(tmp_path):
    write_sidecar(str(tmp_path), _sample())
    bad = _sample()
    bad.active["raft"] = 1  # a storage key cannot be the active raft key
    with pytest.raises(SidecarError):
        write_sidecar(str(tmp_path), bad)
    assert read_sidecar(str(tmp_path)) == _sample()


def test_crash_between_temp_write_and_rename_keeps_old_file(tmp_path, monkeypatch):
    data_dir = str(tmp_path)
    write_sidecar(data_dir, _sample(epoch=3))

    def crash(src, dst):
        raise OSError(errno.EIO, "simulated power loss before rename")

    monkeypatch.setattr(sidecar_module.os, "replace", crash)
    with pytest.raises(OSError):
        write_sidecar(data_dir, _sample(epoch=4))
    monkeypatch.undo()
    temp = os.path.join(data_dir, "encryption", "keys.json.tmp")
    assert os.path.exists(temp)  # the crash left the temp file behind
    assert read_sidecar(data_dir).keys[1].local_epoch == 3  # the old sidecar is intact
    write_sidecar(data_dir, _sample(epoch=5))  # exclusive create still succeeds
    assert read_sidecar(data_dir).keys[1].local_epoch == 5
    assert not os.path.exists(temp)


def test_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(sidecar_module.os, "fsync", spy)
    os.makedirs(tmp_path / "encryption")
    write_sidecar(str(tmp_path), _sample())
    assert synced == [False, True]  # the temp file, then the directory after the rename


def test_probe_refuses_a_filesystem_without_directory_fsync(tmp_path, monkeypatch):
    probe_directory_fsync(str(tmp_path))
    real_fsync = os.fsync

    def no_dir_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(sidecar_module.os, "fsync", no_dir_fsync)
    with pytest.raises(StartupRefused, match="cannot fsync a directory"):
        probe_directory_fsync(str(tmp_path))


def test_sidecar_of_records_the_state_and_this_nodes_epochs():
    from sealkv.plugins.encryption.purpose import PURPOSE_RAFT, PURPOSE_STORAGE
    from sealkv.plugins.encryption.state import EncryptionState, WrappedKey

    state = EncryptionState(keys={1: WrappedKey(PURPOSE_STORAGE, b"w1", 3),
                                  2: WrappedKey(PURPOSE_RAFT, b"w2", 3)},
                            active={PURPOSE_STORAGE: 1, PURPOSE_RAFT: 2},
                            storage_cutover_index=4, key_change_index=4)
    made = sidecar_module.sidecar_of(state, {1: 7})
    made.validate()
    assert (made.raft_applied_index, made.storage_envelope_cutover_index) == (4, 4)
    assert made.storage_envelope_active and made.active == {"storage": 1, "raft": 2}
    assert {k: (v.purpose, v.wrapped, v.created, v.local_epoch) for k, v in made.keys.items()} \
        == {1: ("storage", b"w1", 3, 7), 2: ("raft", b"w2", 3, 0)}
