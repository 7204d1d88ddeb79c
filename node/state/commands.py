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
| 0x30   | ALARM         | action u8 (1 raise, 2 disarm), cause u8 (1 disk full, 2 quota; |
|        |               | 0 with disarm: every cause), member_len u16, member (empty     |
|        |               | with disarm: every member)                                     |
| 0x22   | REVOKE        | serial_len u8 (1-20), serial (big-endian unsigned): a client or |
|        |               | node certificate serial added to the revocation list            |
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

BODY_V1 = 0x01

OP_PUT = 0x01
OP_DELETE = 0x02
OP_CAS = 0x10
OP_BARRIER = 0x11
OP_BATCH = 0x12
OP_MEMBER_SET = 0x20
OP_MEMBER_REMOVE = 0x21
OP_ALARM = 0x30

OP_REVOKE = 0x22

CORE_OPCODES = frozenset({OP_PUT, OP_DELETE, OP_CAS, OP_BARRIER, OP_BATCH, OP_MEMBER_SET,
                          OP_MEMBER_REMOVE, OP_ALARM, OP_REVOKE})
# What a BATCH may carry: the key-value commands, never membership, plugin or nested batches.
BATCHABLE_OPCODES = frozenset({OP_PUT, OP_DELETE, OP_CAS, OP_BARRIER})
MAX_BATCH_COMMANDS = 4096
MAX_SERIAL_BYTES = 20  # RFC 5280 4.1.2.2

CAS_BY_REVISION = 0
CAS_MUST_NOT_EXIST = 1

ROLE_VOTER = 1
ROLE_LEARNER = 2
ROLE_NAMES = {ROLE_VOTER: "voter", ROLE_LEARNER: "learner"}

ALARM_RAISE = 1
ALARM_DISARM = 2
CAUSE_ANY = 0
CAUSE_DISK_FULL = 1
CAUSE_QUOTA = 2
ALARM_CAUSES = (CAUSE_DISK_FULL, CAUSE_QUOTA)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CAS_HEAD = struct.Struct(">BQH")


class CommandError(ValueError):
    """A command body that cannot be decoded."""


class OpcodeClash(ValueError):
    """A plugin claims an opcode that is a core opcode or another plugin's."""


def claim_opcodes(taken: Mapping[int, object], owner: str, opcodes: Iterable[int]) -> None:
    """Raises `OpcodeClash` when one of `opcodes` (claimed by `owner`) is a core opcode or
    already in `taken`: the one rule the node (at plugin load) and the state machine apply."""
    for opcode in opcodes:
        if opcode in CORE_OPCODES or opcode in taken:
            other = "a core opcode" if opcode in CORE_OPCODES else "another plugin's"
            raise OpcodeClash(f"{owner} claims opcode 0x{opcode:02x}, which clashes with "
                              f"{other}")


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


@dataclass(frozen=True, slots=True)
class Alarm:
    """Raises or disarms the NOSPACE alarm of `member` (disarm: "" means every member)."""

    action: int
    cause: int
    member: str


@dataclass(frozen=True, slots=True)
class Revoke:
    serial: int


def serial_bytes(serial: int) -> bytes:
    """The big-endian bytes of a certificate serial; ValueError unless 1..20 bytes."""
    if serial <= 0:
        raise ValueError("a certificate serial is a positive integer")
    raw = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
    if len(raw) > MAX_SERIAL_BYTES:
        raise ValueError(f"a certificate serial has at most {MAX_SERIAL_BYTES} bytes")
    return raw


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
    if isinstance(command, Alarm):
        return bytes((OP_ALARM, BODY_V1, command.action, command.cause)) + _string(command.member)
    if isinstance(command, Revoke):
        raw = serial_bytes(command.serial)
        return bytes((OP_REVOKE, BODY_V1, len(raw))) + raw
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


class BodyReader:
    """The one reader of sealkv's binary bodies: a cursor that checks every length first.

    Core commands and plugin codecs (the encryption plugin's commands and snapshot) read with
    it. Every read raises `error` (a `CommandError` unless a codec passes its own class) when
    the input is too short; `end()` raises when bytes are left over. `what` names the field
    in the message.
    """

    def __init__(self, data: bytes, error: type[Exception] = CommandError):
        self.data = bytes(data)
        self.pos = 0
        self.error = error

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int, what: str = "command body") -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise self.error(f"truncated: {what} needs {size} bytes, {self.remaining()} left")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u8(self, what: str = "u8") -> int:
        return self.take(1, what)[0]

    def u16(self, what: str = "u16") -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str = "u32") -> int:
        return int.from_bytes(self.take(4, what), "big")

    def u64(self, what: str = "u64") -> int:
        return int.from_bytes(self.take(8, what), "big")

    def string(self, what: str = "string") -> str:
        """Reads a u16-length-prefixed UTF-8 string."""
        try:
            return self.take(self.u16(f"{what} length"), what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not UTF-8") from None

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.remaining():
            raise self.error(f"{self.remaining()} trailing bytes")


def decode(command: bytes):
    """Returns the core command object for `command` bytes, or raises `CommandError`."""
    if len(command) < 2:
        raise CommandError("command is shorter than opcode and body version")
    opcode, version = command[0], command[1]
    if opcode not in CORE_OPCODES:
        raise CommandError(f"unknown opcode 0x{opcode:02x}")
    if version != BODY_V1:
        raise CommandError(f"unknown body version {version} for opcode 0x{opcode:02x}")
    if opcode == OP_PUT and len(command) >= 4:
        # Every replica decodes every Put on the apply thread: a well-formed one is two
        # slices (a short one takes the reader below, for its exact error).
        end = 4 + _U16.unpack_from(command, 2)[0]
        if end <= len(command):
            return Put(bytes(command[4:end]), bytes(command[end:]))
    r = BodyReader(memoryview(command)[2:])
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
    elif opcode == OP_ALARM:
        action, cause = r.u8(), r.u8()
        member = r.string()
        if action == ALARM_RAISE and (cause not in ALARM_CAUSES or not member):
            raise CommandError("an alarm raise names a member and a known cause")
        if action == ALARM_DISARM and cause not in ALARM_CAUSES + (CAUSE_ANY,):
            raise CommandError(f"unknown alarm cause {cause}")
        if action not in (ALARM_RAISE, ALARM_DISARM):
            raise CommandError(f"unknown alarm action {action}")
        result = Alarm(action, cause, member)
    elif opcode == OP_REVOKE:
        length = r.u8()
        if not 1 <= length <= MAX_SERIAL_BYTES:
            raise CommandError(f"certificate serial length {length} is not 1-{MAX_SERIAL_BYTES}")
        serial = int.from_bytes(r.take(length), "big")
        if serial == 0:
            raise CommandError("certificate serial 0 is not a serial")
        result = Revoke(serial)
    else:
        result = MemberRemove(r.string())
    r.end()
    return result
