"""The core command codec: exact round trips, and every malformed body refused."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealkv.node.state import commands as cmd

CORE_COMMANDS = [
    cmd.Put(b"k", b"v"),
    cmd.Put(b"\x00\xffbinary", b""),
    cmd.Put(b"k" * 4096, b"\x00" * 1000),
    cmd.Delete(b"gone"),
    cmd.CompareAndSwap(b"k", b"new", cmd.CAS_BY_REVISION, 2**64 - 1),
    cmd.CompareAndSwap(b"k", b"", cmd.CAS_MUST_NOT_EXIST, 0),
    cmd.Barrier(),
    cmd.MemberSet("n1", "127.0.0.1:7001", "127.0.0.1:9001", cmd.ROLE_VOTER),
    cmd.MemberSet("learner-1", "", "127.0.0.1:9004", cmd.ROLE_LEARNER),
    cmd.MemberSet("nœud-é", "h:1", "h:2", cmd.ROLE_VOTER),
    cmd.MemberRemove("n2"),
    cmd.Batch((cmd.Put(b"a", b"1"), cmd.Delete(b"b"),
               cmd.CompareAndSwap(b"c", b"3", cmd.CAS_MUST_NOT_EXIST, 0), cmd.Barrier())),
    cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_DISK_FULL, "n1"),
    cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n2"),
    cmd.Alarm(cmd.ALARM_DISARM, cmd.CAUSE_ANY, ""),
    cmd.Revoke(0x1F2E3D4C5B6A79880011223344556677889900AA),
]


def test_alarm_wire_bytes_and_refusals():
    assert cmd.encode(cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n1")) == \
        b"\x30\x01\x01\x02\x00\x02n1"
    for bad in (b"\x30\x01\x01\x00\x00\x00",          # raise without a member
                b"\x30\x01\x01\x09\x00\x02n1",        # unknown cause
                b"\x30\x01\x07\x01\x00\x02n1",        # unknown action
                b"\x30\x01\x02\x00\x00\x02n1x"):      # trailing bytes
        with pytest.raises(cmd.CommandError):
            cmd.decode(bad)


@pytest.mark.parametrize("command", CORE_COMMANDS, ids=lambda c: type(c).__name__)
def test_round_trip(command):
    wire = cmd.encode(command)
    assert wire[1] == cmd.BODY_V1
    assert cmd.decode(wire) == command


def test_every_core_opcode_is_covered_by_the_round_trip():
    assert {cmd.encode(c)[0] for c in CORE_COMMANDS} == set(cmd.CORE_OPCODES)


def test_opcodes_on_the_wire_are_stable():
    # Journals written by older nodes must still decode: the wire bytes are a contract.
    assert cmd.encode(cmd.Put(b"ab", b"xy")) == b"\x01\x01\x00\x02abxy"
    assert cmd.encode(cmd.Delete(b"ab")) == b"\x02\x01\x00\x02ab"
    assert cmd.encode(cmd.CompareAndSwap(b"k", b"v", cmd.CAS_BY_REVISION, 7)) == (
        b"\x10\x01\x00" + struct.pack(">Q", 7) + b"\x00\x01kv")
    assert cmd.encode(cmd.Barrier()) == b"\x11\x01"
    assert cmd.encode(cmd.MemberRemove("n")) == b"\x21\x01\x00\x01n"
    assert cmd.encode(cmd.Revoke(0x01F4)) == b"\x22\x01\x02\x01\xf4"


def test_encode_refuses_a_non_command():
    with pytest.raises(TypeError):
        cmd.encode(b"\x01\x01")


@pytest.mark.parametrize("wire, message", [
    (b"", "shorter"),
    (b"\x01", "shorter"),
    (b"\x7f\x01", "unknown opcode 0x7f"),
    (b"\x03\x01", "unknown opcode 0x03"),  # plugin range: not core
    (b"\x01\x02\x00\x01kv", "unknown body version 2"),
    (b"\x11\x00", "unknown body version 0"),
], ids=["empty", "one-byte", "unknown-opcode", "plugin-opcode", "put-v2", "barrier-v0"])
def test_decode_refuses_bad_header(wire, message):
    with pytest.raises(cmd.CommandError, match=message):
        cmd.decode(wire)


@pytest.mark.parametrize("command", [c for c in CORE_COMMANDS if not isinstance(c, cmd.Barrier)],
                         ids=lambda c: type(c).__name__)
def test_decode_refuses_every_truncation(command):
    wire = cmd.encode(command)
    # Cutting inside the fixed fields or a length-prefixed field must never decode.
    # (PUT and CAS values run to the end of the body, so cuts inside them are legal.)
    fixed_len = len(wire) - (len(command.value) if hasattr(command, "value") else 0)
    for cut in range(2, fixed_len):
        with pytest.raises(cmd.CommandError):
            cmd.decode(wire[:cut])


@pytest.mark.parametrize("command", [
    cmd.Delete(b"k"), cmd.Barrier(), cmd.MemberSet("n1", "a:1", "b:2", cmd.ROLE_VOTER),
    cmd.MemberRemove("n1"), cmd.Batch((cmd.Put(b"k", b"v"),)), cmd.Revoke(7),
], ids=lambda c: type(c).__name__)
def test_decode_refuses_trailing_bytes(command):
    with pytest.raises(cmd.CommandError, match="trailing"):
        cmd.decode(cmd.encode(command) + b"\x00")


def test_put_length_prefix_longer_than_body_is_truncated():
    with pytest.raises(cmd.CommandError, match="truncated"):
        cmd.decode(b"\x01\x01\x00\x05abc")


def test_decode_refuses_unknown_cas_mode():
    wire = bytearray(cmd.encode(cmd.CompareAndSwap(b"k", b"v", cmd.CAS_BY_REVISION, 1)))
    wire[2] = 2
    with pytest.raises(cmd.CommandError, match="compare-and-swap mode 2"):
        cmd.decode(bytes(wire))


@pytest.mark.parametrize("role", [0, 3, 255])
def test_decode_refuses_unknown_member_role(role):
    wire = bytearray(cmd.encode(cmd.MemberSet("n1", "a:1", "b:2", cmd.ROLE_VOTER)))
    wire[2] = role
    with pytest.raises(cmd.CommandError, match=f"member role {role}"):
        cmd.decode(bytes(wire))


@pytest.mark.parametrize("wire", [
    b"\x21\x01\x00\x02\xff\xfe",                              # MEMBER_REMOVE name
    b"\x20\x01\x01\x00\x01\x80\x00\x03a:1\x00\x03b:2",       # MEMBER_SET name
    b"\x20\x01\x01\x00\x02n1\x00\x02\xc3(\x00\x03b:2",       # MEMBER_SET raft address
])
def test_decode_refuses_non_utf8_names(wire):
    with pytest.raises(cmd.CommandError, match="UTF-8"):
        cmd.decode(wire)


def test_batch_wire_layout_is_stable():
    assert cmd.encode(cmd.Batch((cmd.Put(b"ab", b"xy"), cmd.Barrier()))) == (
        b"\x12\x01\x00\x02" + b"\x00\x00\x00\x08\x01\x01\x00\x02abxy" + b"\x00\x00\x00\x02\x11\x01")
    assert cmd.encode_batch([b"\x11\x01"]) == b"\x12\x01\x00\x01\x00\x00\x00\x02\x11\x01"


@pytest.mark.parametrize("inner", [
    cmd.MemberRemove("n1"), cmd.MemberSet("n1", "a:1", "b:2", cmd.ROLE_VOTER),
    cmd.Batch((cmd.Put(b"k", b"v"),)),
], ids=lambda c: type(c).__name__)
def test_batch_refuses_membership_and_nested_batches(inner):
    sub = cmd.encode(inner)
    with pytest.raises(ValueError, match="only PUT"):
        cmd.encode_batch([sub])
    wire = b"\x12\x01\x00\x01" + struct.pack(">I", len(sub)) + sub
    with pytest.raises(cmd.CommandError, match="may not be batched"):
        cmd.decode(wire)


def test_batch_refuses_plugin_opcodes_and_bad_counts():
    with pytest.raises(ValueError, match="only PUT"):
        cmd.encode_batch([b"\x40\x01"])
    with pytest.raises(ValueError, match="1.."):
        cmd.encode_batch([])
    with pytest.raises(ValueError, match="1.."):
        cmd.encode_batch([b"\x11\x01"] * (cmd.MAX_BATCH_COMMANDS + 1))
    for count in (0, cmd.MAX_BATCH_COMMANDS + 1):
        with pytest.raises(cmd.CommandError, match="outside"):
            cmd.decode(b"\x12\x01" + struct.pack(">H", count))


def test_batch_with_a_bad_sub_command_does_not_decode():
    bad = b"\x01\x01\x00\x09k"  # PUT whose key length runs past its end
    with pytest.raises(cmd.CommandError, match="truncated"):
        cmd.decode(b"\x12\x01\x00\x02" + struct.pack(">I", 2) + b"\x11\x01"
                   + struct.pack(">I", len(bad)) + bad)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_command_error(data):
    try:
        decoded = cmd.decode(data)
    except cmd.CommandError:
        return
    # Whatever decodes re-encodes to the same bytes: there is one spelling per command.
    assert cmd.encode(decoded) == data


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sorted(cmd.CORE_OPCODES)), st.binary(max_size=40))
def test_valid_header_random_body_decodes_or_raises_command_error(opcode, body):
    data = bytes((opcode, cmd.BODY_V1)) + body
    try:
        decoded = cmd.decode(data)
    except cmd.CommandError:
        return
    assert cmd.encode(decoded) == data


@pytest.mark.parametrize("wire, message", [
    (b"\x22\x01\x00", "serial length 0"),
    (b"\x22\x01\x15" + b"\x01" * 21, "serial length 21"),
    (b"\x22\x01\x01\x00", "serial 0"),
])
def test_decode_refuses_bad_revocations(wire, message):
    with pytest.raises(cmd.CommandError, match=message):
        cmd.decode(wire)


@pytest.mark.parametrize("serial", [0, -1, 1 << 160])
def test_encode_refuses_serials_outside_rfc5280(serial):
    with pytest.raises(ValueError):
        cmd.encode(cmd.Revoke(serial))
