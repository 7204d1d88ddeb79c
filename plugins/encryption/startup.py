"""The encryption plugin's start-up checks: the refusals of ENCRYPTION.md §8.

Each function raises `StartupRefused` with a message that names the fix. They run on the
node's start-up thread:

- `load_kek` and `open_sidecar`: in `prepare_start`, before Raft replays anything (replay
  encrypts, so every new nonce epoch must be durable first).
- `check_replayed_state` and `check_membership_collisions`: in `start`, after the replay.

Nothing here logs a key or key bytes.
"""
from __future__ import annotations

import dataclasses
import errno
from typing import Any, Iterable, Mapping, Optional

from sealkv.node.replication.membership import MemberRecord, member_raft_id
from sealkv.plugins.api import StartupRefused

from .kek import KEKProvider, kek_of_check, load_kek_provider
from .keystore import KeyStore
from .nonce import MAX_EPOCH, full_node_id, node_id16
from .purpose import PURPOSE_BY_NAME
from .sidecar import (
    Sidecar, SidecarError, probe_directory_fsync, read_sidecar, sidecar_path, write_sidecar,
)
from .state import EncryptionState


NEXT_PREFIX = "next_"
KEK_OPTION_NAMES = ("kek_provider", "kek_file", "kek_env", "kek_options")


def load_kek(options: Mapping[str, Any], prefix: str = "") -> KEKProvider:
    """Loads the KEK provider named by the plugin options (`kek_provider`, default "file").

    With `prefix="next_"` the same options spelled `next_kek_provider`, `next_kek_file`,
    `next_kek_env`, `next_kek_options` are read instead (the staged next KEK): the provider
    runs the same checks (a file KEK must be a regular 0600/0400 file of 32 bytes).
    """
    provider = options.get(prefix + "kek_provider") or "file"
    if provider == "file":
        return load_kek_provider("file", path=options.get(prefix + "kek_file") or "")
    if provider == "env":
        return load_kek_provider("env", var=options.get(prefix + "kek_env") or "")
    return load_kek_provider(provider, **dict(options.get(prefix + "kek_options") or {}))


def load_next_kek(options: Mapping[str, Any]) -> Optional[KEKProvider]:
    """Loads the staged next KEK (`next_kek_*` options), or returns None when none is set.

    The next KEK is what `sealkv encryption rewrap-keys` moves the key table to; an operator
    stages it on every member by a rolling restart. Refuses (`StartupRefused`, naming the
    option) exactly like the current KEK does.
    """
    if not any(options.get(NEXT_PREFIX + name) for name in KEK_OPTION_NAMES):
        return None
    try:
        return load_kek(options, NEXT_PREFIX)
    except StartupRefused as refused:
        raise StartupRefused(f"the next KEK (--next-kek-*): {refused}") from None


def open_sidecar(data_dir: str, kek: KEKProvider, keystore: KeyStore,
                 next_kek: Optional[KEKProvider] = None) -> tuple[Sidecar, dict[int, int]]:
    """Reads the sidecar, unwraps its keys into `keystore` and bumps every epoch durably.

    Returns (the sidecar as it was found, this process's epoch per key id). Refuses when the
    directory cannot be fsynced, the sidecar is invalid, the KEK cannot unwrap a stored key,
    or the active key's epoch is exhausted. A sidecar rewrapped under a new KEK (it carries
    that KEK's check blob) is opened with whichever of `kek` and the staged `next_kek` is that
    KEK (a crash can leave it rewrapped before the rewrap is committed to the database);
    with neither, the refusal names the fix: configure the new KEK as the node's KEK.
    """
    probe_directory_fsync(data_dir)
    path = sidecar_path(data_dir)
    try:
        sidecar = read_sidecar(data_dir)
    except SidecarError as error:
        raise StartupRefused(f"{error}: restore {path} from a backup or resync it from the "
                             "leader (ResyncSidecar)") from None
    if sidecar is None:
        sidecar = Sidecar()
    found = dataclasses.replace(sidecar, keys=dict(sidecar.keys), active=dict(sidecar.active))
    active_ids = {key_id for key_id in sidecar.active.values() if key_id}
    epochs: dict[int, int] = {}
    opener = sidecar_kek(sidecar, kek, next_kek, path)
    for key_id, key in sorted(sidecar.keys.items()):
        try:
            dek = opener.unwrap(key.wrapped)
        except Exception:  # any unwrap failure is this refusal; the reason could carry bytes
            raise StartupRefused(
                f"the KEK ({kek.name}) cannot unwrap {key.purpose} key {key_id} in "
                f"{path}: start with the KEK this node was bootstrapped with") from None
        keystore.install(key_id, PURPOSE_BY_NAME[key.purpose], dek)
        epoch = min(key.local_epoch + 1, MAX_EPOCH)
        if epoch >= MAX_EPOCH and key_id in active_ids:
            raise StartupRefused(
                f"the nonce epoch of active {key.purpose} key {key_id} is exhausted: rotate "
                "the key from another member (RotateDEK), then start this node")
        sidecar.keys[key_id] = dataclasses.replace(key, local_epoch=epoch)
        epochs[key_id] = epoch
    if sidecar.keys:
        try:
            write_sidecar(data_dir, sidecar)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StartupRefused(f"cannot write {path} (the nonce epochs of this start): "
                                 f"{error.strerror}: free space on the data directory's "
                                 "disk, then start the node again") from None
    return found, epochs


def sidecar_kek(sidecar: Sidecar, kek: KEKProvider, next_kek: Optional[KEKProvider],
                path: str) -> KEKProvider:
    """Returns the KEK the sidecar's keys are wrapped under (see `open_sidecar`)."""
    found = kek_of_check(sidecar.kek_check, kek, next_kek)  # validated: no check at generation 0
    if found is None:
        raise StartupRefused(rewrapped_elsewhere(path, sidecar.kek_generation, kek))
    return found


def rewrapped_elsewhere(where: str, generation: int, kek: KEKProvider) -> str:
    """The refusal of a node whose KEK is not the one the key table was rewrapped under."""
    return (f"the key table in {where} was rewrapped under a new KEK (KEK generation "
            f"{generation}, by `sealkv encryption rewrap-keys`) and this node's KEK "
            f"({kek.name}) is not that KEK: configure the new KEK as this node's KEK "
            "(--kek-file / --kek-provider / --kek-option: the values staged as --next-kek-*) "
            "and restart")


def check_replayed_state(data_dir: str, found: Sidecar, state: EncryptionState,
                         epochs: Mapping[int, int], full_id: int) -> None:
    """Compares the replayed replicated state with the sidecar found at start.

    Refuses when the sidecar records key changes the log does not reach, a cutover index
    the log disagrees with, or a key the replicated state lacks (a rolled-back disk); when
    another node owns this node's node_id16; and when this node's epoch is not above its
    registry row (a disk restored from an old copy). The caller holds the state's lock.
    """
    path = sidecar_path(data_dir)
    if found.raft_applied_index > state.key_change_index:
        raise StartupRefused(
            f"{path} records key changes up to index {found.raft_applied_index} but the "
            f"log only reaches {state.key_change_index}: the Raft data was rolled back; "
            "restore a consistent data directory")
    for name, ours, theirs in (
            ("storage", found.storage_envelope_cutover_index, state.storage_cutover_index),
            ("raft", found.raft_envelope_cutover_index, state.raft_cutover_index)):
        if ours and ours != theirs:
            raise StartupRefused(
                f"{path} has the {name} cutover at index {ours}, the snapshot and log at "
                f"{theirs}: restore a consistent data directory")
    for key_id, key in found.keys.items():
        replicated = state.keys.get(key_id)
        # A sidecar from before a KEK rewrap holds other wrapped bytes of the same key (both
        # were unwrapped into one keystore, which refuses different key bytes for an id).
        rewrapped_since = found.kek_generation < state.kek_generation
        if replicated is None or (replicated.wrapped != key.wrapped and not rewrapped_since):
            raise StartupRefused(f"key {key_id} of {path} is not in the replicated state:"
                                 " restore a consistent data directory")
    mine = node_id16(full_id)
    for (dek_id, node16), record in state.registry.items():
        if node16 != mine:
            continue
        if record.full_node_id != full_id:
            raise StartupRefused(
                f"node_id16 0x{node16:04x} is registered to another member: two members "
                "share a node_id16; give this node a different raft id")
        epoch = epochs.get(dek_id)
        if epoch is not None and record.last_epoch >= epoch:
            raise StartupRefused(
                f"this node's epoch {epoch} for key {dek_id} is not above the registered "
                f"{record.last_epoch}: its disk was restored from an old copy; resync the"
                " sidecar (ResyncSidecar) before starting")


def check_membership_collisions(members: Iterable[MemberRecord], full_id: int) -> None:
    """Refuses to start when another known member shares this node's node_id16 (§4).

    Two such nodes would write nonces from the same space; the registry would halt every
    replica at their second registration.
    """
    mine = node_id16(full_id)
    for member in members:
        raft_id = member_raft_id(member)
        other = full_node_id(raft_id)
        if other != full_id and node_id16(other) == mine:
            raise StartupRefused(
                f"member {member.name} ({raft_id}) shares this node's node_id16 "
                f"0x{mine:04x}: give one of them another raft address")
