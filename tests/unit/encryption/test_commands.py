"""Tests of the control command codecs: exact layouts and rejection of malformed bodies."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption.commands import (
    BootstrapCommand, CommandDecodeError, RegisterCommand, RotationCommand, WriterRow,
)

ROW = WriterRow(7, 0x1122334455667788, 3)
WRAPPED = bytes(range(60))


def test_register_exact_bytes():
    data = c.encode_command(RegisterCommand(ROW))
    assert data == bytes.fromhex("03" "01" "00000007" "1122334455667788" "0003")
    assert c.decode_command(data) == RegisterCommand(ROW)


def test_bootstrap_exact_bytes_and_round_trip():
    rows = (WriterRow(1, 0xA, 1), WriterRow(2, 0xA, 1))
    command = BootstrapCommand(1, WRAPPED, 2, WRAPPED[::-1], rows)
    data = c.encode_command(command)
    assert data[:8] == bytes.fromhex("04" "01" "00000001" "003c")
    assert data[8:68] == WRAPPED
    assert data[68:74] == bytes.fromhex("00000002" "003c")
    assert data[134:138] == bytes.fromhex("00000002")
    assert len(data) == 138 + 2 * 14
    assert c.decode_command(data) == command


@pytest.mark.parametrize("sub_tag, purpose, wrapped", [
    (c.SUB_ROTATE, 1, WRAPPED), (c.SUB_ROTATE, 2, WRAPPED),
    (c.SUB_ENABLE_STORAGE, 1, b""), (c.SUB_ENABLE_RAFT, 2, b"")])
def test_rotation_round_trip(sub_tag, purpose, wrapped):
    command = RotationCommand(sub_tag, 7, purpose, wrapped, ROW)
    data = c.encode_command(command)
    assert data[:8] == bytes((0x05, 0x01, sub_tag)) + b"\x00\x00\x00\x07" + bytes((purpose,))
    assert c.decode_command(data) == command


def _valid_bodies():
    return [
        (c.OP_REGISTER, c.encode_body(RegisterCommand(ROW))),
        (c.OP_BOOTSTRAP, c.encode_body(BootstrapCommand(
            1, WRAPPED, 2, WRAPPED, (WriterRow(1, 5, 1), WriterRow(2, 5, 1))))),
        (c.OP_ROTATION, c.encode_body(RotationCommand(c.SUB_ROTATE, 7, 1, WRAPPED, ROW))),
        (c.OP_ROTATION, c.encode_body(RotationCommand(c.SUB_ENABLE_STORAGE, 7, 1, b"", ROW))),
    ]


@pytest.mark.parametrize("opcode, body", _valid_bodies())
def test_every_truncation_and_trailing_byte_is_rejected(opcode, body):
    c.decode_body(opcode, body)
    for cut in range(len(body)):
        with pytest.raises(CommandDecodeError):
            c.decode_body(opcode, body[:cut])
    with pytest.raises(CommandDecodeError):
        c.decode_body(opcode, body + b"\x00")
    with pytest.raises(CommandDecodeError):
        c.decode_body(opcode, b"\x02" + body[1:])  # unknown body version


def test_oversized_row_count_rejected_before_allocation():
    head = c.encode_body(BootstrapCommand(1, WRAPPED, 2, WRAPPED, ()))[:-4]
    with pytest.raises(CommandDecodeError, match="exceeds"):
        c.decode_bootstrap(head + (16385).to_bytes(4, "big"))
    with pytest.raises(CommandDecodeError, match="exceeds"):
        c.decode_bootstrap(head + (0xFFFFFFFF).to_bytes(4, "big"))
    with pytest.raises(CommandDecodeError):
        c.decode_bootstrap(head + (3).to_bytes(4, "big") + bytes(14))
    rows = tuple(WriterRow(1 + i % 2, 100 + i // 2, 1) for i in range(16384))
    assert len(c.decode_bootstrap(c.encode_body(
        BootstrapCommand(1, WRAPPED, 2, WRAPPED, rows))).rows) == 16384
    with pytest.raises(ValueError):
        c.encode_body(BootstrapCommand(1, WRAPPED, 2, WRAPPED, rows + rows[:1]))


@pytest.mark.parametrize("body", [
    bytes.fromhex("01" "00000000" "0000000000000001" "0001"),   # key id 0
    bytes.fromhex("01" "00000001" "0000000000000000" "0001"),   # full node id 0
])
def test_register_rejects_reserved_ids(body):
    with pytest.raises(CommandDecodeError):
        c.decode_register(body)


def _rotation_body(sub_tag, purpose=1, wrapped=b"", row=ROW, dek_id=7):
    return (bytes((1, sub_tag)) + dek_id.to_bytes(4, "big") + bytes((purpose,))
            + len(wrapped).to_bytes(2, "big") + wrapped
            + row.dek_id.to_bytes(4, "big") + row.full_node_id.to_bytes(8, "big")
            + row.local_epoch.to_bytes(2, "big"))


@pytest.mark.parametrize("body", [
    _rotation_body(0x02, wrapped=WRAPPED),           # rewrap: not its body layout
    _rotation_body(0x03, wrapped=WRAPPED),           # retire with a key
    _rotation_body(0x06),                            # unknown
    _rotation_body(0x01),                            # rotate without a key
    _rotation_body(0x04, wrapped=WRAPPED),           # cutover with a key
    _rotation_body(0x04, purpose=2),                 # storage cutover, raft purpose
    _rotation_body(0x05, purpose=1),                 # raft cutover, storage purpose
    _rotation_body(0x01, purpose=3, wrapped=WRAPPED),
    _rotation_body(0x04, row=WriterRow(8, 1, 1)),    # proposer row for another key
    _rotation_body(0x04, dek_id=0, row=WriterRow(0, 1, 1)),
])
def test_rotation_rejects_malformed_bodies(body):
    with pytest.raises(CommandDecodeError):
        c.decode_rotation(body)


def test_bootstrap_rejects_equal_ids_and_foreign_rows():
    same = c.encode_body(BootstrapCommand(1, WRAPPED, 3, WRAPPED, ()))
    same = same[:1] + (3).to_bytes(4, "big") + same[5:]
    with pytest.raises(CommandDecodeError, match="equal"):
        c.decode_bootstrap(same)
    body = c.encode_body(BootstrapCommand(1, WRAPPED, 2, WRAPPED, (WriterRow(1, 5, 1),)))
    body = body[:-14] + (9).to_bytes(4, "big") + body[-10:]
    with pytest.raises(CommandDecodeError, match="not a bootstrap key"):
        c.decode_bootstrap(body)


def test_unknown_opcode_and_empty_command():
    with pytest.raises(CommandDecodeError):
        c.decode_command(b"")
    with pytest.raises(CommandDecodeError):
        c.decode_command(b"\x06\x01")


@settings(max_examples=500, deadline=None)
@given(opcode=st.sampled_from(c.OPCODES), body=st.binary(max_size=200))
def test_random_bodies_raise_only_decode_errors(opcode, body):
    try:
        command = c.decode_body(opcode, body)
    except CommandDecodeError:
        return
    assert c.encode_body(command) == body  # anything accepted is canonical
