"""A full disk under the Raft journal: the node lives, warns once, loses nothing acknowledged.

A one-node cluster whose data directory is a small tmpfs takes 64 KiB Puts until the disk is
full. The NOSPACE alarm refuses writes: raised by the write admission when free space falls
below the disk reserve, or by the journal when a write finds the disk full (then the node
logs one WARNING for the journal, no traceback, not one per tick, and stops acknowledging:
it steps down rather than count an entry it does not hold). The node must stay up, and once
the tmpfs grows and the alarm is disarmed (an operator's step, as in etcd), take writes again
and keep every acknowledged write, also across a restart. Needs root and tmpfs (skips naming
what is missing).
"""
import os
import signal
import subprocess

import pytest

from sealkv.node import errors
from tests.cluster import wait_for
from tests.small_disk import small_tmpfs

pytestmark = pytest.mark.integration

VALUE = 64 * 1024


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "6m") as mount:
        yield mount


def test_a_full_journal_disk_holds_back_and_resumes_without_losing_a_write(make_cluster,
                                                                          small_disk):
    cluster = make_cluster(1, start=False)
    node = cluster.nodes["n1"]
    data = small_disk / "n1"
    data.mkdir(mode=0o700)
    os.symlink(data, node.data_dir)
    cluster.start()
    acked = {}
    with cluster.client(timeout=3) as c:
        for i in range(400):
            key, value = b"k%04d" % i, os.urandom(VALUE)
            try:
                c.put(key, value)
            except errors.SealkvError:
                break
            acked[key] = value
    assert 0 < len(acked) < 400, "the 6 MiB disk never filled"
    assert node.alive()

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)

    def put_after():
        with cluster.client(timeout=2) as c:
            c.alarm_disarm()
            c.put(b"after", b"space")
        return True

    wait_for(put_after, 30, "a write once the disk has space")

    def read_all():
        with cluster.client(timeout=10) as c:
            return {kv.key: kv.value for kv in c.range(b"k", prefix=True).kvs}

    assert [k for k, v in acked.items() if read_all().get(k) != v] == []
    cluster.kill("n1", signal.SIGKILL)
    cluster.start_node("n1")
    cluster.wait_leader()
    got = read_all()
    assert [k for k, v in acked.items() if got.get(k) != v] == []

    text = node.log()
    assert "Traceback" not in text
    journal_warnings = [line for line in text.splitlines()
                        if " WARNING " in line and "disk full writing" in line
                        and "raft.wal" in line]
    assert len(journal_warnings) <= 1, text[-3000:]
    assert all("NOSPACE alarm raised" in line for line in journal_warnings)
    assert "NOSPACE alarm: the disk of n1 is full" in text
