"""The canary proof: no value is left in the clear in any file once both envelopes are on,
`reencrypt` has run and every member compacted; while every value still reads back, also
after a full cluster restart and on a member added afterwards.

10,000 canaries are written in four phases: before the storage cutover, between the two
cutovers, after both, and under a storage key that is then rotated. Before `reencrypt` the
scan must find the first two phases in the clear (so the scan works) and never the last two.
"""
from __future__ import annotations

import json

import pytest

from sealkv.node.client import SERIALIZABLE
from tests import canary
from tests.cluster import wait_for
from tests.integration.test_encryption_admin import admin, cli, write_kek
from sealkv.v1 import encryption_admin_pb2 as pb

pytestmark = pytest.mark.integration

PER_PHASE = 2500


def read_all(client, prefix: bytes, **kw) -> dict[bytes, bytes]:
    """Every pair under `prefix`, paging past the per-response limit."""
    out: dict[bytes, bytes] = {}
    start, end = prefix, prefix[:-1] + bytes((prefix[-1] + 1,))
    while True:
        r = client.range(start, end, **kw)
        out.update((kv.key, kv.value) for kv in r.kvs)
        if not r.more:
            return out
        start = r.kvs[-1].key + b"\0"


def test_no_canary_survives_reencrypt_and_compaction(make_cluster, tmp_path):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek])
    values = canary.make_canaries(4 * PER_PHASE)
    phases = [values[i * PER_PHASE:(i + 1) * PER_PHASE] for i in range(4)]
    expected = {}

    def write(phase: int):
        items = [(b"canary/%d/%05d" % (phase, i), v) for i, v in enumerate(phases[phase])]
        canary.write_canaries(cluster.client, items)
        expected.update(items)

    endpoints = ",".join(n.grpc for n in cluster.nodes.values())
    write(0)                                                     # cleartext everywhere
    with cluster.client() as c:
        admin(c, "BootstrapEncryption", timeout=15)
        admin(c, "EnableStorageEnvelope", timeout=15)
        write(1)                                                 # sealed at rest, clear in log
        admin(c, "EnableRaftEnvelope", timeout=15)
        write(2)                                                 # sealed everywhere
        write(3)
        admin(c, "RotateDEK", pb.RotateDEKRequest(purpose=pb.STORAGE), timeout=15)

    data_dirs = [n.data_dir for n in cluster.nodes.values()]
    found = canary.scan(data_dirs)
    assert set(phases[0]) | set(phases[1]) <= set(found), "the scan must see cleartext values"
    assert not set(found) & (set(phases[2]) | set(phases[3])), "sealed values found in clear"

    result = cli(["--endpoints", endpoints, "-w", "json", "encryption", "reencrypt",
                  "--rate", "100000", "--batch-size", "1000"], cluster)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["state"] == "done" and job["remaining"] == 0, job
    assert job["rewritten"] == len(values) and job["compaction"].startswith("done"), job

    leftovers = canary.scan(data_dirs)
    assert not leftovers, {v: sorted(p) for v, p in list(leftovers.items())[:5]}
    with cluster.client() as c:
        assert read_all(c, b"canary/") == expected

    # A full cluster restart replays the compacted files.
    cluster.crash_restart_all(60)
    with cluster.client() as c:
        wait_for(lambda: c.put(b"after-restart", b"x"), 30, "writes after the restart")
        assert read_all(c, b"canary/") == expected
        # A member added after the compaction gets everything through a snapshot.
        cluster.add_node("n4")
        wait_for(lambda: cluster.healthy("n4"), 60, "n4 serving")
        c.member_add("n4", cluster.nodes["n4"].raft, cluster.nodes["n4"].grpc)
    with cluster.client("n4") as c4:
        wait_for(lambda: c4.get(b"after-restart", consistency=SERIALIZABLE).kv.value == b"x", 60,
                 "n4 to catch up")
        assert read_all(c4, b"canary/", consistency=SERIALIZABLE) == expected
    leftovers = canary.scan([n.data_dir for n in cluster.nodes.values()])
    assert not leftovers, {v: sorted(p) for v, p in list(leftovers.items())[:5]}
