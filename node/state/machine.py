"""The pure replicated state machine of a sealkv node.

`StateMachine.apply(index, command)` is the single replicated entry point: it decodes the
versioned command bytes and changes the storage stack and the member directory. It has no
clock, randomness, network or logging; the only I/O is what a plugin's apply handler is
specified to do. A command that cannot be applied raises `ApplyHalt`, which the replication
adapter turns into a deliberate halt of the node.

Threading: `apply`, `snapshot` and `restore` run on the pysyncobj tick thread; reads run on
gRPC worker threads. Everything goes through `self.lock`.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping, Optional, Sequence

from sealkv.node.state import commands as cmd
from sealkv.node.errors import ApplyHalt, IntegrityError, where
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.storage.base import VALUE_CLEARTEXT, Entry, Storage, base_store
from sealkv.plugins.api import CommandHandler

SNAPSHOT_MAGIC = b"SEALKVS1"
_RECORD = struct.Struct(">IBQQQI")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a PUT, DELETE or CAS did. `prev` is the previous entry as stored (raw)."""

    revision: int
    prev: Optional[Entry] = None
    succeeded: bool = True
    current: Optional[Entry] = None


class StateMachine:
    """The replicated key-value state: a storage stack plus the member directory."""

    def __init__(self, storage: Storage, initial_members: Sequence[MemberRecord] = (),
                 handlers: Optional[Mapping[int, CommandHandler]] = None,
                 plugin_states: Optional[Mapping[str, object]] = None):
        """Builds the state machine.

        `storage` is the top of the storage stack; `handlers` maps plugin opcodes to their
        apply handlers; `plugin_states` maps plugin names to objects with
        `snapshot_state() -> bytes` and `restore_state(bytes)`.
        """
        self.lock = threading.RLock()
        self.storage = storage
        self.base = base_store(storage)
        self.handlers = dict(handlers or {})
        cmd.claim_opcodes({}, "a plugin", self.handlers)
        self.plugin_states = dict(plugin_states or {})
        self.members: dict[str, MemberRecord] = {m.name: m for m in initial_members}
        self.config_version = 0
        self.applied_index = 0

    # -- replicated apply -------------------------------------------------------------

    def apply(self, index: int, command: bytes):
        """Applies the committed command at log `index`; raises `ApplyHalt` if it cannot."""
        with self.lock:
            opcode = command[0] if command else None
            try:
                if opcode in self.handlers:
                    result = self.handlers[opcode](index, command[1:])
                else:
                    result = self._apply_core(index, cmd.decode(command))
            except ApplyHalt:
                raise
            except cmd.CommandError as exc:
                raise ApplyHalt(f"entry {index}: undecodable command: {exc}") from exc
            except Exception as exc:  # the message could carry a key or value: never log it
                raise ApplyHalt(f"entry {index}: apply failed: {type(exc).__name__} at "
                                f"{where(exc)}") from exc
            self.applied_index = index
            return result

    def _apply_core(self, index: int, command):
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
            entry = self._store(index, command.key, command.value, prev)
            return WriteResult(index, prev, current=entry)
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
            return WriteResult(index)
        if isinstance(command, cmd.MemberRemove):
            existed = self.members.pop(command.name, None) is not None
            self.config_version = index
            return WriteResult(index, succeeded=existed)
        raise ApplyHalt(f"entry {index}: no handler for {type(command).__name__}")

    def _store(self, index: int, key: bytes, value: bytes, prev: Optional[Entry]) -> Entry:
        create = index if prev is None else prev.create_revision
        version = 1 if prev is None else prev.version + 1
        entry = Entry(value, create, index, version, VALUE_CLEARTEXT)
        self.storage.put(key, entry)
        return entry

    # -- reads ------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[Optional[Entry], int]:
        """Returns (the decoded entry or None, the applied index it reflects)."""
        with self.lock:
            return _cleartext(self.storage.get(key)), self.applied_index

    def range(self, start: bytes, end: Optional[bytes], limit: int,
              keys_only: bool) -> tuple[list[tuple[bytes, Entry]], int, int]:
        """Returns (up to `limit` decoded pairs, total count, applied index)."""
        with self.lock:
            total = self.storage.count(start, end)
            pairs: list[tuple[bytes, Entry]] = []
            source = self.base.scan(start, end) if keys_only else self.storage.scan(start, end)
            for key, entry in source:
                if len(pairs) >= limit:
                    break
                pairs.append((key, entry if keys_only else _cleartext(entry)))
            return pairs, total, self.applied_index

    def reveal(self, key: bytes, entry: Optional[Entry]) -> Optional[Entry]:
        """Decodes a raw entry (as returned in `WriteResult.prev`) through the storage stack."""
        if entry is None:
            return None
        layers = []
        layer = self.storage
        while hasattr(layer, "inner"):
            layers.append(layer)
            layer = layer.inner
        with self.lock:
            for layer in reversed(layers):
                entry = layer.decode_entry(key, entry)
        return _cleartext(entry)

    def stored_records(self, start: bytes, limit: int) -> list[tuple[bytes, Entry]]:
        """Returns up to `limit` records as stored at rest (sealed or not) with key >= `start`,
        in key order. gRPC and plugin threads; holds the state lock while it reads."""
        with self.lock:
            out: list[tuple[bytes, Entry]] = []
            for pair in self.base.scan(start, None):
                if len(out) >= limit:
                    break
                out.append(pair)
            return out

    def compact_storage(self) -> bool:
        """Asks the base store to rewrite its files without free space (the optional store
        capability `compact_files()`: a database that reuses freed pages may still hold old
        bytes in them). Returns whether the store did; holds the state lock meanwhile."""
        compact = getattr(self.base, "compact_files", None)
        if compact is None:
            return False
        with self.lock:
            compact()
        return True

    def member_directory(self) -> tuple[dict[str, MemberRecord], int]:
        """Returns a copy of the member directory and its configuration version."""
        with self.lock:
            return dict(self.members), self.config_version

    def digest(self) -> tuple[str, int, int]:
        """Returns (SHA-256 hex of the logical state, number of keys, applied index).

        The digest covers decoded values and revisions, so replicas that hold different
        ciphertexts of the same data have the same digest.
        """
        h = hashlib.sha256()
        with self.lock:
            count = 0
            for key, entry in self.storage.scan(b"", None):
                h.update(_U32.pack(len(key)) + key)
                h.update(struct.pack(">QQQ", entry.create_revision, entry.mod_revision,
                                     entry.version))
                h.update(_U32.pack(len(entry.value)) + entry.value)
                count += 1
            for name in sorted(self.members):
                m = self.members[name]
                h.update(repr((m.name, m.raft_address, m.grpc_address, m.role)).encode())
            h.update(b"config_version %d" % self.config_version)
            for name in sorted(self.plugin_states):
                state = self.plugin_states[name].snapshot_state()
                h.update(name.encode() + _U32.pack(len(state)) + state)
            return h.hexdigest(), count, self.applied_index

    # -- snapshots --------------------------------------------------------------------

    def write_snapshot(self, out: BinaryIO) -> None:
        """Writes the whole replicated state (records as stored at rest) to `out`."""
        with self.lock:
            header = {
                "applied_index": self.applied_index,
                "config_version": self.config_version,
                "members": [[m.name, m.raft_address, m.grpc_address, m.role]
                            for m in self.members.values()],
                "plugins": {name: state.snapshot_state().hex()
                            for name, state in self.plugin_states.items()},
            }
            raw = json.dumps(header, sort_keys=True).encode()
            out.write(SNAPSHOT_MAGIC + _U32.pack(len(raw)) + raw)
            for key, e in self.base.dump():
                out.write(_RECORD.pack(len(key), e.header, e.create_revision, e.mod_revision,
                                       e.version, len(e.value)))
                out.write(key)
                out.write(e.value)
            out.write(_RECORD.pack(0xFFFFFFFF, 0, 0, 0, 0, 0))

    def read_snapshot(self, src: BinaryIO) -> None:
        """Replaces the whole state with a snapshot written by `write_snapshot`."""
        if src.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
            raise ValueError("not a sealkv snapshot")
        header = json.loads(src.read(_U32.unpack(src.read(4))[0]))
        records = list(_read_records(src))
        with self.lock:
            self.base.restore(records)
            self.members = {m[0]: MemberRecord(m[0], m[1], m[2], m[3]) for m in header["members"]}
            self.config_version = header["config_version"]
            self.applied_index = header["applied_index"]
            for name, state in self.plugin_states.items():
                state.restore_state(bytes.fromhex(header["plugins"].get(name, "")))


def _cleartext(entry: Optional[Entry]) -> Optional[Entry]:
    """Returns `entry` if the storage stack decoded it to cleartext, else raises."""
    if entry is not None and entry.state != VALUE_CLEARTEXT:
        raise IntegrityError("a stored value is encrypted but no storage layer decoded it: "
                             "enable the encryption plugin on this node")
    return entry


def _read_records(src: BinaryIO) -> Iterable[tuple[bytes, Entry]]:
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
