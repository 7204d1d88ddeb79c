"""Crash safety of the encryption sidecar written after apply: a node killed (SIGKILL) after
applying a new data key and before its sidecar write reuses no nonce once restarted.

The node is killed at that exact point by the plugin's test hook
(`SEALKV_TEST_DIE_BEFORE_SIDECAR_KEY`, off by default); writers keep going through every node
meanwhile. Afterwards every envelope at rest on every node and every sealed raft payload in
every journal is read back: no (key id, nonce) may seal two different ciphertexts."""
from __future__ import annotations

import os
import signal
from collections import defaultdict

import pytest

from sealkv.node.replication.adapter import _payload_of
from sealkv.node.replication.journal import FileJournal
from sealkv.node.state.storage.base import VALUE_ENCRYPTED
from sealkv.node.state.storage.lmdb_store import LmdbStore
from sealkv.plugins.encryption import envelope
from sealkv.plugins.encryption.layer import DIE_BEFORE_SIDECAR_ENV
from sealkv.plugins.encryption.nonce import full_node_id, node_id16
from sealkv.plugins.encryption.sidecar import read_sidecar
from sealkv.v1 import encryption_admin_pb2 as pb
from tests.cluster import wait_for
from tests.integration.test_encryption_admin import admin, write_kek
from tests.load import Writer

pytestmark = pytest.mark.integration


def sealed_at_rest(data_dir: str) -> list[bytes]:
    """The envelopes stored in a stopped node's database."""
    store = LmdbStore(os.path.join(data_dir, "db"))
    store.open()
    try:
        return [e.value for _, e in store.dump() if e.state == VALUE_ENCRYPTED]
    finally:
        store.close()


def sealed_in_journal(data_dir: str, raft_key_ids: set[int]) -> list[bytes]:
    """The raft envelopes in a stopped node's journal."""
    journal = FileJournal(os.path.join(data_dir, "raft"))
    found = []
    for pos in range(len(journal)):
        payload = _payload_of(journal[pos][0])
        if payload is None:
            continue
        try:
            if envelope.parse(payload).key_id in raft_key_ids:
                found.append(payload)
        except envelope.EnvelopeError:
            continue  # a cleartext entry
    return found


def reused_nonces(envelopes) -> list[tuple[int, bytes]]:
    """(key id, nonce) pairs that sealed more than one distinct envelope."""
    seen: dict[tuple[int, bytes], set[bytes]] = defaultdict(set)
    for raw in envelopes:
        parsed = envelope.parse(raw)
        seen[(parsed.key_id, parsed.nonce)].add(raw)
    return [slot for slot, sealed in seen.items() if len(sealed) > 1]


def both_envelopes_cluster(make_cluster, tmp_path):
    """A 3-node cluster (KEK file in `tmp_path`) bootstrapped with storage key 1 and raft key
    2, both envelopes on."""
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek])
    with cluster.client() as c:
        admin(c, "BootstrapEncryption", timeout=15)  # storage key 1, raft key 2
        admin(c, "EnableStorageEnvelope", timeout=15)
        admin(c, "EnableRaftEnvelope", timeout=15)
    return cluster


@pytest.mark.parametrize("purpose", ["storage", "raft"])
def test_a_kill_between_apply_and_the_sidecar_write_reuses_no_nonce(make_cluster, tmp_path,
                                                                     purpose):
    cluster = both_envelopes_cluster(make_cluster, tmp_path)
    leader = cluster.wait_leader()
    victim = next(n for n in cluster.nodes if n != leader)
    victim_dir = cluster.nodes[victim].data_dir
    cluster.kill(victim, signal.SIGTERM)
    cluster.start_node(victim, env={DIE_BEFORE_SIDECAR_ENV: "3"})  # the rotated key's id
    wait_for(lambda: cluster.healthy(victim), 60, f"{victim} serving again")

    # One writer through each node; the victim's is refused while it is down.
    writers = {n: Writer(cluster.client(n), f"w-{n}-".encode()) for n in cluster.nodes}
    through_victim = writers[victim]
    for writer in writers.values():
        writer.start()
    try:
        through_victim.wait_acked(21)
        request = pb.RotateDEKRequest(purpose=pb.STORAGE if purpose == "storage" else pb.RAFT)
        with cluster.client(leader) as c:
            assert admin(c, "RotateDEK", request, timeout=30).key_id == 3
        # The victim applied the rotation, then died before writing its sidecar.
        assert cluster.nodes[victim].proc.wait(timeout=60) == -signal.SIGKILL
        assert 3 not in read_sidecar(victim_dir).keys
        cluster.start_node(victim)
        through_victim.wait_acked(len(through_victim.acked) + 21, 60)
    finally:
        for writer in writers.values():
            writer.stop.set()
        for writer in writers.values():
            writer.join(30)
    assert 3 in read_sidecar(victim_dir).keys
    wait_for(lambda: len({cluster.client(n).digest().digest for n in cluster.nodes}) == 1,
             30, "every replica to reach the same state")
    cluster.stop_all()

    mine = node_id16(full_node_id(cluster.nodes[victim].raft))
    for name, node in cluster.nodes.items():
        at_rest = sealed_at_rest(node.data_dir)
        in_log = sealed_in_journal(node.data_dir, {2, 3})
        assert reused_nonces(at_rest) == [], name
        assert reused_nonces(in_log) == [], name
    # The check covers the key the victim died on: it sealed under it after the restart.
    victim_sealed = (sealed_at_rest(victim_dir) if purpose == "storage"
                     else sealed_in_journal(victim_dir, {3}))
    assert any(envelope.parse(raw).key_id == 3
               and envelope.parse(raw).nonce[:2] == mine.to_bytes(2, "big")
               for raw in victim_sealed)
