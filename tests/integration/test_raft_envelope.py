"""The raft-log envelope on real node processes: the cutover behind the capability gate, no
cleartext above it in any journal, writes through followers (forwarded envelopes), restarts,
a rotated raft key, and a member added after the cutover."""
from __future__ import annotations

import json
import os
import threading

import pytest

from sealkv.node import errors
from sealkv.node.replication.journal import JOURNAL_FILE
from tests.cluster import wait_for
from tests.integration.test_encryption_admin import admin, capability, cli, write_kek

pytestmark = pytest.mark.integration


def files_containing(cluster, token: bytes) -> list[str]:
    """Every file under every node's data directory whose bytes contain `token`."""
    found = []
    for node in cluster.nodes.values():
        for root, _, files in os.walk(node.data_dir):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    if token in f.read():
                        found.append(path)
    return found


def test_raft_envelope_cutover_seals_every_later_entry(make_cluster, tmp_path):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek])
    leader = cluster.wait_leader()
    followers = [n for n in cluster.nodes if n != leader]
    before = b"raft-before-" + os.urandom(8).hex().encode()
    with cluster.client() as c:
        with pytest.raises(errors.FailedPrecondition, match="not bootstrapped"):
            admin(c, "EnableRaftEnvelope")
        c.put(b"before", before)
        admin(c, "BootstrapEncryption", timeout=15)
        # Values at rest are the storage envelope's business (the database would hold them in
        # the clear otherwise); this test is about the log.
        admin(c, "EnableStorageEnvelope", timeout=15)

        # Writers keep going during the cutover; none of their values may reach a journal in
        # cleartext once they are acknowledged after it, and none is lost.
        stop = threading.Event()
        acked: list[tuple[bytes, bytes]] = []

        def writer(name):
            with cluster.client(name) as own:
                i = 0
                while not stop.is_set():
                    key, value = f"w-{name}-{i}".encode(), os.urandom(12).hex().encode()
                    try:
                        own.put(key, value)
                        acked.append((key, value))
                    except errors.SealkvError:
                        pass  # retryable refusals during the cutover
                    i += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in cluster.nodes]
        for t in threads:
            t.start()
        try:
            result = cli(["--endpoints", cluster.nodes[followers[0]].grpc, "-w", "json",
                          "encryption", "enable-raft-envelope"], cluster)
            assert result.exit_code == 0, result.output
            answer = json.loads(result.output)
            assert not answer["was_already_active"] and answer["raft_key_id"] == 2
            cutover = answer["cutover_index"]
            assert {row["member"] for row in answer["capability_summary"]} == set(cluster.nodes)
            count_at_cutover = len(acked)
            wait_for(lambda: len(acked) > count_at_cutover + 30, 30, "writes after the cutover")
        finally:
            stop.set()
            for t in threads:
                t.join(30)

        # Idempotent: a retry reports the original index.
        again = json.loads(cli(["--endpoints", cluster.nodes[leader].grpc, "-w", "json",
                                "encryption", "enable-raft-envelope"], cluster).output)
        assert again["was_already_active"] and again["cutover_index"] == cutover
        for name in cluster.nodes:
            cap = capability(cluster, name)
            assert cap.raft_wrap_installed and cap.raft_envelope_cutover_index == cutover

        after = b"raft-after-" + os.urandom(8).hex().encode()
        for name in cluster.nodes:  # through the leader and forwarded by followers
            with cluster.client(name) as own:
                own.put(f"after-{name}".encode(), after + name.encode())
        for key, value in acked:
            assert c.get(key).kv.value == value

    # The pre-cutover value is in the journals (the scan works); nothing after it is.
    assert any(path.endswith(JOURNAL_FILE) for path in files_containing(cluster, before))
    assert files_containing(cluster, after) == []

    # Restart every node: the journals replay through the envelope.
    cluster.crash_restart_all(60)
    with cluster.client() as c:
        wait_for(lambda: c.put(b"post-restart", b"v"), 30, "writes after the restart")
        for name in cluster.nodes:
            assert c.get(f"after-{name}".encode()).kv.value == after + name.encode()
        # A rotated raft key: later entries are sealed under it; older ones still open.
        rotated = admin(c, "RotateDEK", admin_request_raft(), timeout=15)
        c.put(b"rotated", after + b"-rotated")
        # A member added after the cutover catches up through sealed entries.
        cluster.add_node("n4")
        wait_for(lambda: cluster.healthy("n4"), 60, "n4 serving")
        c.member_add("n4", cluster.nodes["n4"].raft, cluster.nodes["n4"].grpc)
    with cluster.client("n4") as c4:
        wait_for(lambda: c4.get(b"rotated").kv.value == after + b"-rotated", 60,
                 "n4 to catch up")
    assert rotated.key_id == 3
    assert files_containing(cluster, after) == []


def admin_request_raft():
    from sealkv.v1 import encryption_admin_pb2 as pb

    return pb.RotateDEKRequest(purpose=pb.RAFT)
