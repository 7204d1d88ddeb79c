"""Tests of the envelope storage layer and the encryption plugin's shell."""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Optional

import pytest

from sealkv.node.errors import IntegrityError, Unavailable
from sealkv.node.state.storage.base import VALUE_CLEARTEXT, VALUE_ENCRYPTED, Entry, StorageFull
from sealkv.node.state.storage.lmdb_store import LmdbStore
from sealkv.node.errors import ApplyHalt
from sealkv.plugins.api import PluginContext, StartupRefused
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption.commands import RegisterCommand, WriterRow
from sealkv.plugins.encryption.keystore import KeyConflict, KeyStore
from sealkv.node.data_dir import DataDirError, refuse_disabled_plugin_data
from sealkv.plugins.encryption.layer import EncryptionLayerPlugin
from sealkv.plugins.encryption.proposals import (
    bootstrap_command, cutover_command, rotation_command,
)
from sealkv.plugins.encryption.purpose import PURPOSE_STORAGE
from sealkv.plugins.encryption.nonce import full_node_id
from sealkv.plugins.encryption.sidecar import read_sidecar, sidecar_dir
from sealkv.plugins.encryption.storage import EncryptionUnavailableError
from tests.small_disk import fill, small_tmpfs


class DictStore:
    """A minimal in-memory `Storage`; for tests only."""

    def __init__(self):
        self.data: dict[bytes, Entry] = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, entry):
        self.data[key] = entry

    def delete(self, key):
        return self.data.pop(key, None) is not None

    def scan(self, start, end):
        for key in sorted(self.data):
            if key >= start and (end is None or key < end):
                yield key, self.data[key]

    def count(self, start, end):
        return sum(1 for _ in self.scan(start, end))

    def dump(self):
        return iter(sorted(self.data.items()))

    def restore(self, records):
        self.data = dict(records)


def write_kek(path, key: Optional[bytes] = None) -> str:
    """Writes a new KEK file (mode 0600) at `path`: `key`, else 32 random bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32) if key is None else key)
    os.close(fd)
    return str(path)


@pytest.fixture
def kek_file(tmp_path):
    return write_kek(tmp_path / "kek.bin")


def make_plugin(tmp_path, kek_file, raft_id="node-a", data="data-a", next_kek=None):
    """A prepared plugin with the KEK file `kek_file` (and `next_kek` staged, when given)."""
    options = {"kek_file": kek_file}
    if next_kek:
        options["next_kek_file"] = next_kek
    context = PluginContext(node_name=raft_id, raft_id=raft_id,
                            data_dir=str(tmp_path / data), options=options)
    plugin = EncryptionLayerPlugin(context)
    plugin.prepare_start()
    return plugin


def apply(plugin, index, command, persist=True):
    """Applies `command` as the node does: the handler, then the persist it decided (left
    due with `persist=False`, the window between the two)."""
    data = c.encode_command(command)
    result = plugin.command_handlers()[data[0]](index, data[1:])
    if persist:
        plugin.persist_applied()
    return result


def encrypted_cluster(tmp_path, kek_file, members=("node-a", "node-b")):
    plugin = make_plugin(tmp_path, kek_file)
    store = DictStore()
    layer = plugin.wrap(store)
    apply(plugin, 3, bootstrap_command(plugin, list(members)))
    apply(plugin, 4, cutover_command(plugin.view(), 1))
    return plugin, layer, store


def entry(value, revision=10):
    return Entry(value=value, create_revision=revision, mod_revision=revision, version=1)


def test_cleartext_before_cutover(tmp_path, kek_file):
    plugin = make_plugin(tmp_path, kek_file)
    store = DictStore()
    layer = plugin.wrap(store)
    layer.put(b"k", entry(b"plain"))
    assert store.data[b"k"].value == b"plain" and store.data[b"k"].header == VALUE_CLEARTEXT
    assert layer.get(b"k").value == b"plain"


def test_values_are_sealed_after_cutover_and_read_back(tmp_path, kek_file):
    plugin, layer, store = encrypted_cluster(tmp_path, kek_file)
    assert plugin.state.storage_cutover_index == 4
    layer.put(b"user/1", entry(b"secret value", revision=11))
    stored = store.data[b"user/1"]
    assert stored.header == VALUE_ENCRYPTED and b"secret value" not in stored.value
    assert len(stored.value) == len(b"secret value") + 34
    assert stored.value[:6] == b"\x01\x00" + (1).to_bytes(4, "big")
    nonce = stored.value[6:18]
    assert nonce[:2] == (full_node_id("node-a") & 0xFFFF).to_bytes(2, "big")
    assert nonce[2:4] == b"\x00\x01" and nonce[4:] == (1).to_bytes(8, "big")
    got = layer.get(b"user/1")
    assert got.value == b"secret value" and got.header == VALUE_CLEARTEXT
    assert [(k, e.value) for k, e in layer.scan(b"", None)] == [(b"user/1", b"secret value")]
    assert layer.delete(b"user/1") and layer.get(b"user/1") is None


def test_over_lmdb_the_sealed_record_goes_down_by_its_fields_and_reads_back(tmp_path,
                                                                           kek_file):
    plugin = make_plugin(tmp_path, kek_file)
    store = LmdbStore(str(tmp_path / "db"), map_size=64 * 1024 * 1024)
    store.open()
    try:
        layer = plugin.wrap(store)
        apply(plugin, 3, bootstrap_command(plugin, ["node-a"]))
        apply(plugin, 4, cutover_command(plugin.view(), 1))
        layer.put(b"user/1", Entry(b"secret value", 9, 11, 3))
        stored = store.get(b"user/1")
        assert (stored.header, stored.create_revision, stored.mod_revision, stored.version) == \
            (VALUE_ENCRYPTED, 9, 11, 3)
        assert b"secret value" not in stored.value and stored.value[:2] == b"\x01\x00"
        assert layer.get(b"user/1") == Entry(b"secret value", 9, 11, 3)
        # The AAD still binds the revision: the same bytes under another one do not open.
        store.put(b"user/1", dataclasses.replace(stored, mod_revision=12))
        with pytest.raises(IntegrityError):
            layer.get(b"user/1")
    finally:
        store.close()


def test_puts_follow_a_storage_key_rotation_and_are_counted(tmp_path, kek_file):
    plugin, layer, store = encrypted_cluster(tmp_path, kek_file)
    layer.put(b"a", entry(b"one", 11))
    layer.put(b"a2", entry(b"one again", 11))
    apply(plugin, 12, rotation_command(plugin, PURPOSE_STORAGE))
    new_id = plugin.state.active_storage_id
    assert new_id != 1
    layer.put(b"b", entry(b"two", 13))
    assert store.data[b"a2"].value[2:6] == (1).to_bytes(4, "big")
    assert store.data[b"a2"].value[10:18] == (2).to_bytes(8, "big")  # the key's 2nd nonce
    assert store.data[b"b"].value[2:6] == new_id.to_bytes(4, "big")
    assert store.data[b"b"].value[10:18] == (1).to_bytes(8, "big")  # its own counter
    assert [layer.get(k).value for k in (b"a", b"a2", b"b")] == [b"one", b"one again", b"two"]
    seals = next(rows for name, _, _, rows in plugin.metrics()
                 if name == "sealkv_encryption_envelope_seals")
    assert ({"purpose": "storage"}, 3) in seals


def test_tampering_swapping_and_reserved_states_are_integrity_errors(tmp_path, kek_file):
    _, layer, store = encrypted_cluster(tmp_path, kek_file)
    layer.put(b"a", entry(b"value a", 11))
    layer.put(b"b", entry(b"value b", 11))
    a, b = store.data[b"a"], store.data[b"b"]
    store.data[b"a"], store.data[b"b"] = b, a
    for key in (b"a", b"b"):
        with pytest.raises(IntegrityError):
            layer.get(key)
    with pytest.raises(IntegrityError):
        list(layer.scan(b"", None))
    flipped = bytearray(a.value)
    flipped[-1] ^= 1
    store.data[b"a"] = dataclasses.replace(a, value=bytes(flipped))
    with pytest.raises(IntegrityError):
        layer.get(b"a")
    store.data[b"a"] = dataclasses.replace(a, mod_revision=12)  # moved to another version
    with pytest.raises(IntegrityError):
        layer.get(b"a")
    for state in (0x02, 0x03):
        store.data[b"a"] = dataclasses.replace(a, header=state)
        with pytest.raises(IntegrityError, match="reserved"):
            layer.get(b"a")


def test_rebadge_guard(tmp_path, kek_file):
    _, layer, store = encrypted_cluster(tmp_path, kek_file)
    layer.put(b"k", entry(b"x" * 40, 11))
    sealed = store.data[b"k"]
    store.data[b"k"] = dataclasses.replace(sealed, header=VALUE_CLEARTEXT)  # bit cleared
    with pytest.raises(IntegrityError, match="cleared"):
        layer.get(b"k")
    # A legitimate cleartext value that merely looks like an envelope is returned as is.
    lookalike = b"\x01\x00\x00\x00\x00\x01" + os.urandom(40)
    store.data[b"k"] = entry(lookalike, 11)
    assert layer.get(b"k").value == lookalike


def test_sidecar_written_after_apply_and_epoch_bumped_on_restart(tmp_path, kek_file):
    plugin, layer, _ = encrypted_cluster(tmp_path, kek_file)
    sidecar = read_sidecar(plugin.context.data_dir)
    assert sidecar.storage_envelope_cutover_index == 4 and sidecar.raft_applied_index == 4
    assert {k: v.local_epoch for k, v in sidecar.keys.items()} == {1: 1, 2: 1}
    restarted = make_plugin(tmp_path, kek_file)
    assert restarted.local_epoch(1) == 2
    assert read_sidecar(plugin.context.data_dir).keys[1].local_epoch == 2
    assert restarted.nonce_factory(1).next()[2:4] == b"\x00\x02"


def test_restart_replay_register_and_start_checks(tmp_path, kek_file):
    plugin, _, _ = encrypted_cluster(tmp_path, kek_file)
    snapshot = plugin.snapshot_state()
    restarted = make_plugin(tmp_path, kek_file)
    restarted.restore_state(snapshot)
    restarted.check_start_state()
    pending = restarted.pending_registrations()
    assert [cmd.row.local_epoch for cmd in pending] == [2, 2]
    with pytest.raises(Unavailable):
        restarted.admit_write(0)
    for index, command in enumerate(pending, start=5):
        apply(restarted, index, command)
    restarted.admit_write(0)
    assert restarted.pending_registrations() == []


def test_start_refuses_an_epoch_behind_the_registry(tmp_path, kek_file):
    plugin, _, _ = encrypted_cluster(tmp_path, kek_file)
    me = plugin.full_node_id
    apply(plugin, 5, RegisterCommand(WriterRow(1, me, 9)))  # registry is ahead of this disk
    snapshot = plugin.snapshot_state()
    restarted = make_plugin(tmp_path, kek_file)
    restarted.restore_state(snapshot)
    with pytest.raises(StartupRefused, match="old copy"):
        restarted.check_start_state()


def test_admit_write_waits_for_own_registration(tmp_path, kek_file):
    plugin = make_plugin(tmp_path, kek_file)
    plugin.admit_write(0)  # not bootstrapped: nothing is sealed, nothing to wait for
    apply(plugin, 3, bootstrap_command(plugin, ["node-b"]))  # this node has no row yet
    with pytest.raises(Unavailable, match="retry"):
        plugin.admit_write(0)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(plugin.admit_write(30)))
    waiter.start()
    apply(plugin, 5, RegisterCommand(WriterRow(1, plugin.full_node_id, 1)))
    waiter.join(30)
    assert outcome == [None]


def test_an_admitted_node_is_checked_again_after_every_change(tmp_path, kek_file):
    # Admission answers at once while nothing changed since the last one: any key change
    # (a rotation, the raft cutover, a snapshot installed) must make it look again.
    plugin, _, _ = encrypted_cluster(tmp_path, kek_file)
    plugin.admit_write(0)
    plugin.admit_write(0)
    me = plugin.full_node_id
    node_b = WriterRow(0, full_node_id("node-b"), 1)

    def proposed_by_node_b(rotation):  # so the entry carries no row of this node
        return dataclasses.replace(rotation, proposer=dataclasses.replace(
            node_b, dek_id=rotation.proposer.dek_id))

    apply(plugin, 5, proposed_by_node_b(rotation_command(plugin, PURPOSE_STORAGE)))
    with pytest.raises(Unavailable, match="retry"):
        plugin.admit_write(0)
    apply(plugin, 6, RegisterCommand(WriterRow(plugin.state.active_storage_id, me, 1)))
    plugin.admit_write(0)
    apply(plugin, 7, proposed_by_node_b(cutover_command(plugin.view(), 2)))
    plugin.admit_write(0)  # the raft key's row came with the bootstrap
    apply(plugin, 8, proposed_by_node_b(rotation_command(plugin, 2)))
    with pytest.raises(Unavailable, match="retry"):  # sealed under the new raft key now
        plugin.admit_write(0)
    unregistered = plugin.snapshot_state()
    apply(plugin, 9, RegisterCommand(WriterRow(plugin.state.active_raft_id, me, 1)))
    plugin.admit_write(0)
    registered = plugin.snapshot_state()
    plugin.restore_state(unregistered)  # a snapshot installed from a leader behind us
    with pytest.raises(Unavailable, match="retry"):
        plugin.admit_write(0)
    plugin.restore_state(registered)
    plugin.admit_write(0)


def test_late_joiner_gets_keys_from_snapshot(tmp_path, kek_file):
    plugin, layer, store = encrypted_cluster(tmp_path, kek_file)
    layer.put(b"k", entry(b"value", 11))
    joiner = make_plugin(tmp_path, kek_file, raft_id="node-b", data="data-b")
    joiner_layer = joiner.wrap(DictStore())
    joiner.restore_state(plugin.snapshot_state())
    joiner_layer.restore(store.dump())
    assert joiner_layer.get(b"k").value == b"value"
    # Restoring decided the sidecar; until the node persists it, nothing is sealed.
    assert read_sidecar(joiner.context.data_dir) is None
    with pytest.raises(EncryptionUnavailableError, match="not durable yet"):
        joiner_layer.put(b"early", entry(b"v", 12))
    joiner.persist_applied()
    # node-b has a bootstrap row at epoch 1, so it must not reuse epoch 1 for this key.
    assert read_sidecar(joiner.context.data_dir).keys[1].local_epoch == 2
    stranger = make_plugin(tmp_path, kek_file, raft_id="node-c", data="data-c")
    stranger.restore_state(plugin.snapshot_state())
    assert stranger.local_epoch(1) == 1 and stranger.pending_registrations()
    joiner_layer.put(b"j", entry(b"mine", 12))
    assert joiner_layer.get(b"j").value == b"mine"


def test_a_new_key_seals_only_once_its_epoch_is_durable(tmp_path, kek_file):
    """The "not durable yet" gate: apply installs a key, the node persists after it."""
    plugin = make_plugin(tmp_path, kek_file)
    layer = plugin.wrap(DictStore())
    apply(plugin, 3, bootstrap_command(plugin, ["node-a"]), persist=False)
    assert read_sidecar(plugin.context.data_dir) is None
    with pytest.raises(EncryptionUnavailableError, match="not durable yet"):
        plugin.nonce_factory(1)  # the applying thread is refused, never waits for itself
    sealed = []
    sealer = threading.Thread(target=lambda: sealed.append(plugin.nonce_factory(2, 30)))
    sealer.start()  # another thread (the raft envelope's sealing) waits for the persist
    sealer.join(0.2)
    assert sealer.is_alive() and not sealed  # still waiting: nothing is durable yet
    plugin.persist_applied()
    sealer.join(30)
    assert [f.local_epoch for f in sealed] == [1]
    assert read_sidecar(plugin.context.data_dir).keys[2].local_epoch == 1
    apply(plugin, 4, cutover_command(plugin.view(), 1))
    layer.put(b"k", entry(b"v", 5))
    assert layer.get(b"k").value == b"v"


def test_a_failed_sidecar_write_halts_and_stays_due(tmp_path, kek_file):
    plugin = make_plugin(tmp_path, kek_file)
    apply(plugin, 3, bootstrap_command(plugin, ["node-a"]), persist=False)
    # A directory where the temp file goes: the write fails (even for root).
    blocker = os.path.join(sidecar_dir(plugin.context.data_dir), "keys.json.tmp")
    os.makedirs(blocker)
    with pytest.raises(ApplyHalt, match="cannot write the encryption sidecar"):
        plugin.persist_applied()
    with pytest.raises(EncryptionUnavailableError):
        plugin.nonce_factory(1)
    os.rmdir(blocker)
    plugin.persist_applied()  # still due: written now
    assert set(read_sidecar(plugin.context.data_dir).keys) == {1, 2}
    plugin.nonce_factory(1)


def test_a_sidecar_write_on_a_full_disk_is_storage_full_and_stays_due(tmp_path, kek_file):
    # A full disk is no reason to halt: the adapter applies the group again once there is
    # room (its NOSPACE stall). A real full file system: a 64 KiB tmpfs under the sidecar.
    plugin = make_plugin(tmp_path, kek_file)
    apply(plugin, 3, bootstrap_command(plugin, ["node-a"]), persist=False)
    with small_tmpfs(sidecar_dir(plugin.context.data_dir), "64k") as directory:
        ballast = fill(directory)
        with pytest.raises(StorageFull, match="cannot write the encryption sidecar"):
            plugin.persist_applied()
        with pytest.raises(EncryptionUnavailableError):
            plugin.nonce_factory(1)  # no epoch is used before it is durable
        os.unlink(ballast)
        plugin.persist_applied()  # still due: written now
        assert set(read_sidecar(plugin.context.data_dir).keys) == {1, 2}
        plugin.nonce_factory(1)


def test_a_start_on_a_full_disk_is_refused_with_the_fix(tmp_path, kek_file):
    # prepare_start bumps every nonce epoch in the sidecar before anything is served; on a
    # full disk that is a start-up refusal naming the fix, not a traceback. A real full disk:
    # the data directory on a 256 KiB tmpfs.
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        plugin = make_plugin(disk, kek_file)
        apply(plugin, 3, bootstrap_command(plugin, ["node-a"]))  # the sidecar holds keys
        ballast = fill(disk)
        with pytest.raises(StartupRefused, match="No space left on device: free space"):
            make_plugin(disk, kek_file)
        os.unlink(ballast)
        make_plugin(disk, kek_file)  # room again: it starts


def test_malformed_commands_halt(tmp_path, kek_file):
    plugin = make_plugin(tmp_path, kek_file)
    handlers = plugin.command_handlers()
    for opcode in (0x03, 0x04, 0x05):
        with pytest.raises(ApplyHalt):
            handlers[opcode](1, b"\x01\x02")
    with pytest.raises(ApplyHalt):
        plugin.restore_state(b"\x01garbage")


def test_prepare_start_refusals(tmp_path, kek_file):
    context = PluginContext(node_name="a", raft_id="a", data_dir=str(tmp_path / "d"))
    with pytest.raises(StartupRefused, match="kek_file"):
        EncryptionLayerPlugin(context).prepare_start()
    encrypted_cluster(tmp_path, kek_file)
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(32))
    os.chmod(other, 0o600)
    with pytest.raises(StartupRefused, match="cannot unwrap"):
        make_plugin(tmp_path, str(other))
    # The sidecar lives in the plugin's data directory, which the node refuses to ignore.
    refuse_disabled_plugin_data(str(tmp_path / "data-a"), ["encryption"], ["encryption"])
    with pytest.raises(DataDirError, match="encryption is not enabled"):
        refuse_disabled_plugin_data(str(tmp_path / "data-a"), [], ["encryption"])


def test_keystore_refuses_overwrite_and_hides_bytes():
    store = KeyStore()
    store.install(1, 1, b"\x05" * 32)
    store.install(1, 1, b"\x05" * 32)
    with pytest.raises(KeyConflict):
        store.install(1, 1, b"\x06" * 32)
    with pytest.raises(KeyConflict):
        store.install(1, 2, b"\x05" * 32)
    assert "05" not in repr(store) and store.get_for(1, 2) is None


def test_start_refuses_a_member_sharing_this_nodes_node_id16(tmp_path, kek_file):
    from sealkv.node.replication.membership import MemberRecord
    from sealkv.plugins.encryption.nonce import node_id16

    plugin = make_plugin(tmp_path, kek_file, raft_id="127.0.0.1:7000")
    mine = node_id16(full_node_id("127.0.0.1:7000"))
    clash = next(f"10.0.0.1:{port}" for port in range(1, 1 << 20)
                 if node_id16(full_node_id(f"10.0.0.1:{port}")) == mine)
    friendly = MemberRecord("b", "127.0.0.1:7001", "127.0.0.1:9001", 1)
    plugin.check_membership_collisions([friendly])  # no clash: no refusal
    with pytest.raises(StartupRefused, match="shares this node's node_id16"):
        plugin.check_membership_collisions([friendly, MemberRecord("c", clash, "x:1", 1)])


def test_the_plugin_declares_its_optional_capabilities(tmp_path, kek_file):
    from sealkv.node.state.storage.base import WrappingLayer
    from sealkv.plugins.api import ProvidesPayloadCodec

    plugin = make_plugin(tmp_path, kek_file)
    assert isinstance(plugin, ProvidesPayloadCodec)
    assert isinstance(plugin.wrap(DictStore()), WrappingLayer)
    assert not isinstance(DictStore(), WrappingLayer)
