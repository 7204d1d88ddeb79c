"""Raft under load and after a partition: the rules sealkv enforces around pysyncobj."""
import re
import threading

import pytest

from sealkv.node import errors
from sealkv.node.client import SERIALIZABLE
from tests.cluster import wait_for

pytestmark = pytest.mark.integration

LOAD_SECONDS = 30
CLIENTS = 64
CHANNELS = 8
# A line a node logs at CRITICAL, or the start of a Python traceback.
BAD_LINE = re.compile(r" CRITICAL |^Traceback \(most recent call last\)", re.MULTILINE)


def bad_lines(node) -> list[str]:
    return [line for line in node.log().splitlines() if BAD_LINE.search(line)]


def test_64_clients_of_puts_leave_no_critical_line_and_no_traceback(cluster3):
    leader = cluster3.wait_leader()
    channels = [cluster3.client(leader, timeout=10) for _ in range(CHANNELS)]
    stop = threading.Event()
    acked = [0] * CLIENTS
    failed = [0] * CLIENTS

    def put_loop(i: int) -> None:
        client, n = channels[i % CHANNELS], 0
        while not stop.is_set():
            try:
                client.put(b"load/%02d/%07d" % (i, n), b"v" * 100)
                acked[i] += 1
            except errors.SealkvError:
                failed[i] += 1
            n += 1

    threads = [threading.Thread(target=put_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    stop.wait(LOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join(15)
    for c in channels:
        c.close()
    assert sum(acked) > CLIENTS, f"only {sum(acked)} puts acknowledged ({sum(failed)} failed)"

    def converged():
        digests = set()
        for node in cluster3.nodes.values():
            with cluster3.client(node.name, timeout=5) as c:
                digests.add(c.digest().digest)
        return len(digests) == 1

    wait_for(converged, 30, "every replica to hold the same data")
    for node in cluster3.nodes.values():
        assert node.alive(), f"{node.name} exited:\n{node.log()[-3000:]}"
        assert bad_lines(node) == [], (f"{node.name} logged CRITICAL lines or tracebacks under "
                                       f"{CLIENTS}-client load:\n{node.log()[-4000:]}")


def test_a_partitioned_follower_returns_without_raising_the_term(tmp_path):
    """PreVote: a follower cut off for several election timeouts (and past the connection
    timeout, so its connections die) rejoins at the leader's term; the leader stays."""
    from tests.faults.harness import NetnsCluster
    from tests.faults.netns import Network

    available, why = Network.available()
    if not available:
        pytest.skip(f"partitions need network namespaces: {why}")
    import random
    network = Network(random.Random())
    cluster = NetnsCluster(str(tmp_path), 3, network)
    try:
        cluster.start(timeout=60)
        leader = cluster.wait_leader()
        with cluster.client(leader, timeout=10) as c:
            c.put(b"before", b"1")
        term = cluster.status(leader).term
        follower = sorted(n for n in cluster.nodes if n != leader)[0]
        others = set(cluster.nodes) - {follower}
        network.partition({follower}, others)
        # Longer than the connection timeout (3.5 s) and many election timeouts (<= 1.5 s).
        cut_off = threading.Event()
        cut_off.wait(6)
        with cluster.client(leader, timeout=10) as c:
            c.put(b"during", b"2")
        assert cluster.status(leader).term == term, "the majority changed term meanwhile"
        network.heal()

        def caught_up():
            with cluster.client(follower, timeout=5) as c:
                return c.get(b"during", consistency=SERIALIZABLE).found  # local read
        wait_for(caught_up, 30, f"{follower} to catch up after the partition healed")
        for name in cluster.nodes:
            s = cluster.status(name)
            assert s.term == term, (f"{name} is at term {s.term}, was {term}: the returning "
                                    f"follower raised the term\n{cluster.logs()}")
        assert cluster.wait_leader() == leader
    finally:
        cluster.stop_all()
        network.close()
