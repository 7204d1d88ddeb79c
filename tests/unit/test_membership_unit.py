"""Membership orchestration (add, remove, transfer) and the node handle, on a real state machine
behind a fake replication adapter."""
import threading
import types

import pytest

from sealkv.node import errors
from sealkv.node.replication.membership import (MemberRecord, Membership, member_raft_id,
                                                raft_id)
from sealkv.node.serving.handle import NodeHandle
from sealkv.node.state import commands as cmd
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore

N1 = MemberRecord("n1", "127.0.0.1:7001", "127.0.0.1:9001", cmd.ROLE_VOTER)
N2 = MemberRecord("n2", "127.0.0.1:7002", "127.0.0.1:9002", cmd.ROLE_VOTER)
N3 = MemberRecord("n3", "127.0.0.1:7003", "127.0.0.1:9003", cmd.ROLE_VOTER)
L1 = MemberRecord("l1", "", "127.0.0.1:9101", cmd.ROLE_LEARNER)


class FakeReplication:
    """A one-node Raft stand-in: proposals apply at once, voter changes are recorded, and a
    leadership transfer hands over to `successor` (for tests only)."""

    def __init__(self, sm: StateMachine, self_raft: str):
        self.sm = sm
        self.membership_lock = threading.RLock()
        self.is_leader = True
        self.leader_raft_address = self_raft
        self.voters = {self_raft}
        self.index = 0
        self.fail_add_voter = None
        self.successor = None
        self.transfers = []

    def propose(self, command, timeout):
        self.index += 1
        return self.sm.apply(self.index, command)

    def add_voter(self, raft_address, timeout):
        if self.fail_add_voter is not None:
            raise self.fail_add_voter
        self.voters.add(raft_address)

    def remove_voter(self, raft_address, timeout):
        self.voters.discard(raft_address)

    def transfer_leadership(self, raft_address, timeout):
        self.transfers.append(raft_address)
        if self.successor is not None:
            self.is_leader = False
            self.leader_raft_address = raft_address or self.successor

    def wait_until(self, condition, timeout):
        return condition()


def make(members=(N1, N2)):
    sm = StateMachine(MemoryStore(), list(members))
    replication = FakeReplication(sm, N1.raft_address)
    return Membership(replication, sm.member_directory, N1.raft_address, 5.0), replication, sm


def names(sm):
    return sorted(sm.member_directory()[0])


def test_the_one_raft_id_rule():
    assert raft_id("n1", "127.0.0.1:7001") == "127.0.0.1:7001"
    assert raft_id("l1", None) == raft_id("l1", "") == "learner:l1"
    assert member_raft_id(N1) == "127.0.0.1:7001"
    assert member_raft_id(L1) == "learner:l1"
    assert member_raft_id(MemberRecord("odd", "127.0.0.1:1", "g", cmd.ROLE_LEARNER)) == "learner:odd"


def test_add_runs_the_checks_then_records_the_member_and_the_voter():
    membership, replication, sm = make()
    seen = []
    membership.add_check(lambda member, timeout: seen.append(member.name))
    membership.add(N3, 5.0)
    assert seen == ["n3"] and names(sm) == ["n1", "n2", "n3"]
    assert N3.raft_address in replication.voters
    membership.add(L1, 5.0)
    assert names(sm) == ["l1", "n1", "n2", "n3"] and "" not in replication.voters


@pytest.mark.parametrize("member,message", [
    (MemberRecord("n2", "127.0.0.1:7999", "127.0.0.1:9999", cmd.ROLE_VOTER), "named 'n2'"),
    (MemberRecord("n9", N2.raft_address, "127.0.0.1:9999", cmd.ROLE_VOTER), "raft address"),
    (MemberRecord("n9", "127.0.0.1:7999", N2.grpc_address, cmd.ROLE_VOTER), "gRPC address"),
])
def test_add_refuses_duplicates_before_any_check(member, message):
    membership, _, sm = make()
    membership.add_check(lambda m, t: pytest.fail("a check ran for a duplicate"))
    with pytest.raises(errors.AlreadyExists, match=message):
        membership.add(member, 5.0)
    assert names(sm) == ["n1", "n2"]


def test_a_refusing_check_adds_nothing():
    membership, replication, sm = make()

    def refuse(member, timeout):
        raise errors.FailedPrecondition("not capable")

    membership.add_check(refuse)
    with pytest.raises(errors.FailedPrecondition):
        membership.add(N3, 5.0)
    assert names(sm) == ["n1", "n2"] and replication.index == 0


def test_a_refused_voter_change_rolls_the_directory_back_but_an_unknown_outcome_does_not():
    membership, replication, sm = make()
    replication.fail_add_voter = errors.FailedPrecondition("request denied")
    with pytest.raises(errors.FailedPrecondition):
        membership.add(N3, 5.0)
    assert names(sm) == ["n1", "n2"]
    replication.fail_add_voter = errors.OutcomeUnknown("late")
    with pytest.raises(errors.OutcomeUnknown):
        membership.add(N3, 5.0)
    assert names(sm) == ["n1", "n2", "n3"]  # it may still commit: the row stays


def test_only_the_leader_changes_membership_and_names_the_leader():
    membership, replication, sm = make()
    replication.is_leader = False
    replication.leader_raft_address = N2.raft_address
    with pytest.raises(errors.NotLeader) as caught:
        membership.add(N3, 5.0)
    assert caught.value.leader == N2.grpc_address
    replication.leader_raft_address = None
    with pytest.raises(errors.NotLeader, match="no leader is known"):
        membership.remove("n2", 5.0)


def test_remove_a_follower_a_learner_and_refuse_the_last_voter():
    membership, replication, sm = make((N1, N2, L1))
    membership.remove("n2", 5.0)
    assert names(sm) == ["l1", "n1"] and N2.raft_address not in replication.voters
    membership.remove("l1", 5.0)
    with pytest.raises(errors.FailedPrecondition, match="last voter"):
        membership.remove("n1", 5.0)
    with pytest.raises(errors.NotFound):
        membership.remove("ghost", 5.0)


def test_removing_the_leader_hands_over_and_sends_the_caller_to_the_new_leader():
    membership, replication, sm = make()
    replication.successor = N2.raft_address
    with pytest.raises(errors.NotLeader) as caught:
        membership.remove("n1", 5.0)
    assert caught.value.leader == N2.grpc_address and replication.transfers == [None]
    assert names(sm) == ["n1", "n2"]  # the new leader removes it when asked again


def test_transfer_leadership_names_a_voter_and_waits_to_see_it_lead():
    membership, replication, sm = make((N1, N2, L1))
    with pytest.raises(errors.NotFound):
        membership.transfer_leadership("l1", 5.0)
    with pytest.raises(errors.InvalidArgument, match="already the leader"):
        membership.transfer_leadership("n1", 5.0)
    with pytest.raises(errors.OutcomeUnknown):  # requested, never observed
        membership.transfer_leadership("n2", 5.0)
    replication.is_leader = True
    replication.leader_raft_address = N1.raft_address
    replication.successor = N2.raft_address
    membership.transfer_leadership("n2", 5.0)
    assert replication.transfers[-1] == N2.raft_address


def make_handle():
    """A NodeHandle over a node made of real parts and the fake replication."""
    membership, replication, sm = make()
    replication.barrier = lambda timeout: 41
    layer = types.SimpleNamespace(name="encryption")
    node = types.SimpleNamespace(
        config=types.SimpleNamespace(name="n1", data_dir="/d", grpc=N1.grpc_address,
                                     request_timeout=5.0, tls_files=None),
        raft_id=raft_id("n1", N1.raft_address), adapter=replication, state_machine=sm,
        membership=membership, storage_plugins=[layer],
        require_leader=membership.require_leader,
        leader_grpc_address=membership.leader_grpc_address)
    return NodeHandle(node), replication, membership, layer


def test_handle_confirms_leadership_through_a_barrier_and_rechecks_after_it():
    handle, replication, _, _ = make_handle()
    assert handle.confirm_leadership(5.0) == 41

    def lose_leadership(timeout):
        replication.is_leader = False
        replication.leader_raft_address = N2.raft_address
        return 42

    replication.barrier = lose_leadership
    with pytest.raises(errors.NotLeader) as caught:
        handle.confirm_leadership(5.0)
    assert caught.value.leader == N2.grpc_address


def test_handle_member_checks_run_in_membership_add():
    handle, _, membership, _ = make_handle()
    seen = []
    handle.add_member_check(lambda member, timeout: seen.append((member.name, timeout)))
    membership.add(N3, 3.0)
    assert seen == [("n3", 3.0)]


def test_handle_identity_layers_and_pooled_channels():
    handle, _, _, layer = make_handle()
    assert (handle.name, handle.raft_id, handle.grpc_address) == ("n1", N1.raft_address,
                                                                   N1.grpc_address)
    assert handle.storage_layer("encryption") is layer and handle.storage_layer("x") is None
    one = handle.channel("127.0.0.1:1")
    assert handle.channel("127.0.0.1:1") is one and handle.channel("127.0.0.1:2") is not one
    handle.close()
    assert handle.channel("127.0.0.1:1") is not one
    handle.close()
