"""Linearizable reads confirmed by ReadIndex (a quorum round of messages, no log entry), on
real node processes: they leave the Raft log alone, see every acknowledged write, never come
stale from a deposed leader, and go on through a leader kill."""
import signal
import threading

import pytest

from sealkv.node import errors
from sealkv.node.client import SERIALIZABLE, Client
from tests.cluster import wait_for

pytestmark = pytest.mark.integration

READS = 200


def unary_client(cluster, name: str, timeout: float) -> Client:
    """A client of one node that sends one unary RPC per call (no batch stream)."""
    return Client([cluster.nodes[name].grpc], timeout=timeout, batching=False,
                  **cluster.client_kwargs)


def commit_indexes(cluster) -> dict:
    return {name: cluster.status(name).commit_index for name in cluster.nodes}


@pytest.mark.parametrize("batching", [True, False], ids=["batch-stream", "unary"])
def test_linearizable_gets_on_leader_and_followers_leave_the_log_alone(cluster3, batching):
    leader = cluster3.wait_leader()
    with cluster3.client(leader, timeout=10) as c:
        c.put(b"k", b"v1")
    # Every node has applied the write (its commit index is the leader's) before counting.
    wait_for(lambda: len(set(commit_indexes(cluster3).values())) == 1, 30,
             "every node to reach the same commit index")
    before = commit_indexes(cluster3)
    counted = {name: cluster3.status(name).kv_counters for name in cluster3.nodes}
    for name in cluster3.nodes:
        with (cluster3.client(name, timeout=10) if batching
              else unary_client(cluster3, name, 10)) as c:
            for _ in range(READS):
                assert c.get(b"k").kv.value == b"v1"
    after = commit_indexes(cluster3)
    assert after == before, (f"{3 * READS} linearizable Gets moved the commit index from "
                             f"{before} to {after}: reads wrote the Raft log\n{cluster3.logs()}")
    for name in cluster3.nodes:
        now, then = cluster3.status(name).kv_counters, counted[name]
        assert now.read_index_reads - then.read_index_reads >= READS, name
        assert now.read_index_fallbacks == then.read_index_fallbacks, name
    rounds = cluster3.status(leader).kv_counters.read_index_rounds - \
        counted[leader].read_index_rounds
    assert rounds >= READS, f"the leader confirmed {rounds} rounds for {3 * READS} reads"


def test_a_learner_asks_the_leader_and_writes_nothing_either(cluster3):
    learner = cluster3.add_node("l1", learner=True)
    with cluster3.client() as c:
        c.member_add("l1", "", learner.grpc, learner=True)
    leader = cluster3.wait_leader()
    with cluster3.client(leader, timeout=10) as writer, \
            cluster3.client("l1", timeout=10) as reader:
        writer.put(b"k", b"v0")
        wait_for(lambda: reader.get(b"k", consistency=SERIALIZABLE).found, 30,
                 "the learner to replicate")
        for i in range(20):  # each read sees the write acknowledged just before it
            writer.put(b"k", b"v%d" % i)
            assert reader.get(b"k").kv.value == b"v%d" % i
        wait_for(lambda: len(set(commit_indexes(cluster3).values())) == 1, 30,
                 "every node to reach the same commit index")
        before = commit_indexes(cluster3)
        for _ in range(READS):
            assert reader.get(b"k").kv.value == b"v19"
    after = commit_indexes(cluster3)
    assert after == before, (f"{READS} linearizable Gets on a learner moved the commit index "
                             f"from {before} to {after}\n{cluster3.logs()}")


def test_a_follower_read_sees_the_write_acknowledged_just_before_on_the_leader(cluster3):
    leader = cluster3.wait_leader()
    followers = sorted(n for n in cluster3.nodes if n != leader)
    with cluster3.client(leader, timeout=10) as writer, \
            cluster3.client(followers[0], timeout=10) as r1, \
            unary_client(cluster3, followers[1], 10) as r2:
        for i in range(50):
            value = b"v%d" % i
            writer.put(b"seq", value)
            for reader in (r1, r2):
                got = reader.get(b"seq").kv.value
                assert got == value, (f"a follower read {got!r} after {value!r} was "
                                      "acknowledged on the leader")


def test_a_paused_old_leader_never_serves_a_stale_linearizable_read(cluster3):
    old = cluster3.wait_leader()
    with cluster3.client(old, timeout=10) as c:
        c.put(b"x", b"old")
    # One connection to the old leader only, opened before the pause.
    stale_reader = unary_client(cluster3, old, 15)
    try:
        assert stale_reader.get(b"x", consistency=SERIALIZABLE).kv.value == b"old"
        cluster3.kill(old, signal.SIGSTOP)
        try:
            new = wait_for(lambda: _leader_of(cluster3, set(cluster3.nodes) - {old}), 30,
                           "the two others to elect a leader")
            with cluster3.client(new, timeout=10) as c:
                c.put(b"x", b"new")
            # The read reaches the old leader while it still believes it leads.
            box: list = []
            reader = threading.Thread(target=lambda: box.append(_get_or_error(stale_reader)))
            reader.start()
        finally:
            cluster3.kill(old, signal.SIGCONT)
        reader.join(30)
        assert box, "the read on the resumed old leader never returned"
        assert box[0] in (b"new",) or isinstance(box[0], errors.SealkvError), (
            f"the resumed old leader served {box[0]!r} after b'new' was acknowledged")
        # Once it follows the new leader, its linearizable reads are current.
        wait_for(lambda: stale_reader.get(b"x").kv.value == b"new", 30,
                 "the old leader to serve the new value")
    finally:
        stale_reader.close()


def _leader_of(cluster, names: set):
    """The leader every node of `names` names, when it is one of them (else None)."""
    views = {cluster.status(name).leader for name in names}
    return views.pop() if len(views) == 1 and views <= names else None


def _get_or_error(client):
    try:
        got = client.get(b"x")
        return got.kv.value if got.found else None
    except errors.SealkvError as exc:
        return exc


def test_linearizable_reads_go_on_through_a_leader_kill(cluster3):
    leader = cluster3.wait_leader()
    followers = sorted(n for n in cluster3.nodes if n != leader)
    with cluster3.client(leader, timeout=10) as c:
        c.put(b"k", b"before")
    stop = threading.Event()
    results: dict = {name: [] for name in followers}

    def read_loop(name: str) -> None:
        with cluster3.client(name, timeout=15) as reader:
            while not stop.is_set():
                try:
                    got = reader.get(b"k")
                    results[name].append(got.kv.value if got.found else None)
                except errors.SealkvError as exc:
                    results[name].append(exc)

    threads = [threading.Thread(target=read_loop, args=(n,), daemon=True) for n in followers]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(r) >= 5 for r in results.values()), 30,
             "reads on both followers before the kill")
    cluster3.kill(leader)
    new = cluster3.wait_leader(exclude=leader)
    with cluster3.client(new, timeout=10) as c:
        c.put(b"k", b"after")
    counts = {n: len(r) for n, r in results.items()}
    wait_for(lambda: all(r[-1] == b"after" and len(r) > counts[n] + 5
                         for n, r in results.items()), 30,
             "reads on both survivors to go on and see the write made after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    for name, seen in results.items():
        failures = [r for r in seen if isinstance(r, errors.SealkvError)]
        assert not failures, (f"{name}: {len(failures)} of {len(seen)} linearizable reads "
                              f"failed across the leader kill, first: {failures[0]}")
        assert set(seen) <= {b"before", b"after"}
        assert seen.index(b"after") > max(i for i, v in enumerate(seen) if v == b"before")


def test_a_cut_off_leader_that_still_believes_it_leads_serves_no_stale_read(tmp_path):
    """The leader is partitioned from both followers and told to keep believing it leads for
    30 s (CheckQuorum's `leader_fallback_timeout`): only the confirmation round stands
    between its linearizable reads and the value it holds, older than the new leader's."""
    from tests.faults.harness import NetnsCluster
    from tests.faults.netns import Network

    available, why = Network.available()
    if not available:
        pytest.skip(f"partitions need network namespaces: {why}")
    import random
    config = tmp_path / "slow-fallback.toml"
    config.write_text("[raft_settings]\nleader_fallback_timeout = 30.0\n")
    network = Network(random.Random())
    cluster = NetnsCluster(str(tmp_path), 3, network, extra_args=["--config", str(config)])
    try:
        cluster.start(timeout=60)
        old = cluster.wait_leader()
        with cluster.client(old, timeout=10) as c:
            c.put(b"x", b"old")
        others = set(cluster.nodes) - {old}
        network.partition({old}, others)
        new = wait_for(lambda: _leader_of(cluster, others), 30,
                       "the two others to elect a leader")
        with cluster.client(new, timeout=10) as c:
            c.put(b"x", b"new")
        assert cluster.status(old).is_leader, "the cut-off leader already stepped down"
        with unary_client(cluster, old, 5) as stale, cluster.client(old, timeout=5) as batched:
            for reader in (stale, batched):
                got = _get_or_error(reader)
                assert isinstance(got, errors.SealkvError), (
                    f"the cut-off leader served {got!r} after b'new' was acknowledged")
    finally:
        cluster.stop_all()
        network.close()
