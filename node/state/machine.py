"""The pure replicated state machine of a sealkv node.

`StateMachine.apply(index, command)` is the single replicated entry point: it decodes the
versioned command bytes and changes the storage stack and the member directory. It has no
clock, randomness, network or logging, and no I/O besides the store's transaction. A command
that cannot be applied raises `ApplyHalt`, which the replication adapter turns into a
deliberate halt of the node.

Decide inside, act outside (etcd-io/raft Ready/Advance): a plugin whose apply decided
node-local I/O (the encryption sidecar) only records it; the caller of `apply` then runs
`persist_applied()` on the same thread, before the next entry (the contract is
`sealkv.plugins.api.PersistsAfterApply`). `load`, `read_snapshot` and `rollback` run it
themselves before returning.

Transactions: applied entries go into the base store's write transaction together with the
applied index and, when they change, the member directory, the configuration version and the
replicated plugin states (`META_*` keys). By default every `apply` commits; with
`defer_commit` set (the replication adapter does, for group commit) entries accumulate until
`commit()`, and a batch applies in one transaction by construction. `applied_index` is the
committed index: what readers see.

Threading: `apply`, `commit`, `load` and `read_snapshot` run on the pysyncobj tick thread (or
the start-up thread before it runs) and hold `self.lock`. Reads run on gRPC worker threads:
on an MVCC store (LMDB) each read uses one read transaction and never takes `self.lock`, so a
read never blocks apply; on the in-memory store (tests) reads take `self.lock`.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence

from sealkv.node.state import commands as cmd
from sealkv.node.errors import ApplyHalt, IntegrityError, where
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.storage.base import (
    VALUE_CLEARTEXT, Entry, Storage, StorageFull, base_store, layers_of,
)
from sealkv.plugins.api import CommandHandler, PersistsAfterApply

SNAPSHOT_MAGIC = b"SEALKVS1"
_RECORD = struct.Struct(">IBQQQI")
_U32 = struct.Struct(">I")

META_APPLIED = b"applied_index"
META_CONFIG_VERSION = b"config_version"
META_MEMBERS = b"members"
META_PLUGIN = b"plugin/"
META_ALARMS = b"alarms"
META_REVOKED = b"revoked"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a PUT, DELETE or CAS did.

    `prev` (the entry before the write) and `current` (a CAS's entry after it: the new one on
    success, the unchanged one on failure) are always entries as stored, which may be
    envelopes; `StateMachine.reveal` decodes them. Apply never decodes a value.
    """

    revision: int
    prev: Optional[Entry] = None
    succeeded: bool = True
    current: Optional[Entry] = None
    # A PUT or CAS refused because a NOSPACE alarm is active: nothing was written.
    refused: bool = False


class StateMachine:
    """The replicated key-value state: a storage stack plus the member directory."""

    def __init__(self, storage: Storage, initial_members: Sequence[MemberRecord] = (),
                 handlers: Optional[Mapping[int, CommandHandler]] = None,
                 plugin_states: Optional[Mapping[str, object]] = None):
        """Builds the state machine.

        `storage` is the top of the storage stack; `handlers` maps plugin opcodes to their
        apply handlers; `plugin_states` maps plugin names to objects with
        `snapshot_state() -> bytes` and `restore_state(bytes)`; those that also offer
        `PersistsAfterApply` are run by `persist_applied()`.
        """
        self.lock = threading.RLock()
        self.storage = storage
        self.base = base_store(storage)
        # The base store's optional capability: read transactions that never block apply.
        self.mvcc = bool(getattr(self.base, "mvcc", False))
        self.handlers = dict(handlers or {})
        cmd.claim_opcodes({}, "a plugin", self.handlers)
        self.plugin_states = dict(plugin_states or {})
        self._persisters = [state for state in self.plugin_states.values()
                            if isinstance(state, PersistsAfterApply)]
        self.members: dict[str, MemberRecord] = {m.name: m for m in initial_members}
        # What a read view holds where the store has no META_MEMBERS / META_PLUGIN yet (no
        # member or plugin command and no snapshot stored them): the state before any of
        # them, never the live one, which may be ahead of the view (`_viewed_header`); and
        # what `rollback` returns the plugin states to when none was stored.
        self._initial_members = _members_json(self.members.values())
        self._initial_plugin_states: Optional[dict[str, bytes]] = None
        self.config_version = 0
        # Active alarms, replicated: (member, cause) -> index of the entry that raised it.
        self.alarms: dict[tuple[str, int], int] = {}
        # Revoked certificate serials, replicated. Replaced, never mutated, so `is_revoked`
        # reads it on any thread without the lock.
        self.revoked: frozenset[int] = frozenset()
        self.applied_index = 0
        self._pending_index = 0
        self.defer_commit = False
        self._group_touched_plugins = False
        # Counters for start-up reporting: entries applied, entries skipped (already stored).
        self.applied_entries = 0
        self.skipped_entries = 0

    def load(self) -> int:
        """Loads what the base store holds (a restart) and returns its applied index.

        Restores the applied index, the member directory, the configuration version and the
        plugin states stored with the data. Returns 0 for an empty store (the initial members
        stay). Call once on the start-up thread, after the plugins are prepared and before the
        log replays: replay then skips every entry at or below the returned index.
        """
        with self.lock:
            raw = self.base.get_meta(META_APPLIED)
            if raw is None:
                return 0
            self._load_meta()
        self.persist_applied()
        return self.applied_index

    def _load_meta(self, plugins: bool = True) -> None:
        self.applied_index = self._pending_index = int(self.base.get_meta(META_APPLIED) or 0)
        members = self.base.get_meta(META_MEMBERS)
        if members is not None:
            self.members = {m[0]: MemberRecord(m[0], m[1], m[2], m[3])
                            for m in json.loads(members)}
        self.config_version = int(self.base.get_meta(META_CONFIG_VERSION) or 0)
        self.alarms = _alarms_from_json(self.base.get_meta(META_ALARMS))
        self.revoked = _revoked_from_json(self.base.get_meta(META_REVOKED))
        if plugins:
            for name, state in self.plugin_states.items():
                raw = self.base.get_meta(META_PLUGIN + name.encode())
                if raw is None and self._initial_plugin_states is not None:
                    raw = self._initial_plugin_states[name]  # none stored: as before any
                if raw is not None:
                    state.restore_state(raw)

    def _save_members(self) -> None:
        self.base.put_meta(META_MEMBERS, _members_json(self.members.values()))
        self.base.put_meta(META_CONFIG_VERSION, b"%d" % self.config_version)

    def _save_alarms(self) -> None:
        self.base.put_meta(META_ALARMS, _alarms_json(self.alarms))

    def _save_revoked(self) -> None:
        self.base.put_meta(META_REVOKED, _revoked_json(self.revoked))

    def _save_plugin_states(self) -> None:
        for name, state in self.plugin_states.items():
            self.base.put_meta(META_PLUGIN + name.encode(), state.snapshot_state())

    # -- replicated apply -------------------------------------------------------------

    def apply(self, index: int, command: bytes):
        """Applies the committed command at log `index`; raises `ApplyHalt` if it cannot.

        An entry at or below the index already applied (the database is ahead of the log
        after a restart, or the log re-sent a committed suffix) is skipped: returns None.
        On `ApplyHalt` the open transaction is aborted, so nothing of the group is kept.
        `StorageFull` (the store's disk or map is full) also aborts the group; the caller
        runs `rollback()` and applies the group's entries again once there is room.
        The caller runs `persist_applied()` after it returns, before the next entry.
        """
        with self.lock:
            if index <= self._pending_index:
                self.skipped_entries += 1
                return None
            if not self.base.in_write:
                self.base.begin_write()
            opcode = command[0] if command else None
            try:
                if opcode in self.handlers:
                    self._keep_initial_plugin_states()
                    self._group_touched_plugins = True
                    result = self.handlers[opcode](index, command[1:])
                    self._save_plugin_states()
                else:
                    result = self._apply_core(index, cmd.decode(command))
                self.base.put_meta(META_APPLIED, b"%d" % index)
            except BaseException as exc:
                self.base.abort()
                self._pending_index = self.applied_index
                if isinstance(exc, (ApplyHalt, StorageFull)):
                    raise
                if isinstance(exc, cmd.CommandError):
                    raise ApplyHalt(f"entry {index}: undecodable command: {exc}") from exc
                # The message could carry a key or value: never log it.
                raise ApplyHalt(f"entry {index}: apply failed: {type(exc).__name__} at "
                                f"{where(exc)}") from exc
            self._pending_index = index
            self.applied_entries += 1
            if not self.defer_commit:
                self.commit()
            return result

    def _keep_initial_plugin_states(self) -> None:
        # Tick thread, lock held: before the first change of the plugin states (a command
        # or a snapshot) in this process.
        if self._initial_plugin_states is None:
            self._initial_plugin_states = {name: state.snapshot_state()
                                           for name, state in self.plugin_states.items()}

    def persist_applied(self) -> None:
        """Performs the node-local I/O the applies so far decided (`PersistsAfterApply`).

        Called on the applying thread after `apply` returns, before the next entry, without
        the state lock (a reader is never blocked behind an fsync). Cheap when nothing is due.
        When a plugin cannot persist, the open transaction is aborted as for a failed apply
        (nothing of the group is kept) and `ApplyHalt` is raised: the node halts; a plugin
        that found its disk full raises `StorageFull`, which the adapter treats as a database
        that found it full (the group is applied again once there is room).
        """
        for persister in self._persisters:
            try:
                persister.persist_applied()
            except BaseException as exc:
                with self.lock:
                    self.base.abort()
                    self._pending_index = self.applied_index
                if isinstance(exc, (ApplyHalt, StorageFull)):
                    raise
                raise ApplyHalt(f"cannot persist what apply decided: {type(exc).__name__} "
                                f"at {where(exc)}") from exc

    def commit(self) -> int:
        """Commits the entries applied since the last commit; returns the committed index.

        Tick thread. Raises `StorageFull` (from the LMDB store) when the disk or map is full:
        the transaction is then aborted and `rollback()` must run before the next apply.
        """
        with self.lock:
            if self.base.in_write:
                self.base.commit()
            self._group_touched_plugins = False
            self.applied_index = self._pending_index
            return self.applied_index

    def rollback(self) -> int:
        """After a failed commit: reloads the in-memory state from the store; returns its index.

        The entries of the lost group must be applied again (the adapter rewinds the log).
        """
        with self.lock:
            self.base.abort()
            self._load_meta(plugins=self._group_touched_plugins)
            self._group_touched_plugins = False
        self.persist_applied()
        return self.applied_index

    def compact_store(self, timeout: float) -> Optional[tuple[int, int]]:
        """Commits what is applied and rewrites the base store without its free pages, when
        it can (LMDB); returns (bytes before, after) or None. Tick thread."""
        compact = getattr(self.base, "compact", None)
        if compact is None:
            return None
        with self.lock:
            self.commit()
            return compact(timeout)

    @contextmanager
    def transaction(self):
        """Applies everything inside the block in one store transaction (one commit)."""
        with self.lock:
            deferred, self.defer_commit = self.defer_commit, True
            try:
                yield self
            finally:
                self.defer_commit = deferred
            if not deferred:
                self.commit()

    def _apply_core(self, index: int, command):
        if self.alarms and isinstance(command, (cmd.Put, cmd.CompareAndSwap)):
            # Like etcd's capped applier: once a NOSPACE alarm is replicated, writes that
            # were admitted before it are refused on every replica alike (deletes go on).
            return WriteResult(index, succeeded=False, refused=True)
        if isinstance(command, cmd.Put):
            prev = self.base.get(command.key)
            self._store(index, command.key, command.value, prev)
            return WriteResult(index, prev)
        if isinstance(command, cmd.Delete):
            prev = self.base.get(command.key)
            if prev is not None:
                self.storage.delete(command.key)
            return WriteResult(index, prev, succeeded=prev is not None)
        if isinstance(command, cmd.CompareAndSwap):
            prev = self.base.get(command.key)
            if command.mode == cmd.CAS_MUST_NOT_EXIST:
                ok = prev is None
            else:
                ok = prev is not None and prev.mod_revision == command.expected_revision
            if not ok:
                return WriteResult(index, prev, succeeded=False, current=prev)
            self._store(index, command.key, command.value, prev)
            return WriteResult(index, prev, current=self.base.get(command.key))
        if isinstance(command, cmd.Barrier):
            return WriteResult(index)
        if isinstance(command, cmd.Batch):
            # One entry, one apply call (so one storage transaction wherever the store commits
            # per entry); one result per sub-command, in order. A failed compare is a result,
            # not a failure of the batch. Every sub-command decoded before the first applies.
            return tuple(self._apply_core(index, sub) for sub in command.commands)
        if isinstance(command, cmd.MemberSet):
            self.members[command.name] = MemberRecord(command.name, command.raft_address,
                                                      command.grpc_address, command.role)
            self.config_version = index
            self._save_members()
            return WriteResult(index)
        if isinstance(command, cmd.MemberRemove):
            existed = self.members.pop(command.name, None) is not None
            self.config_version = index
            self._save_members()
            return WriteResult(index, succeeded=existed)
        if isinstance(command, cmd.Alarm):
            if command.action == cmd.ALARM_RAISE:
                self.alarms.setdefault((command.member, command.cause), index)
            else:
                self.alarms = {(member, cause): at for (member, cause), at in self.alarms.items()
                               if (command.member and member != command.member)
                               or (command.cause and cause != command.cause)}
            self._save_alarms()
            return WriteResult(index)
        if isinstance(command, cmd.Revoke):
            new = command.serial not in self.revoked
            if new:
                self.revoked = self.revoked | {command.serial}
                self._save_revoked()
            return WriteResult(index, succeeded=new)
        raise ApplyHalt(f"entry {index}: no handler for {type(command).__name__}")

    def _store(self, index: int, key: bytes, value: bytes, prev: Optional[Entry]) -> None:
        create = index if prev is None else prev.create_revision
        version = 1 if prev is None else prev.version + 1
        self.storage.put(key, Entry(value, create, index, version, VALUE_CLEARTEXT))

    # -- reads ------------------------------------------------------------------------

    def read_view(self):
        """Returns a context manager: one consistent view for every read of this thread
        inside its block (it binds nothing useful to `as`).

        An MVCC store gives a read transaction (apply goes on meanwhile); the in-memory store
        gives the state lock. Handed over as it is, not wrapped in a generator of ours: every
        Get and Range enters it.
        """
        return self.base.read_view() if self.mvcc else self.lock

    def _viewed_index(self) -> int:
        if self.mvcc:
            return int(self.base.get_meta(META_APPLIED) or 0)
        return self.applied_index

    def get(self, key: bytes) -> tuple[Optional[Entry], int]:
        """Returns (the decoded entry or None, the applied index it reflects)."""
        with self.read_view():
            return _cleartext(self.storage.get(key)), self._viewed_index()

    def range(self, start: bytes, end: Optional[bytes], limit: int, keys_only: bool,
              max_bytes: Optional[int] = None) -> tuple[list[tuple[bytes, Entry]], int, int]:
        """Returns (decoded pairs, total count, applied index) from one read view.

        Stops after `limit` pairs, or before the pair that would take the keys and values
        past `max_bytes` (at least one pair is returned, so a caller always progresses).
        """
        with self.read_view():
            total = self.storage.count(start, end)
            pairs: list[tuple[bytes, Entry]] = []
            size = 0
            source = self.base.scan(start, end) if keys_only else self.storage.scan(start, end)
            for key, entry in source:
                if len(pairs) >= limit:
                    break
                size += len(key) + (0 if keys_only else len(entry.value))
                if max_bytes is not None and pairs and size > max_bytes:
                    break
                pairs.append((key, entry if keys_only else _cleartext(entry)))
            return pairs, total, self._viewed_index()

    def reveal(self, key: bytes, entry: Optional[Entry]) -> Optional[Entry]:
        """Decodes a raw entry (as returned in `WriteResult.prev`) through the storage stack."""
        if entry is None:
            return None
        with self.lock:
            for layer in reversed(layers_of(self.storage)):
                entry = layer.decode_entry(key, entry)
        return _cleartext(entry)

    def stored_records(self, start: bytes, limit: int) -> list[tuple[bytes, Entry]]:
        """Returns up to `limit` records as stored at rest (sealed or not) with key >= `start`,
        in key order. gRPC and plugin threads; one read view (on LMDB it never blocks apply)."""
        with self.read_view():
            out: list[tuple[bytes, Entry]] = []
            for pair in self.base.scan(start, None):
                if len(out) >= limit:
                    break
                out.append(pair)
            return out

    def active_alarms(self) -> dict[tuple[str, int], int]:
        """Returns a copy of the replicated alarms: (member, cause) -> raising index."""
        with self.lock:
            return dict(self.alarms)

    def is_revoked(self, serial: int) -> bool:
        """Whether a certificate serial is on the replicated revocation list (any thread)."""
        return serial in self.revoked

    def member_directory(self) -> tuple[dict[str, MemberRecord], int]:
        """Returns a copy of the member directory and its configuration version."""
        with self.lock:
            return dict(self.members), self.config_version

    def _viewed_header(self) -> dict:
        """The replicated state besides the records, as the current read view has it."""
        members = self.base.get_meta(META_MEMBERS)
        if members is None:
            members = self._initial_members
        plugins = {}
        for name, state in self.plugin_states.items():
            raw = self.base.get_meta(META_PLUGIN + name.encode())
            plugins[name] = raw if raw is not None else self._initial_plugin_state(name, state)
        return {
            "applied_index": self._viewed_index(),
            "config_version": int(self.base.get_meta(META_CONFIG_VERSION) or 0),
            "members": json.loads(members),
            "plugins": plugins,
            "alarms": json.loads(self.base.get_meta(META_ALARMS) or b"[]"),
            "revoked": json.loads(self.base.get_meta(META_REVOKED) or b"[]"),
        }

    def _initial_plugin_state(self, name: str, state) -> bytes:
        """A plugin's state before its first command or snapshot (a view without its
        META_PLUGIN key); any thread."""
        with self.lock:  # not between a capture and the change it precedes
            if self._initial_plugin_states is None:
                return state.snapshot_state()  # unchanged so far in this process
            return self._initial_plugin_states[name]

    def digest(self) -> tuple[str, int, int]:
        """Returns (SHA-256 hex of the logical state, number of keys, applied index).

        The digest covers decoded values and revisions, so replicas that hold different
        ciphertexts of the same data have the same digest. It streams one read view.
        """
        h = hashlib.sha256()
        with self.read_view():
            count = 0
            for key, entry in self.storage.scan(b"", None):
                h.update(_U32.pack(len(key)) + key)
                h.update(struct.pack(">QQQ", entry.create_revision, entry.mod_revision,
                                     entry.version))
                h.update(_U32.pack(len(entry.value)) + entry.value)
                count += 1
            header = self._viewed_header()
        for m in sorted(header["members"]):
            h.update(repr(tuple(m)).encode())
        h.update(b"config_version %d" % header["config_version"])
        if header["alarms"]:
            h.update(b"alarms " + _alarms_json(_alarms_from_json(header["alarms"])))
        if header["revoked"]:
            h.update(b"revoked " + _revoked_json(_revoked_from_json(header["revoked"])))
        for name in sorted(header["plugins"]):
            state = header["plugins"][name]
            h.update(name.encode() + _U32.pack(len(state)) + state)
        return h.hexdigest(), count, header["applied_index"]

    # -- snapshots --------------------------------------------------------------------

    @contextmanager
    def snapshot_view(self) -> Iterator[tuple[dict, Iterator[bytes]]]:
        """Opens one read view and yields (header, pieces) of the snapshot at its index.

        `header` is the replicated state besides the records (`applied_index`, `members`,
        `config_version`, `plugins` as raw bytes, `alarms`, `revoked`); iterating `pieces`
        gives the encoded snapshot (`encode_snapshot_header`, one `encode_record` per record
        as stored at rest, `END_RECORD`), read from that same view. On LMDB apply goes on
        meanwhile and the view closes at the end of the block; iterate `pieces` on the thread
        that entered it (the view is the thread's).
        """
        with self._snapshot_source() as (header, records):
            yield header, self._pieces(header, records)

    @staticmethod
    def _pieces(header: dict, records) -> Iterator[bytes]:
        yield encode_snapshot_header(header)
        for key, entry in records:
            yield encode_record(key, entry)
        yield END_RECORD

    def write_snapshot(self, out: BinaryIO) -> int:
        """Writes the replicated state (records as stored at rest) to `out`; returns its index.

        Snapshot, then persist (hashicorp/raft's `FSM.Snapshot`/`FSMSnapshot.Persist`): the
        state is fixed at one instant and written without holding the state lock. On LMDB the
        instant is one read transaction (call it inside `read_view()` opened at the index the
        snapshot must reflect, possibly on another thread); on the in-memory store (tests) a
        copy of the record references taken under the lock, which is released before writing.
        """
        with self.snapshot_view() as (header, pieces):
            for piece in pieces:
                out.write(piece)
            return header["applied_index"]

    @contextmanager
    def _snapshot_source(self):
        """Yields (header, records) fixed at one instant, with the state lock not held."""
        if self.mvcc:
            with self.read_view():  # a read transaction: apply goes on beside it
                yield self._viewed_header(), self.base.dump()
            return
        with self.lock:
            header, records = self._viewed_header(), list(self.base.dump())
        yield header, records

    def read_snapshot(self, src: BinaryIO, *, skip_if_covered: bool = False) -> bool:
        """Replaces the whole state with a snapshot written by `write_snapshot`.

        Records stream into one store transaction (no full copy in memory). With
        `skip_if_covered`, a snapshot at or below the applied index is not loaded (the
        store already holds a later state of the same log) and False is returned.
        """
        header = read_snapshot_header(src)
        with self.lock:
            if skip_if_covered and header["applied_index"] <= self._pending_index:
                return False
            self.commit()
            self.base.begin_write()
            try:
                self.base.restore(read_records(src))
                self.members = {m[0]: MemberRecord(m[0], m[1], m[2], m[3])
                                for m in header["members"]}
                self.config_version = header["config_version"]
                self._save_members()
                self.alarms = _alarms_from_json(header.get("alarms", []))
                self._save_alarms()
                self.revoked = _revoked_from_json(header.get("revoked", []))
                self._save_revoked()
                self._keep_initial_plugin_states()
                for name, state in self.plugin_states.items():
                    state.restore_state(header["plugins"].get(name, b""))
                self._save_plugin_states()
                self.base.put_meta(META_APPLIED, b"%d" % header["applied_index"])
                self.base.commit()
            except BaseException:
                self.base.abort()
                raise
            self.applied_index = self._pending_index = header["applied_index"]
        self.persist_applied()
        return True


def _revoked_json(revoked) -> bytes:
    return json.dumps([f"{serial:x}" for serial in sorted(revoked)]).encode()


def _revoked_from_json(raw) -> frozenset:
    """Serials from META_REVOKED bytes or an already-decoded snapshot header list."""
    if raw is None:
        return frozenset()
    items = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    return frozenset(int(serial, 16) for serial in items)


def _alarms_json(alarms: Mapping[tuple[str, int], int]) -> bytes:
    return json.dumps(sorted([member, cause, index] for (member, cause), index in alarms.items()),
                      separators=(",", ":")).encode()


def _alarms_from_json(raw) -> dict[tuple[str, int], int]:
    rows = json.loads(raw) if isinstance(raw, (bytes, str)) else (raw or [])
    return {(member, cause): index for member, cause, index in rows}


def _members_json(members: Iterable[MemberRecord]) -> bytes:
    return json.dumps(sorted([m.name, m.raft_address, m.grpc_address, m.role]
                             for m in members), separators=(",", ":")).encode()


def _cleartext(entry: Optional[Entry]) -> Optional[Entry]:
    """Returns `entry` if the storage stack decoded it to cleartext, else raises."""
    if entry is not None and entry.state != VALUE_CLEARTEXT:
        raise IntegrityError("a stored value is encrypted but no storage layer decoded it: "
                             "enable the encryption plugin on this node")
    return entry


def encode_snapshot_header(header: dict) -> bytes:
    """The start of an encoded snapshot: magic, length, the header as JSON (plugin states as
    hex)."""
    doc = dict(header, plugins={name: bytes(raw).hex()
                                for name, raw in header["plugins"].items()})
    raw = json.dumps(doc, sort_keys=True).encode()
    return SNAPSHOT_MAGIC + _U32.pack(len(raw)) + raw


def encode_record(key: bytes, e: Entry) -> bytes:
    """One record of an encoded snapshot, as stored at rest."""
    return _RECORD.pack(len(key), e.header, e.create_revision, e.mod_revision, e.version,
                        len(e.value)) + key + e.value


END_RECORD = _RECORD.pack(0xFFFFFFFF, 0, 0, 0, 0, 0)


def read_snapshot_header(src: BinaryIO) -> dict:
    """Reads the header of an encoded snapshot (plugin states back to bytes); raises
    ValueError when `src` does not start with one."""
    if src.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
        raise ValueError("not a sealkv snapshot")
    head = src.read(4)
    if len(head) != 4:
        raise ValueError("snapshot is truncated")
    raw = src.read(_U32.unpack(head)[0])
    try:
        header = json.loads(raw)
        header["plugins"] = {name: bytes.fromhex(text)
                             for name, text in header["plugins"].items()}
        int(header["applied_index"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("snapshot header is not valid") from None
    return header


def read_records(src: BinaryIO) -> Iterator[tuple[bytes, Entry]]:
    """Yields the records of an encoded snapshot after its header, up to the end mark;
    raises ValueError when they are cut short."""
    while True:
        head = src.read(_RECORD.size)
        if len(head) != _RECORD.size:
            raise ValueError("snapshot is truncated")
        key_len, header, create, mod, version, value_len = _RECORD.unpack(head)
        if key_len == 0xFFFFFFFF:
            return
        key = src.read(key_len)
        value = src.read(value_len)
        if len(key) != key_len or len(value) != value_len:
            raise ValueError("snapshot is truncated")
        yield key, Entry(value, create, mod, version, header)
