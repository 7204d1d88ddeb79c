"""A follower's proposals when its leader is not connected (the leader died or restarts).

Real pysyncobj on an un-ticked `_RaftObject` (the fixture of test_group_commit, whose
transport records what it would send): callers wait for a reachable leader before proposing,
and a proposal the follower cannot forward must be refused at once as "no leader" (nothing
was submitted), not sent into a dead connection and reported "outcome unknown" an election
timeout later.
"""
from pysyncobj import FAIL_REASON

from sealkv.node import errors
from sealkv.node.replication.adapter import _proposal_failure
from tests.unit.test_group_commit import append, entry, raft  # noqa: F401  (fixture)


def follow(obj) -> None:
    append(obj, 1, 0, [entry(2, 1)])
    assert obj._getLeader() == obj.leader


def propose(obj) -> list:
    answers: list = []
    obj.apply_command(b"put", callback=lambda result, reason: answers.append(reason))
    obj._checkCommandsToApply()
    return answers


def sent(obj, kind: str) -> list:
    return [e for e in obj.events if e != "fdatasync" and e[2] == kind]


def test_a_follower_waits_for_a_connection_to_its_leader_before_proposing(raft):
    follow(raft)
    adapter = raft._adapter
    adapter._obj = raft
    assert not adapter._leader_reachable()  # named, but unreachable: nothing would arrive
    raft._SyncObj__connectedNodes.add(raft.leader)
    assert adapter._leader_reachable()


def test_a_proposal_for_an_unconnected_leader_is_refused_at_once_as_not_submitted(raft):
    follow(raft)
    raft.events.clear()
    assert propose(raft) == [FAIL_REASON.MISSING_LEADER]
    assert sent(raft, "apply_command") == []
    error = _proposal_failure(FAIL_REASON.MISSING_LEADER)
    assert isinstance(error, errors.Unavailable)  # the client may try another endpoint


def test_a_proposal_for_a_connected_leader_is_forwarded_and_waits_for_its_answer(raft):
    follow(raft)
    raft._SyncObj__connectedNodes.add(raft.leader)
    raft.events.clear()
    assert propose(raft) == []
    assert [e[1] for e in sent(raft, "apply_command")] == [raft.leader.address]


def test_a_proposal_another_node_forwarded_here_is_answered_not_leader(raft):
    follow(raft)
    raft.events.clear()
    raft._SyncObj__onMessageReceived(raft.other, {
        'type': 'apply_command', 'command': b"put", 'request_id': 7})
    raft._checkCommandsToApply()
    assert sent(raft, "apply_command_response") == [
        ("send", raft.other.address, "apply_command_response", 0)]
