"""Leader-side builders of the encryption control commands, for the encryption admin.

Each builder runs on the leader, on a gRPC thread, under the admin lock, and returns a command
already checked against a consistent copy of the replicated state (`EncryptionLayerAccess.view`)
with the same rules apply uses, so nothing that would halt a replica is ever proposed: a
command that could not apply raises `ProposalRefused` (FAILED_PRECONDITION). Fresh data keys
are drawn and wrapped by the layer; this module never sees the KEK.
"""
from __future__ import annotations

from .commands import (
    SUB_ENABLE_RAFT, SUB_ENABLE_STORAGE, SUB_RETIRE, SUB_ROTATE, BootstrapCommand, RotationCommand,
    WriterRow,
)
from .layer import NEW_KEY_EPOCH, EncryptionLayerAccess, EncryptionView
from .nonce import full_node_id
from .purpose import PURPOSE_STORAGE
from .state import EncryptionState, ProposalRefused


def bootstrap_command(layer: EncryptionLayerAccess,
                      member_raft_ids: list[str]) -> BootstrapCommand:
    """Builds a checked BOOTSTRAP with fresh keys and the writer rows of every member at
    `NEW_KEY_EPOCH`."""
    state = layer.view().state
    storage_id, raft_id = _next_key_ids(state, 2)
    rows = tuple(WriterRow(dek_id, full_node_id(member), NEW_KEY_EPOCH)
                 for member in sorted(set(member_raft_ids))
                 for dek_id in (storage_id, raft_id))
    command = BootstrapCommand(storage_id, layer.new_wrapped_key(), raft_id,
                               layer.new_wrapped_key(), rows)
    state.check_bootstrap(command, layer.unwrap)
    return command


def rotation_command(layer: EncryptionLayerAccess, purpose: int) -> RotationCommand:
    """Builds a checked key rotation for `purpose` (1 storage, 2 raft)."""
    view = layer.view()
    (dek_id,) = _next_key_ids(view.state, 1)
    command = RotationCommand(SUB_ROTATE, dek_id, purpose, layer.new_wrapped_key(),
                              WriterRow(dek_id, view.full_node_id, NEW_KEY_EPOCH))
    view.state.check_rotation(command, layer.unwrap)
    return command


def cutover_command(view: EncryptionView, purpose: int) -> RotationCommand:
    """Builds a checked envelope cutover for `purpose`, with this node's real epoch.

    Raises `AlreadyActive` (with the original cutover index) when the envelope is on.
    """
    dek_id = view.state.active[purpose]
    epoch = view.local_epoch(dek_id) or 0
    sub_tag = SUB_ENABLE_STORAGE if purpose == PURPOSE_STORAGE else SUB_ENABLE_RAFT
    command = RotationCommand(sub_tag, dek_id or 1, purpose, b"",
                              WriterRow(dek_id or 1, view.full_node_id, epoch))
    view.state.check_rotation(command)
    return command


def retire_command(view: EncryptionView, key_id: int) -> RotationCommand:
    """Builds a checked retirement of `key_id` (ROTATION sub-tag 0x03)."""
    state = view.state
    key = state.keys.get(key_id)
    if key is None:
        raise ProposalRefused(f"no key {key_id}" + (" (already retired)"
                                                    if key_id in state.retired else ""))
    command = RotationCommand(SUB_RETIRE, key_id, key.purpose, b"",
                              WriterRow(key_id, view.full_node_id, view.local_epoch(key_id) or 0))
    state.check_rotation(command)
    return command


def _next_key_ids(state: EncryptionState, count: int) -> list[int]:
    start = max(set(state.keys) | state.retired, default=0) + 1
    return list(range(start, start + count))
