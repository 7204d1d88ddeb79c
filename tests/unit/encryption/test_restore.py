"""The encryption state of a restored cluster: every key must unwrap under the given KEK, two
fresh keys become active above every id in use, the registry starts empty, epochs at 0."""
import os

import pytest

from sealkv.node.replication.dump_file import NO_OP_COMMAND, restored_log_base
from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption import restore
from sealkv.plugins.encryption.kek import LocalKEK
from sealkv.plugins.encryption.purpose import PURPOSE_RAFT, PURPOSE_STORAGE
from sealkv.plugins.encryption.sidecar import read_sidecar
from sealkv.plugins.encryption.state import EncryptionState, WrappedKey, WriterRecord

from .test_layer import write_kek


@pytest.fixture
def kek_bytes():
    return os.urandom(32)


def backed_up_state(kek: bytes) -> EncryptionState:
    local = LocalKEK(kek)
    state = EncryptionState()
    state.keys = {1: WrappedKey(PURPOSE_STORAGE, local.wrap(os.urandom(32)), 4),
                  2: WrappedKey(PURPOSE_RAFT, local.wrap(os.urandom(32)), 4),
                  3: WrappedKey(PURPOSE_STORAGE, local.wrap(os.urandom(32)), 40)}
    state.active = {PURPOSE_STORAGE: 3, PURPOSE_RAFT: 2}
    state.storage_cutover_index, state.raft_cutover_index = 6, 8
    state.retired = {7}
    state.registry = {(3, 0x1234): WriterRecord(0xABCD1234, 1, 5)}
    state.key_change_index = 40
    return state


def test_a_restore_rotates_both_keys_empties_the_registry_and_writes_fresh_epochs(
        tmp_path, kek_bytes):
    kek = write_kek(tmp_path / "kek", kek_bytes)
    before = backed_up_state(kek_bytes)
    restored = restore.restore_for_new_cluster(before.to_bytes(), 100, {"kek_file": kek})
    after = EncryptionState.from_bytes(restored.state)
    storage, raft = after.active_storage_id, after.active_raft_id
    assert storage > 7 and raft == storage + 1  # above every id in use, retired ones too
    assert after.keys[storage].created == after.keys[raft].created == 100
    assert LocalKEK(kek_bytes).unwrap(after.keys[storage].wrapped) != \
        LocalKEK(kek_bytes).unwrap(after.keys[3].wrapped)
    assert {k: after.keys[k] for k in (1, 2, 3)} == before.keys  # old keys stay, to read
    assert after.registry == {} and after.key_change_index == 100
    assert (after.storage_cutover_index, after.raft_cutover_index) == (6, 8)
    assert restored.summary["storage_key"] == storage
    restored.write_member_files(str(tmp_path / "n1"))
    sidecar = read_sidecar(str(tmp_path / "n1"))
    assert sidecar.active == {"storage": storage, "raft": raft}
    assert {k.local_epoch for k in sidecar.keys.values()} == {0}
    assert sidecar.raft_applied_index == 100


def test_two_restores_of_one_backup_draw_different_keys(tmp_path, kek_bytes):
    kek = write_kek(tmp_path / "kek", kek_bytes)
    raw = backed_up_state(kek_bytes).to_bytes()
    one = EncryptionState.from_bytes(restore.restore_for_new_cluster(raw, 100, {"kek_file": kek})
                                     .state)
    two = EncryptionState.from_bytes(restore.restore_for_new_cluster(raw, 100, {"kek_file": kek})
                                     .state)
    assert one.keys[one.active_storage_id].wrapped != two.keys[two.active_storage_id].wrapped


def test_the_restore_refuses_without_the_right_kek(tmp_path, kek_bytes):
    raw = backed_up_state(kek_bytes).to_bytes()
    with pytest.raises(StartupRefused, match="--kek-file"):
        restore.restore_for_new_cluster(raw, 100, {})
    other = write_kek(tmp_path / "other", os.urandom(32))
    with pytest.raises(StartupRefused, match="cannot unwrap storage key 1"):
        restore.restore_for_new_cluster(raw, 100, {"kek_file": other})


def test_an_unbootstrapped_state_is_kept_and_describes_itself():
    raw = EncryptionState().to_bytes()
    assert restore.restore_for_new_cluster(raw, 9, {}).state == raw
    assert restore.describe(raw)["encrypted"] is False


def test_the_restored_log_continues_after_the_state():
    last, previous = restored_log_base(77)
    assert last == (NO_OP_COMMAND, 77, 0) and previous == (NO_OP_COMMAND, 76, 0)
    assert restored_log_base(0)[0][1] == 2
