"""The encryption state in a backup, and what a cluster restored from one starts with.

A backup (`sealkv snapshot save`) holds the replicated encryption state as every node's
snapshot does: the data keys wrapped by the KEK, the active ids, the cutover indexes, the
writer registry. `describe` says what is there without any key. `restore_for_new_cluster`
makes the state a restored cluster starts with, so that it can never reuse a nonce of the
cluster the backup came from, even if both keep running:

- every stored key must unwrap under the KEK given to the restore (else it refuses, naming
  the fix): the restored nodes must read every envelope of the backup;
- a fresh storage key and a fresh raft key (random, wrapped by that KEK) become active at
  the backup's index, so the restored cluster's first write, and every later one, is
  sealed under a key the old cluster never had. Their ids start at a random offset above
  every id in use, so they do not coincide with ids the old cluster gives its own later
  rotations either;
- the writer registry starts empty: the old cluster's rows describe nonces under the old
  keys, which the restored cluster never seals under again; its members register their
  epochs under the new keys as they start;
- each member's sidecar holds the key table with epoch 0 (fresh): the first start makes
  epoch 1 durable before it encrypts anything.

Old keys stay for reading. Nothing here logs or returns key bytes.
"""
from __future__ import annotations

import os
import secrets
from typing import Any, Mapping

from sealkv.plugins.api import RestoredState, StartupRefused

from . import startup
from .kek import DEK_SIZE, KEKProvider, unwrapped_or_none
from .purpose import PURPOSE_NAMES, PURPOSE_RAFT, PURPOSE_STORAGE
from .sidecar import sidecar_of, write_sidecar
from .state import EncryptionState, StateDecodeError, WrappedKey

# The restored cluster's new key ids start this far (at most) above every id in use.
ID_OFFSET_RANGE = 1 << 20


def _parse(state: bytes) -> EncryptionState:
    try:
        return EncryptionState.from_bytes(state)
    except StateDecodeError as error:
        raise StartupRefused(f"the backup's encryption state cannot be read ({error}): use "
                             "another backup") from None


def describe(state: bytes) -> dict[str, Any]:
    """What `sealkv snapshot status` shows of the encryption state (ids only, no key)."""
    parsed = _parse(state)
    return {"encrypted": parsed.storage_envelope_active,
            "bootstrapped": parsed.bootstrapped,
            "storage_envelope_active": parsed.storage_envelope_active,
            "raft_envelope_active": parsed.raft_envelope_active,
            "active_storage_key": parsed.active_storage_id,
            "active_raft_key": parsed.active_raft_id,
            "wrapped_keys": len(parsed.keys)}


def restore_for_new_cluster(state: bytes, index: int,
                            options: Mapping[str, Any]) -> RestoredState:
    """Returns the encryption state and member files of a cluster restored at `index` (see
    the module docstring). `options` are the plugin's options (the KEK provider)."""
    parsed = _parse(state)
    if not parsed.bootstrapped:
        return RestoredState(state, summary={"encryption": "not bootstrapped"})
    needed = ("the backup holds encrypted data: the restore needs the KEK its data keys are "
              "wrapped with (--kek-file F, or --kek-provider/--kek-option)")
    if not any(options.get(name) for name in ("kek_file", "kek_provider", "kek_env")):
        raise StartupRefused(needed)
    try:
        kek = startup.load_kek(options)
    except StartupRefused as error:
        raise StartupRefused(f"{needed}: {error}") from None
    for key_id, key in sorted(parsed.keys.items()):
        if not _unwraps(kek, key.wrapped):
            raise StartupRefused(
                f"the KEK ({kek.name}) cannot unwrap {PURPOSE_NAMES[key.purpose]} key {key_id} "
                "of the backup: give the restore the KEK of the cluster the backup was saved "
                "from (--kek-file, or --kek-provider/--kek-option)")
    restored = _rotated(parsed, index, kek)
    sidecar = sidecar_of(restored, {})  # epoch 0: the first start makes epoch 1 durable
    sidecar.validate()
    return RestoredState(
        restored.to_bytes(), lambda data_dir: write_sidecar(data_dir, sidecar),
        {"storage_key": restored.active_storage_id, "raft_key": restored.active_raft_id,
         "previous_storage_key": parsed.active_storage_id,
         "previous_raft_key": parsed.active_raft_id})


def _unwraps(kek: KEKProvider, wrapped: bytes) -> bool:
    dek = unwrapped_or_none(kek, wrapped)
    return dek is not None and len(dek) == DEK_SIZE


def _rotated(state: EncryptionState, index: int, kek: KEKProvider) -> EncryptionState:
    restored = state.copy()
    in_use = set(state.keys) | state.retired
    first = max(in_use, default=0) + 1 + secrets.randbelow(ID_OFFSET_RANGE)
    if first + 1 > 0xFFFFFFFF:
        first = max(in_use, default=0) + 1
    if first + 1 > 0xFFFFFFFF:
        raise StartupRefused("no data key id is left for the restored cluster's new keys")
    for key_id, purpose in ((first, PURPOSE_STORAGE), (first + 1, PURPOSE_RAFT)):
        wrapped = kek.wrap(os.urandom(32))
        if not _unwraps(kek, wrapped):
            raise StartupRefused(f"the KEK ({kek.name}) cannot unwrap a key it just wrapped: "
                                 "check the KEK provider")
        restored.keys[key_id] = WrappedKey(purpose, wrapped, index)
        restored.active[purpose] = key_id
    restored.registry = {}
    restored.key_change_index = index
    return restored
