"""The encryption storage-layer plugin: the replicated encryption state and its node-local shell.

`EncryptionLayerPlugin` (entry point `encryption` of `sealkv.storage_layers`) owns the
replicated encryption state (`state.py`), the unwrapped data keys (`keystore.py`), the
node-local KEK (`kek.py`), the sidecar (`sidecar.py`) and this process's nonce epochs
(`nonce.py`). It applies the control opcodes 0x03-0x05 and wraps the storage stack with the
envelope layer (`storage.py`). The other jobs live in files named for them: the start-up
refusals in `startup.py`, the writer registration and write admission in `registration.py`,
the capability protocol in `capability.py`, the leader-side command builders beside the admin
in `proposals.py` (except the KEK rewrap's, `rewrap_command` here: it wraps the unwrapped keys
under the next KEK, neither of which leaves this plugin). The admin reaches this plugin only
through `EncryptionLayerAccess`.

Nothing here logs a key, a value or key bytes.
"""
from __future__ import annotations

import dataclasses
import errno
import hmac
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

from sealkv.node.errors import ApplyHalt, IntegrityError
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.storage.base import Entry, Storage, StorageFull
from sealkv.plugins.api import (
    PluginContext, RestoredState, StartupRefused, StorageLayerPlugin,
)

from . import commands, reencryption, restore, startup
from .commands import CommandDecodeError, RegisterCommand, RewrapCommand
from .core_dumps import disable_core_dumps
from .counters import COUNTERS
from .kek import KEKProvider, kek_check_blob, kek_of_check, opens_check, unwrapped_or_none
from .keystore import KeyStore
from .nonce import MAX_EPOCH, NonceFactory, full_node_id, node_id16
from .purpose import PURPOSE_NAMES
from .raft_envelope import RaftPayloadCodec
from .registration import ChangeCondition, WriterRegistration
from .sidecar import Sidecar, SidecarError, sidecar_of, write_sidecar
from .state import ApplyResult, EncryptionState, Outcome, ProposalRefused, StateDecodeError
from .storage import EncryptionStorage, EncryptionUnavailableError

NEW_KEY_EPOCH = 1  # every node's epoch for a key it installs for the first time

# Test hook, off unless set (the crash-safety integration test only): a key id. The process
# SIGKILLs itself between the apply that installed that key and the sidecar write that would
# first record it, the window the "not durable yet" gate protects.
DIE_BEFORE_SIDECAR_ENV = "SEALKV_TEST_DIE_BEFORE_SIDECAR_KEY"
# The same for a KEK rewrap (the rewrap test only): a KEK generation. The process SIGKILLs
# itself after applying the rewrap to that generation (its KEK switched in memory), before
# the sidecar write that would first record it.
DIE_BEFORE_REWRAP_SIDECAR_ENV = "SEALKV_TEST_DIE_BEFORE_SIDECAR_KEK_GENERATION"


@dataclass(frozen=True)
class EncryptionView:
    """A consistent copy of this node's encryption state, taken at one instant.

    `state` is a private copy of the replicated state (the holder may read it freely; it never
    changes), `full_node_id` this node's id, `epochs` this process's nonce epoch per key id,
    `kek_loaded` whether a KEK is loaded, `raft_wrap_installed` whether this node seals and
    opens raft payloads (`RaftPayloadCodec.wrap_installed`).
    """

    state: EncryptionState
    full_node_id: int
    epochs: Mapping[int, int]
    kek_loaded: bool
    raft_wrap_installed: bool = False

    def local_epoch(self, dek_id: int) -> Optional[int]:
        """Returns this node's nonce epoch for `dek_id` (None: never used here)."""
        return self.epochs.get(dek_id)


class EncryptionLayerAccess(Protocol):
    """What the encryption admin may use of the encryption layer (gRPC threads only).

    The admin never sees the KEK or the unwrapped keys: it reads a consistent copy of the
    state (`view`), asks for new wrapped keys and trial unwraps, and asks the layer to judge
    its own keys and to rewrite its sidecar. No method may be called from the tick thread.
    """

    raft_codec: RaftPayloadCodec
    """The raft-log envelope; the admin opens and closes its proposal intake at the cutover."""

    def view(self) -> EncryptionView:
        """Returns a consistent copy of the state, without a serialisation round trip."""

    def new_wrapped_key(self) -> bytes:
        """Returns a fresh random data key wrapped by this node's KEK (for a proposal)."""

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwraps `wrapped` with this node's KEK; raises when it cannot (pre-checks only)."""

    def key_problem(self, state: EncryptionState) -> str:
        """Returns why this node cannot use every key of `state`, or "" when it can."""

    def next_kek_status(self, state: EncryptionState) -> tuple[bool, str, bytes]:
        """Returns (next KEK ready, why not, a fresh check blob of the next KEK): ready when
        the current KEK opens every key of `state` and the staged next KEK wraps and unwraps."""

    def next_kek_opens(self, check: bytes) -> bool:
        """Whether `check` (another member's next-KEK check blob) was made under this node's
        next KEK: the two members staged the same next KEK."""

    def rewrap_command(self, state: EncryptionState) -> RewrapCommand:
        """Returns `state`'s key table wrapped under the next KEK as a checked rewrap command
        (`ProposalRefused` when it could not apply)."""

    def resync_sidecar(self) -> int:
        """Rewrites the sidecar from the replicated state; returns its key-change index."""

    def record_readable(self, key: bytes, entry: Entry) -> bool:
        """Whether a record as stored decodes here (the re-encryption leader's pre-check:
        a record that would fail at apply is never proposed)."""


class EncryptionLayerPlugin(StorageLayerPlugin):
    """The built-in encryption plugin: envelope storage layer, control opcodes 0x03-0x05.

    Options (`PluginContext.options`): `kek_provider` (default "file"), `kek_file` (path for
    the file provider), `kek_env` (variable for the env provider, tests only), `kek_options`
    (a mapping for other providers), `catch_up_timeout` (seconds, default 60), and the staged
    next KEK for a rewrap: `next_kek_provider`, `next_kek_file`, `next_kek_env`,
    `next_kek_options`. `kek` and `next_kek` may be passed directly by tests.

    Threads: command handlers, `snapshot_state`, `restore_state` and `persist_applied` run
    on the tick thread; `admit_write` and the `EncryptionLayerAccess` methods on gRPC threads;
    `prepare_start` and `start` on the start-up thread. Everything shared goes through one
    condition.

    The sidecar (the optional capability `sealkv.plugins.api.PersistsAfterApply`): apply
    never writes it. A handler that changes the key
    table, a cutover or this node's epochs marks the sidecar due; the node calls
    `persist_applied()` right after, on the tick thread, which writes it. A key's nonce
    epoch counts as durable only once a sidecar holding it is on disk, and `nonce_factory`
    hands out no factory before that: nothing is sealed under an epoch a crash could forget.
    """

    name = "encryption"

    def __init__(self, context: PluginContext, *, kek: Optional[KEKProvider] = None,
                 next_kek: Optional[KEKProvider] = None):
        super().__init__(context)
        self.state = EncryptionState()
        self.keystore = KeyStore()
        # `kek` is the KEK the replicated key table is wrapped under; `next_kek` the staged
        # one (options next_kek_*) a rewrap moves it to. After the rewrap applies, `kek` is the
        # former next KEK (the same object). Replaced on the tick thread or at start-up, read
        # anywhere (one reference).
        self.kek = kek
        self.next_kek = next_kek
        # The KEKs a rewrap applied in this process replaced, oldest first: a group rolled
        # back after a failed commit (a full disk) can take the key table back under one.
        self._replaced_keks: list[KEKProvider] = []
        self.full_node_id = full_node_id(context.raft_id)
        self.node_id16 = node_id16(self.full_node_id)
        self._epochs: dict[int, int] = {}
        self._factories: dict[int, NonceFactory] = {}
        self._sidecar_at_start: Optional[Sidecar] = None
        # Apply decided the sidecar must be rewritten (tick thread; `persist_applied` does it).
        self._sidecar_due = False
        # key id -> the epoch the sidecar on disk records for it (under `_cond`).
        self._durable_epochs: dict[int, int] = {}
        # Serialises sidecar writes (tick thread's persist, a gRPC thread's resync).
        self._sidecar_lock = threading.Lock()
        self._prepared = False
        self._cond = ChangeCondition(threading.RLock())  # notified after every change
        self.raft_codec = RaftPayloadCodec(self.state, self.keystore, self.nonce_factory)
        self.storage: Optional[EncryptionStorage] = None  # the envelope layer, once `wrap` ran
        self.registration = WriterRegistration(self.state, self._epochs, self.full_node_id,
                                               self._cond)

    # ---- backups (the RestoresSnapshots capability; see restore.py) --------------------------

    @classmethod
    def describe_snapshot_state(cls, state: bytes) -> Mapping[str, Any]:
        """What `sealkv snapshot status` shows of a backup's encryption state (no key)."""
        return restore.describe(state)

    @classmethod
    def restore_snapshot_state(cls, state: bytes, index: int,
                               options: Mapping[str, Any]) -> RestoredState:
        """The encryption state of a cluster restored from a backup: fresh data keys, an
        empty writer registry, fresh epochs (needs the KEK in `options`)."""
        return restore.restore_for_new_cluster(state, index, options)

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
            self.kek = startup.load_kek(self.context.options)
        if self.next_kek is None:
            self.next_kek = startup.load_next_kek(self.context.options)
        found, epochs = startup.open_sidecar(self.context.data_dir, self.kek, self.keystore,
                                             self.next_kek)
        self._sidecar_at_start = found
        with self._cond:  # like every change of the epochs (the write admission counts them)
            self._epochs.update(epochs)
            self._durable_epochs.update(epochs)  # open_sidecar wrote them
            self._cond.notify_all()
        self._prepared = True

    def start(self, node: Any) -> None:
        """Checks the replayed state against this node's disk, then registers this node.

        Called after the log replay, before serving clients, on the start-up thread. Raises
        `StartupRefused` when the sidecar and the replayed state disagree (a rolled-back disk),
        when this node's epoch is not above its registry row, or when another node owns this
        node's node_id16. Then starts the writer registration (`node.propose(cmd, timeout)`).
        """
        if not self._prepared:
            raise StartupRefused("the encryption plugin was started without prepare_start()")
        self.check_start_state()
        self.check_membership_collisions(node.membership_snapshot().members)
        self.registration.start(node.propose)

    def check_membership_collisions(self, members: Iterable[MemberRecord]) -> None:
        """Refuses to start when another known member shares this node's node_id16 (§4)."""
        startup.check_membership_collisions(members, self.full_node_id)

    def check_start_state(self, catch_up_timeout: Optional[float] = None) -> None:
        """The §8 start-up checks that need the replayed state (see `start`).

        A follower replays only what it knew was committed (pysyncobj persists the commit
        index on the leader only), so the key changes its sidecar records may arrive from the
        leader after start: wait for them, bounded by `catch_up_timeout` (option
        `catch_up_timeout`, default 60 s), before calling the disk rolled back.
        """
        found = self._sidecar_at_start or Sidecar()
        if catch_up_timeout is None:
            catch_up_timeout = float(self.context.options.get("catch_up_timeout", 60.0))
        with self._cond:
            self._cond.wait_for(
                lambda: self.state.key_change_index >= found.raft_applied_index,
                timeout=catch_up_timeout)
            startup.check_replayed_state(self.context.data_dir, found, self.state,
                                         self._epochs, self.full_node_id)

    def pending_registrations(self) -> list[RegisterCommand]:
        """Returns the REGISTER commands this node still needs (active keys, current epochs)."""
        return self.registration.pending()

    def admit_write(self, timeout: float) -> None:
        """Holds a client write until this node's writer rows are applied (`registration.py`)."""
        self.registration.admit_write(timeout)

    def stop(self) -> None:
        """Stops the registration thread."""
        self.registration.stop()

    # ---- storage layer ----------------------------------------------------------------------

    def wrap(self, inner: Storage) -> Storage:
        """Returns the envelope layer over `inner`."""
        self.storage = EncryptionStorage(inner, self.state, self.keystore, self.nonce_factory)
        return self.storage

    def nonce_factory(self, dek_id: int, timeout: float = 0.0) -> NonceFactory:
        """Returns this process's nonce factory for `dek_id`, once its epoch is durable.

        The "not durable yet" gate: a key installed by apply has its epoch on disk only after
        the node's `persist_applied()`. A caller on another thread (the raft envelope's
        sealing, gRPC threads) waits up to `timeout` for it; the tick thread passes 0, as the
        persist it would wait for runs on that thread (it ran before the next entry, so a
        refusal there is a broken contract and halts). Raises `EncryptionUnavailableError`
        when the key has no epoch here, or none durable within `timeout`.
        """
        with self._cond:
            factory = self._factories.get(dek_id)
            if factory is None:
                if not self._cond.wait_for(lambda: self._epochs.get(dek_id) is None
                                           or self._epoch_durable(dek_id), timeout):
                    raise EncryptionUnavailableError(
                        f"the nonce epoch of key {dek_id} is not durable yet")
                epoch = self._epochs.get(dek_id)
                if epoch is None:
                    raise EncryptionUnavailableError(f"no nonce epoch for key {dek_id}")
                factory = NonceFactory(self.node_id16, epoch)
                self._factories[dek_id] = factory
            return factory

    def _epoch_durable(self, dek_id: int) -> bool:
        epoch = self._epochs.get(dek_id)
        return epoch is not None and self._durable_epochs.get(dek_id) == epoch

    def local_epoch(self, dek_id: int) -> Optional[int]:
        """Returns this node's current nonce epoch for `dek_id` (None: never used here)."""
        with self._cond:
            return self._epochs.get(dek_id)

    def payload_codec(self) -> RaftPayloadCodec:
        """The raft-log envelope (the optional `payload_codec` capability the node hands to
        its replication adapter)."""
        return self.raft_codec

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
            return self._key_table_changed(
                self.state.apply_bootstrap(index, command, self._install))

    def _apply_rotation(self, index: int, body: bytes) -> ApplyResult:
        command = _decoded(commands.decode_rotation, body)
        if isinstance(command, RewrapCommand):
            return self._apply_rewrap(index, command)
        with self._cond:
            result = self.state.apply_rotation(index, command, self._install)
            if result.outcome is Outcome.APPLIED and command.sub_tag == commands.SUB_RETIRE:
                self.keystore.remove(command.dek_id)
                self._epochs.pop(command.dek_id, None)
                self._factories.pop(command.dek_id, None)
            self._key_table_changed(result)
        if command.sub_tag == commands.SUB_ENABLE_RAFT:
            self.raft_codec.cutover_applied(index)
        return result

    def _apply_rewrap(self, index: int, command: RewrapCommand) -> ApplyResult:
        """Applies a KEK rewrap: verify, switch this node's KEK, rewrite the sidecar."""
        with self._cond:
            return self._key_table_changed(
                self.state.apply_rewrap(index, command, self._rewrap))

    def _key_table_changed(self, result: ApplyResult) -> ApplyResult:
        """After applying an entry that may change the key table, a cutover or this node's
        epochs (tick thread, under the condition): an applied one makes the sidecar due (the
        node writes it right after, `persist_applied`); waiters are woken either way."""
        if result.outcome is Outcome.APPLIED:
            self._sidecar_due = True
        self._cond.notify_all()
        return result

    def _rewrap(self, check: bytes, keys: tuple[tuple[int, int, bytes], ...]) -> None:
        """Node-local part of a rewrap (tick thread, under the condition): the KEK that opens
        `check` must open every rewrapped key to the key this node already holds; it then
        becomes this node's KEK. Raises `ApplyHalt` naming the fix when this node has no such
        KEK (it was not staged here)."""
        target = self._kek_for(check, "the rewrap entry", self.state.kek_generation + 1)
        for key_id, purpose, wrapped in keys:
            dek = target.unwrap(wrapped)
            held = self.keystore.get_for(key_id, purpose)
            if held is None or not hmac.compare_digest(held, dek):
                raise ApplyHalt(f"the rewrapped {PURPOSE_NAMES[purpose]} key {key_id} is not "
                                "the key this node holds")
        if target is not self.kek:
            self._replaced_keks.append(self.kek)
        self.kek = target

    def _kek_to_restore(self, restored: EncryptionState) -> KEKProvider:
        """The KEK of a restored key table: the staged next KEK when it holds a rewrap this
        node had not applied; one a rewrap of this process replaced when it is older than
        the current table (a group rolled back after a failed commit: the database reloads
        the state before the rewrap); else the current KEK."""
        if self._replaced_keks and restored.kek_generation < self.state.kek_generation:
            if not restored.kek_check:  # never rewrapped: the KEK this process started with
                return self._replaced_keks[0]
            for kek in self._replaced_keks:
                if opens_check(kek, restored.kek_check):
                    return kek
        return self._kek_for(restored.kek_check, "the snapshot", restored.kek_generation)

    def _kek_for(self, check: bytes, where: str, generation: int) -> KEKProvider:
        """Returns which of this node's KEKs made `check` (the current one for an empty check,
        generation 0); raises `ApplyHalt` with the fix when neither did."""
        if self.kek is None:
            raise ApplyHalt("no KEK is loaded: the encryption plugin was not prepared")
        found = kek_of_check(check, self.kek, self.next_kek)
        if found is None:
            raise ApplyHalt(startup.rewrapped_elsewhere(where, generation, self.kek))
        return found

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

    def persist_applied(self) -> None:
        """Writes the sidecar when apply decided it (`PersistsAfterApply`; tick thread).

        Raises `ApplyHalt` when it cannot be written; the sidecar then stays due.
        """
        if not self._sidecar_due:
            return
        self._write_sidecar()
        self._sidecar_due = False

    def _write_sidecar(self) -> int:
        """Writes the sidecar from the replicated state and this process's epochs, then marks
        those epochs durable; returns the key-change index it reflects.

        Any thread, holding no lock of the state machine. The content is taken under the
        write lock, so of two writers the later one writes the later state.
        """
        with self._sidecar_lock:
            with self._cond:
                sidecar = sidecar_of(self.state, self._epochs)
            _die_here_if_testing(sidecar, self._durable_epochs)
            try:
                write_sidecar(self.context.data_dir, sidecar)
            except (OSError, SidecarError) as error:
                if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                    # A full disk: nothing of the group is kept and it is applied again
                    # once there is room (the adapter's NOSPACE stall), as for the database.
                    raise StorageFull(error.errno, f"cannot write the encryption sidecar: "
                                                   f"{error.strerror}") from error
                raise ApplyHalt(f"cannot write the encryption sidecar: {error}") from error
            with self._cond:
                self._durable_epochs = {key_id: key.local_epoch
                                        for key_id, key in sidecar.keys.items()}
                self._cond.notify_all()
            return sidecar.raft_applied_index

    def record_readable(self, key: bytes, entry: Entry) -> bool:
        """Whether a record as stored decodes here (see `EncryptionLayerAccess`)."""
        try:
            self.storage.decode_entry(key, entry)
        except IntegrityError:
            return False
        return True

    def resync_sidecar(self) -> int:
        """Rewrites this node's sidecar from the replicated state and this process's epochs.

        Called by the admin's ResyncSidecar on a gRPC thread (a node that lost its sidecar).
        Returns the key-change index the sidecar now reflects; raises `ApplyHalt` (carrying
        the reason) when the sidecar cannot be written.
        """
        return self._write_sidecar()

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
            self.kek = self._kek_to_restore(restored)
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
                self._sidecar_due = True  # the state machine runs persist_applied next
            self._cond.notify_all()

    # ---- what the admin may use (EncryptionLayerAccess) --------------------------------------

    def view(self) -> EncryptionView:
        """Returns a consistent copy of the state (see `EncryptionLayerAccess.view`)."""
        with self._cond:
            return EncryptionView(self.state.copy(), self.full_node_id, dict(self._epochs),
                                  self.kek is not None, self.raft_codec.wrap_installed)

    def metrics(self) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
        """This node's encryption metrics (`sealkv.plugins.api.ProvidesMetrics`)."""
        view = self.view()
        state, counts = view.state, COUNTERS.snapshot()
        storage = self.storage
        if storage is not None and storage.sealed:
            key = ("seal", "storage", "")
            counts[key] = counts.get(key, 0) + storage.sealed
        events = {"seal": [], "open": [], "failure": []}
        for (event, purpose, reason), n in sorted(counts.items()):
            labels = {"purpose": purpose, **({"reason": reason} if reason else {})}
            events[event].append((labels, n))
        job = state.job
        return [
            ("sealkv_encryption_active_key_id", "gauge",
             "The active data key id by purpose (0: none).",
             [({"purpose": PURPOSE_NAMES[p]}, state.active.get(p, 0)) for p in PURPOSE_NAMES]),
            ("sealkv_encryption_envelope_active", "gauge",
             "Whether the storage and raft-log envelopes are active (1) or not (0).",
             [({"envelope": "storage"}, int(state.storage_envelope_active)),
              ({"envelope": "raft"}, int(state.raft_envelope_active))]),
            ("sealkv_encryption_nonce_epoch", "gauge",
             "This process's nonce epoch per data key id.",
             [({"key_id": str(k)}, e) for k, e in sorted(view.epochs.items())]),
            ("sealkv_encryption_envelope_seals", "counter", "Envelopes sealed, by purpose.",
             events["seal"]),
            ("sealkv_encryption_envelope_opens", "counter", "Envelopes opened, by purpose.",
             events["open"]),
            ("sealkv_encryption_auth_failures", "counter",
             "Envelopes that failed to open, by purpose and reason.", events["failure"]),
            ("sealkv_encryption_reencrypt_done", "gauge",
             "Values the re-encryption job has examined (its total is _total).",
             [({}, job.done if job else 0)]),
            ("sealkv_encryption_reencrypt_total", "gauge",
             "Values the re-encryption job has to examine.", [({}, job.total if job else 0)]),
        ]

    def new_wrapped_key(self) -> bytes:
        """Returns a fresh random data key wrapped by this node's KEK."""
        return self._require_kek().wrap(os.urandom(32))

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwraps `wrapped` with this node's KEK (the leader's pre-checks)."""
        return self._require_kek().unwrap(wrapped)

    def key_problem(self, state: EncryptionState) -> str:
        """Returns why this node cannot use every key of `state`, or "" when it can."""
        if self.kek is None:
            return "no KEK is loaded"
        for key_id, key in sorted(state.keys.items()):
            dek = unwrapped_or_none(self.kek, key.wrapped)
            if dek is None:
                return f"the KEK cannot unwrap {PURPOSE_NAMES[key.purpose]} key {key_id}"
            held = self.keystore.get_for(key_id, key.purpose)
            if held is None or not hmac.compare_digest(held, dek):
                return f"{PURPOSE_NAMES[key.purpose]} key {key_id} is not loaded on this node"
        return ""

    def next_kek_status(self, state: EncryptionState) -> tuple[bool, str, bytes]:
        """See `EncryptionLayerAccess.next_kek_status`; never raises."""
        next_kek = self.next_kek
        if next_kek is None:
            return False, ("no next KEK is staged on this node: restart it with "
                           "--next-kek-file (or --next-kek-provider/--next-kek-option)"), b""
        problem = self.key_problem(state)
        if problem:
            return False, f"the current KEK cannot open the key table: {problem}", b""
        try:
            check = kek_check_blob(next_kek)
        except Exception as error:  # type only: a provider's text could carry bytes
            return False, f"the next KEK ({next_kek.name}) cannot wrap: {type(error).__name__}", b""
        if not opens_check(next_kek, check):
            return False, f"the next KEK ({next_kek.name}) cannot unwrap what it wraps", b""
        return True, "", check

    def next_kek_opens(self, check: bytes) -> bool:
        """See `EncryptionLayerAccess.next_kek_opens`."""
        return opens_check(self.next_kek, check)

    def rewrap_command(self, state: EncryptionState) -> RewrapCommand:
        """See `EncryptionLayerAccess.rewrap_command` (gRPC thread, the leader)."""
        next_kek = self.next_kek
        if next_kek is None:
            raise ProposalRefused("no next KEK is staged on the leader: restart it with "
                                  "--next-kek-file (or --next-kek-provider/--next-kek-option)")
        if unwrapped_or_none(next_kek, state.keys[state.active_storage_id].wrapped) is not None:
            raise ProposalRefused("the next KEK is the KEK the key table is already wrapped "
                                  "under: stage a new KEK as --next-kek-* on every member")
        keys = []
        for key_id, key in sorted(state.keys.items()):
            dek = self.keystore.get_for(key_id, key.purpose)
            if dek is None:
                raise ProposalRefused(f"{PURPOSE_NAMES[key.purpose]} key {key_id} is not "
                                      "loaded on the leader")
            keys.append((key_id, key.purpose, next_kek.wrap(dek)))
        command = RewrapCommand(state.kek_generation + 1, kek_check_blob(next_kek), tuple(keys))
        state.check_rewrap(command, next_kek.unwrap)
        return command

    def _require_kek(self) -> KEKProvider:
        if self.kek is None:
            raise EncryptionUnavailableError("no KEK is loaded: the plugin was not prepared")
        return self.kek


def _decoded(decoder: Callable[[bytes], Any], body: bytes) -> Any:
    try:
        return decoder(body)
    except CommandDecodeError as error:
        raise ApplyHalt(f"malformed encryption command: {error}") from error


def _die_here_if_testing(sidecar: Sidecar, durable: Mapping[int, int]) -> None:
    """The crash-safety tests' kill points (`DIE_BEFORE_SIDECAR_ENV`,
    `DIE_BEFORE_REWRAP_SIDECAR_ENV`); nothing when unset."""
    wanted = os.environ.get(DIE_BEFORE_SIDECAR_ENV)
    if wanted and wanted.isdigit() and int(wanted) in sidecar.keys \
            and int(wanted) not in durable:
        os.kill(os.getpid(), signal.SIGKILL)
    generation = os.environ.get(DIE_BEFORE_REWRAP_SIDECAR_ENV)
    if generation and generation.isdigit() and sidecar.kek_generation == int(generation):
        os.kill(os.getpid(), signal.SIGKILL)
