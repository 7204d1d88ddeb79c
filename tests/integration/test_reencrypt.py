"""Online re-encryption on real node processes: throttled, resumed by a new leader after the
old one is killed, losing to concurrent client writes; then retire-dek refused while a key is
in use and accepted once nothing uses it."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from sealkv.node import errors
from sealkv.v1 import encryption_admin_pb2 as pb
from tests import canary
from tests.cluster import wait_for
from tests.integration.test_canary import read_all
from tests.integration.test_encryption_admin import admin, cli, write_kek

pytestmark = pytest.mark.integration

COUNT = 3000


def job(cluster, name=None):
    names = [name] if name else [n for n, p in cluster.nodes.items() if p.alive()]
    with cluster.client(*names) as c:
        return admin(c, "GetReencryptionStatus")


def test_reencrypt_resumes_after_a_leader_change_and_loses_to_client_writes(make_cluster,
                                                                            tmp_path):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek])
    expected = {b"v/%05d" % i: v for i, v in enumerate(canary.make_canaries(COUNT))}
    canary.write_canaries(cluster.client, list(expected.items()))
    endpoints = ",".join(n.grpc for n in cluster.nodes.values())
    with cluster.client() as c:
        with pytest.raises(errors.FailedPrecondition, match="storage envelope is not active"):
            admin(c, "StartReencryption")
        admin(c, "BootstrapEncryption", timeout=15)
        admin(c, "EnableStorageEnvelope", timeout=15)
        wait_for(lambda: all(job(cluster, n).remaining == COUNT for n in cluster.nodes), 30,
                 "every node to count the cleartext values")

    started = json.loads(cli(["--endpoints", endpoints, "-w", "json", "encryption", "reencrypt",
                              "--rate", "150", "--batch-size", "25", "--no-wait"], cluster).output)
    assert started["state"] == "running" and started["total"] == COUNT

    stop = threading.Event()
    uncertain = []  # puts whose outcome is unknown (the leader was killed): they may be sealed

    def overwrite():  # clients keep writing keys the job is about to rewrite
        with cluster.client() as own:
            i = COUNT - 1
            while not stop.is_set() and i > 0:
                key = b"v/%05d" % i
                value = b"newer-" + os.urandom(6).hex().encode()
                try:
                    own.put(key, value)
                    expected[key] = value
                except errors.SealkvError:
                    uncertain.append(key)
                i -= 7

    writer = threading.Thread(target=overwrite)
    writer.start()
    try:
        wait_for(lambda: job(cluster).done >= 400, 60, "the job to make progress")
        leader = cluster.wait_leader()
        before = job(cluster, leader)
        assert before.state == "running" and 0 < before.rate and before.eta_seconds > 0, before
        cluster.kill(leader, signal.SIGKILL)
        cluster.wait_leader(60, exclude=leader)
        wait_for(lambda: job(cluster).done > before.done, 60, "a new leader to resume the job")
        cluster.start_node(leader)
    finally:
        stop.set()
        writer.join(60)
    final = wait_for(lambda: (lambda s: s if s.state == "done" and s.compaction.startswith(
        "done") else None)(job(cluster)), 120, "the job and its compaction to finish")
    # Values a client rewrote before the job reached them were sealed already: nothing to do.
    overwritten = sum(1 for v in expected.values() if v.startswith(b"newer-"))
    assert overwritten > 0 and final.remaining == 0, final
    assert COUNT - overwritten - len(uncertain) <= final.rewritten + final.skipped <= COUNT, \
        final
    with cluster.client() as c:
        for key in uncertain:  # settle what a killed leader may or may not have applied
            c.put(key, expected[key])
        wait_for(lambda: read_all(c, b"v/") == expected, 30, "every value, newest wins")

        # Rotate; the old key is still used by every value: refused with the count.
        admin(c, "RotateDEK", pb.RotateDEKRequest(purpose=pb.STORAGE), timeout=15)
        refused = cli(["--endpoints", endpoints, "encryption", "retire-dek", "1"], cluster)
        assert refused.exit_code == 1 and f"still used by {COUNT} stored values" \
            in refused.output, refused.output
        raft = cli(["--endpoints", endpoints, "encryption", "retire-dek", "2"], cluster)
        assert raft.exit_code == 1 and "active raft key" in raft.output, raft.output
        done = cli(["--endpoints", endpoints, "-w", "json", "encryption", "reencrypt",
                    "--rate", "100000", "--batch-size", "1000"], cluster)
        assert done.exit_code == 0 and json.loads(done.output)["remaining"] == 0, done.output
        retired = cli(["--endpoints", endpoints, "-w", "json", "encryption", "retire-dek", "1"],
                      cluster)
        assert retired.exit_code == 0, retired.output
        assert json.loads(retired.output)["purpose"] == "storage"
        assert read_all(c, b"v/") == expected
        status = cli(["--endpoints", endpoints, "-w", "json", "encryption", "status"], cluster)
        rows = json.loads(status.output)
        assert all([k["key_id"] for k in row["keys"]] == [2, 3] for row in rows), rows
        assert rows[0]["reencryption"]["state"] == "done"
