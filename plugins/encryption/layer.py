"""The encryption storage layer and the plugin that owns the replicated encryption state.

`EncryptionStorage` seals values into AES-256-GCM envelopes on `put` once the storage envelope
is active, and opens them on `get`/`scan`, dispatching on the value header's state bits only
(ENCRYPTION.md §3). `EncryptionLayerPlugin` (entry point `encryption` of
`sealkv.storage_layers`) wires it to the replicated state (`state.py`), the node-local KEK
(`kek.py`), the sidecar (`sidecar.py`) and the nonce epochs (`nonce.py`).

Nothing here logs a key, a value or key bytes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Mapping, Optional

from sealkv.node.errors import IntegrityError, Unavailable
from sealkv.node.state.storage.base import (
    VALUE_CLEARTEXT, VALUE_ENCRYPTED, VALUE_STATE_MASK, Entry, Storage, StorageLayer,
)
from sealkv.node.errors import ApplyHalt
from sealkv.plugins.api import PluginContext, StartupRefused, StorageLayerPlugin

from . import commands, envelope
from .core_dumps import disable_core_dumps
from . import reencryption
from .raft_envelope import RaftPayloadCodec
from .commands import (
    BootstrapCommand, CommandDecodeError, RegisterCommand, RotationCommand, WriterRow,
)
from .kek import KEKProvider, load_kek_provider
from .keystore import KeyStore
from .nonce import MAX_EPOCH, NonceFactory, full_node_id, node_id16
from .sidecar import (
    Sidecar, SidecarError, SidecarKey, probe_directory_fsync, read_sidecar, sidecar_path,
    write_sidecar,
)
from .state import (
    PURPOSE_NAMES, PURPOSE_RAFT, PURPOSE_STORAGE, ApplyResult, EncryptionState, Outcome,
    ProposalRefused, StateDecodeError,
)

logger = logging.getLogger(__name__)

NEW_KEY_EPOCH = 1  # every node's epoch for a key it installs for the first time
_PURPOSE_BY_NAME = {name: purpose for purpose, name in PURPOSE_NAMES.items()}


class EncryptionUnavailableError(RuntimeError):
    """A write must be encrypted but this node has no usable key or nonce (halts the node)."""


class EncryptionStorage(StorageLayer):
    """A storage layer that stores values in envelopes once the storage envelope is active.

    `state` is the live replicated state (read, never changed here), `keystore` the unwrapped
    keys, and `nonces(dek_id)` returns the `NonceFactory` of this process for a key. `put` runs
    in replicated apply: any exception from it halts the node. `get`/`scan` raise
    `IntegrityError` (DATA_LOSS) for any record that does not decode, never return None for it.
    """

    def __init__(self, inner: Storage, state: EncryptionState, keystore: KeyStore,
                 nonces: Callable[[int], NonceFactory]):
        super().__init__(inner)
        self.state = state
        self.keystore = keystore
        self.nonces = nonces

    def put(self, key: bytes, entry: Entry) -> None:
        """Stores `entry` (plaintext value) sealed or cleartext per the replicated state."""
        if entry.state != VALUE_CLEARTEXT:
            raise ValueError("the storage layer expects plaintext entries")
        if not self.state.storage_envelope_active:
            self.inner.put(key, entry)
            return
        dek_id = self.state.active_storage_id
        dek = self.keystore.get_for(dek_id, PURPOSE_STORAGE)
        if dek is None:
            raise EncryptionUnavailableError(f"storage key {dek_id} is not loaded")
        header = (entry.header & ~VALUE_STATE_MASK & 0xFF) | VALUE_ENCRYPTED
        header6 = envelope.envelope_header(dek_id)
        sealed = envelope.seal(dek, dek_id, self.nonces(dek_id).next(), entry.value,
                               envelope.storage_aad(header6, header, key, entry.mod_revision))
        self.inner.put(key, dataclasses.replace(entry, value=sealed, header=header))

    def decode_entry(self, key: bytes, entry: Entry) -> Entry:
        """Returns the plaintext entry; raises `IntegrityError` when it cannot be trusted."""
        state = entry.state
        if state == VALUE_ENCRYPTED:
            try:
                plaintext = envelope.open_envelope(
                    lambda key_id: self.keystore.get_for(key_id, PURPOSE_STORAGE), entry.value,
                    lambda header6: envelope.storage_aad(header6, entry.header, key,
                                                         entry.mod_revision))
            except envelope.EnvelopeError as error:
                raise IntegrityError(f"stored value failed decryption: {error}") from None
            return dataclasses.replace(entry, value=plaintext,
                                       header=entry.header & ~VALUE_STATE_MASK)
        if state == VALUE_CLEARTEXT:
            if len(entry.value) >= envelope.OVERHEAD and self._verifies_as_envelope(key, entry):
                raise IntegrityError("a value marked cleartext is an authentic envelope: its "
                                     "encrypted bit was cleared")
            return entry
        raise IntegrityError(f"stored value has the reserved state 0x{state:02x}")

    def _verifies_as_envelope(self, key: bytes, entry: Entry) -> bool:
        """The rebadge guard: whether a cleartext value opens under a loaded storage key."""
        sealed_header = (entry.header & ~VALUE_STATE_MASK & 0xFF) | VALUE_ENCRYPTED
        try:
            envelope.open_envelope(
                lambda key_id: self.keystore.get_for(key_id, PURPOSE_STORAGE), entry.value,
                lambda header6: envelope.storage_aad(header6, sealed_header, key,
                                                     entry.mod_revision))
        except envelope.EnvelopeError:
            return False
        return True


class EncryptionLayerPlugin(StorageLayerPlugin):
    """The built-in encryption plugin: envelope storage layer, control opcodes 0x03-0x05.

    Options (`PluginContext.options`): `kek_provider` (default "file"), `kek_file` (path for
    the file provider), `kek_env` (variable for the env provider, tests only), `kek_options`
    (a mapping for other providers). `kek` may be passed directly by tests.

    Threads: command handlers, `snapshot_state` and `restore_state` run on the tick thread;
    `admit_write`, the pre-checks and the command builders on gRPC threads; `prepare_start`
    and `start` on the start-up thread.
    """

    name = "encryption"

    def __init__(self, context: PluginContext, *, kek: Optional[KEKProvider] = None):
        super().__init__(context)
        self.state = EncryptionState()
        self.keystore = KeyStore()
        self.kek = kek
        self.full_node_id = full_node_id(context.raft_id)
        self.node_id16 = node_id16(self.full_node_id)
        self._epochs: dict[int, int] = {}
        self._factories: dict[int, NonceFactory] = {}
        self._sidecar_at_start: Optional[Sidecar] = None
        self._prepared = False
        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._register_thread: Optional[threading.Thread] = None
        self.raft_codec = RaftPayloadCodec(self.state, self.keystore, self.nonce_factory)

    # ---- start-up ---------------------------------------------------------------------------

    def prepare_start(self) -> None:
        """Loads the KEK and the sidecar and bumps every nonce epoch durably.

        Call once, on the start-up thread, after building the plugin and before Raft starts or
        replays anything (replay encrypts). Raises `StartupRefused` with the fix when: no KEK
        is configured or it fails its checks; the directory cannot be fsynced; the sidecar is
        invalid; the KEK cannot unwrap a stored key; the active key's epoch is exhausted.
        """
        disable_core_dumps()
        if self.kek is None:
            self.kek = self._load_kek(self.context.options)
        probe_directory_fsync(self.context.data_dir)
        path = sidecar_path(self.context.data_dir)
        try:
            sidecar = read_sidecar(self.context.data_dir)
        except SidecarError as error:
            raise StartupRefused(f"{error}: restore {path} from a backup or resync it from the "
                                 "leader (ResyncSidecar)") from None
        if sidecar is None:
            sidecar = Sidecar()
        self._sidecar_at_start = dataclasses.replace(sidecar, keys=dict(sidecar.keys),
                                                     active=dict(sidecar.active))
        active_ids = {key_id for key_id in sidecar.active.values() if key_id}
        for key_id, key in sorted(sidecar.keys.items()):
            try:
                dek = self.kek.unwrap(key.wrapped)
            except Exception:
                raise StartupRefused(
                    f"the KEK ({self.kek.name}) cannot unwrap {key.purpose} key {key_id} in "
                    f"{path}: start with the KEK this node was bootstrapped with") from None
            self.keystore.install(key_id, _PURPOSE_BY_NAME[key.purpose], dek)
            epoch = min(key.local_epoch + 1, MAX_EPOCH)
            if epoch >= MAX_EPOCH and key_id in active_ids:
                raise StartupRefused(
                    f"the nonce epoch of active {key.purpose} key {key_id} is exhausted: rotate "
                    "the key from another member (RotateDEK), then start this node")
            sidecar.keys[key_id] = dataclasses.replace(key, local_epoch=epoch)
            self._epochs[key_id] = epoch
        if sidecar.keys:
            write_sidecar(self.context.data_dir, sidecar)
        self._prepared = True

    @staticmethod
    def _load_kek(options: Mapping[str, Any]) -> KEKProvider:
        provider = options.get("kek_provider", "file")
        if provider == "file":
            return load_kek_provider("file", path=options.get("kek_file") or "")
        if provider == "env":
            return load_kek_provider("env", var=options.get("kek_env") or "")
        return load_kek_provider(provider, **dict(options.get("kek_options") or {}))

    def start(self, node: Any) -> None:
        """Checks the replayed state against this node's disk, then registers this node.

        Called after the log replay, before serving clients, on the start-up thread. Raises
        `StartupRefused` when the sidecar and the replayed state disagree (a rolled-back disk),
        when this node's epoch is not above its registry row, or when another node owns this
        node's node_id16. Then starts a thread that proposes REGISTER for every active key until
        this node's rows for its current epochs are applied (`node.propose(cmd, timeout)`).
        """
        if not self._prepared:
            raise StartupRefused("the encryption plugin was started without prepare_start()")
        self.check_start_state()
        self.check_membership_collisions(node.membership_snapshot().members)
        self._register_thread = threading.Thread(
            target=self._register_loop, args=(node,), name="sealkv-encryption-register",
            daemon=True)
        self._register_thread.start()

    def check_membership_collisions(self, members) -> None:
        """Refuses to start when another known member shares this node's node_id16 (§4).

        `members` are member records (voters by raft address, learners as "learner:<name>",
        the node handle's raft id convention). Two such nodes would write nonces from the same
        space; the registry would halt every replica at their second registration.
        """
        for member in members:
            raft_id = member.raft_address or f"learner:{member.name}"
            other = full_node_id(raft_id)
            if other != self.full_node_id and node_id16(other) == self.node_id16:
                raise StartupRefused(
                    f"member {member.name} ({raft_id}) shares this node's node_id16 "
                    f"0x{self.node_id16:04x}: give one of them another raft address")

    def check_start_state(self, catch_up_timeout: Optional[float] = None) -> None:
        """The §8 start-up checks that need the replayed state (see `start`).

        A follower replays only what it knew was committed (pysyncobj persists the commit
        index on the leader only), so the key changes its sidecar records may arrive from the
        leader after start: wait for them, bounded by `catch_up_timeout` (option
        `catch_up_timeout`, default 60 s), before calling the disk rolled back.
        """
        before = self._sidecar_at_start or Sidecar()
        path = sidecar_path(self.context.data_dir)
        if catch_up_timeout is None:
            catch_up_timeout = float(self.context.options.get("catch_up_timeout", 60.0))
        deadline = time.monotonic() + catch_up_timeout
        while self.state.key_change_index < before.raft_applied_index \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            state = self.state
            if before.raft_applied_index > state.key_change_index:
                raise StartupRefused(
                    f"{path} records key changes up to index {before.raft_applied_index} but the "
                    f"log only reaches {state.key_change_index}: the Raft data was rolled back; "
                    "restore a consistent data directory")
            for name, ours, theirs in (
                    ("storage", before.storage_envelope_cutover_index, state.storage_cutover_index),
                    ("raft", before.raft_envelope_cutover_index, state.raft_cutover_index)):
                if ours and ours != theirs:
                    raise StartupRefused(
                        f"{path} has the {name} cutover at index {ours}, the snapshot and log at "
                        f"{theirs}: restore a consistent data directory")
            for key_id, key in before.keys.items():
                replicated = state.keys.get(key_id)
                if replicated is None or replicated.wrapped != key.wrapped:
                    raise StartupRefused(f"key {key_id} of {path} is not in the replicated state:"
                                         " restore a consistent data directory")
            for (dek_id, node16), record in state.registry.items():
                if node16 != self.node_id16:
                    continue
                if record.full_node_id != self.full_node_id:
                    raise StartupRefused(
                        f"node_id16 0x{node16:04x} is registered to another member: two members "
                        "share a node_id16; give this node a different raft id")
                epoch = self._epochs.get(dek_id)
                if epoch is not None and record.last_epoch >= epoch:
                    raise StartupRefused(
                        f"this node's epoch {epoch} for key {dek_id} is not above the registered "
                        f"{record.last_epoch}: its disk was restored from an old copy; resync the"
                        " sidecar (ResyncSidecar) before starting")

    def _register_loop(self, node: Any) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            pending = self.pending_registrations()
            if not pending:
                if self._stopping.wait(1.0):
                    return
                continue
            for command in pending:
                try:
                    node.propose(commands.encode_command(command), 5.0)
                except Exception as error:  # retried: no leader yet, or a leader change
                    logger.info("writer registration not applied yet: %s",
                                type(error).__name__)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 2.0)

    def pending_registrations(self) -> list[RegisterCommand]:
        """Returns the REGISTER commands this node still needs (active keys, current epochs)."""
        with self._cond:
            result = []
            for dek_id in sorted({self.state.active_storage_id, self.state.active_raft_id} - {0}):
                epoch = self._epochs.get(dek_id)
                if epoch is None:
                    continue
                record = self.state.writer(dek_id, self.node_id16)
                if record is None or record.last_epoch < epoch:
                    result.append(RegisterCommand(WriterRow(dek_id, self.full_node_id, epoch)))
            return result

    def stop(self) -> None:
        """Stops the registration thread."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    # ---- storage layer ----------------------------------------------------------------------

    def wrap(self, inner: Storage) -> Storage:
        """Returns the envelope layer over `inner`."""
        self.storage = EncryptionStorage(inner, self.state, self.keystore, self.nonce_factory)
        return self.storage

    def payload_codec(self) -> RaftPayloadCodec:
        """The raft-log envelope (the optional `payload_codec` capability the node hands to
        its replication adapter)."""
        return self.raft_codec

    def nonce_factory(self, dek_id: int) -> NonceFactory:
        """Returns this process's nonce factory for `dek_id` (its epoch is already durable)."""
        with self._cond:
            factory = self._factories.get(dek_id)
            if factory is None:
                epoch = self._epochs.get(dek_id)
                if epoch is None:
                    raise EncryptionUnavailableError(f"no durable nonce epoch for key {dek_id}")
                factory = NonceFactory(self.node_id16, epoch)
                self._factories[dek_id] = factory
            return factory

    def local_epoch(self, dek_id: int) -> Optional[int]:
        """Returns this node's current nonce epoch for `dek_id` (None: never used here)."""
        with self._cond:
            return self._epochs.get(dek_id)

    # ---- replicated commands ----------------------------------------------------------------

    def command_handlers(self) -> Mapping[int, Callable[[int, bytes], Any]]:
        """Returns the handlers of REGISTER (0x03), BOOTSTRAP (0x04) and ROTATION (0x05)."""
        return {commands.OP_REGISTER: self._apply_register,
                commands.OP_BOOTSTRAP: self._apply_bootstrap,
                commands.OP_ROTATION: self._apply_rotation,
                reencryption.OP_REENCRYPT: self._apply_reencrypt}

    def _apply_reencrypt(self, index: int, body: bytes) -> ApplyResult:
        """Applies 0x06 REENCRYPT (see `reencryption.py`); values are re-sealed in place."""
        command = _decoded(reencryption.decode_body, body)
        storage = self.storage
        rewriter = reencryption.Rewriter(
            raw=storage.inner.get,
            reseal=lambda key, raw: storage.put(key, storage.decode_entry(key, raw)))
        with self._cond:
            job, effective = reencryption.apply_command(
                self.state.job, index, command, self.state.active_storage_id,
                self.state.storage_envelope_active, rewriter)
            self.state.job = job
            self._cond.notify_all()
        return ApplyResult(Outcome.APPLIED if effective else Outcome.STALE_CONSUMED, index)

    def _apply_register(self, index: int, body: bytes) -> ApplyResult:
        command = _decoded(commands.decode_register, body)
        with self._cond:
            result = self.state.apply_register(index, command)
            self._cond.notify_all()
        return result

    def _apply_bootstrap(self, index: int, body: bytes) -> ApplyResult:
        command = _decoded(commands.decode_bootstrap, body)
        with self._cond:
            result = self.state.apply_bootstrap(index, command, self._install)
            if result.outcome is Outcome.APPLIED:
                self._persist()
            self._cond.notify_all()
        return result

    def _apply_rotation(self, index: int, body: bytes) -> ApplyResult:
        command = _decoded(commands.decode_rotation, body)
        with self._cond:
            result = self.state.apply_rotation(index, command, self._install)
            if result.outcome is Outcome.APPLIED and command.sub_tag == commands.SUB_RETIRE:
                self.keystore.remove(command.dek_id)
                self._epochs.pop(command.dek_id, None)
                self._factories.pop(command.dek_id, None)
            if result.outcome is Outcome.APPLIED:
                self._persist()
            self._cond.notify_all()
        if command.sub_tag == commands.SUB_ENABLE_RAFT:
            self.raft_codec.cutover_applied(index)
        return result

    def _install(self, key_id: int, purpose: int, wrapped: bytes) -> None:
        """Unwraps a replicated key with the KEK, keeps it, and picks this node's epoch."""
        if self.kek is None:
            raise ApplyHalt("no KEK is loaded: the encryption plugin was not prepared")
        self.keystore.install(key_id, purpose, self.kek.unwrap(wrapped))
        if key_id not in self._epochs:
            record = self.state.writer(key_id, self.node_id16)
            epoch = NEW_KEY_EPOCH
            if record is not None and record.full_node_id == self.full_node_id:
                epoch = record.last_epoch + 1  # a late joiner or a lost sidecar
            if epoch >= MAX_EPOCH:
                raise ApplyHalt(f"nonce epoch of key {key_id} is exhausted on this node")
            self._epochs[key_id] = epoch

    def _persist(self) -> None:
        """Writes the sidecar from the replicated state (durable before the next encryption)."""
        state = self.state
        sidecar = Sidecar(
            raft_applied_index=state.key_change_index,
            storage_envelope_active=state.storage_envelope_active,
            storage_envelope_cutover_index=state.storage_cutover_index,
            raft_envelope_cutover_index=state.raft_cutover_index,
            active={"storage": state.active_storage_id, "raft": state.active_raft_id},
            keys={key_id: SidecarKey(PURPOSE_NAMES[key.purpose], key.wrapped, key.created,
                                     self._epochs.get(key_id, 0))
                  for key_id, key in state.keys.items()})
        try:
            write_sidecar(self.context.data_dir, sidecar)
        except (OSError, SidecarError) as error:
            raise ApplyHalt(f"cannot write the encryption sidecar: {error}") from error

    def resync_sidecar(self) -> int:
        """Rewrites this node's sidecar from the replicated state and this process's epochs.

        Called by the admin's ResyncSidecar on a gRPC thread (a node that lost its sidecar).
        Returns the key-change index the sidecar now reflects; raises `ApplyHalt` (carrying
        the reason) when the sidecar cannot be written.
        """
        with self._cond:
            self._persist()
            return self.state.key_change_index

    def snapshot_state(self) -> bytes:
        """Returns the replicated encryption state for a Raft snapshot."""
        with self._cond:
            return self.state.to_bytes()

    def restore_state(self, data: bytes) -> None:
        """Replaces the replicated state with a snapshot's, unwrapping every key it holds."""
        try:
            restored = EncryptionState.from_bytes(data)
        except StateDecodeError as error:
            raise ApplyHalt(str(error)) from error
        with self._cond:
            for field in dataclasses.fields(EncryptionState):
                setattr(self.state, field.name, getattr(restored, field.name))
            for key_id, key in sorted(restored.keys.items()):
                try:
                    self._install(key_id, key.purpose, key.wrapped)
                except ApplyHalt:
                    raise
                except Exception as error:
                    raise ApplyHalt(f"cannot unwrap key {key_id} from the snapshot: "
                                    f"{type(error).__name__}") from error
            if restored.keys:
                self._persist()
            self._cond.notify_all()

    # ---- admission and leader-side builders -------------------------------------------------

    def admit_write(self, timeout: float) -> None:
        """Waits up to `timeout` until this node's registry rows for its current epochs are
        applied for every key a client write could be sealed under; else raises `Unavailable`.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                missing = self._unregistered_key()
                if missing is None:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    raise Unavailable(
                        f"this node's writer registration for key {missing} is not applied "
                        "yet: retry")
                self._cond.wait(remaining)

    def _unregistered_key(self) -> Optional[int]:
        keys = []
        if self.state.bootstrapped:
            keys.append(self.state.active_storage_id)
        if self.state.raft_envelope_active:
            keys.append(self.state.active_raft_id)
        for dek_id in keys:
            record = self.state.writer(dek_id, self.node_id16)
            epoch = self._epochs.get(dek_id)
            if (record is None or epoch is None or record.full_node_id != self.full_node_id
                    or record.last_epoch != epoch):
                return dek_id
        return None

    def bootstrap_command(self, member_raft_ids: list[str]) -> BootstrapCommand:
        """Builds (leader, gRPC thread) a checked BOOTSTRAP with fresh keys and the writer
        rows of every member at `NEW_KEY_EPOCH`; raises `ProposalRefused` if it cannot apply."""
        storage_id, raft_id = self._next_key_ids(2)
        rows = tuple(WriterRow(dek_id, full_node_id(raft_id_), NEW_KEY_EPOCH)
                     for raft_id_ in sorted(set(member_raft_ids))
                     for dek_id in (storage_id, raft_id))
        command = BootstrapCommand(storage_id, self.kek.wrap(os.urandom(32)), raft_id,
                                   self.kek.wrap(os.urandom(32)), rows)
        with self._cond:
            self.state.check_bootstrap(command, self.kek.unwrap)
        return command

    def rotation_command(self, purpose: int) -> RotationCommand:
        """Builds a checked key rotation for `purpose` (1 storage, 2 raft)."""
        (dek_id,) = self._next_key_ids(1)
        command = RotationCommand(commands.SUB_ROTATE, dek_id, purpose,
                                  self.kek.wrap(os.urandom(32)),
                                  WriterRow(dek_id, self.full_node_id, NEW_KEY_EPOCH))
        with self._cond:
            self.state.check_rotation(command, self.kek.unwrap)
        return command

    def cutover_command(self, purpose: int) -> RotationCommand:
        """Builds a checked envelope cutover for `purpose`, with this node's real epoch."""
        with self._cond:
            dek_id = self.state.active[purpose]
            epoch = self._epochs.get(dek_id, 0)
            sub_tag = (commands.SUB_ENABLE_STORAGE if purpose == PURPOSE_STORAGE
                       else commands.SUB_ENABLE_RAFT)
            command = RotationCommand(sub_tag, dek_id or 1, purpose, b"",
                                      WriterRow(dek_id or 1, self.full_node_id, epoch))
            self.state.check_rotation(command)
            return command

    def retire_command(self, key_id: int) -> RotationCommand:
        """Builds a checked retirement of `key_id` (ROTATION sub-tag 0x03)."""
        with self._cond:
            key = self.state.keys.get(key_id)
            if key is None:
                raise ProposalRefused(f"no key {key_id}" + (" (already retired)"
                                                            if key_id in self.state.retired
                                                            else ""))
            command = RotationCommand(commands.SUB_RETIRE, key_id, key.purpose, b"",
                                      WriterRow(key_id, self.full_node_id,
                                                self._epochs.get(key_id, 0)))
            self.state.check_rotation(command)
            return command

    def _next_key_ids(self, count: int) -> list[int]:
        with self._cond:
            start = max(set(self.state.keys) | self.state.retired, default=0) + 1
        return list(range(start, start + count))


def _decoded(decoder: Callable[[bytes], Any], body: bytes) -> Any:
    try:
        return decoder(body)
    except CommandDecodeError as error:
        raise ApplyHalt(f"malformed encryption command: {error}") from error
