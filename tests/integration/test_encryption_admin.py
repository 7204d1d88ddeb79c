"""The encryption admin service on real node processes: bootstrap, the capability fan-out and
its refusals, the storage envelope cutover, and the capability fence for new members."""
from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner

from sealkv.node import errors
from sealkv.node.client import SERIALIZABLE
from sealkv.node.replication.dump_file import DUMP_MAGIC
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.base import VALUE_CLEARTEXT, VALUE_ENCRYPTED
from sealkv.node.state.storage.memory import MemoryStore
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc
from tests.cluster import free_port, wait_for

pytestmark = pytest.mark.integration

STUB = pb_grpc.EncryptionAdminStub
BEFORE_KEY, BEFORE_VALUE = b"k-before", b"cleartext-before-cutover-5f1c"
AFTER_KEY, AFTER_VALUE = b"k-after", b"sealed-after-cutover-9a7e"
COMPACT_AFTER = 100


def write_kek(path) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    return str(path)


def write_compaction_config(path) -> str:
    # Small enough that a test can force a snapshot by writing; large enough that nothing
    # compacts before the cutover.
    with open(path, "w") as f:
        f.write(f"[raft_settings]\nlog_compaction_min_entries = {COMPACT_AFTER}\n")
    return str(path)


def admin(client, method, request=None, **kw):
    request = request if request is not None else getattr(pb, f"{method}Request")()
    return client.call(STUB, method, request, **kw)


def sidecar_state(cluster, name):
    with cluster.client(name) as c:
        return admin(c, "GetSidecarState", endpoint=cluster.nodes[name].grpc,
                     follow_leader=False)


def capability(cluster, name):
    with cluster.client(name, timeout=2) as c:
        return admin(c, "GetCapability", endpoint=cluster.nodes[name].grpc, follow_leader=False)


def assert_refused(cluster, via, *needles, skip=()):
    """EnableStorageEnvelope (sent to `via`) is refused with FAILED_PRECONDITION naming
    `needles`, and nothing changed on any running voter (except those in `skip`)."""
    with cluster.client(via) as c:
        with pytest.raises(errors.FailedPrecondition) as refused:
            admin(c, "EnableStorageEnvelope", timeout=10)
    message = refused.value.message
    for needle in needles:
        assert needle in message, f"{needle!r} not in refusal: {message}"
    for node in cluster.nodes.values():
        if node.alive() and node.raft and node.name not in skip:
            state = sidecar_state(cluster, node.name)
            assert not state.storage_envelope_active and state.storage_envelope_cutover_index == 0
    return message


def at_rest(node):
    """Returns (raw dump bytes, {key: stored entry}) from a node's last Raft snapshot."""
    with open(os.path.join(node.data_dir, "raft", "raft.dump"), "rb") as f:
        raw = f.read()
    src = io.BytesIO(raw)
    assert src.read(len(DUMP_MAGIC)) == DUMP_MAGIC
    src.read(int.from_bytes(src.read(4), "big"))
    sm = StateMachine(MemoryStore())
    sm.read_snapshot(src)
    return raw, dict(sm.base.dump())


def cli(args, cluster):
    """Runs the `sealkv` CLI as the cluster's `root` identity (the `encryption` group comes
    from the admin plugin's entry point)."""
    from sealkv.node.cli.main import cli as root

    return CliRunner().invoke(root, args, env=cluster.cli_env())


def test_storage_envelope_cutover_behind_the_capability_fan_out(make_cluster, tmp_path):
    kek = write_kek(tmp_path / "kek")
    config = write_compaction_config(tmp_path / "node.toml")
    cluster = make_cluster(3, plugins=["encryption"],
                           extra_args=["--kek-file", kek, "--config", config])
    # Two standalone nodes outside the cluster: one with encryption (it answers GetCapability
    # for its own node id) and one without the plugin at all.
    impostor = make_cluster(1, start=False, plugins=["encryption"],
                            extra_args=["--kek-file", write_kek(tmp_path / "kek2")])
    plain = make_cluster(1, start=False)
    impostor.start_node("n1")
    plain.start_node("n1")
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    endpoints = ",".join(n.grpc for n in cluster.nodes.values())

    with cluster.client() as c:
        c.put(BEFORE_KEY, BEFORE_VALUE)

        # Not bootstrapped: the cutover never bootstraps implicitly.
        with pytest.raises(errors.FailedPrecondition, match="not bootstrapped"):
            admin(c, "EnableStorageEnvelope")

        # A follower answers with the leader's address, in the message and the metadata.
        with pytest.raises(errors.NotLeader) as not_leader:
            admin(c, "BootstrapEncryption", endpoint=cluster.nodes[follower].grpc,
                  follow_leader=False)
        assert not_leader.value.leader == cluster.nodes[leader].grpc
        assert cluster.nodes[leader].grpc in not_leader.value.message

        # Bootstrap through the CLI (any endpoint; the client follows the leader).
        result = cli(["--endpoints", cluster.nodes[follower].grpc, "-w", "json",
                      "encryption", "bootstrap"], cluster)
        assert result.exit_code == 0, result.output
        assert '"storage_key_id": 1' in result.output
        with pytest.raises(errors.FailedPrecondition, match="already bootstrapped"):
            admin(c, "BootstrapEncryption")

        # Every node is capable and holds the wrapped keys (by id only).
        for name in cluster.nodes:
            wait_for(lambda: capability(cluster, name).encryption_capable, 10,
                     f"{name} capable after bootstrap")
            state = sidecar_state(cluster, name)
            assert [k.key_id for k in state.keys] == [1, 2]
            assert state.active_storage_key_id == 1 and not state.storage_envelope_active

        # Refusal 1: a voter is stopped (SIGSTOP: it accepts connections but never answers,
        # so this also proves a hung peer cannot hold the RPC past the fan-out deadline).
        cluster.kill(follower, signal.SIGSTOP)
        started = time.monotonic()
        assert_refused(cluster, leader, follower, "did not answer", skip=(follower,))
        assert time.monotonic() - started < 9
        os.kill(cluster.nodes[follower].pid, signal.SIGCONT)
        wait_for(lambda: capability(cluster, follower).encryption_capable, 20,
                 f"{follower} back and capable")
        # The resumed voter may call an election (pysyncobj has no pre-vote): settle first.
        leader = cluster.wait_leader()

        # Refusal 2: a learner in the directory that is not running (disconnected).
        c.member_add("ghost", "", f"127.0.0.1:{free_port()}", learner=True)
        assert_refused(cluster, leader, "ghost", "unreachable")
        c.member_remove("ghost")

        # Refusal 3: a directory entry whose gRPC address answers for another node id.
        wait_for(lambda: capability(impostor, "n1").encryption_capable, 20, "impostor up")
        c.member_add("imp", "", impostor.nodes["n1"].grpc, learner=True)
        assert_refused(cluster, leader, "imp", "mismatched responder")
        c.member_remove("imp")

        # Concurrent enables produce exactly one cutover.
        responses, failures = [], []

        def enable():
            try:
                with cluster.client() as own:
                    responses.append(admin(own, "EnableStorageEnvelope", timeout=15))
            except errors.SealkvError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=enable) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures, failures
        fresh = [r for r in responses if not r.was_already_active]
        assert len(fresh) == 1 and len(responses) == 4
        cutover = fresh[0].cutover_index
        assert cutover > 0 and {r.cutover_index for r in responses} == {cutover}
        assert sorted(r.member for r in fresh[0].capability_summary) == ["n1", "n2", "n3"]
        assert all(r.ok for r in fresh[0].capability_summary)

        # A retry is OK, names the original index, and runs no fan-out.
        retry = admin(c, "EnableStorageEnvelope")
        assert retry.was_already_active and retry.cutover_index == cutover
        assert not retry.capability_summary
        result = cli(["--endpoints", endpoints, "encryption", "enable-storage-envelope"], cluster)
        assert result.exit_code == 0, result.output
        assert f"already active since index {cutover}" in result.output

        for name in cluster.nodes:
            wait_for(lambda: sidecar_state(cluster, name).storage_envelope_cutover_index
                     == cutover, 10, f"{name} sidecar records the cutover")

        # The raft envelope follows through the same gate.
        raft = admin(c, "EnableRaftEnvelope", timeout=15)
        assert raft.cutover_index > cutover and not raft.was_already_active
        assert sorted(r.member for r in raft.capability_summary) == ["n1", "n2", "n3"]

        # After the cutover, an incapable node cannot be added; nothing changes.
        wait_for(lambda: plain.status("n1").is_leader, 20, "plain node up")
        with pytest.raises(errors.FailedPrecondition) as fenced:
            c.member_add("plain", "", plain.nodes["n1"].grpc, learner=True, timeout=15)
        assert "plain" in fenced.value.message and "not capable" in fenced.value.message
        assert "plain" not in [m.name for m in c.member_list().members]

        c.put(AFTER_KEY, AFTER_VALUE)
        for node in cluster.nodes.values():
            def both_readable():
                got = {k: c.get(k, SERIALIZABLE, endpoint=node.grpc).kv.value
                       for k in (BEFORE_KEY, AFTER_KEY)}
                return got == {BEFORE_KEY: BEFORE_VALUE, AFTER_KEY: AFTER_VALUE}
            wait_for(both_readable, 10, f"both values readable on {node.name}")

        status = cli(["--endpoints", endpoints, "-w", "json", "encryption", "status",
                      "--cluster"], cluster)
        assert status.exit_code == 0, status.output
        assert status.output.count('"storage_envelope_active": true') == 3
        assert status.output.count('"capable": true') == 3

        # Force a snapshot on every node by writing past the compaction threshold, then check
        # what each node stores at rest.
        for i in range(COMPACT_AFTER + 20):
            c.put(b"filler/%04d" % i, b"x")

    for node in cluster.nodes.values():
        def compacted_with_after():
            try:
                return AFTER_KEY in at_rest(node)[1]
            except (OSError, ValueError):
                return False
        wait_for(compacted_with_after, 20, f"{node.name} snapshot holding {AFTER_KEY!r}")
        raw, records = at_rest(node)
        before, after = records[BEFORE_KEY], records[AFTER_KEY]
        assert before.state == VALUE_CLEARTEXT and before.value == BEFORE_VALUE
        assert after.state == VALUE_ENCRYPTED
        assert after.value[0] == 0x01 and int.from_bytes(after.value[2:6], "big") == 1
        assert AFTER_VALUE not in after.value
        assert AFTER_VALUE not in raw, f"{node.name} stores the post-cutover value in clear"
        assert BEFORE_VALUE in raw

    # A node that lost its sidecar gets it back from the replicated state.
    sidecar = os.path.join(cluster.nodes[follower].data_dir, "encryption", "keys.json")
    os.unlink(sidecar)
    assert not capability(cluster, follower).sidecar_present
    result = cli(["--endpoints", cluster.nodes[follower].grpc, "encryption", "resync-sidecar"],
                 cluster)
    assert result.exit_code == 0, result.output
    state = sidecar_state(cluster, follower)
    assert state.present and state.storage_envelope_cutover_index == cutover
    assert [k.key_id for k in state.keys] == [1, 2]

    # Rotation: a fresh id, trial-unwrapped by the leader; new writes use it.
    result = cli(["--endpoints", endpoints, "-w", "json", "encryption", "rotate-dek",
                  "--purpose", "storage"], cluster)
    assert result.exit_code == 0, result.output
    assert '"key_id": 3' in result.output
    with cluster.client() as c:
        c.put(b"k-rotated", b"v3")
        assert c.get(b"k-rotated").kv.value == b"v3"
        assert c.get(AFTER_KEY).kv.value == AFTER_VALUE
        # Epochs are uint32 on the wire and rejected above 0xFFFF; they are filled in
        # server-side, so a registration of the leader is a no-op once its row exists.
        with pytest.raises(errors.InvalidArgument, match="above 0xFFFF"):
            admin(c, "RegisterEncryptionWriter",
                  pb.RegisterEncryptionWriterRequest(local_epoch=0x10000))
        registered = admin(c, "RegisterEncryptionWriter")
        assert {r.dek_id for r in registered.registrations} == {2, 3}


def test_a_member_added_while_the_fan_out_runs_is_probed_before_the_cutover(make_cluster,
                                                                           tmp_path):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, plugins=["encryption"], extra_args=["--kek-file", kek])
    leader = cluster.wait_leader()
    slow = next(n for n in cluster.nodes if n != leader)
    with cluster.client(leader) as c:
        admin(c, "BootstrapEncryption", timeout=15)
    # A paused voter holds the first probe round open (up to its deadline) ...
    cluster.kill(slow, signal.SIGSTOP)
    outcome = {}
    rounds_before = cluster.nodes[leader].log().count("capability fan-out round 1")

    def enable():
        with cluster.client(leader) as c:
            try:
                outcome["response"] = admin(c, "EnableStorageEnvelope", timeout=20)
            except errors.SealkvError as exc:
                outcome["error"] = exc

    caller = threading.Thread(target=enable)
    caller.start()
    try:
        wait_for(lambda: cluster.nodes[leader].log().count("capability fan-out round 1")
                 > rounds_before, 10, "the cutover's first fan-out round to start")
        # ... while a learner that does not run joins the cluster,
        with cluster.client(leader) as c:
            c.member_add("late", "", f"127.0.0.1:{free_port()}", learner=True, timeout=10)
    finally:
        cluster.kill(slow, signal.SIGCONT)
    caller.join(30)
    # ... so the fan-out probes again, finds it, and refuses the cutover naming it.
    assert "membership changed during the capability fan-out" in cluster.nodes[leader].log()
    assert "capability fan-out round 2" in cluster.nodes[leader].log()
    assert isinstance(outcome.get("error"), errors.FailedPrecondition), outcome
    assert "late" in outcome["error"].message
    assert not sidecar_state(cluster, leader).storage_envelope_active
