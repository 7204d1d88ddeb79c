"""Tests of the replicated encryption state: registry cases, bootstrap, rotation, snapshots."""
from __future__ import annotations

import pytest

from sealkv.node.errors import ApplyHalt
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption.commands import (
    BootstrapCommand, RegisterCommand, RotationCommand, WriterRow,
)
from sealkv.plugins.encryption.state import (
    AlreadyActive, AlreadyBootstrapped, EncryptionState, Outcome, ProposalRefused,
    StateDecodeError, WriterRecord,
)

W1, W2, W3 = b"\x01" * 60, b"\x02" * 60, b"\x03" * 60
NODE_A = 0xAAAA_0000_0000_1234
NODE_B = 0xBBBB_0000_0000_5678
NODE_A_TWIN = 0xCCCC_0000_0000_1234  # same node_id16 as NODE_A


class Installs:
    """Records installs; fails for blobs in `bad` (stands in for the KEK, for tests only)."""

    def __init__(self, bad=()):
        self.calls, self.bad = [], set(bad)

    def __call__(self, key_id, purpose, wrapped):
        if wrapped in self.bad:
            raise ValueError("does not unwrap")
        self.calls.append((key_id, purpose))


def unwrap(blob):
    if blob == b"\xee" * 60:
        raise ValueError("bad")
    return b"\x00" * 32


def bootstrap_cmd(rows=None):
    rows = rows if rows is not None else (WriterRow(1, NODE_A, 1), WriterRow(2, NODE_A, 1),
                                          WriterRow(1, NODE_B, 1), WriterRow(2, NODE_B, 1))
    return BootstrapCommand(1, W1, 2, W2, tuple(rows))


def bootstrapped() -> EncryptionState:
    state = EncryptionState()
    state.apply_bootstrap(5, bootstrap_cmd(), Installs())
    return state


def register(state, index, full, epoch, dek=1):
    return state.apply_register(index, RegisterCommand(WriterRow(dek, full, epoch)))


def test_registry_five_cases():
    state = bootstrapped()
    assert register(state, 6, NODE_A, 2).outcome is Outcome.APPLIED          # advance
    assert state.writer(1, 0x1234) == WriterRecord(NODE_A, 1, 2)
    assert register(state, 7, NODE_A, 2).outcome is Outcome.NOOP_REPLAY      # same epoch
    with pytest.raises(ApplyHalt, match="rolled back"):                     # lower epoch
        register(state, 8, NODE_A, 1)
    with pytest.raises(ApplyHalt, match="share a node_id16"):                # collision
        register(state, 9, NODE_A_TWIN, 5)
    assert state.writer(1, 0x1234) == WriterRecord(NODE_A, 1, 2)             # unchanged
    fresh = EncryptionState()
    fresh.apply_bootstrap(5, bootstrap_cmd(rows=()), Installs())
    register(fresh, 6, NODE_B, 4)                                            # insert
    assert fresh.writer(1, 0x5678) == WriterRecord(NODE_B, 4, 4)


def test_register_precheck_mirrors_apply():
    state = bootstrapped()
    assert state.check_register(RegisterCommand(WriterRow(1, NODE_A, 3))) == "advance"
    with pytest.raises(ProposalRefused):
        state.check_register(RegisterCommand(WriterRow(1, NODE_A_TWIN, 3)))
    with pytest.raises(ProposalRefused):
        state.check_register(RegisterCommand(WriterRow(9, NODE_A, 3)))
    with pytest.raises(ApplyHalt):
        register(state, 6, NODE_A, 3, dek=9)


def test_bootstrap_installs_keys_rows_and_replay_is_noop():
    installs = Installs()
    state = EncryptionState()
    assert state.apply_bootstrap(5, bootstrap_cmd(), installs).outcome is Outcome.APPLIED
    assert installs.calls == [(1, 1), (2, 2)]
    assert (state.active_storage_id, state.active_raft_id, state.key_change_index) == (1, 2, 5)
    assert state.keys[1].created == 5 and len(state.registry) == 4
    before = state.to_bytes()
    assert state.apply_bootstrap(9, bootstrap_cmd(), installs).outcome is Outcome.NOOP_REPLAY
    assert state.to_bytes() == before and len(installs.calls) == 2


def test_second_different_bootstrap_halts_and_is_refused_at_leader():
    state = bootstrapped()
    other = BootstrapCommand(3, W3, 4, W3, ())
    with pytest.raises(AlreadyBootstrapped):
        state.check_bootstrap(other, unwrap)
    with pytest.raises(ApplyHalt):
        state.apply_bootstrap(9, other, Installs())


def test_bootstrap_with_colliding_rows_is_refused_and_halts_without_change():
    rows = (WriterRow(1, NODE_A, 1), WriterRow(1, NODE_A_TWIN, 1))
    state = EncryptionState()
    with pytest.raises(ProposalRefused, match="node_id16"):
        state.check_bootstrap(bootstrap_cmd(rows), unwrap)
    installs = Installs()
    with pytest.raises(ApplyHalt):
        state.apply_bootstrap(5, bootstrap_cmd(rows), installs)
    assert state == EncryptionState() and installs.calls == []


def test_bootstrap_precheck_trial_unwraps():
    with pytest.raises(ProposalRefused, match="unwrap"):
        EncryptionState().check_bootstrap(BootstrapCommand(1, b"\xee" * 60, 2, W2, ()), unwrap)
    EncryptionState().check_bootstrap(bootstrap_cmd(), unwrap)


def test_failed_unwrap_at_apply_halts():
    state = EncryptionState()
    with pytest.raises(ApplyHalt, match="cannot install"):
        state.apply_bootstrap(5, bootstrap_cmd(), Installs(bad={W2}))
    assert not state.bootstrapped


def cutover(dek=1, full=NODE_A, epoch=1, sub=c.SUB_ENABLE_STORAGE, purpose=1):
    return RotationCommand(sub, dek, purpose, b"", WriterRow(dek, full, epoch))


def test_storage_cutover_fresh_then_already_active_keeps_index():
    state = bootstrapped()
    state.check_rotation(cutover(epoch=2))
    result = state.apply_rotation(10, cutover(epoch=2), Installs())
    assert (result.outcome, result.index) == (Outcome.APPLIED, 10)
    assert state.storage_envelope_active and state.storage_cutover_index == 10
    assert state.writer(1, 0x1234).last_epoch == 2  # registry row applied with the cutover
    again = state.apply_rotation(20, cutover(epoch=2), Installs())
    assert (again.outcome, again.index) == (Outcome.ALREADY_ACTIVE, 10)
    assert state.storage_cutover_index == 10
    with pytest.raises(AlreadyActive) as already:
        state.check_rotation(cutover(epoch=2))
    assert already.value.cutover_index == 10


def test_raft_cutover():
    state = bootstrapped()
    result = state.apply_rotation(11, cutover(dek=2, sub=c.SUB_ENABLE_RAFT, purpose=2),
                                  Installs())
    assert result.outcome is Outcome.APPLIED and state.raft_cutover_index == 11
    assert not state.storage_envelope_active


def test_cutover_raced_by_rotation_is_consumed_without_effect():
    state = bootstrapped()
    rotate = RotationCommand(c.SUB_ROTATE, 3, 1, W3, WriterRow(3, NODE_B, 1))
    state.check_rotation(rotate, unwrap)
    assert state.apply_rotation(8, rotate, Installs()).outcome is Outcome.APPLIED
    assert state.active_storage_id == 3 and state.keys[3].created == 8
    stale = cutover(dek=1)
    with pytest.raises(ProposalRefused, match="no longer"):
        state.check_rotation(stale)
    before = state.to_bytes()
    assert state.apply_rotation(9, stale, Installs()).outcome is Outcome.STALE_CONSUMED
    assert state.to_bytes() == before


def test_malformed_cutovers_halt():
    with pytest.raises(ApplyHalt, match="before bootstrap"):
        EncryptionState().apply_rotation(3, cutover(), Installs())
    state = bootstrapped()
    with pytest.raises(ApplyHalt):
        state.apply_rotation(9, cutover(dek=2), Installs())    # raft key, storage cutover
    with pytest.raises(ApplyHalt):
        state.apply_rotation(9, cutover(dek=77), Installs())   # unknown key
    with pytest.raises(ApplyHalt, match="share"):
        state.apply_rotation(9, cutover(full=NODE_A_TWIN), Installs())
    assert not state.storage_envelope_active


def test_rotation_key_reuse_refused_and_replay_noop():
    state = bootstrapped()
    reuse = RotationCommand(c.SUB_ROTATE, 2, 1, W3, WriterRow(2, NODE_A, 1))
    with pytest.raises(ProposalRefused, match="in use"):
        state.check_rotation(reuse, unwrap)
    with pytest.raises(ApplyHalt, match="in use"):
        state.apply_rotation(9, reuse, Installs())
    rotate = RotationCommand(c.SUB_ROTATE, 3, 2, W3, WriterRow(3, NODE_A, 1))
    state.apply_rotation(9, rotate, Installs())
    assert state.apply_rotation(10, rotate, Installs()).outcome is Outcome.NOOP_REPLAY
    bad = RotationCommand(c.SUB_ROTATE, 4, 2, b"\xee" * 60, WriterRow(4, NODE_A, 1))
    with pytest.raises(ProposalRefused, match="unwrap"):
        state.check_rotation(bad, unwrap)


def test_snapshot_round_trip_is_deterministic():
    state = bootstrapped()
    register(state, 6, NODE_A, 4)
    state.apply_rotation(7, cutover(epoch=4), Installs())
    state.apply_rotation(8, RotationCommand(c.SUB_ROTATE, 3, 2, W3, WriterRow(3, NODE_B, 1)),
                         Installs())
    data = state.to_bytes()
    copy = EncryptionState.from_bytes(data)
    assert copy == state and copy.to_bytes() == data
    assert copy.keys[3].wrapped == W3  # a late joiner gets every wrapped key
    assert EncryptionState.from_bytes(b"") == EncryptionState()


def test_snapshot_decoder_rejects_damage():
    data = bootstrapped().to_bytes()
    for cut in range(1, len(data)):
        with pytest.raises(StateDecodeError):
            EncryptionState.from_bytes(data[:cut])
    with pytest.raises(StateDecodeError):
        EncryptionState.from_bytes(data + b"\x00")
    with pytest.raises(StateDecodeError):
        EncryptionState.from_bytes(b"\x02" + data[1:])
