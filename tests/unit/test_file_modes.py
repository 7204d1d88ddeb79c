"""Data directory modes: every directory 0700 and every file 0600, whatever was there."""
from __future__ import annotations

import os
import stat

import pytest

from sealkv.node import file_modes


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_tightens_a_loose_tree_and_reports_what_it_changed(tmp_path):
    data = tmp_path / "data"
    (data / "raft").mkdir(parents=True)
    (data / "raft" / "raft.journal").write_bytes(b"x")
    (data / "keep").write_bytes(b"y")
    os.chmod(data, 0o755)
    os.chmod(data / "raft", 0o777)
    os.chmod(data / "raft" / "raft.journal", 0o644)
    os.chmod(data / "keep", 0o600)
    os.symlink("/etc/hostname", data / "link")
    report = file_modes.tighten_data_dir(str(data))
    assert mode(data) == 0o700 and mode(data / "raft") == 0o700
    assert mode(data / "raft" / "raft.journal") == 0o600
    assert sorted(report.changed) == sorted([(str(data), 0o755), (str(data / "raft"), 0o777),
                                             (str(data / "raft" / "raft.journal"), 0o644)])
    assert report.symlinks == [str(data / "link")]
    assert file_modes.tighten_data_dir(str(data)).changed == []


def test_secure_data_dir_restricts_the_umask_for_everything_created_later(tmp_path):
    previous = os.umask(0o022)
    try:
        file_modes.secure_data_dir(str(tmp_path / "d"))
        os.makedirs(tmp_path / "d" / "sub")
        with open(tmp_path / "d" / "sub" / "f", "wb") as f:
            f.write(b"z")
        assert mode(tmp_path / "d") == 0o700
        assert mode(tmp_path / "d" / "sub") == 0o700
        assert mode(tmp_path / "d" / "sub" / "f") == 0o600
    finally:
        os.umask(previous)


def test_a_path_whose_mode_cannot_change_is_named_with_the_fix(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o700)
    (tmp_path / "f").write_bytes(b"x")
    os.chmod(tmp_path / "f", 0o644)

    def refuse(path, mode):  # an OS refusal (another owner, a read-only mount): for tests only
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(file_modes.os, "chmod", refuse)
    with pytest.raises(file_modes.DataDirModeError) as info:
        file_modes.tighten_data_dir(str(tmp_path))
    assert f"chmod 0600 {tmp_path / 'f'}" in str(info.value)
