"""The replicated encryption state and its deterministic apply rules (ENCRYPTION.md §4, §6).

`EncryptionState` is pure: no I/O, clock, randomness or logging. It holds the wrapped data-key
table `{id: (purpose, wrapped, created index)}`, the active key id per purpose, the storage and
raft envelope cutover indexes, and the writer registry
`(dek_id, node_id16) -> (full_node_id, first_epoch, last_epoch)`. Every replica applies the same
entries in the same order and reaches the same state; `to_bytes()` gives the same bytes for the
same state, for Raft snapshots, so a node that joins after log compaction gets every wrapped key.

Each rule is evaluated once and used twice: by the `apply_*` functions (a broken rule raises
`ApplyHalt`) and by the leader's `check_*` pre-checks (a broken rule raises `ProposalRefused`),
so nothing that can fail at apply is proposed. Unwrapping needs the node-local KEK, so it is
passed in: apply takes an `install(key_id, purpose, wrapped)` callable that unwraps and keeps
the key (and raises if it cannot), the pre-checks an `unwrap(wrapped)` callable.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Callable, Optional

from sealkv.node.errors import ApplyHalt, FailedPrecondition, where

from .reencryption import ReencryptJob
from .commands import (
    SUB_ENABLE_RAFT, SUB_ENABLE_STORAGE, SUB_RETIRE, SUB_ROTATE, BodyReader, BootstrapCommand,
    CommandDecodeError, RegisterCommand, RewrapCommand, RotationCommand, WriterRow, encode_body,
)
from .nonce import node_id16
from .purpose import PURPOSE_NAMES, PURPOSE_RAFT, PURPOSE_STORAGE

SNAPSHOT_VERSION = 0x01
SNAPSHOT_VERSION_EXTENDED = 0x02  # v1 + retired key ids + the re-encryption job
SNAPSHOT_VERSION_REWRAPPED = 0x03  # v2 + the KEK generation and its check blob

Installer = Callable[[int, int, bytes], None]
Unwrapper = Callable[[bytes], bytes]
# Applies a rewrap node-locally: (new KEK check blob, keys as (id, purpose, wrapped)) ->
# None; verifies every wrapped key opens to the key already held and switches this node to
# the new KEK, or raises (the node cannot follow the cluster's KEK).
Rewrapper = Callable[[bytes, tuple[tuple[int, int, bytes], ...]], None]


class RuleViolation(Exception):
    """An entry breaks an encryption rule (halts at apply, refused before proposing)."""


class RegistryRollback(RuleViolation):
    """A registration carries a lower epoch than the registry: the node was rolled back."""


class RegistryCollision(RuleViolation):
    """Another full node id already writes under this (key, node_id16): nonces could repeat."""


class ProposalRefused(FailedPrecondition):
    """The leader refuses to propose a command that could not be applied; nothing changed."""


class AlreadyBootstrapped(ProposalRefused):
    """The cluster already has data keys; bootstrap runs once."""


class AlreadyActive(ProposalRefused):
    """The envelope is already active since `cutover_index` (callers report it as success)."""

    def __init__(self, message: str, cutover_index: int):
        super().__init__(message)
        self.cutover_index = cutover_index


class StateDecodeError(ValueError):
    """Snapshot bytes of the encryption state are malformed."""


class Outcome(enum.Enum):
    """What applying a control entry did."""

    APPLIED = "applied"
    NOOP_REPLAY = "noop_replay"          # the same entry again: nothing to do
    ALREADY_ACTIVE = "already_active"    # cutover: original index kept
    STALE_CONSUMED = "stale_consumed"    # cutover: its key is no longer active


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of one control entry; `index` is the cutover or key-creation index."""

    outcome: Outcome
    index: int = 0


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """One entry of the replicated key table."""

    purpose: int
    wrapped: bytes
    created: int


@dataclass(frozen=True, slots=True)
class WriterRecord:
    """One writer registry row's value."""

    full_node_id: int
    first_epoch: int
    last_epoch: int


@dataclass
class EncryptionState:
    """The replicated encryption state (see the module docstring)."""

    keys: dict[int, WrappedKey] = field(default_factory=dict)
    active: dict[int, int] = field(
        default_factory=lambda: {PURPOSE_STORAGE: 0, PURPOSE_RAFT: 0})
    storage_cutover_index: int = 0
    raft_cutover_index: int = 0
    registry: dict[tuple[int, int], WriterRecord] = field(default_factory=dict)
    key_change_index: int = 0
    retired: set[int] = field(default_factory=set)
    job: Optional[ReencryptJob] = None
    # How many times the key table was rewrapped under a new KEK (0: the bootstrap KEK), the
    # current KEK's check blob (`kek.kek_check_blob`; empty at generation 0) and the index of
    # the last rewrap entry.
    kek_generation: int = 0
    kek_check: bytes = b""
    kek_rewrap_index: int = 0

    # ---- queries -------------------------------------------------------------------------

    def copy(self) -> "EncryptionState":
        """Returns an independent copy (its rows and keys are immutable, so shallow is enough)."""
        return dataclasses.replace(self, **{f.name: copy.copy(getattr(self, f.name))
                                            for f in dataclasses.fields(self)})

    @property
    def bootstrapped(self) -> bool:
        """Whether the first data keys are installed."""
        return self.active[PURPOSE_STORAGE] != 0

    @property
    def storage_envelope_active(self) -> bool:
        """Whether values are stored in envelopes (from `storage_cutover_index` on)."""
        return self.storage_cutover_index > 0

    @property
    def raft_envelope_active(self) -> bool:
        """Whether entries above `raft_cutover_index` carry wrapped payloads."""
        return self.raft_cutover_index > 0

    @property
    def active_storage_id(self) -> int:
        """The storage key new values are sealed under (0: none)."""
        return self.active[PURPOSE_STORAGE]

    @property
    def active_raft_id(self) -> int:
        """The raft key new payloads are sealed under (0: none)."""
        return self.active[PURPOSE_RAFT]

    def writer(self, dek_id: int, node_id16: int) -> Optional[WriterRecord]:
        """Returns the registry row of (dek_id, node_id16), or None."""
        return self.registry.get((dek_id, node_id16))

    def registry_case(self, row: WriterRow) -> str:
        """Classifies `row` against the registry: "insert", "advance" or "noop".

        Raises `RegistryCollision` for another full id at the same node_id16 and
        `RegistryRollback` for a lower epoch than the registry's last one.
        """
        current = self.registry.get((row.dek_id, row.node_id16))
        return _registry_case(current, row)

    # ---- apply (tick thread, deterministic) ------------------------------------------------

    def apply_register(self, index: int, command: RegisterCommand) -> ApplyResult:
        """Applies 0x03 REGISTER; raises `ApplyHalt` on rollback, collision or unknown key."""
        case = _halting(self._evaluate_register, command)
        if case == "noop":
            return ApplyResult(Outcome.NOOP_REPLAY)
        self._put_row(command.row)
        return ApplyResult(Outcome.APPLIED, index)

    def apply_bootstrap(self, index: int, command: BootstrapCommand,
                        install: Installer) -> ApplyResult:
        """Applies 0x04 BOOTSTRAP; an identical replay is a no-op, a different one halts."""
        outcome = _halting(self._evaluate_bootstrap, command)
        if outcome is Outcome.NOOP_REPLAY:
            return ApplyResult(outcome)
        _installing(install, command.storage_id, PURPOSE_STORAGE, command.storage_wrapped)
        _installing(install, command.raft_id, PURPOSE_RAFT, command.raft_wrapped)
        self.keys[command.storage_id] = WrappedKey(PURPOSE_STORAGE, command.storage_wrapped, index)
        self.keys[command.raft_id] = WrappedKey(PURPOSE_RAFT, command.raft_wrapped, index)
        self.active[PURPOSE_STORAGE] = command.storage_id
        self.active[PURPOSE_RAFT] = command.raft_id
        for row in command.rows:
            if self.registry_case(row) != "noop":
                self._put_row(row)
        self.key_change_index = index
        return ApplyResult(Outcome.APPLIED, index)

    def apply_rotation(self, index: int, command: RotationCommand,
                       install: Installer) -> ApplyResult:
        """Applies 0x05 ROTATION (rotate, enable storage envelope, enable raft envelope).

        Cutovers: malformed -> `ApplyHalt`; key no longer active -> consumed, no effect;
        already active -> no effect, original index kept; fresh -> the proposer's registry
        row first, then the flag and cutover index = `index`.
        """
        result = _halting(self._evaluate_rotation, command)
        if result.outcome is not Outcome.APPLIED:
            return result
        if command.sub_tag == SUB_RETIRE:
            del self.keys[command.dek_id]
            self.retired.add(command.dek_id)
            for slot in [slot for slot in self.registry if slot[0] == command.dek_id]:
                del self.registry[slot]
            self.key_change_index = index
            return ApplyResult(Outcome.APPLIED, index)
        if command.sub_tag == SUB_ROTATE:
            _installing(install, command.dek_id, command.purpose, command.wrapped)
            self.keys[command.dek_id] = WrappedKey(command.purpose, command.wrapped, index)
            self.active[command.purpose] = command.dek_id
        if self.registry_case(command.proposer) != "noop":
            self._put_row(command.proposer)
        if command.sub_tag == SUB_ENABLE_STORAGE:
            self.storage_cutover_index = index
        elif command.sub_tag == SUB_ENABLE_RAFT:
            self.raft_cutover_index = index
        self.key_change_index = index
        return ApplyResult(Outcome.APPLIED, index)

    def apply_rewrap(self, index: int, command: RewrapCommand,
                     rewrap: Rewrapper) -> ApplyResult:
        """Applies 0x05 ROTATION sub-tag 0x02: the key table rewrapped under a new KEK.

        The same rewrap again -> no-op; a rewrap computed from another table or generation (a
        rotation, retirement or another rewrap raced it) -> consumed, no effect; else
        `rewrap(check, keys)` (node-local: verify and switch KEK, raising halts) and the table's
        wrapped bytes, the generation and the check blob are replaced.
        """
        result = _halting(self._evaluate_rewrap, command)
        if result.outcome is not Outcome.APPLIED:
            return result
        try:
            rewrap(command.check, command.keys)
        except ApplyHalt:
            raise
        except Exception as error:
            raise ApplyHalt(f"cannot apply the KEK rewrap (generation {command.generation}): "
                            f"{type(error).__name__} at {where(error)}") from error
        for key_id, purpose, wrapped in command.keys:
            self.keys[key_id] = WrappedKey(purpose, wrapped, self.keys[key_id].created)
        self.kek_generation = command.generation
        self.kek_check = command.check
        self.kek_rewrap_index = self.key_change_index = index
        return ApplyResult(Outcome.APPLIED, index)

    # ---- leader pre-checks (gRPC threads, read-only) ---------------------------------------

    def check_rewrap(self, command: RewrapCommand, unwrap_next: Unwrapper) -> None:
        """Refuses a rewrap unless it would take effect: it names every key of the table with
        its purpose, the next generation, and every wrapped key opens under the next KEK."""
        try:
            encode_body(command)
        except ValueError as error:
            raise ProposalRefused(f"malformed rewrap: {error}") from None
        result = _refusing(self._evaluate_rewrap, command)
        if result.outcome is not Outcome.APPLIED:
            raise ProposalRefused("the key table changed while the rewrap was prepared: retry")
        for key_id, _purpose, wrapped in command.keys:
            _trial_unwrap(unwrap_next, key_id, wrapped)

    def check_register(self, command: RegisterCommand) -> str:
        """Refuses (`ProposalRefused`) a registration that would halt; returns its case."""
        return _refusing(self._evaluate_register, command)

    def check_bootstrap(self, command: BootstrapCommand, unwrap: Unwrapper) -> None:
        """Refuses a bootstrap unless it would apply: first one, distinct ids, no collision
        in its rows, and both wrapped keys unwrap under this node's KEK."""
        try:
            encode_body(command)
        except ValueError as error:
            raise ProposalRefused(f"malformed bootstrap: {error}") from None
        if self.bootstrapped:
            raise AlreadyBootstrapped(
                f"encryption is already bootstrapped (storage key {self.active_storage_id}, "
                f"raft key {self.active_raft_id}); rotate keys instead")
        _refusing(self._evaluate_bootstrap, command)
        _trial_unwrap(unwrap, command.storage_id, command.storage_wrapped)
        _trial_unwrap(unwrap, command.raft_id, command.raft_wrapped)

    def check_rotation(self, command: RotationCommand, unwrap: Optional[Unwrapper] = None) -> None:
        """Refuses a rotation or cutover unless it would take effect.

        Raises `AlreadyActive` (with the original cutover index) when the envelope is on,
        `ProposalRefused` when the key is stale, reused or does not unwrap, or a registry rule
        would halt.
        """
        try:
            encode_body(command)
        except ValueError as error:
            raise ProposalRefused(f"malformed rotation: {error}") from None
        result = _refusing(self._evaluate_rotation, command)
        if result.outcome is Outcome.ALREADY_ACTIVE:
            raise AlreadyActive("the envelope is already active", result.index)
        if result.outcome is Outcome.STALE_CONSUMED:
            raise ProposalRefused(f"key {command.dek_id} is no longer the active "
                                  f"{PURPOSE_NAMES[command.purpose]} key: retry")
        if result.outcome is Outcome.NOOP_REPLAY:
            raise ProposalRefused(f"key id {command.dek_id} is already in use")
        if command.sub_tag == SUB_ROTATE:
            if unwrap is None:
                raise ProposalRefused("a rotation must be trial-unwrapped before proposing")
            _trial_unwrap(unwrap, command.dek_id, command.wrapped)

    # ---- rules -----------------------------------------------------------------------------

    def _evaluate_register(self, command: RegisterCommand) -> str:
        key = self.keys.get(command.row.dek_id)
        if key is None:
            raise RuleViolation(f"registration names unknown key {command.row.dek_id}")
        return self.registry_case(command.row)

    def _evaluate_bootstrap(self, command: BootstrapCommand) -> Outcome:
        if command.storage_id == command.raft_id:
            raise RuleViolation("bootstrap storage and raft key ids are equal")
        if self.bootstrapped:
            if (self.active_storage_id == command.storage_id
                    and self.active_raft_id == command.raft_id
                    and self.keys[command.storage_id].wrapped == command.storage_wrapped
                    and self.keys[command.raft_id].wrapped == command.raft_wrapped):
                return Outcome.NOOP_REPLAY
            raise RuleViolation("a different bootstrap was already applied")
        for key_id in (command.storage_id, command.raft_id):
            if key_id in self.keys:
                raise RuleViolation(f"key id {key_id} is already in use")
        trial = dict(self.registry)
        for row in command.rows:
            case = _registry_case(trial.get((row.dek_id, row.node_id16)), row)
            if case != "noop":
                trial[(row.dek_id, row.node_id16)] = _advanced(trial.get(
                    (row.dek_id, row.node_id16)), row)
        return Outcome.APPLIED

    def _evaluate_rotation(self, command: RotationCommand) -> ApplyResult:
        if not self.bootstrapped:
            raise RuleViolation("rotation or cutover before bootstrap")
        if command.sub_tag == SUB_RETIRE:
            if command.dek_id in self.retired:
                return ApplyResult(Outcome.NOOP_REPLAY)
            key = self.keys.get(command.dek_id)
            if key is None or key.purpose != command.purpose:
                raise RuleViolation(f"retirement names key {command.dek_id}, which is not a "
                                    f"{PURPOSE_NAMES[command.purpose]} key")
            if self.active[command.purpose] == command.dek_id:
                raise RuleViolation(f"key {command.dek_id} is the active "
                                    f"{PURPOSE_NAMES[command.purpose]} key: rotate first")
            return ApplyResult(Outcome.APPLIED)
        if command.sub_tag == SUB_ROTATE:
            if command.dek_id in self.retired:
                raise RuleViolation(f"key id {command.dek_id} was retired and is never reused")
            existing = self.keys.get(command.dek_id)
            if existing is not None:
                if (existing.purpose == command.purpose and existing.wrapped == command.wrapped
                        and self.active[command.purpose] == command.dek_id):
                    return ApplyResult(Outcome.NOOP_REPLAY, existing.created)
                raise RuleViolation(f"key id {command.dek_id} is already in use")
            _registry_case(None, command.proposer)
            return ApplyResult(Outcome.APPLIED)
        key = self.keys.get(command.dek_id)
        if key is None or key.purpose != command.purpose:
            raise RuleViolation(f"cutover names key {command.dek_id}, which is not a "
                                f"{PURPOSE_NAMES[command.purpose]} key")
        if self.active[command.purpose] != command.dek_id:
            return ApplyResult(Outcome.STALE_CONSUMED)
        index = (self.storage_cutover_index if command.sub_tag == SUB_ENABLE_STORAGE
                 else self.raft_cutover_index)
        if index:
            return ApplyResult(Outcome.ALREADY_ACTIVE, index)
        self.registry_case(command.proposer)
        return ApplyResult(Outcome.APPLIED)

    def _evaluate_rewrap(self, command: RewrapCommand) -> ApplyResult:
        if not self.bootstrapped:
            raise RuleViolation("a KEK rewrap before bootstrap")
        table = {key_id: key.purpose for key_id, key in self.keys.items()}
        named = {key_id: purpose for key_id, purpose, _ in command.keys}
        if (command.generation == self.kek_generation and command.check == self.kek_check
                and named == table
                and all(self.keys[key_id].wrapped == wrapped
                        for key_id, _, wrapped in command.keys)):
            return ApplyResult(Outcome.NOOP_REPLAY)
        if command.generation != self.kek_generation + 1 or named != table:
            return ApplyResult(Outcome.STALE_CONSUMED)
        return ApplyResult(Outcome.APPLIED)

    def _put_row(self, row: WriterRow) -> None:
        slot = (row.dek_id, row.node_id16)
        self.registry[slot] = _advanced(self.registry.get(slot), row)

    # ---- snapshot codec --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Returns the canonical snapshot form (equal states give equal bytes).

        Layout, big-endian: version 0x01 | storage_cutover(8) | raft_cutover(8) |
        key_change_index(8) | active storage(4) | active raft(4) | key count(4) | per key in
        id order: id(4) purpose(1) created(8) length(2) wrapped | row count(4) | per row in
        (dek_id, node_id16) order: dek_id(4) node_id16(2) full_node_id(8) first(2) last(2).
        """
        parts = [bytes((SNAPSHOT_VERSION,)),
                 self.storage_cutover_index.to_bytes(8, "big"),
                 self.raft_cutover_index.to_bytes(8, "big"),
                 self.key_change_index.to_bytes(8, "big"),
                 self.active[PURPOSE_STORAGE].to_bytes(4, "big"),
                 self.active[PURPOSE_RAFT].to_bytes(4, "big"),
                 len(self.keys).to_bytes(4, "big")]
        for key_id, key in sorted(self.keys.items()):
            parts += [key_id.to_bytes(4, "big"), bytes((key.purpose,)),
                      key.created.to_bytes(8, "big"), len(key.wrapped).to_bytes(2, "big"),
                      key.wrapped]
        parts.append(len(self.registry).to_bytes(4, "big"))
        for (dek_id, node16), record in sorted(self.registry.items()):
            parts += [dek_id.to_bytes(4, "big"), node16.to_bytes(2, "big"),
                      record.full_node_id.to_bytes(8, "big"),
                      record.first_epoch.to_bytes(2, "big"), record.last_epoch.to_bytes(2, "big")]
        if self.retired or self.job is not None or self.kek_generation:
            # Version 0x02 appends: retired count(4) | ids(4 each, ascending) | job flag(1) |
            # the job (`ReencryptJob.to_bytes`) when the flag is 1.
            parts[0] = bytes((SNAPSHOT_VERSION_EXTENDED,))
            parts.append(len(self.retired).to_bytes(4, "big"))
            parts += [key_id.to_bytes(4, "big") for key_id in sorted(self.retired)]
            parts.append(b"\x01" + self.job.to_bytes() if self.job is not None else b"\x00")
        if self.kek_generation:
            # Version 0x03 appends to 0x02: kek_generation(4) | rewrap index(8) |
            # check length(2) | check.
            parts[0] = bytes((SNAPSHOT_VERSION_REWRAPPED,))
            parts += [self.kek_generation.to_bytes(4, "big"),
                      self.kek_rewrap_index.to_bytes(8, "big"),
                      len(self.kek_check).to_bytes(2, "big"), self.kek_check]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptionState":
        """Parses and validates `to_bytes()` output; empty data is the initial state."""
        if not data:
            return cls()
        try:
            return cls._parse(BodyReader(data))
        except CommandDecodeError as error:
            raise StateDecodeError(f"encryption snapshot: {error}") from None

    @classmethod
    def _parse(cls, reader: BodyReader) -> "EncryptionState":
        version = reader.u8("version")
        if version not in (SNAPSHOT_VERSION, SNAPSHOT_VERSION_EXTENDED,
                           SNAPSHOT_VERSION_REWRAPPED):
            raise StateDecodeError("unsupported encryption snapshot version")
        state = cls()
        state.storage_cutover_index = reader.u64("storage cutover")
        state.raft_cutover_index = reader.u64("raft cutover")
        state.key_change_index = reader.u64("key change index")
        state.active = {PURPOSE_STORAGE: reader.u32("active storage"),
                        PURPOSE_RAFT: reader.u32("active raft")}
        count = reader.u32("key count")
        if count * 15 > reader.remaining():
            raise StateDecodeError("key count exceeds the snapshot size")
        previous = 0
        for _ in range(count):
            key_id = reader.u32("key id")
            purpose = reader.u8("purpose")
            created = reader.u64("created")
            wrapped = reader.take(reader.u16("wrapped length"), "wrapped key")
            if key_id <= previous or purpose not in PURPOSE_NAMES or not wrapped:
                raise StateDecodeError("keys out of order, id 0, unknown purpose or empty key")
            previous = key_id
            state.keys[key_id] = WrappedKey(purpose, wrapped, created)
        count = reader.u32("row count")
        if (count * 18 != reader.remaining() if version == SNAPSHOT_VERSION
                else count * 18 > reader.remaining()):
            raise StateDecodeError("row count does not match the snapshot size")
        last_slot = (0, -1)
        for _ in range(count):
            slot = (reader.u32("row key"), reader.u16("row node_id16"))
            record = WriterRecord(reader.u64("row full id"), reader.u16("row first epoch"),
                                  reader.u16("row last epoch"))
            if (slot <= last_slot or slot[0] not in state.keys
                    or node_id16(record.full_node_id) != slot[1] or record.full_node_id == 0
                    or record.first_epoch > record.last_epoch):
                raise StateDecodeError("invalid or unordered writer registry row")
            last_slot = slot
            state.registry[slot] = record
        if version in (SNAPSHOT_VERSION_EXTENDED, SNAPSHOT_VERSION_REWRAPPED):
            count = reader.u32("retired count")
            if count * 4 > reader.remaining():
                raise StateDecodeError("retired count exceeds the snapshot size")
            state.retired = {reader.u32("retired id") for _ in range(count)}
            if len(state.retired) != count or state.retired & set(state.keys):
                raise StateDecodeError("retired key ids repeat or are still in the table")
            if reader.u8("job flag"):
                state.job = ReencryptJob.read(reader)
        if version == SNAPSHOT_VERSION_REWRAPPED:
            state.kek_generation = reader.u32("kek generation")
            state.kek_rewrap_index = reader.u64("kek rewrap index")
            state.kek_check = reader.take(reader.u16("kek check length"), "kek check")
            if not state.kek_generation or not state.kek_check:
                raise StateDecodeError("a rewrapped state without its generation or check")
        reader.end()
        for purpose, key_id in state.active.items():
            if key_id and (key_id not in state.keys or state.keys[key_id].purpose != purpose):
                raise StateDecodeError(f"active {PURPOSE_NAMES[purpose]} key is not in the table")
        if (state.storage_cutover_index or state.raft_cutover_index) and not state.bootstrapped:
            raise StateDecodeError("a cutover without bootstrap")
        return state


def _registry_case(current: Optional[WriterRecord], row: WriterRow) -> str:
    if current is None:
        return "insert"
    if current.full_node_id != row.full_node_id:
        raise RegistryCollision(
            f"node_id16 0x{row.node_id16:04x} of key {row.dek_id} belongs to node "
            f"{current.full_node_id:#018x}, not {row.full_node_id:#018x}: two members share a "
            "node_id16; change one member's raft id")
    if row.local_epoch > current.last_epoch:
        return "advance"
    if row.local_epoch == current.last_epoch:
        return "noop"
    raise RegistryRollback(
        f"node {row.full_node_id:#018x} registers epoch {row.local_epoch} for key {row.dek_id} "
        f"below the registered {current.last_epoch}: its data directory was rolled back")


def _advanced(current: Optional[WriterRecord], row: WriterRow) -> WriterRecord:
    if current is None:
        return WriterRecord(row.full_node_id, row.local_epoch, row.local_epoch)
    return WriterRecord(current.full_node_id, current.first_epoch, row.local_epoch)


def _halting(evaluate, command):
    try:
        return evaluate(command)
    except RuleViolation as error:
        raise ApplyHalt(str(error)) from error


def _refusing(evaluate, command):
    try:
        return evaluate(command)
    except RuleViolation as error:
        raise ProposalRefused(str(error)) from error


def _installing(install: Installer, key_id: int, purpose: int, wrapped: bytes) -> None:
    try:
        install(key_id, purpose, wrapped)
    except ApplyHalt:
        raise
    except Exception as error:
        # Type and location only: an unwrap error's text could carry key material.
        raise ApplyHalt(f"cannot install {PURPOSE_NAMES[purpose]} key {key_id}: "
                        f"{type(error).__name__} at {where(error)}") from error


def _trial_unwrap(unwrap: Unwrapper, key_id: int, wrapped: bytes) -> None:
    try:
        dek = unwrap(wrapped)
    except Exception as error:
        raise ProposalRefused(f"this node's KEK cannot unwrap key {key_id}: {error}") from None
    if len(dek) != 32:
        raise ProposalRefused(f"key {key_id} does not unwrap to 32 bytes")
