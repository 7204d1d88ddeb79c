"""Power loss of the whole cluster, simulated: files cut back to what their fsyncs covered.

The nodes run with the fsync record hook (`SEALKV_TEST_FSYNC_RECORD`, see
`sealkv.node.durable`): every fsync appends the file and the size it made durable. A run
writes under load, kills every node with SIGKILL at a seeded moment, then cuts each file
in the data directories back to its last synced size (a file never synced is deleted, as
its name may not have reached the disk either), restarts the cluster and reads back every
acknowledged write. With `--fsync always` nothing acknowledged may be lost; with
`--fsync never` nothing is synced, so the same procedure must show a loss.
"""
import json
import os
import random
import signal

import pytest

from sealkv.node import durable
from tests.cluster import wait_for
from tests.load import Writer

pytestmark = pytest.mark.integration

RUNS_ALWAYS = 20
RUNS_NEVER = 2


def kill_all(cluster) -> None:
    """SIGKILL every node at (nearly) the same moment, as a power cut would."""
    nodes = [n for n in cluster.nodes.values() if n.alive()]
    for node in nodes:
        os.kill(node.pid, signal.SIGKILL)
    for node in nodes:
        node.proc.wait(timeout=15)


def cut_to_synced(cluster, record: str) -> dict:
    """Cuts every file of every node back to its last synced size; returns what was cut."""
    synced: dict[str, int] = {}
    if os.path.exists(record):
        with open(record) as f:
            for line in f:
                item = json.loads(line)
                synced[item["path"]] = item["size"]
    cut = {}
    for node in cluster.nodes.values():
        for root, _, files in os.walk(node.data_dir):
            for name in files:
                path = os.path.abspath(os.path.join(root, name))
                if name == "LOCK":
                    continue
                size = os.path.getsize(path)
                if path not in synced:
                    os.unlink(path)
                    cut[path] = size
                elif size > synced[path]:
                    os.truncate(path, synced[path])
                    cut[path] = size - synced[path]
    # What is left is, by construction, what the disk holds now.
    with open(record, "w") as f:
        for node in cluster.nodes.values():
            for root, _, files in os.walk(node.data_dir):
                for name in files:
                    path = os.path.abspath(os.path.join(root, name))
                    f.write(json.dumps({"path": path, "size": os.path.getsize(path)}) + "\n")
    return cut


def lost_after_power_loss(cluster, record: str, seed: int) -> list[bytes]:
    """One run: load, power cut at a seeded moment, restart; returns the acknowledged keys
    that did not come back."""
    rng = random.Random(seed)
    writers = [Writer(cluster.client(timeout=3), b"s%02d/%d/" % (seed, w)) for w in range(3)]
    for writer in writers:
        writer.start()
    target = rng.randint(5, 40)
    wait_for(lambda: sum(len(w.acked) for w in writers) >= target, 30,
             f"{target} acknowledged writes")
    kill_all(cluster)
    for writer in writers:
        writer.stop.set()
        writer.join(15)
    acked = {k: v for w in writers for k, v in w.acked.items()}
    cut_to_synced(cluster, record)
    for name in cluster.nodes:
        cluster.start_node(name)
    cluster.wait_leader(timeout=45)
    with cluster.client(timeout=10) as c:
        got = {kv.key: kv.value for kv in c.range(b"s%02d/" % seed, prefix=True).kvs}
    return sorted(k for k, v in acked.items() if got.get(k) != v)


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    record = str(tmp_path / "fsync-record.jsonl")
    monkeypatch.setenv(durable.RECORD_ENV, record)
    return record


def test_fsync_always_loses_no_acknowledged_write_over_seeded_power_cuts(make_cluster,
                                                                        recorded):
    cluster = make_cluster(3)
    for seed in range(RUNS_ALWAYS):
        lost = lost_after_power_loss(cluster, recorded, seed)
        assert not lost, (f"seed {seed}: {len(lost)} acknowledged writes lost, e.g. "
                          f"{lost[:3]}\n{cluster.logs()}")


def test_fsync_never_can_lose_acknowledged_writes_in_a_power_cut(make_cluster, recorded):
    cluster = make_cluster(3, extra_args=["--fsync", "never"])
    losses = [lost_after_power_loss(cluster, recorded, seed) for seed in range(RUNS_NEVER)]
    assert any(losses), "with --fsync never a power cut of every node lost nothing"
