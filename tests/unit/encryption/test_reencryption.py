"""Re-encryption: the command codec, the deterministic apply rules and the snapshot of the job."""
from __future__ import annotations

import pytest

from sealkv.node.errors import ApplyHalt
from sealkv.node.state.storage.base import VALUE_ENCRYPTED, Entry
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption import proposals
from sealkv.plugins.encryption import reencryption as r
from sealkv.plugins.encryption.commands import CommandDecodeError
from sealkv.plugins.encryption.state import EncryptionState
from tests.unit.encryption.test_layer import DictStore, apply, kek_file, make_plugin  # noqa: F401


def test_commands_round_trip_and_reject_garbage():
    for command in (r.ReencryptStart(500, 64, True, 10),
                    r.ReencryptBatch(7, 3, b"a", b"c", ((b"a", 1), (b"b", 2))),
                    r.ReencryptFinish(7, b"c", True, 12), r.ReencryptCompacted(7, True)):
        data = r.encode_command(command)
        assert data[0] == r.OP_REENCRYPT and r.decode_body(data[1:]) == command
        for cut in range(1, len(data) - 1):
            with pytest.raises(CommandDecodeError):
                r.decode_body(data[1:cut])
        with pytest.raises(CommandDecodeError):
            r.decode_body(data[1:] + b"\0")
    with pytest.raises(CommandDecodeError):
        r.decode_body(bytes((1, 9)))


@pytest.fixture
def sealed(tmp_path, kek_file):  # noqa: F811
    plugin = make_plugin(tmp_path, kek_file)
    store = DictStore()
    layer = plugin.wrap(store)
    store.put(b"old", Entry(b"clear-before-cutover", 2, 2, 1))
    apply(plugin, 3, proposals.bootstrap_command(plugin, ["node-a"]))
    apply(plugin, 4, proposals.cutover_command(plugin.view(), 1))
    layer.put(b"k1", Entry(b"under-key-1", 5, 5, 1))
    layer.put(b"k2", Entry(b"under-key-1-too", 6, 6, 1))
    apply(plugin, 7, proposals.rotation_command(plugin, 1))
    return plugin, store, layer


def handle(plugin, index, command):
    data = r.encode_command(command)
    return plugin.command_handlers()[r.OP_REENCRYPT](index, data[1:])


def test_a_job_rewrites_every_stale_value_and_loses_to_newer_writes(sealed):
    plugin, store, layer = sealed
    active = plugin.state.active_storage_id
    assert active == 3 and r.needs_rewrite(store.get(b"old"), active)
    handle(plugin, 8, r.ReencryptStart(100, 2, False, 3))
    job = plugin.state.job
    assert job.state == r.RUNNING and job.job_id == 8 and job.cursor == b""
    # A client rewrote k2 after the leader looked (revision 6): the job must skip it.
    layer.put(b"k2", Entry(b"client-wins", 6, 9, 2))
    handle(plugin, 10, r.ReencryptBatch(8, 2, b"", b"k2", ((b"k1", 5), (b"k2", 6))))
    # A stale repeat (same cursor_from) has no effect.
    handle(plugin, 11, r.ReencryptBatch(8, 2, b"", b"k2", ((b"k1", 5), (b"k2", 6))))
    handle(plugin, 12, r.ReencryptBatch(8, 1, b"k2", b"old", ((b"old", 2),)))
    job = plugin.state.job
    assert (job.done, job.rewritten, job.skipped, job.cursor) == (3, 2, 1, b"old")
    for key in (b"k1", b"k2", b"old"):
        assert store.get(key).state == VALUE_ENCRYPTED and r.envelope_key_id(store.get(key)) == 3
    assert layer.get(b"k1").value == b"under-key-1" and layer.get(b"k2").value == b"client-wins"
    assert layer.get(b"old").value == b"clear-before-cutover"
    assert store.get(b"k1").mod_revision == 5  # a rewrite keeps the revisions
    handle(plugin, 13, r.ReencryptFinish(8, b"old", False, 3))
    assert plugin.state.job.state == r.DONE and plugin.state.job.finished_index == 13
    assert not plugin.state.job.needs_compaction  # started without compaction
    handle(plugin, 14, r.ReencryptStart(100, 2, True, 3))
    handle(plugin, 15, r.ReencryptFinish(14, b"", False, 3))
    assert plugin.state.job.needs_compaction
    handle(plugin, 16, r.ReencryptCompacted(99, True))  # another job: no effect
    assert plugin.state.job.needs_compaction
    handle(plugin, 17, r.ReencryptCompacted(14, True))
    assert plugin.state.job.compaction == r.COMPACTION_DONE
    # The job is in the snapshot (survives restarts and reaches late joiners).
    copy = EncryptionState.from_bytes(plugin.state.to_bytes())
    assert copy.job == plugin.state.job


def test_retire_removes_an_unused_key_for_good(sealed):
    plugin, store, layer = sealed
    with pytest.raises(Exception, match="active"):
        proposals.retire_command(plugin.view(), 3)
    command = proposals.retire_command(plugin.view(), 1)
    assert command.sub_tag == c.SUB_RETIRE
    apply(plugin, 8, command)
    assert 1 not in plugin.state.keys and 1 in plugin.state.retired
    assert plugin.keystore.get(1) is None
    assert EncryptionState.from_bytes(plugin.state.to_bytes()).retired == {1}
    assert proposals.rotation_command(plugin, 1).dek_id == 4  # ids are never reused
    with pytest.raises(ApplyHalt):  # a retirement of the active key halts at apply
        apply(plugin, 9, c.RotationCommand(c.SUB_RETIRE, 3, 1, b"", command.proposer.__class__(
            3, command.proposer.full_node_id, 1)))
