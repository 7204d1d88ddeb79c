"""Membership changes on a live cluster: voters, learners, removal, leadership transfer."""
import signal

import pytest

from sealkv.node import errors
from sealkv.node.client import SERIALIZABLE
from sealkv.v1 import cluster_pb2
from tests.cluster import wait_for

pytestmark = pytest.mark.integration


def roles(status):
    return {m.name: m.role for m in status.members}


def test_add_voter_and_learner_then_remove_a_node(cluster3):
    with cluster3.client() as c:
        c.put(b"before", b"1")
        version0 = c.member_list().config_version

        n4 = cluster3.add_node("n4")
        added = c.member_add("n4", n4.raft, n4.grpc)
        assert added.member.name == "n4" and added.member.role == cluster_pb2.VOTER
        assert added.config_version > version0

        n5 = cluster3.add_node("n5", learner=True)
        learner = c.member_add("n5", "", n5.grpc, learner=True)
        assert learner.member.role == cluster_pb2.LEARNER
        assert learner.config_version > added.config_version

        c.put(b"after", b"2")
    for name in ("n4", "n5"):
        with cluster3.client(name) as c:
            wait_for(lambda: c.get(b"after", SERIALIZABLE).found, 20, f"{name} to catch up")
            assert c.get(b"before").kv.value == b"1"
            assert c.get(b"after").kv.value == b"2"
    status = cluster3.status("n1")
    assert roles(status) == {"n1": cluster_pb2.VOTER, "n2": cluster_pb2.VOTER,
                             "n3": cluster_pb2.VOTER, "n4": cluster_pb2.VOTER,
                             "n5": cluster_pb2.LEARNER}
    assert cluster3.status("n5").role == cluster_pb2.LEARNER
    # A learner's connectivity comes from a background health probe.
    wait_for(lambda: {m.name: m.connected for m in cluster3.status("n1").members}["n5"], 10,
             "n1 to see the learner connected")
    cluster3.kill("n5")
    wait_for(lambda: not {m.name: m.connected for m in cluster3.status("n1").members}["n5"], 10,
             "n1 to see the learner gone")

    leader = cluster3.wait_leader()
    victim = next(n for n in ("n2", "n3", "n4") if n != leader)
    with cluster3.client(leader) as c:
        removed = c.member_remove(victim)
        assert victim not in {m.name for m in removed.members}
        with pytest.raises(errors.NotFound):
            c.member_remove(victim)
    cluster3.kill(victim)
    with cluster3.client(leader) as c:
        c.put(b"after-remove", b"3")
        assert c.get(b"after-remove").found


def test_learner_never_votes(make_cluster):
    cluster = make_cluster(3)
    learner = cluster.add_node("l1", learner=True)
    with cluster.client() as c:
        c.member_add("l1", "", learner.grpc, learner=True)
        c.put(b"k", b"v")
    with cluster.client("l1") as c:
        wait_for(lambda: c.get(b"k", SERIALIZABLE).found, 20, "the learner to replicate")
    # Two of three voters gone: the learner must not help form a quorum.
    leader = cluster.wait_leader()
    followers = [n for n in ("n1", "n2", "n3") if n != leader]
    cluster.kill(followers[0])
    cluster.kill(leader)
    with cluster.client("l1", followers[1], timeout=3) as c:
        with pytest.raises((errors.Unavailable, errors.OutcomeUnknown)):
            c.put(b"no-quorum", b"x")
    for name in ("l1", followers[1]):
        s = cluster.status(name)
        assert not s.is_leader
    assert not cluster.status("l1").is_leader and cluster.status("l1").role == cluster_pb2.LEARNER


def test_member_add_validates_and_refuses_duplicates(cluster3):
    with cluster3.client() as c:
        n1 = cluster3.nodes["n1"]
        with pytest.raises(errors.AlreadyExists, match="n1"):
            c.member_add("n1", "127.0.0.1:1", "127.0.0.1:2")
        with pytest.raises(errors.AlreadyExists, match="raft address"):
            c.member_add("x", n1.raft, "127.0.0.1:2")
        with pytest.raises(errors.InvalidArgument):
            c.member_add("bad name!", "127.0.0.1:1", "127.0.0.1:2")
        with pytest.raises(errors.InvalidArgument):
            c.member_add("x", "nonsense", "127.0.0.1:2")
        with pytest.raises(errors.InvalidArgument, match="learner has no raft address"):
            c.member_add("x", "127.0.0.1:1", "127.0.0.1:2", learner=True)
        with pytest.raises(errors.NotFound):
            c.member_remove("ghost")
        assert len(c.member_list().members) == 3


def test_membership_change_on_a_follower_points_at_the_leader(cluster3):
    leader = cluster3.wait_leader()
    follower = next(n for n in cluster3.nodes if n != leader)
    with cluster3.client(follower) as c:
        with pytest.raises(errors.NotLeader) as info:
            c.member_remove("ghost", follow_leader=False)
    assert info.value.leader == cluster3.nodes[leader].grpc
    assert cluster3.nodes[leader].grpc in info.value.message


def test_transfer_leadership(cluster3):
    leader = cluster3.wait_leader()
    target = next(n for n in cluster3.nodes if n != leader)
    with cluster3.client(leader) as c:
        response = c.transfer_leadership(target)
    assert response.leader == target
    assert cluster3.wait_leader() == target


def test_removing_the_leader_hands_over_first(cluster3):
    leader = cluster3.wait_leader()
    with cluster3.client() as c:
        c.member_remove(leader)
        new = cluster3.wait_leader(exclude=leader)
        assert leader not in {m.name for m in c.member_list().members}
    cluster3.kill(leader, signal.SIGTERM)
    with cluster3.client(new) as c:
        c.put(b"k", b"v")


def test_a_member_added_just_before_a_crash_can_lead_the_restarted_node(cluster3):
    """The fault suite's seed 2: a node killed right after a member was added restarts with a
    saved commit index below the addition (the meta file is written once a second). The new
    member then leads; the restarted node must let it in, because it uses the latest
    membership of its log, committed or not."""
    leader = cluster3.wait_leader()
    victim = next(n for n in cluster3.nodes if n != leader)
    n4 = cluster3.add_node("n4")
    with cluster3.client(leader) as c:
        c.member_add("n4", n4.raft, n4.grpc)
    cluster3.kill(victim)
    with cluster3.client(leader) as c:
        wait_for(lambda: c.transfer_leadership("n4").leader == "n4", 20, "n4 to lead")
    cluster3.start_node(victim)
    assert cluster3.wait_leader() == "n4"
    with cluster3.client(victim) as c:
        c.put(b"k", b"v")
        assert c.get(b"k").kv.value == b"v"
