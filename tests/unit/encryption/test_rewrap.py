"""Tests of the KEK rewrap (ROTATION sub-tag 0x02): its codec, its apply rules, the node-local
KEK switch, the sidecar it leaves, and what a restart with each KEK does."""
from __future__ import annotations

import os

import pytest

from sealkv.node.errors import ApplyHalt
from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption.commands import CommandDecodeError, RewrapCommand
from sealkv.plugins.encryption.kek import FileKEK, opens_check
from sealkv.plugins.encryption.proposals import bootstrap_command, rotation_command
from sealkv.plugins.encryption.sidecar import Sidecar, SidecarError, read_sidecar
from sealkv.plugins.encryption.sidecar import write_sidecar
from sealkv.plugins.encryption.state import (
    EncryptionState, Outcome, ProposalRefused, WrappedKey,
)

from .test_layer import DictStore, apply, entry, make_plugin, write_kek

WRAPPED = bytes(range(60))


@pytest.fixture
def keks(tmp_path):
    return write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")


def bootstrapped(tmp_path, kek, next_kek=None):
    plugin = make_plugin(tmp_path, kek, next_kek=next_kek)
    layer = plugin.wrap(DictStore())
    apply(plugin, 3, bootstrap_command(plugin, ["node-a"]))
    apply(plugin, 4, rotation_command(plugin, 1))  # a table of three keys
    return plugin, layer


# ---- codec ------------------------------------------------------------------------------------

def test_rewrap_round_trip_and_layout():
    command = RewrapCommand(3, WRAPPED, ((1, 1, WRAPPED), (2, 2, WRAPPED[::-1])))
    data = c.encode_command(command)
    assert data[:9] == bytes.fromhex("05" "01" "02" "00000003" "003c")
    assert c.decode_command(data) == command
    body = data[1:]
    for cut in range(len(body)):
        with pytest.raises(CommandDecodeError):
            c.decode_body(c.OP_ROTATION, body[:cut])
    with pytest.raises(CommandDecodeError):
        c.decode_body(c.OP_ROTATION, body + b"\x00")


@pytest.mark.parametrize("command", [
    RewrapCommand(0, WRAPPED, ((1, 1, WRAPPED),)),               # generation 0
    RewrapCommand(1, b"", ((1, 1, WRAPPED),)),                   # no check blob
    RewrapCommand(1, WRAPPED, ()),                               # no keys
    RewrapCommand(1, WRAPPED, ((2, 1, WRAPPED), (1, 2, WRAPPED))),  # not ascending
    RewrapCommand(1, WRAPPED, ((1, 3, WRAPPED),)),               # unknown purpose
    RewrapCommand(1, WRAPPED, ((0, 1, WRAPPED),)),               # key id 0
])
def test_malformed_rewraps_are_refused_both_ways(command):
    with pytest.raises(ValueError):
        c.encode_command(command)
    with pytest.raises(CommandDecodeError):
        c.decode_body(c.OP_ROTATION, unchecked_body(command))
    good = RewrapCommand(1, WRAPPED, ((1, 1, WRAPPED), (2, 2, WRAPPED)))
    assert unchecked_body(good) == c.encode_body(good)
    assert isinstance(c.decode_body(c.OP_ROTATION, c.encode_body(good)), RewrapCommand)


def unchecked_body(command: RewrapCommand) -> bytes:
    """The rewrap body layout (commands.py) written without any of the encoder's checks, so
    the decoder can be shown what the encoder refuses to write."""
    def wrapped(blob):
        return len(blob).to_bytes(2, "big") + blob

    return (b"\x01\x02" + command.generation.to_bytes(4, "big") + wrapped(command.check)
            + len(command.keys).to_bytes(4, "big")
            + b"".join(key_id.to_bytes(4, "big") + bytes((purpose,)) + wrapped(blob)
                       for key_id, purpose, blob in command.keys))


# ---- state rules ------------------------------------------------------------------------------

def _state_with_keys() -> EncryptionState:
    state = EncryptionState()
    state.keys = {1: WrappedKey(1, b"a" * 60, 3), 2: WrappedKey(2, b"b" * 60, 3)}
    state.active = {1: 1, 2: 2}
    return state


def test_state_rules_apply_replay_stale_and_snapshot():
    state = _state_with_keys()
    seen = []
    command = RewrapCommand(1, WRAPPED, ((1, 1, b"A" * 60), (2, 2, b"B" * 60)))
    result = state.apply_rewrap(9, command, lambda check, keys: seen.append((check, keys)))
    assert result.outcome is Outcome.APPLIED and seen == [(WRAPPED, command.keys)]
    assert state.keys[1].wrapped == b"A" * 60 and state.keys[1].created == 3
    assert (state.kek_generation, state.kek_check, state.kek_rewrap_index) == (1, WRAPPED, 9)
    assert state.key_change_index == 9
    # The same entry again (a replay) changes nothing and does not call the node-local part.
    assert state.apply_rewrap(10, command, lambda *a: seen.append(a)).outcome \
        is Outcome.NOOP_REPLAY and len(seen) == 1
    # A rewrap prepared from an older generation or another table is consumed without effect.
    stale = RewrapCommand(1, WRAPPED[::-1], command.keys)
    assert state.apply_rewrap(11, stale, lambda *a: seen.append(a)).outcome \
        is Outcome.STALE_CONSUMED
    short = RewrapCommand(2, WRAPPED, ((1, 1, b"C" * 60),))
    assert state.apply_rewrap(12, short, lambda *a: seen.append(a)).outcome \
        is Outcome.STALE_CONSUMED
    with pytest.raises(ProposalRefused, match="changed"):
        state.check_rewrap(short, lambda blob: bytes(32))
    assert len(seen) == 1 and state.kek_generation == 1
    # The snapshot carries the generation, the check blob and the rewrap index.
    copy = EncryptionState.from_bytes(state.to_bytes())
    assert copy == state
    assert EncryptionState.from_bytes(_state_with_keys().to_bytes()).kek_generation == 0


def test_state_refuses_a_rewrap_the_next_kek_cannot_open():
    state = _state_with_keys()
    command = RewrapCommand(1, WRAPPED, ((1, 1, b"A" * 60), (2, 2, b"B" * 60)))

    def unwrap(blob):
        raise ValueError("does not authenticate")

    with pytest.raises(ProposalRefused, match="cannot unwrap key 1"):
        state.check_rewrap(command, unwrap)


# ---- the node: switch, sidecar, restart -------------------------------------------------------

def test_rewrap_switches_the_kek_and_rewrites_the_sidecar(tmp_path, keks):
    old, new = keks
    plugin, layer = bootstrapped(tmp_path, old, new)
    layer.put(b"k", entry(b"value before"))
    ready, why, check = plugin.next_kek_status(plugin.view().state)
    assert ready and not why and opens_check(FileKEK(new), check)
    assert not opens_check(FileKEK(old), check)
    command = plugin.rewrap_command(plugin.view().state)
    assert command.generation == 1 and [k for k, _, _ in command.keys] == [1, 2, 3]
    result = apply(plugin, 5, command)
    assert result.outcome is Outcome.APPLIED
    assert plugin.kek is plugin.next_kek
    sidecar = read_sidecar(plugin.context.data_dir)
    assert sidecar.kek_generation == 1 and sidecar.raft_applied_index == 5
    new_kek = FileKEK(new)
    for key_id, key in sidecar.keys.items():
        assert new_kek.unwrap(key.wrapped) == plugin.keystore.get(key_id)
    assert layer.get(b"k").value == b"value before"
    layer.put(b"k2", entry(b"value after", 11))
    assert layer.get(b"k2").value == b"value after"
    # New keys are now wrapped under the new KEK; a re-run finds nothing to do.
    apply(plugin, 6, rotation_command(plugin, 1))
    assert new_kek.unwrap(plugin.view().state.keys[4].wrapped) == plugin.keystore.get(4)
    assert plugin.next_kek_opens(plugin.view().state.kek_check)
    with pytest.raises(ProposalRefused, match="already wrapped under"):
        plugin.rewrap_command(plugin.view().state)


def test_a_rollback_past_a_rewrap_restores_the_table_under_the_kek_it_replaced(tmp_path,
                                                                              keks):
    # A full disk fails the database commit of a group holding a rewrap: the adapter rolls
    # back, and the state machine reloads the plugin's state from before the rewrap (never
    # rewrapped: no check blob) while this process already switched to the new KEK.
    old, new = keks
    plugin, _ = bootstrapped(tmp_path, old, new)
    before = plugin.snapshot_state()
    held = {key_id: plugin.keystore.get(key_id) for key_id in (1, 2, 3)}
    apply(plugin, 5, plugin.rewrap_command(plugin.view().state))
    assert plugin.kek is plugin.next_kek
    plugin.restore_state(before)  # the rollback's reload
    state = plugin.view().state
    assert state.kek_generation == 0
    assert {key_id: plugin.kek.unwrap(state.keys[key_id].wrapped) for key_id in held} == held
    # The retry applies the rewrap again.
    assert apply(plugin, 5, plugin.rewrap_command(state)).outcome is Outcome.APPLIED
    assert plugin.kek is plugin.next_kek and plugin.view().state.kek_generation == 1


def test_restart_after_rewrap_with_each_kek(tmp_path, keks):
    old, new = keks
    plugin, _ = bootstrapped(tmp_path, old, new)
    apply(plugin, 5, plugin.rewrap_command(plugin.view().state))
    snapshot = plugin.snapshot_state()
    # Only the old KEK: refused at start, naming the fix.
    with pytest.raises(StartupRefused) as refused:
        make_plugin(tmp_path, old)
    message = str(refused.value)
    assert "rewrapped under a new KEK" in message and "--kek-file" in message
    assert "KEK generation 1" in message
    # The new KEK as the node's KEK: starts, restores and checks fine.
    promoted = make_plugin(tmp_path, new)
    promoted.restore_state(snapshot)
    promoted.check_start_state(catch_up_timeout=0)
    assert promoted.key_problem(promoted.view().state) == ""
    # The old KEK with the new one still staged (not promoted yet): also fine.
    staged = make_plugin(tmp_path, old, next_kek=new)
    staged.restore_state(snapshot)
    assert staged.kek is staged.next_kek
    staged.check_start_state(catch_up_timeout=0)


def test_crash_windows_of_the_rewrite(tmp_path, keks):
    """The sidecar is rewritten at apply, the database commits after: a crash between leaves
    a rewrapped sidecar with the pre-rewrap state; the reverse order leaves the old sidecar
    with a rewrapped state. A restart with the next KEK staged recovers from both."""
    old, new = keks
    plugin, _ = bootstrapped(tmp_path, old, new)
    before = plugin.snapshot_state()
    command = plugin.rewrap_command(plugin.view().state)
    old_sidecar = read_sidecar(plugin.context.data_dir)
    apply(plugin, 5, command)
    after = plugin.snapshot_state()
    # 1: rewrapped sidecar, database before the rewrap: the replay applies it again.
    restarted = make_plugin(tmp_path, old, next_kek=new)
    restarted.restore_state(before)
    assert restarted.kek is not restarted.next_kek
    assert apply(restarted, 5, command).outcome is Outcome.APPLIED
    assert restarted.kek is restarted.next_kek
    restarted.check_start_state(catch_up_timeout=0)
    # 2: old sidecar, database after the rewrap: the snapshot switches the KEK at load.
    write_sidecar(plugin.context.data_dir, old_sidecar)
    restarted = make_plugin(tmp_path, old, next_kek=new)
    restarted.restore_state(after)
    restarted.persist_applied()  # as the state machine does after a restore
    assert restarted.kek is restarted.next_kek
    restarted.check_start_state(catch_up_timeout=0)
    assert read_sidecar(plugin.context.data_dir).kek_generation == 1


def test_a_node_without_the_next_kek_halts_at_the_rewrap(tmp_path, keks):
    old, new = keks
    leader, _ = bootstrapped(tmp_path, old, new)
    command = leader.rewrap_command(leader.view().state)
    lagging = make_plugin(tmp_path, old, raft_id="node-b", data="data-b")
    lagging.wrap(DictStore())
    ready, why, _ = lagging.next_kek_status(lagging.view().state)
    assert not ready and "--next-kek-file" in why
    lagging.restore_state(leader.snapshot_state())  # the same table as the leader
    with pytest.raises(ApplyHalt, match="configure the new KEK"):
        apply(lagging, 5, command)
    assert lagging.view().state.kek_generation == 0


def test_a_member_with_another_next_kek_is_not_the_leaders(tmp_path, keks):
    old, new = keks
    leader, _ = bootstrapped(tmp_path, old, new)
    other = make_plugin(tmp_path, old, raft_id="node-b", data="data-b",
                        next_kek=write_kek(tmp_path / "other.kek"))
    other.restore_state(leader.snapshot_state())
    ready, _, check = other.next_kek_status(other.view().state)
    assert ready and not leader.next_kek_opens(check)
    _, _, own = leader.next_kek_status(leader.view().state)
    assert leader.next_kek_opens(own)


def test_next_kek_file_gets_the_kek_file_checks(tmp_path, keks):
    old, new = keks
    os.chmod(new, 0o644)
    with pytest.raises(StartupRefused, match="next KEK.*chmod 600"):
        make_plugin(tmp_path, old, next_kek=new)


def test_sidecar_kek_fields():
    check = WRAPPED
    sidecar = Sidecar(kek_generation=2, kek_check=check)
    parsed = Sidecar.from_json(sidecar.to_json())
    assert (parsed.kek_generation, parsed.kek_check) == (2, check)
    assert b"kek_generation" not in Sidecar().to_json()
    with pytest.raises(SidecarError):
        Sidecar(kek_generation=2).to_json()
    text = sidecar.to_json().replace(b'"kek_generation": 2,', b"")
    with pytest.raises(SidecarError, match="together"):
        Sidecar.from_json(text)


def test_next_kek_flags_and_toml_reach_the_plugin_options(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sealkv.node import server
    from sealkv.node.cli.main import register_commands

    cli = register_commands()
    seen = []
    monkeypatch.setattr(server, "run", lambda config: seen.append(config) or 0)
    toml = tmp_path / "node.toml"
    toml.write_text('[plugin_options.encryption]\nnext_kek_provider = "file"\n')
    base = ["node", "start", "--config", str(toml), "--name", "n1", "--data-dir",
            str(tmp_path / "d"), "--raft", "127.0.0.1:7001", "--grpc", "127.0.0.1:9001",
            "--insecure", "--encryption", "--kek-file", "/k/current"]
    result = CliRunner().invoke(cli, base + ["--next-kek-file", "/k/next",
                                             "--next-kek-option", "pin_file=/k/pin"])
    assert result.exit_code == 0, result.output
    options = seen[0].plugin_options["encryption"]
    assert options == {"kek_file": "/k/current", "next_kek_file": "/k/next",
                       "next_kek_provider": "file", "next_kek_options": {"pin_file": "/k/pin"}}
    bad = CliRunner().invoke(cli, base + ["--next-kek-option", "novalue"])
    assert bad.exit_code == 2 and "--next-kek-option takes KEY=VALUE" in bad.output
