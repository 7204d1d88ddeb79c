"""The raft-log envelope: the encryption plugin's payload codec (ENCRYPTION.md §2, §3, §7).

Once the raft envelope is active, every Raft entry above `raft_cutover_index` carries its whole
payload (one command, or a batch of them) sealed once with the active raft data key, AAD
`'R' | 0x01 | key_id`. Entries are told apart by log index only: index > cutover is sealed,
the cutover entry itself (the cleartext marker, ROTATION sub-tag 0x05) and everything before
it are cleartext.

Three guards keep a cleartext payload from ever landing above the cutover:

- **Sealing** (`seal`, any node, proposing thread): a node seals once it has applied the
  marker (the wrap is installed by applying it, so it is installed on every node, at start-up
  by replay, and after any leader change by the replicated state).
- **The intake barrier** (`close_intake`, leader, admin thread): while the leader proposes the
  marker, other proposals on it wait; it reopens when the marker's outcome is known. If that
  outcome is unknown it stays closed until the marker applies or this node stops leading.
- **The append gate** (`admit_append`, leader, tick thread): every proposal the leader is
  about to append, local or forwarded by a follower that has not applied the marker yet, must
  be a raft envelope once a marker precedes it in the log, and must not be one before; a
  refused proposal is answered with a retryable error and never appended. A new leader re-arms
  the gate from its unapplied log suffix (`on_leadership`).

Nothing here logs a payload or key bytes.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional

from sealkv.node.errors import ApplyHalt, Unavailable

from . import commands, envelope
from .counters import COUNTERS
from .keystore import KeyStore
from .nonce import NonceFactory
from .purpose import PURPOSE_RAFT
from .state import EncryptionState


def is_raft_marker(payload: bytes) -> bool:
    """Whether `payload` is a raft envelope cutover entry (ROTATION, sub-tag 0x05)."""
    return (len(payload) > 2 and payload[0] == commands.OP_ROTATION
            and payload[2] == commands.SUB_ENABLE_RAFT)


def looks_sealed(payload: bytes, raft_key_ids: Iterable[int]) -> bool:
    """Whether `payload` parses as an envelope under one of `raft_key_ids` (no decryption).

    No cleartext command parses as one: the envelope's second byte (flags) is 0x00, while the
    only opcode equal to the version byte 0x01 (PUT) is followed by its body version 0x01.
    """
    try:
        key_id = envelope.key_id_of(payload)  # the header only: this runs for every append
    except envelope.EnvelopeError:
        return False
    return key_id in set(raft_key_ids)


class RaftPayloadCodec:
    """The `PayloadCodec` of the encryption plugin (see the module docstring).

    `state` is the live replicated state (read here, changed only by apply), `keystore` the
    unwrapped keys, `nonces(dek_id, timeout)` this process's nonce factory for a key (waits
    up to `timeout` for its epoch to be durable; raises when it has none here by then).
    """

    gates_appends = True

    def __init__(self, state: EncryptionState, keystore: KeyStore,
                 nonces: Callable[[int], NonceFactory]):
        self.state = state
        self.keystore = keystore
        self.nonces = nonces
        self._cond = threading.Condition()
        self._intake_closed = False
        # The active raft key's sealer, AAD and nonce source, built by the first seal under
        # it (any proposing thread; a racing second build is identical). Valid until the
        # active id changes: a key id always names the same bytes and its nonce factory lives
        # as long as the process (as for the storage layer's sealing).
        self._sealing: Optional[tuple[envelope.Sealer, bytes, Callable[[], bytes]]] = None
        # Tick thread: the indexes of applied entries sealed under each raft key, above the
        # last snapshot (the retained log's users of a key; `log_users`).
        self._sealed_at: dict[int, list[int]] = {}
        # Tick thread: (key id, its key as the keystore holds it, opener, raft AAD) of the key
        # the last entry was sealed under. Checked against the keystore on every open (the
        # same bytes object), so a key removed or installed again is never opened from here.
        self._opening: Optional[tuple[int, bytes, envelope.Opener, bytes]] = None
        self._snapshot_index = 0
        # Leader only (tick thread): the log index of a marker appended or found unapplied in
        # this leadership, whose outcome is not applied yet.
        self._marker_at = 0

    # ---- sealing (proposing threads) ---------------------------------------------------

    @property
    def wrap_installed(self) -> bool:
        """Whether this node seals its proposals (it has applied the raft cutover)."""
        return self.state.raft_envelope_active

    def seal(self, command: bytes, timeout: float) -> bytes:
        """Seals `command` with the active raft key once the wrap is installed; waits (up to
        `timeout`) while the intake is closed, except for the marker itself."""
        deadline = time.monotonic() + timeout
        if self._intake_closed and not is_raft_marker(command):
            with self._cond:
                while self._intake_closed and not self.wrap_installed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Unavailable("the raft-log envelope cutover is in progress: "
                                          "proposals are paused; retry")
                    self._cond.wait(remaining)
        if not self.wrap_installed:
            return command
        key_id = self.state.active_raft_id
        sealing = self._sealing
        try:
            if sealing is None or sealing[0].key_id != key_id:
                sealing = self._sealing = self._sealing_for(key_id, deadline)
            sealer, aad, next_nonce = sealing
            nonce = next_nonce()
        except (RuntimeError, ValueError) as error:  # exhausted nonces, no durable epoch
            raise Unavailable(f"cannot seal under raft key {key_id} on this node "
                              f"({type(error).__name__}): rotate the raft key") from None
        sealed = sealer.seal(nonce, command, aad)
        COUNTERS.add("seal", "raft")
        return sealed

    def _sealing_for(self, key_id: int, deadline: float
                     ) -> tuple[envelope.Sealer, bytes, Callable[[], bytes]]:
        dek = self.keystore.get_for(key_id, PURPOSE_RAFT)
        if dek is None:
            raise Unavailable(f"raft key {key_id} is not loaded on this node yet: retry")
        # A key just installed by apply: wait for its epoch's sidecar write (the gate).
        factory = self.nonces(key_id, max(0.0, deadline - time.monotonic()))
        return envelope.Sealer(dek, key_id), envelope.raft_aad(key_id), factory.next

    # ---- the intake barrier (leader, admin thread) ---------------------------------------

    def close_intake(self) -> None:
        """Pauses every proposal on this node except the marker (see the module docstring)."""
        with self._cond:
            self._intake_closed = True

    def reopen_intake(self) -> None:
        """Lets paused proposals go: they are sealed if the wrap is installed by now."""
        with self._cond:
            self._intake_closed = False
            self._cond.notify_all()

    @property
    def intake_closed(self) -> bool:
        return self._intake_closed

    # ---- the append gate (leader, tick thread) -------------------------------------------

    def admit_append(self, index: int, payload: bytes) -> Optional[str]:
        sealed_region = self.state.raft_envelope_active or (self._marker_at and
                                                           index > self._marker_at)
        sealed = looks_sealed(payload, self.keystore.ids(PURPOSE_RAFT))
        if sealed_region and not sealed:
            return "a cleartext proposal above the raft envelope cutover (its proposer has not " \
                   "applied the cutover yet)"
        if not sealed_region and sealed:
            return "a sealed proposal below the raft envelope cutover"
        if not sealed_region and is_raft_marker(payload):
            self._marker_at = index
        return None

    def on_leadership(self, is_leader: bool, unapplied: Iterable[tuple[int, bytes]]) -> None:
        self._marker_at = 0
        if not is_leader:
            self.reopen_intake()  # the new leader decides; our seals follow the applied state
            return
        for index, payload in unapplied:
            if is_raft_marker(payload) and not self.state.raft_envelope_active:
                self._marker_at = index
                break

    # ---- apply (tick thread) --------------------------------------------------------------

    def open(self, index: int, payload: bytes) -> bytes:
        cutover = self.state.raft_cutover_index
        if not cutover or index <= cutover:
            return payload
        try:
            key_id = envelope.key_id_of(payload)
            opening = self._opener_for(key_id)
            command = opening[2].open(payload, opening[3])
        except envelope.EnvelopeError as error:
            COUNTERS.add("failure", "raft", type(error).__name__)
            raise ApplyHalt(f"entry {index} is above the raft envelope cutover {cutover} and "
                            f"does not open as a raft envelope: {type(error).__name__}") from None
        self._sealed_at.setdefault(key_id, []).append(index)
        COUNTERS.add("open", "raft")
        return command

    def _opener_for(self, key_id: int) -> tuple[int, bytes, envelope.Opener, bytes]:
        """The cached opening of raft key `key_id` (tick thread); raises `UnknownKeyId` when no
        raft key with that id is loaded."""
        dek = self.keystore.get_for(key_id, PURPOSE_RAFT)
        if dek is None:
            raise envelope.UnknownKeyId(f"no raft key with id {key_id} is loaded")
        opening = self._opening
        if opening is None or opening[0] != key_id or opening[1] is not dek:
            opening = self._opening = (key_id, dek, envelope.Opener(dek, key_id),
                                       envelope.raft_aad(key_id))
        return opening

    def snapshot_taken(self, index: int) -> None:
        self._snapshot_index = max(self._snapshot_index, index)
        for key_id in list(self._sealed_at):
            kept = [i for i in self._sealed_at[key_id] if i > self._snapshot_index]
            if kept:
                self._sealed_at[key_id] = kept
            else:
                del self._sealed_at[key_id]

    def log_users(self, key_id: int) -> int:
        """The number of entries of this node's retained log sealed under `key_id` (applied
        entries above its last snapshot). Safe from any thread (a copy is read)."""
        indexes = list(self._sealed_at.get(key_id, ()))
        return sum(1 for i in indexes if i > self._snapshot_index)

    def cutover_applied(self, index: int) -> None:
        """Called by the plugin after applying a raft cutover entry at `index` (whatever its
        outcome): the marker's fate is known, so the gate follows the state and the intake
        reopens (sealed from now on if the cutover took effect)."""
        if index == self._marker_at or self.state.raft_envelope_active:
            self._marker_at = 0
        self.reopen_intake()
