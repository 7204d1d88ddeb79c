"""Rolling restarts of a real 3-node cluster: what a restart does to the leader and the term.

A follower that restarts must rejoin quietly: PreVote keeps it from raising the term, and the
voters' leader lease keeps the others from granting it anything while the leader is alive.
A restarted leader costs one election; when it comes back it must follow the new leader and
not unseat it.
"""
from __future__ import annotations

import signal
import time

import pytest

from sealkv.node.client import SERIALIZABLE
from tests.cluster import wait_for
from tests.load import Writer

pytestmark = pytest.mark.integration

ROUNDS = 3


def views(cluster) -> dict[str, tuple]:
    """Each live node's (leader raft address, term)."""
    out = {}
    for name, node in cluster.nodes.items():
        if node.alive():
            s = cluster.status(name)
            out[name] = (s.leader, s.term)
    return out


def leader_and_term(cluster) -> tuple[str, int, str]:
    """The agreed leader's name, its term and its raft address."""
    name = cluster.wait_leader(60)
    s = cluster.status(name)
    return name, s.term, s.leader


def views_once_caught_up(cluster, name: str, leader: str, marker: bytes) -> dict[str, tuple]:
    """Writes `marker` through `leader`, waits until the restarted `name` applied it, and
    returns every live node's (leader, term)."""
    with cluster.client(leader, timeout=10) as c:
        c.put(marker, b"x")
    with cluster.client(name, timeout=5) as c:
        wait_for(lambda: c.get(marker, consistency=SERIALIZABLE).kv.value == b"x", 60,
                 f"{name} applies a write made after its restart")
    return views(cluster)


def test_restarting_followers_keeps_the_leader_and_the_term(cluster3):
    cluster = cluster3
    leader, term, address = leader_and_term(cluster)
    with Writer(cluster.client(leader, timeout=10)) as load:
        for round_ in range(ROUNDS):
            for name in [n for n in cluster.nodes if n != leader]:
                cluster.restart(name)
                seen = views_once_caught_up(cluster, name, leader,
                                            b"restart/%d/%s" % (round_, name.encode()))
                assert set(seen.values()) == {(address, term)}, (
                    f"round {round_}, after restarting follower {name}: every node should "
                    f"still follow {leader} ({address}) at term {term}, saw {seen}\n"
                    f"{cluster.logs()}")
            load.wait_acked(len(load.acked) + 5)
    assert not load.errors, (f"writes at the leader failed while followers restarted: "
                             f"{load.errors[:5]}\n{cluster.logs()}")


def test_a_restarted_leader_comes_back_as_a_follower_of_the_new_leader(cluster3):
    cluster = cluster3
    for round_ in range(ROUNDS):
        old, term, _ = leader_and_term(cluster)
        signalled = time.monotonic()
        cluster.kill(old, signal.SIGTERM)
        stopped = time.monotonic()
        # The stopping leader handed over before it exited: a voter leads already, nobody
        # waits for an election timeout to notice the old leader is gone.
        handed_to = cluster.leader()
        assert handed_to not in (None, old), (
            f"round {round_}: {old} exited without handing the leadership over\n"
            f"{cluster.logs()}")
        new = cluster.wait_leader(60, exclude=old)
        with cluster.client(new, timeout=10) as c:
            wait_for(lambda: c.put(b"after-stop/%d" % round_, b"v"), 60, "a Put at the new leader")
        # Measured, never asserted: how long until the new leader served a write.
        print(f"round {round_}: {old} took {stopped - signalled:.2f}s to stop; {new} served "
              f"a Put {time.monotonic() - stopped:.2f}s after that")
        new_term = cluster.status(new).term
        assert new_term > term
        new_address = cluster.status(new).leader
        cluster.start_node(old)
        wait_for(lambda: cluster.healthy(old), 60, f"{old} serving again")
        seen = views_once_caught_up(cluster, old, new, b"rejoined/%d" % round_)
        assert set(seen.values()) == {(new_address, new_term)}, (
            f"round {round_}: {old}, restarted, should follow {new} at term {new_term}; "
            f"saw {seen}\n{cluster.logs()}")
