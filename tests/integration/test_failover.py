"""Crashes and restarts: no acknowledged write is lost."""
import os
import signal
import time

import pytest

from tests.cluster import wait_for
from tests.load import Writer

pytestmark = pytest.mark.integration


def assert_all_readable(cluster, acked: dict, names):
    for name in names:
        with cluster.client(name, timeout=10) as c:
            got = {kv.key: kv.value for kv in c.range(b"", range_end=b"\0").kvs}
            missing = [k for k in acked if got.get(k) != acked[k]]
            assert not missing, f"{name} lost {len(missing)} acknowledged writes, e.g. {missing[:3]}"


def test_kill_leader_under_writes_elects_a_new_leader_and_loses_nothing(cluster3):
    old = cluster3.wait_leader()
    writer = Writer(cluster3.client(timeout=3), b"w/")
    writer.start()
    wait_for(lambda: len(writer.acked) >= 50, 20, "50 acknowledged writes")
    cluster3.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    new = cluster3.wait_leader(timeout=15, exclude=old)
    elected_after = time.monotonic() - killed_at
    count_at_election = len(writer.acked)
    wait_for(lambda: len(writer.acked) > count_at_election + 20, 20,
             "writes to continue under the new leader")
    writer.stop.set()
    writer.join(10)
    assert new != old
    assert elected_after < 10, f"new leader took {elected_after:.1f}s"
    survivors = [n for n in cluster3.nodes if n != old]
    assert_all_readable(cluster3, writer.acked, survivors)
    cluster3.start_node(old)
    wait_for(lambda: cluster3.status(old).applied_index >= cluster3.status(new).commit_index,
             20, "the restarted node to catch up")
    assert_all_readable(cluster3, writer.acked, [old])


def test_full_cluster_restart_keeps_every_acknowledged_write(cluster3):
    writer = Writer(cluster3.client(timeout=3), b"r/")
    writer.start()
    wait_for(lambda: len(writer.acked) >= 100, 30, "100 acknowledged writes")
    writer.stop.set()
    writer.join(10)
    for name in list(cluster3.nodes):
        cluster3.kill(name, signal.SIGTERM)
    for name in list(cluster3.nodes):
        cluster3.start_node(name)
    cluster3.wait_leader(timeout=30)
    assert_all_readable(cluster3, writer.acked, list(cluster3.nodes))


def test_kill_9_of_every_node_keeps_every_acknowledged_write(cluster3):
    writer = Writer(cluster3.client(timeout=3), b"k/")
    writer.start()
    wait_for(lambda: len(writer.acked) >= 100, 30, "100 acknowledged writes")
    for name in list(cluster3.nodes):
        cluster3.kill(name, signal.SIGKILL)
    writer.stop.set()
    writer.join(10)
    for name in list(cluster3.nodes):
        cluster3.start_node(name)
    cluster3.wait_leader(timeout=30)
    assert_all_readable(cluster3, writer.acked, list(cluster3.nodes))


def compacting_config(tmp_path) -> str:
    """A node TOML file that makes pysyncobj snapshot every few entries."""
    path = tmp_path / "compact.toml"
    path.write_text("[raft_settings]\nlog_compaction_min_entries = 8\n")
    return str(path)


def test_restart_after_log_compaction_restores_from_the_dump(make_cluster, tmp_path):
    cluster = make_cluster(3, extra_args=["--config", compacting_config(tmp_path)])
    with cluster.client() as c:
        for i in range(60):
            c.put(b"c%02d" % i, b"v%02d" % i)
    for node in cluster.nodes.values():
        wait_for(lambda: os.path.exists(os.path.join(node.data_dir, "raft", "raft.dump")), 20,
                 f"{node.name} to write a dump")
    for name in list(cluster.nodes):
        cluster.kill(name, signal.SIGTERM)
    for name in list(cluster.nodes):
        cluster.start_node(name)
    leader = cluster.wait_leader()
    for name in cluster.nodes:
        status = cluster.status(name)
        assert sorted(m.name for m in status.members) == ["n1", "n2", "n3"]
    # With only two of three voters left, a write still commits: no node counts itself twice.
    cluster.kill(next(n for n in cluster.nodes if n != leader))
    with cluster.client(leader) as c:
        c.put(b"after", b"restart")
        got = {kv.key: kv.value for kv in c.range(b"c", prefix=True).kvs}
    assert got == {b"c%02d" % i: b"v%02d" % i for i in range(60)}
