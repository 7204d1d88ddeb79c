"""The replicated command format of the core state machine.

A command is one opcode byte followed by a body; every body starts with a body version byte
(`BODY_V1`). Integers are big-endian. Bodies are decoded exactly: a short, long or unknown
body raises `CommandError`, which at apply time halts the node (a replica never guesses).

Core opcodes (0x03-0x0F are reserved for the encryption plugin, 0x40-0x7F for other plugins):

| opcode | name          | body after the version byte                                    |
|--------|---------------|----------------------------------------------------------------|
| 0x01   | PUT           | key_len u16, key, value (the rest)                             |
| 0x02   | DELETE        | key_len u16, key                                               |
| 0x10   | CAS           | mode u8 (0 revision, 1 must not exist), expected u64, key_len  |
|        |               | u16, key, value (the rest)                                     |
| 0x11   | BARRIER       | nothing: a no-op that linearizable reads wait for              |
| 0x12   | BATCH         | count u16 (1..MAX_BATCH_COMMANDS), then per command: len u32,  |
|        |               | the command (PUT, DELETE, CAS or BARRIER, version byte incl.)  |
| 0x20   | MEMBER_SET    | role u8, then three u16-length strings: name, raft, grpc       |
| 0x21   | MEMBER_REMOVE | name_len u16, name                                             |
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

BODY_V1 = 0x01

OP_PUT = 0x01
OP_DELETE = 0x02
OP_CAS = 0x10
OP_BARRIER = 0x11
OP_BATCH = 0x12
OP_MEMBER_SET = 0x20
OP_MEMBER_REMOVE = 0x21

CORE_OPCODES = frozenset({OP_PUT, OP_DELETE, OP_CAS, OP_BARRIER, OP_BATCH, OP_MEMBER_SET,
                          OP_MEMBER_REMOVE})
# What a BATCH may carry: the key-value commands, never membership, plugin or nested batches.
BATCHABLE_OPCODES = frozenset({OP_PUT, OP_DELETE, OP_CAS, OP_BARRIER})
MAX_BATCH_COMMANDS = 4096

CAS_BY_REVISION = 0
CAS_MUST_NOT_EXIST = 1

ROLE_VOTER = 1
ROLE_LEARNER = 2

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CAS_HEAD = struct.Struct(">BQH")


class CommandError(ValueError):
    """A command body that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


@dataclass(frozen=True, slots=True)
class CompareAndSwap:
    key: bytes
    value: bytes
    mode: int
    expected_revision: int


@dataclass(frozen=True, slots=True)
class Barrier:
    pass


@dataclass(frozen=True, slots=True)
class Batch:
    """Key-value commands (Put, Delete, CompareAndSwap, Barrier) applied in order as one entry.

    A proposer that holds the sub-commands already encoded calls `encode_batch` directly.
    """

    commands: tuple


@dataclass(frozen=True, slots=True)
class MemberSet:
    name: str
    raft_address: str
    grpc_address: str
    role: int


@dataclass(frozen=True, slots=True)
class MemberRemove:
    name: str


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def encode(command) -> bytes:
    """Returns the wire bytes of a core command object."""
    if isinstance(command, Put):
        return bytes((OP_PUT, BODY_V1)) + _U16.pack(len(command.key)) + command.key + command.value
    if isinstance(command, Delete):
        return bytes((OP_DELETE, BODY_V1)) + _U16.pack(len(command.key)) + command.key
    if isinstance(command, CompareAndSwap):
        return (bytes((OP_CAS, BODY_V1))
                + _CAS_HEAD.pack(command.mode, command.expected_revision, len(command.key))
                + command.key + command.value)
    if isinstance(command, Barrier):
        return bytes((OP_BARRIER, BODY_V1))
    if isinstance(command, Batch):
        return encode_batch([encode(c) for c in command.commands])
    if isinstance(command, MemberSet):
        return (bytes((OP_MEMBER_SET, BODY_V1, command.role)) + _string(command.name)
                + _string(command.raft_address) + _string(command.grpc_address))
    if isinstance(command, MemberRemove):
        return bytes((OP_MEMBER_REMOVE, BODY_V1)) + _string(command.name)
    raise TypeError(f"not a core command: {type(command).__name__}")


def encode_batch(commands) -> bytes:
    """Returns the BATCH command carrying `commands` (encoded PUT/DELETE/CAS/BARRIER bytes).

    Raises ValueError for an empty or oversized batch or a command a batch may not carry:
    the proposer checks here, before anything reaches the log.
    """
    if not 1 <= len(commands) <= MAX_BATCH_COMMANDS:
        raise ValueError(f"a batch carries 1..{MAX_BATCH_COMMANDS} commands, not {len(commands)}")
    parts = [bytes((OP_BATCH, BODY_V1)), _U16.pack(len(commands))]
    for command in commands:
        if not command or command[0] not in BATCHABLE_OPCODES:
            raise ValueError("a batch carries only PUT, DELETE, CAS and BARRIER commands")
        parts.append(_U32.pack(len(command)))
        parts.append(command)
    return b"".join(parts)


def key_of(command: bytes) -> Optional[bytes]:
    """Returns the key an encoded PUT, DELETE or CAS writes (None for any other command)."""
    opcode = command[0] if command else None
    if opcode in (OP_PUT, OP_DELETE):
        start = 4
    elif opcode == OP_CAS:
        start = 2 + _CAS_HEAD.size
    else:
        return None
    return command[start:start + _U16.unpack_from(command, start - 2)[0]]


class _Reader:
    """Reads fields from a body and insists on consuming it exactly."""

    def __init__(self, body: bytes):
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise CommandError("command body is truncated")
        chunk = self.body[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def string(self) -> str:
        try:
            return self.take(self.u16()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError("command string is not UTF-8") from exc

    def rest(self) -> bytes:
        chunk = self.body[self.pos:]
        self.pos = len(self.body)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.body):
            raise CommandError("command body has trailing bytes")


def decode(command: bytes):
    """Returns the core command object for `command` bytes, or raises `CommandError`."""
    if len(command) < 2:
        raise CommandError("command is shorter than opcode and body version")
    opcode, version = command[0], command[1]
    if opcode not in CORE_OPCODES:
        raise CommandError(f"unknown opcode 0x{opcode:02x}")
    if version != BODY_V1:
        raise CommandError(f"unknown body version {version} for opcode 0x{opcode:02x}")
    r = _Reader(memoryview(command)[2:].tobytes())
    if opcode == OP_PUT:
        key = r.take(r.u16())
        result = Put(key, r.rest())
    elif opcode == OP_DELETE:
        result = Delete(r.take(r.u16()))
    elif opcode == OP_CAS:
        mode, expected, key_len = _CAS_HEAD.unpack(r.take(_CAS_HEAD.size))
        if mode not in (CAS_BY_REVISION, CAS_MUST_NOT_EXIST):
            raise CommandError(f"unknown compare-and-swap mode {mode}")
        key = r.take(key_len)
        result = CompareAndSwap(key, r.rest(), mode, expected)
    elif opcode == OP_BARRIER:
        result = Barrier()
    elif opcode == OP_BATCH:
        count = r.u16()
        if not 1 <= count <= MAX_BATCH_COMMANDS:
            raise CommandError(f"batch count {count} is outside 1..{MAX_BATCH_COMMANDS}")
        subs = []
        for _ in range(count):
            sub = r.take(_U32.unpack(r.take(4))[0])
            if not sub or sub[0] not in BATCHABLE_OPCODES:
                raise CommandError("a batch carries a command that may not be batched")
            subs.append(decode(sub))  # all decode exactly before anything applies
        result = Batch(tuple(subs))
    elif opcode == OP_MEMBER_SET:
        role = r.u8()
        if role not in (ROLE_VOTER, ROLE_LEARNER):
            raise CommandError(f"unknown member role {role}")
        result = MemberSet(r.string(), r.string(), r.string(), role)
    else:
        result = MemberRemove(r.string())
    r.end()
    return result
