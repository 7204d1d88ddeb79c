"""The LMDB database under the state machine, with real node processes: a restart opens the
database and replays only the log after its applied index."""
import re
import signal

import pytest

from sealkv.v1 import kv_pb2
from tests.cluster import wait_for
from tests.integration.test_failover import compacting_config

pytestmark = pytest.mark.integration

REPLAY_LINE = re.compile(r"replayed (\d+) log entries after the database's applied index (\d+)")


def last_replay(node) -> tuple[int, int]:
    """(entries replayed, database index at start) from the node's last start-up line."""
    found = REPLAY_LINE.findall(node.log())
    assert found, "no start-up replay line in the node's log"
    replayed, index = found[-1]
    return int(replayed), int(index)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_replays_only_the_log_after_the_database(make_cluster, tmp_path, sig):
    cluster = make_cluster(3, extra_args=["--config", compacting_config(tmp_path)])
    with cluster.client() as c:
        for i in range(150):
            c.put(b"r%03d" % i, b"v%03d" % i)
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    wait_for(lambda: cluster.status(follower).applied_index >=
             cluster.status(leader).commit_index, 20, "the follower to apply everything")
    cluster.kill(follower, sig)
    with cluster.client(leader) as c:
        c.put(b"while-down", b"x")
    cluster.start_node(follower)
    node = cluster.nodes[follower]
    wait_for(lambda: len(REPLAY_LINE.findall(node.log())) >= 2, 30,
             "the restarted node to replay")
    replayed, db_index = last_replay(node)
    assert db_index >= 150, "the database did not hold the applied state"
    assert replayed < 20, f"replayed {replayed} entries: the database should cover all but a few"
    wait_for(lambda: cluster.status(follower).applied_index >=
             cluster.status(leader).commit_index, 20, "the restarted node to catch up")
    status = cluster.status(follower)
    assert status.db_applied_index_at_start == db_index
    assert status.replayed_at_start == replayed
    with cluster.client(follower) as c:
        got = {kv.key: kv.value for kv in c.range(b"", range_end=b"\0",
                                                  consistency=kv_pb2.SERIALIZABLE).kvs}
    assert got[b"while-down"] == b"x"
    assert all(got[b"r%03d" % i] == b"v%03d" % i for i in range(150))
