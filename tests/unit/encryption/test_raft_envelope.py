"""The raft-log envelope codec: sealing, the append gate, the intake barrier, apply by index."""
from __future__ import annotations

import threading

import pytest

from sealkv.node import errors
from sealkv.node.errors import ApplyHalt
from sealkv.node.state import commands as core
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption import envelope
from sealkv.plugins.encryption.proposals import (
    bootstrap_command, cutover_command, rotation_command,
)
from sealkv.plugins.encryption.raft_envelope import is_raft_marker, looks_sealed
from tests.unit.encryption.test_layer import apply, kek_file, make_plugin  # noqa: F401

PUT = core.encode(core.Put(b"k", b"secret-value"))


@pytest.fixture
def plugin(tmp_path, kek_file):  # noqa: F811
    plugin = make_plugin(tmp_path, kek_file)
    apply(plugin, 3, bootstrap_command(plugin, ["node-a"]))
    return plugin


def test_before_the_cutover_payloads_are_the_commands(plugin):
    codec = plugin.payload_codec()
    assert codec.seal(PUT, 0.1) == PUT
    assert codec.open(10, PUT) == PUT
    assert codec.admit_append(10, PUT) is None


def test_the_marker_arms_the_gate_and_its_apply_installs_the_wrap(plugin):
    codec = plugin.payload_codec()
    marker = cutover_command(plugin.view(), 2)
    marker_bytes = c.encode_command(marker)
    assert is_raft_marker(marker_bytes) and not is_raft_marker(PUT)
    assert codec.admit_append(5, marker_bytes) is None
    # Above the pending marker: cleartext is refused, envelopes are not yet produced anywhere.
    assert "cleartext" in codec.admit_append(6, PUT)
    apply(plugin, 5, marker)
    assert codec.wrap_installed and plugin.state.raft_cutover_index == 5
    sealed = codec.seal(PUT, 0.1)
    assert sealed != PUT and PUT[3:] not in sealed
    assert looks_sealed(sealed, [2]) and not looks_sealed(PUT, [2])
    assert codec.admit_append(6, sealed) is None
    assert "cleartext" in codec.admit_append(7, PUT)
    assert codec.open(6, sealed) == PUT
    assert codec.open(5, marker_bytes) == marker_bytes  # the cutover entry itself is cleartext
    with pytest.raises(ApplyHalt, match="above the raft envelope cutover"):
        codec.open(7, PUT)
    # The raft AAD: a storage-purpose envelope of the same bytes does not open.
    storage_key = plugin.keystore.get(1)
    forged = envelope.seal(storage_key, 1, b"\0" * 12, PUT, envelope.raft_aad(1))
    with pytest.raises(ApplyHalt):
        codec.open(8, forged)


def test_seals_follow_a_raft_key_rotation(plugin):
    codec = plugin.payload_codec()
    apply(plugin, 5, cutover_command(plugin.view(), 2))
    first = codec.seal(PUT, 0.1)
    assert envelope.parse(first).key_id == 2
    rotation = rotation_command(plugin, 2)
    apply(plugin, 6, rotation)
    second = codec.seal(PUT, 0.1)
    assert envelope.parse(second).key_id == rotation.dek_id != 2
    assert codec.open(7, first) == codec.open(8, second) == PUT


def test_an_entry_under_a_key_no_longer_loaded_halts_even_after_one_opened(plugin):
    codec = plugin.payload_codec()
    apply(plugin, 5, cutover_command(plugin.view(), 2))
    sealed = codec.seal(PUT, 0.1)
    assert codec.open(6, sealed) == PUT
    plugin.keystore.remove(2)  # the opening the codec keeps must not outlive the key
    with pytest.raises(ApplyHalt, match="UnknownKeyId"):
        codec.open(7, sealed)


def test_a_new_leader_rearms_the_gate_from_its_unapplied_log(plugin):
    codec = plugin.payload_codec()
    marker_bytes = c.encode_command(cutover_command(plugin.view(), 2))
    codec.on_leadership(True, [(8, PUT), (9, marker_bytes)])
    assert codec.admit_append(10, PUT) is not None
    codec.on_leadership(False, [])
    codec.on_leadership(True, [(8, PUT)])
    assert codec.admit_append(10, PUT) is None
    # A sealed payload below any marker would be applied as cleartext: refused.
    apply(plugin, 9, cutover_command(plugin.view(), 2))
    sealed = codec.seal(PUT, 0.1)
    plugin.state.raft_cutover_index = 0  # as if the cutover had not happened (test only)
    assert "below" in codec.admit_append(12, sealed)


def test_closed_intake_holds_proposals_until_the_marker_applies(plugin):
    codec = plugin.payload_codec()
    marker = cutover_command(plugin.view(), 2)
    codec.close_intake()
    with pytest.raises(errors.Unavailable, match="paused"):
        codec.seal(PUT, 0.05)
    assert codec.seal(c.encode_command(marker), 0.05) == c.encode_command(marker)
    out = []
    waiter = threading.Thread(target=lambda: out.append(codec.seal(PUT, 5)))
    waiter.start()
    apply(plugin, 5, marker)
    waiter.join(5)
    assert out and looks_sealed(out[0], [2])


def test_the_retained_log_counts_users_of_a_raft_key_until_a_snapshot_covers_them(plugin):
    # What RetireDEK asks every member (GetKeyUsage): entries above the last snapshot, taken
    # here or loaded (a snapshot installed from the leader, see the adapter's _read_dump).
    codec = plugin.payload_codec()
    apply(plugin, 5, cutover_command(plugin.view(), 2))
    for index in (6, 7, 8):
        codec.open(index, codec.seal(PUT, 0.1))
    assert codec.log_users(2) == 3 and codec.log_users(1) == 0
    codec.snapshot_taken(6)
    assert codec.log_users(2) == 2
    codec.snapshot_taken(8)
    assert codec.log_users(2) == 0
    codec.snapshot_taken(7)  # an older snapshot changes nothing
    assert codec.log_users(2) == 0
