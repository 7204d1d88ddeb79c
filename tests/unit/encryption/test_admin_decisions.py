"""The encryption admin's decisions, on a real encryption layer behind a fake node.

`FakeNode` stands in for the node handle (for tests only): it applies proposed commands to the
real `EncryptionLayerPlugin` at increasing indexes, keeps a scripted membership, and the
fan-out's probe is scripted per member. The real gRPC path is covered by
tests/integration/test_encryption_admin.py.
"""
from __future__ import annotations

import threading

import grpc
import pytest

from sealkv.node.replication.membership import (
    MemberRecord, MembershipSnapshot, member_raft_id,
)
from sealkv.node.state import commands as core
from sealkv.plugins.encryption import commands as c
from sealkv.plugins.encryption import proposals
from sealkv.plugins.encryption.admin import EncryptionAdminPlugin, EncryptionAdminService
from sealkv.plugins.encryption.nonce import full_node_id
from sealkv.plugins.encryption.purpose import PURPOSE_STORAGE
from sealkv.plugins.fanout import ProbeAnswer
from sealkv.v1 import encryption_admin_pb2 as pb
from tests.unit.encryption.test_layer import kek_file, make_plugin  # noqa: F401

ME = MemberRecord("node-a", "node-a", "grpc-a", core.ROLE_VOTER)
PEER = MemberRecord("node-b", "node-b", "grpc-b", core.ROLE_VOTER)
LATE = MemberRecord("node-c", "node-c", "grpc-c", core.ROLE_VOTER)


class Aborted(Exception):
    """What `FakeContext.abort` raises; for tests only."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class FakeContext:
    """A servicer context without a client deadline; for tests only."""

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        pass

    def abort(self, code, message):
        raise Aborted(code, message)


class FakeNode:
    """The node handle the admin gets; for tests only (see the module docstring)."""

    def __init__(self, layer, snapshots):
        self.layer = layer
        self.snapshots = list(snapshots)
        self.snapshot_calls = 0
        self.membership_lock = threading.RLock()
        self.index = 10
        self.before_next_proposal = []  # commands "another leader" gets in first
        self.name, self.data_dir = "node-a", layer.context.data_dir

    def add_member_check(self, check):
        pass

    def storage_layer(self, name):
        return self.layer if name == "encryption" else None

    def confirm_leadership(self, timeout):
        return self.index

    def membership_snapshot(self):
        version, members = self.snapshots[min(self.snapshot_calls, len(self.snapshots) - 1)]
        self.snapshot_calls += 1
        return MembershipSnapshot(tuple(members), (), "node-a", 1, self.index, self.index,
                                  version)

    def propose(self, command: bytes, timeout: float):
        for other in self.before_next_proposal:
            self._apply(c.encode_command(other))
        self.before_next_proposal = []
        return self._apply(command)

    def _apply(self, command: bytes):
        """Applies `command` at the next index as the node does: the handler, then the
        persist it decided (`PersistsAfterApply`), before anything else is applied."""
        self.index += 1
        result = self.layer.command_handlers()[command[0]](self.index, command[1:])
        self.layer.persist_applied()
        return result

    def wait_applied(self, index, timeout):
        pass

    def channel(self, address):
        return address


class Probe:
    """A scripted capability probe: capable members answer with their real node id."""

    def __init__(self, incapable=()):
        self.incapable = dict(incapable)
        self.asked = []

    def __call__(self, member, channel, timeout):
        self.asked.append(member.name)
        if member.name in self.incapable:
            return ProbeAnswer(full_node_id(member_raft_id(member)), False,
                               self.incapable[member.name])
        return ProbeAnswer(full_node_id(member_raft_id(member)), True)


@pytest.fixture
def admin(tmp_path, kek_file):  # noqa: F811
    layer = make_plugin(tmp_path, kek_file, raft_id="node-a")
    node = FakeNode(layer, [(1, [ME, PEER])])
    plugin = EncryptionAdminPlugin(node)
    plugin.probe = Probe()
    yield plugin, EncryptionAdminService(plugin), node, layer
    plugin.stop()


def call(service, method, request=None):
    return getattr(service, method)(request, FakeContext())


def bootstrap(service):
    return call(service, "BootstrapEncryption", pb.BootstrapEncryptionRequest())


def enable(service):
    return call(service, "EnableStorageEnvelope", pb.EnableStorageEnvelopeRequest())


def test_a_cutover_before_bootstrap_is_a_failed_precondition(admin):
    plugin, service, _, layer = admin
    with pytest.raises(Aborted) as refused:
        enable(service)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not bootstrapped" in refused.value.message
    assert plugin.probe.asked == [] and not layer.view().state.bootstrapped


def test_an_active_envelope_answers_with_the_original_index_and_no_fan_out(admin):
    plugin, service, node, _ = admin
    bootstrap(service)
    first = enable(service)
    assert not first.was_already_active and first.cutover_index == node.index
    asked = list(plugin.probe.asked)
    node.index += 5  # later entries must not move the reported index
    again = enable(service)
    assert again.was_already_active and again.cutover_index == first.cutover_index
    assert plugin.probe.asked == asked


def test_a_failed_member_refuses_the_cutover_naming_it(admin):
    plugin, service, _, layer = admin
    bootstrap(service)
    plugin.probe = Probe(incapable={"node-b": "no KEK is loaded"})
    with pytest.raises(Aborted) as refused:
        enable(service)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-b" in refused.value.message and "no KEK is loaded" in refused.value.message
    assert not layer.view().state.storage_envelope_active


def test_a_rotation_that_races_the_cutover_is_a_failed_precondition(admin):
    _, service, node, layer = admin
    bootstrap(service)
    # Another rotation is ordered before the cutover: its key is no longer the active one.
    node.before_next_proposal = [proposals.rotation_command(layer, PURPOSE_STORAGE)]
    with pytest.raises(Aborted) as refused:
        enable(service)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "rotation raced" in refused.value.message
    assert not layer.view().state.storage_envelope_active


def test_a_membership_change_during_the_check_probes_the_new_member(admin):
    plugin, service, node, layer = admin
    bootstrap(service)
    plugin.probe = Probe(incapable={"node-c": "old build"})
    node.snapshots = [(1, [ME, PEER]), (2, [ME, PEER, LATE])]
    node.snapshot_calls = 0
    with pytest.raises(Aborted) as refused:
        enable(service)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-c" in refused.value.message and "old build" in refused.value.message
    assert plugin.probe.asked.count("node-c") == 1 and plugin.probe.asked.count("node-b") == 2
    assert not layer.view().state.storage_envelope_active
