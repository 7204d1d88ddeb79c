"""Binary codecs of the encryption plugin's replicated control commands (ENCRYPTION.md §6).

A replicated command on the wire is `opcode (1 byte) | body`. Every body starts with the body
version byte 0x01; all integers are big-endian; lengths are exact and trailing bytes are an
error; counts and lengths are checked against the remaining input before anything is
allocated. Decoding raises `CommandDecodeError`; at apply that halts the node.

Layouts (sizes in bytes)::

    writer row  = dek_id(4) full_node_id(8) local_epoch(2)                      14 bytes
                  (dek_id != 0, full_node_id != 0; node_id16 = full_node_id & 0xFFFF)
    wrapped key = length(2) bytes(length)            1 <= length <= 1024

    0x03 REGISTER   body = 0x01 | writer row                                    15 bytes
    0x04 BOOTSTRAP  body = 0x01 | storage_id(4) | wrapped key | raft_id(4) | wrapped key
                           | row_count(4) | row_count x writer row
                    (storage_id, raft_id != 0 and distinct; 0 <= row_count <= 16384;
                     every row's dek_id is storage_id or raft_id)
    0x05 ROTATION   body = 0x01 | sub_tag(1) | dek_id(4) | purpose(1) | length(2)
                           | wrapped(length) | proposer writer row
                    sub_tag 0x01 rotate DEK:             1 <= length <= 1024
                    sub_tag 0x04 enable storage envelope: purpose 1, length 0
                    sub_tag 0x05 enable raft envelope:    purpose 2, length 0
                    sub_tag 0x03 retire DEK:              length 0 (dek_id names the key)
                    purpose 1 = storage, 2 = raft; dek_id != 0; the proposer row's dek_id
                    equals dek_id.
    0x05 ROTATION, sub_tag 0x02 (rewrap the key table under a new KEK) has its own body:
                    body = 0x01 | 0x02 | generation(4) | wrapped key (the new KEK's check
                           blob) | key_count(4) | key_count x (key_id(4) purpose(1)
                           wrapped key)
                    (generation >= 1; 1 <= key_count <= 65535; key ids non-zero, strictly
                     ascending; purposes 1 or 2)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from sealkv.node.state.commands import BodyReader as CoreBodyReader

from .nonce import epoch_in_range, node_id16
from .purpose import PURPOSE_RAFT, PURPOSE_STORAGE

OP_REGISTER = 0x03
OP_BOOTSTRAP = 0x04
OP_ROTATION = 0x05
OPCODES = (OP_REGISTER, OP_BOOTSTRAP, OP_ROTATION)

BODY_VERSION = 0x01
SUB_ROTATE = 0x01
SUB_REWRAP = 0x02
SUB_RETIRE = 0x03
SUB_ENABLE_STORAGE = 0x04
SUB_ENABLE_RAFT = 0x05

MAX_WRITER_ROWS = 16384
MAX_WRAPPED_LEN = 1024
MAX_REWRAP_KEYS = 65535
ROW_SIZE = 14

_ROW = struct.Struct(">IQH")


class CommandDecodeError(ValueError):
    """A command body is malformed; the message says which field."""


@dataclass(frozen=True, slots=True)
class WriterRow:
    """A writer registration: node `full_node_id` encrypts under `dek_id` at `local_epoch`."""

    dek_id: int
    full_node_id: int
    local_epoch: int

    @property
    def node_id16(self) -> int:
        """The low 16 bits of the full node id, as used in nonces."""
        return node_id16(self.full_node_id)


@dataclass(frozen=True, slots=True)
class RegisterCommand:
    """0x03 REGISTER: adds or advances one writer registry row."""

    row: WriterRow


@dataclass(frozen=True, slots=True)
class BootstrapCommand:
    """0x04 BOOTSTRAP: installs the first storage and raft data keys and the writer rows."""

    storage_id: int
    storage_wrapped: bytes
    raft_id: int
    raft_wrapped: bytes
    rows: tuple[WriterRow, ...]


@dataclass(frozen=True, slots=True)
class RotationCommand:
    """0x05 ROTATION: rotates a data key or enables an envelope, per `sub_tag`."""

    sub_tag: int
    dek_id: int
    purpose: int
    wrapped: bytes
    proposer: WriterRow


@dataclass(frozen=True, slots=True)
class RewrapCommand:
    """0x05 ROTATION sub-tag 0x02: the whole key table wrapped again under a new KEK.

    `generation` is the KEK generation it moves the cluster to (the current one plus one),
    `check` the new KEK's check blob (`kek.kek_check_blob`), `keys` every key of the table as
    (key_id, purpose, wrapped under the new KEK), ascending by id. Only wrapped bytes: the
    data keys themselves do not change.
    """

    generation: int
    check: bytes
    keys: tuple[tuple[int, int, bytes], ...]


Command = Union[RegisterCommand, BootstrapCommand, RotationCommand, RewrapCommand]


class BodyReader(CoreBodyReader):
    """The core body reader (`sealkv.node.state.commands.BodyReader`) raising
    `CommandDecodeError`; shared with the snapshot codec of `state.py`."""

    def __init__(self, data: bytes):
        super().__init__(data, CommandDecodeError)


def _read_version(reader: BodyReader) -> None:
    version = reader.u8("body version")
    if version != BODY_VERSION:
        raise CommandDecodeError(f"unsupported body version 0x{version:02x}")


def _read_row(reader: BodyReader) -> WriterRow:
    dek_id, full_id, epoch = _ROW.unpack(reader.take(ROW_SIZE, "writer row"))
    if dek_id == 0:
        raise CommandDecodeError("writer row names the reserved key id 0")
    if full_id == 0:
        raise CommandDecodeError("writer row has full_node_id 0 (not capable)")
    return WriterRow(dek_id, full_id, epoch)


def _read_wrapped(reader: BodyReader, what: str) -> bytes:
    length = reader.u16(f"{what} length")
    if not 1 <= length <= MAX_WRAPPED_LEN:
        raise CommandDecodeError(f"{what} length {length} is outside 1..{MAX_WRAPPED_LEN}")
    return reader.take(length, what)


def _pack_row(row: WriterRow) -> bytes:
    if not (0 < row.dek_id <= 0xFFFFFFFF and 0 < row.full_node_id <= 0xFFFFFFFFFFFFFFFF
            and epoch_in_range(row.local_epoch)):
        raise ValueError(f"invalid writer row {row}")
    return _ROW.pack(row.dek_id, row.full_node_id, row.local_epoch)


def _pack_wrapped(wrapped: bytes) -> bytes:
    if not 1 <= len(wrapped) <= MAX_WRAPPED_LEN:
        raise ValueError(f"a wrapped key must be 1..{MAX_WRAPPED_LEN} bytes")
    return len(wrapped).to_bytes(2, "big") + bytes(wrapped)


def _check_id(key_id: int) -> bytes:
    if not 0 < key_id <= 0xFFFFFFFF:
        raise ValueError("key id must be in 1..2**32-1")
    return key_id.to_bytes(4, "big")


def encode_body(command: Command) -> bytes:
    """Returns the body of `command` (without the opcode); raises ValueError if invalid."""
    version = bytes((BODY_VERSION,))
    if isinstance(command, RegisterCommand):
        return version + _pack_row(command.row)
    if isinstance(command, BootstrapCommand):
        if command.storage_id == command.raft_id:
            raise ValueError("storage and raft key ids must differ")
        if len(command.rows) > MAX_WRITER_ROWS:
            raise ValueError(f"at most {MAX_WRITER_ROWS} writer rows")
        for row in command.rows:
            if row.dek_id not in (command.storage_id, command.raft_id):
                raise ValueError("a bootstrap row must name the storage or raft key")
        return (version + _check_id(command.storage_id) + _pack_wrapped(command.storage_wrapped)
                + _check_id(command.raft_id) + _pack_wrapped(command.raft_wrapped)
                + len(command.rows).to_bytes(4, "big")
                + b"".join(_pack_row(row) for row in command.rows))
    if isinstance(command, RewrapCommand):
        _check_rewrap(command, ValueError)
        return (version + bytes((SUB_REWRAP,)) + command.generation.to_bytes(4, "big")
                + _pack_wrapped(command.check) + len(command.keys).to_bytes(4, "big")
                + b"".join(key_id.to_bytes(4, "big") + bytes((purpose,)) + _pack_wrapped(wrapped)
                           for key_id, purpose, wrapped in command.keys))
    if isinstance(command, RotationCommand):
        _check_rotation(command, ValueError)
        return (version + bytes((command.sub_tag,)) + _check_id(command.dek_id)
                + bytes((command.purpose,)) + len(command.wrapped).to_bytes(2, "big")
                + bytes(command.wrapped) + _pack_row(command.proposer))
    raise TypeError(f"not an encryption command: {type(command).__name__}")


def opcode_of(command: Command) -> int:
    """Returns the opcode of `command`."""
    if isinstance(command, RegisterCommand):
        return OP_REGISTER
    if isinstance(command, BootstrapCommand):
        return OP_BOOTSTRAP
    if isinstance(command, (RotationCommand, RewrapCommand)):
        return OP_ROTATION
    raise TypeError(f"not an encryption command: {type(command).__name__}")


def encode_command(command: Command) -> bytes:
    """Returns the full replicated command: opcode byte + body."""
    return bytes((opcode_of(command),)) + encode_body(command)


def decode_register(body: bytes) -> RegisterCommand:
    """Decodes a 0x03 REGISTER body."""
    reader = BodyReader(body)
    _read_version(reader)
    row = _read_row(reader)
    reader.end()
    return RegisterCommand(row)


def decode_bootstrap(body: bytes) -> BootstrapCommand:
    """Decodes a 0x04 BOOTSTRAP body."""
    reader = BodyReader(body)
    _read_version(reader)
    storage_id = reader.u32("storage id")
    storage_wrapped = _read_wrapped(reader, "storage wrapped key")
    raft_id = reader.u32("raft id")
    raft_wrapped = _read_wrapped(reader, "raft wrapped key")
    if storage_id == 0 or raft_id == 0:
        raise CommandDecodeError("bootstrap names the reserved key id 0")
    if storage_id == raft_id:
        raise CommandDecodeError("bootstrap storage and raft key ids are equal")
    count = reader.u32("row count")
    if count > MAX_WRITER_ROWS:
        raise CommandDecodeError(f"row count {count} exceeds {MAX_WRITER_ROWS}")
    if reader.remaining() != count * ROW_SIZE:
        raise CommandDecodeError(f"{count} rows need {count * ROW_SIZE} bytes, "
                                 f"{reader.remaining()} present")
    rows = tuple(_read_row(reader) for _ in range(count))
    reader.end()
    for row in rows:
        if row.dek_id not in (storage_id, raft_id):
            raise CommandDecodeError(f"bootstrap row names key {row.dek_id}, not a bootstrap key")
    return BootstrapCommand(storage_id, storage_wrapped, raft_id, raft_wrapped, rows)


def decode_rotation(body: bytes) -> Union[RotationCommand, RewrapCommand]:
    """Decodes a 0x05 ROTATION body (a `RewrapCommand` for sub-tag 0x02)."""
    reader = BodyReader(body)
    _read_version(reader)
    sub_tag = reader.u8("sub-tag")
    if sub_tag == SUB_REWRAP:
        return _decode_rewrap(reader)
    dek_id = reader.u32("dek id")
    purpose = reader.u8("purpose")
    length = reader.u16("wrapped length")
    if length > MAX_WRAPPED_LEN:
        raise CommandDecodeError(f"wrapped length {length} exceeds {MAX_WRAPPED_LEN}")
    wrapped = reader.take(length, "wrapped key")
    proposer = _read_row(reader)
    reader.end()
    command = RotationCommand(sub_tag, dek_id, purpose, wrapped, proposer)
    _check_rotation(command, CommandDecodeError)
    return command


def _decode_rewrap(reader: BodyReader) -> RewrapCommand:
    generation = reader.u32("kek generation")
    check = _read_wrapped(reader, "kek check")
    count = reader.u32("key count")
    if not 1 <= count <= MAX_REWRAP_KEYS:
        raise CommandDecodeError(f"rewrap key count {count} is outside 1..{MAX_REWRAP_KEYS}")
    if count * 8 > reader.remaining():  # id(4) purpose(1) length(2) + at least one byte
        raise CommandDecodeError(f"{count} keys do not fit in {reader.remaining()} bytes")
    keys = tuple((reader.u32("key id"), reader.u8("purpose"), _read_wrapped(reader, "wrapped key"))
                 for _ in range(count))
    reader.end()
    command = RewrapCommand(generation, check, keys)
    _check_rewrap(command, CommandDecodeError)
    return command


def _check_rewrap(command: RewrapCommand, error: type[Exception]) -> None:
    if not 0 < command.generation <= 0xFFFFFFFF:
        raise error("a rewrap's KEK generation must be in 1..2**32-1")
    if not 1 <= len(command.check) <= MAX_WRAPPED_LEN:
        raise error("a rewrap needs the new KEK's check blob")
    if not 1 <= len(command.keys) <= MAX_REWRAP_KEYS:
        raise error(f"a rewrap carries 1..{MAX_REWRAP_KEYS} keys")
    previous = 0
    for key_id, purpose, wrapped in command.keys:
        if not previous < key_id <= 0xFFFFFFFF:
            raise error("rewrap key ids must be non-zero and strictly ascending")
        if purpose not in (PURPOSE_STORAGE, PURPOSE_RAFT):
            raise error(f"unknown key purpose {purpose}")
        if not 1 <= len(wrapped) <= MAX_WRAPPED_LEN:
            raise error(f"a wrapped key must be 1..{MAX_WRAPPED_LEN} bytes")
        previous = key_id


def _check_rotation(command: RotationCommand, error: type[Exception]) -> None:
    if command.sub_tag == SUB_REWRAP:
        raise error("rotation sub-tag 0x02 (rewrap) has its own body: use RewrapCommand")
    if command.sub_tag not in (SUB_ROTATE, SUB_ENABLE_STORAGE, SUB_ENABLE_RAFT, SUB_RETIRE):
        raise error(f"unknown rotation sub-tag 0x{command.sub_tag:02x}")
    if not 0 < command.dek_id <= 0xFFFFFFFF:
        raise error("rotation names the reserved key id 0")
    if command.purpose not in (PURPOSE_STORAGE, PURPOSE_RAFT):
        raise error(f"unknown key purpose {command.purpose}")
    if command.sub_tag == SUB_ROTATE:
        if not 1 <= len(command.wrapped) <= MAX_WRAPPED_LEN:
            raise error("a rotation needs a wrapped key")
    elif command.sub_tag == SUB_RETIRE:
        if command.wrapped:
            raise error("a retirement carries no wrapped key")
    else:
        expected = PURPOSE_STORAGE if command.sub_tag == SUB_ENABLE_STORAGE else PURPOSE_RAFT
        if command.purpose != expected:
            raise error("cutover purpose does not match its sub-tag")
        if command.wrapped:
            raise error("a cutover carries no wrapped key")
    if command.proposer.dek_id != command.dek_id:
        raise error("the proposer row names another key")


_DECODERS = {OP_REGISTER: decode_register, OP_BOOTSTRAP: decode_bootstrap,
             OP_ROTATION: decode_rotation}


def decode_body(opcode: int, body: bytes) -> Command:
    """Decodes the body of an encryption opcode; raises `CommandDecodeError`."""
    decoder = _DECODERS.get(opcode)
    if decoder is None:
        raise CommandDecodeError(f"opcode 0x{opcode:02x} is not an encryption command")
    return decoder(body)


def decode_command(data: bytes) -> Command:
    """Decodes a full command (opcode byte + body); raises `CommandDecodeError`."""
    if not data:
        raise CommandDecodeError("empty command")
    return decode_body(data[0], bytes(data[1:]))
