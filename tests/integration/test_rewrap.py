"""Online KEK rotation on real 3-node TLS clusters: `sealkv encryption rewrap-keys`.

The operator stages the next KEK on every node by a rolling restart (--next-kek-*), runs
rewrap-keys (every member proves through the capability fan-out that its KEK opens the key
table and that its next KEK is the leader's; then the table rewrapped under the next KEK goes
through the log), then promotes next -> current in each node's configuration.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

from sealkv.node import errors
from sealkv.node.client import SERIALIZABLE, Client
from sealkv.node.security.pki import ROLE_READONLY
from sealkv.node.security.tls import client_kwargs
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.plugins.encryption.kek import FileKEK, UnwrapError
from sealkv.plugins.encryption.layer import DIE_BEFORE_REWRAP_SIDECAR_ENV
from sealkv.plugins.encryption.sidecar import read_sidecar
from tests.cluster import PYTHON, wait_for
from tests.integration.test_encryption import start_fails
from tests.integration.test_encryption_admin import (
    admin, capability, cli, sidecar_state, write_kek,
)
from tests.load import Writer
from tests.softhsm import make_token

pytestmark = pytest.mark.integration

KEK_FLAGS = ("--kek-file", "--kek-provider", "--kek-option",
             "--next-kek-file", "--next-kek-provider", "--next-kek-option")


def file_kek(path) -> list[str]:
    return ["--kek-file", path]


def next_of(flags: list[str]) -> list[str]:
    """The --next-kek-* spelling of KEK flags."""
    return [f"--next-{flag[2:]}" if flag in KEK_FLAGS else flag for flag in flags]


def pkcs11_kek(hsm, label: str) -> list[str]:
    return ["--kek-provider", "pkcs11"] + [a for k, v in hsm.kek_options(label).items()
                                          for a in ("--kek-option", f"{k}={v}")]


def set_keks(node, current: list[str], staged: list[str] = ()) -> None:
    """Replaces the node's KEK flags: `current` as --kek-*, `staged` as --next-kek-*."""
    args, kept = node.extra_args, []
    i = 0
    while i < len(args):
        if args[i] in KEK_FLAGS:
            i += 2
            continue
        kept.append(args[i])
        i += 1
    node.extra_args = kept + list(current) + next_of(list(staged))


def restart(cluster, name, current, staged=()) -> None:
    """Restarts one node (SIGTERM) with new KEK flags and waits until it serves again, is
    capable, and follows the leader every node names."""
    set_keks(cluster.nodes[name], current, staged)
    cluster.restart(name, ready=lambda: capability(cluster, name).encryption_capable)


def sealed_cluster(make_cluster, current):
    cluster = make_cluster(3, plugins=["encryption"], extra_args=list(current))
    with cluster.client() as c:
        c.put(b"before-bootstrap", b"cleartext-then-sealed")
        admin(c, "BootstrapEncryption", timeout=15)
        admin(c, "EnableStorageEnvelope", timeout=15)
        for i in range(20):
            c.put(b"sealed/%d" % i, b"value-%d" % i)
    return cluster


def expected_values() -> dict[bytes, bytes]:
    values = {b"sealed/%d" % i: b"value-%d" % i for i in range(20)}
    values[b"before-bootstrap"] = b"cleartext-then-sealed"
    return values


def assert_all_readable(cluster, values, via=None):
    names = [via] if via else [n for n, p in cluster.nodes.items() if p.alive()]
    for name in names:
        with cluster.client(name, timeout=10) as c:
            for key, value in values.items():
                got = c.get(key, consistency=SERIALIZABLE) if via else c.get(key)
                assert got.kv.value == value, (name, key)


def rewrap_cli(cluster, json_out=True):
    """Runs `sealkv encryption rewrap-keys` against every node (the client finds the leader)."""
    endpoints = ",".join(n.grpc for n in cluster.nodes.values())
    return cli(["--endpoints", endpoints, *(["-w", "json"] if json_out else []),
                "encryption", "rewrap-keys"], cluster)


def generations(cluster) -> dict[str, int]:
    return {n: capability(cluster, n).kek_generation for n, p in cluster.nodes.items()
            if p.alive()}


def test_rewrap_file_to_file_under_load_then_restarts(make_cluster, tmp_path):
    old, new = write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")
    cluster = sealed_cluster(make_cluster, file_kek(old))
    # Before staging: every member reports why it is not ready, and the rewrap is refused.
    assert "--next-kek-file" in capability(cluster, "n1").next_kek_reason
    result = rewrap_cli(cluster, json_out=False)
    assert result.exit_code != 0 and "no next KEK" in result.output, result.output

    # Stage the next KEK by a rolling restart.
    for name in list(cluster.nodes):
        restart(cluster, name, file_kek(old), file_kek(new))
        assert capability(cluster, name).next_kek_ready
    cluster.wait_leader()
    endpoints = ",".join(n.grpc for n in cluster.nodes.values())
    status = cli(["--endpoints", endpoints, "-w", "json", "encryption", "status", "--cluster"],
                 cluster)
    assert status.exit_code == 0, status.output
    rows = json.loads(status.output)
    assert len(rows) == 3 and all(r["next_kek_ready"] and r["kek_generation"] == 0
                                  for r in rows), rows
    before = {n: {k.key_id: k for k in sidecar_state(cluster, n).keys} for n in cluster.nodes}

    with Writer(cluster.client(timeout=10)) as load:
        result = rewrap_cli(cluster)
        assert result.exit_code == 0, result.output
        answer = json.loads(result.output)
        assert answer["kek_generation"] == 1 and not answer["was_already_done"]
        assert sorted(r["member"] for r in answer["capability_summary"]) == ["n1", "n2", "n3"]
        done_at = len(load.acked)
        wait_for(lambda: len(load.acked) >= done_at + 5, 30, "writes after the rewrap")
    wait_for(lambda: set(generations(cluster).values()) == {1}, 30, "every node at generation 1")
    for name in cluster.nodes:
        state = sidecar_state(cluster, name)
        assert sorted(k.key_id for k in state.keys) == sorted(before[name])
    assert_all_readable(cluster, {**expected_values(), **load.acked})

    # The admin act is in the audit log of the leader that ran it (request and outcome).
    audited = [n for n in cluster.nodes.values()
               if "EncryptionAdmin/RewrapKeys" in open(os.path.join(n.data_dir, "audit",
                                                                    "audit.log")).read()]
    assert audited, "RewrapKeys is not in any node's audit log"
    # A re-run is safe: nothing to do, same generation and index.
    again = rewrap_cli(cluster)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["was_already_done"]
    assert json.loads(again.output)["index"] == answer["index"]

    # Writes after the rewrap, then a node restarted with only the old KEK refuses, naming
    # the fix; restarted with the new KEK as its KEK it works.
    with cluster.client() as c:
        c.put(b"after-rewrap", b"sealed-under-new-kek-wrap")
    victim = next(n for n in cluster.nodes if n != cluster.wait_leader())
    cluster.kill(victim, signal.SIGTERM)
    out = start_fails(cluster, victim, "--plugins", "encryption", "--kek-file", old)
    assert "rewrapped under a new KEK" in out and "--kek-file" in out, out[-2000:]
    restart_args = file_kek(new)
    set_keks(cluster.nodes[victim], restart_args)
    cluster.start_node(victim)
    wait_for(lambda: capability(cluster, victim).encryption_capable, 60, f"{victim} capable")
    wait_for(lambda: cluster.client(victim).get(b"after-rewrap", consistency=SERIALIZABLE).kv
             .value == b"sealed-under-new-kek-wrap", 30, f"{victim} caught up")
    assert_all_readable(cluster, {**expected_values(), **load.acked}, via=victim)
    # Promote everywhere: the whole cluster restarts with the new KEK only.
    for name in cluster.nodes:
        if name != victim:
            restart(cluster, name, file_kek(new))
    cluster.wait_leader()
    assert_all_readable(cluster, {**expected_values(), **load.acked})
    digests = {cluster.client(n).digest().digest for n in cluster.nodes}
    assert len(digests) == 1


def test_a_member_without_the_next_kek_refuses_and_nothing_changes(make_cluster, tmp_path):
    old, new = write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")
    other = write_kek(tmp_path / "other.kek")
    cluster = sealed_cluster(make_cluster, file_kek(old) + next_of(file_kek(new)))
    staged = cluster.wait_leader()
    unstaged, elsewhere = [n for n in cluster.nodes if n != staged]
    restart(cluster, unstaged, file_kek(old))                     # no next KEK
    restart(cluster, elsewhere, file_kek(old), file_kek(other))   # another next KEK
    before = {n: sidecar_state(cluster, n) for n in cluster.nodes}
    leader = cluster.wait_leader()
    with cluster.client() as c:
        with pytest.raises(errors.FailedPrecondition) as refused:
            admin(c, "RewrapKeys", timeout=20)
    message = refused.value.message
    assert "no next KEK is staged" in message, message
    if leader == unstaged:  # a restart can move the leadership: the leader refuses itself
        assert "the leader cannot rewrap" in message, message
    else:
        assert unstaged in message, message
        mismatched = elsewhere if leader == staged else staged
        assert mismatched in message and "not the leader's next KEK" in message, message
    # A read-only identity may look (GetCapability) but not rewrap.
    viewer = cluster.client_files("viewer", ROLE_READONLY)
    with Client([cluster.nodes[leader].grpc], timeout=5, **client_kwargs(viewer)) as c:
        with pytest.raises(errors.PermissionDenied):
            admin(c, "RewrapKeys", timeout=10)
    assert set(generations(cluster).values()) == {0}
    for name in cluster.nodes:
        after = sidecar_state(cluster, name)
        assert after.raft_applied_index == before[name].raft_applied_index
        assert [k.key_id for k in after.keys] == [k.key_id for k in before[name].keys]
    assert_all_readable(cluster, expected_values())


@pytest.mark.parametrize("when", ["before_sidecar", "after_sidecar"])
def test_rewrap_survives_a_kill_9_during_the_rewrite(make_cluster, tmp_path, when):
    old, new = write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")
    cluster = sealed_cluster(make_cluster, file_kek(old) + next_of(file_kek(new)))
    leader = cluster.wait_leader()
    victim = next(n for n in cluster.nodes if n != leader)
    victim_dir = cluster.nodes[victim].data_dir
    outcome = []
    rewrap = threading.Thread(target=lambda: outcome.append(rewrap_cli(cluster)))
    victim_leads = False
    if when == "before_sidecar":
        # The victim applies the rewrap (its KEK switched in memory) and dies before its
        # sidecar write: a deterministic kill point.
        cluster.kill(victim, signal.SIGTERM)
        cluster.start_node(victim, env={DIE_BEFORE_REWRAP_SIDECAR_ENV: "1"})
        wait_for(lambda: capability(cluster, victim).next_kek_ready, 60, f"{victim} ready")
        # Its restart may have made it the leader (no pre-vote): then it dies before answering.
        victim_leads = cluster.wait_leader() == victim
        rewrap.start()
        assert cluster.nodes[victim].proc.wait(timeout=60) == -signal.SIGKILL
        assert read_sidecar(victim_dir).kek_generation == 0
    else:
        # The victim dies the moment its rewritten sidecar is in place (its database may
        # have committed the rewrap or not yet).
        def rewritten() -> bool:
            sidecar = read_sidecar(victim_dir)
            return sidecar is not None and sidecar.kek_generation == 1

        rewrap.start()
        wait_for(rewritten, 30, f"{victim}'s sidecar rewrite", interval=0.001)
        cluster.kill(victim, signal.SIGKILL)
    rewrap.join(60)
    # The majority committed the rewrap either way (a leader that died before answering
    # leaves an unknown outcome: the re-run below settles it).
    assert outcome and (outcome[0].exit_code == 0 or victim_leads), outcome[0].output
    # It restarts with the old KEK and the next still staged (the operator has not
    # promoted yet): consistent, at the new generation, its sidecar rewrapped.
    cluster.start_node(victim)
    wait_for(lambda: capability(cluster, victim).encryption_capable, 60, f"{victim} capable")
    # Safe to re-run (retried while the restarted member settles).
    again = wait_for(lambda: (r := rewrap_cli(cluster)).exit_code == 0 and r, 60,
                     "a successful re-run", interval=1.0)
    answer = json.loads(again.output)
    assert answer["kek_generation"] == 1
    assert answer["was_already_done"] or outcome[0].exit_code != 0, again.output
    wait_for(lambda: capability(cluster, victim).kek_generation == 1, 30,
             f"{victim} at generation 1")
    wait_for(lambda: read_sidecar(victim_dir).kek_generation == 1, 30, "the sidecar rewritten")
    assert_all_readable(cluster, expected_values(), via=victim)
    # And then with the new KEK only.
    restart(cluster, victim, file_kek(new))
    assert_all_readable(cluster, expected_values(), via=victim)
    with cluster.client() as c:
        c.put(b"after", b"v")
    wait_for(lambda: cluster.client(victim).get(b"after", consistency=SERIALIZABLE).kv.value
             == b"v", 30, f"{victim} applies new writes")


def test_rewrap_racing_a_rotation_and_a_cutover_is_serialized(make_cluster, tmp_path):
    old, new = write_kek(tmp_path / "old.kek"), write_kek(tmp_path / "new.kek")
    cluster = make_cluster(3, plugins=["encryption"],
                           extra_args=file_kek(old) + next_of(file_kek(new)))
    with cluster.client() as c:
        admin(c, "BootstrapEncryption", timeout=15)
    results, failures = {}, []

    def run(method, request=None):
        try:
            with cluster.client(timeout=30) as own:
                results[method] = admin(own, method, request, timeout=30)
        except errors.SealkvError as exc:
            failures.append((method, exc))

    threads = [threading.Thread(target=run, args=args) for args in (
        ("RewrapKeys",), ("RotateDEK", pb.RotateDEKRequest(purpose=pb.STORAGE)),
        ("EnableStorageEnvelope",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not failures, failures
    assert results["RewrapKeys"].kek_generation == 1
    # Whatever the order, every node ends with the whole table (the rotated key too) wrapped
    # under the new KEK, and nothing the old KEK opens.
    new_kek, old_kek = FileKEK(new), FileKEK(old)
    for name, node in cluster.nodes.items():
        wait_for(lambda: capability(cluster, name).kek_generation == 1, 30, f"{name} at gen 1")
        wait_for(lambda: 3 in read_sidecar(node.data_dir).keys, 30, f"{name} has key 3")
        for key in read_sidecar(node.data_dir).keys.values():
            assert len(new_kek.unwrap(key.wrapped)) == 32
            with pytest.raises(UnwrapError):
                old_kek.unwrap(key.wrapped)
    # A rolling restart: each step waits until the node follows the leader again. A stopping
    # leader hands over to a caught-up voter and a restarted node rejoins without an
    # election (tests/integration/test_rolling_restart.py), so once the last step is done
    # nothing is electing and a write succeeds at once, whichever node led.
    for name in list(cluster.nodes):
        restart(cluster, name, file_kek(new))
    with cluster.client() as c:
        c.put(b"k", b"v")
        assert c.get(b"k").kv.value == b"v"


def test_rewrap_file_to_pkcs11_and_back(make_cluster, tmp_path):
    hsm = make_token(str(tmp_path / "hsm"))
    keygen = subprocess.run(
        [PYTHON, "-m", "sealkv.node.cli", "encryption", "pkcs11-keygen", "--module", hsm.module,
         "--token-label", hsm.token_label, "--key-label", "kek-2", "--pin-file", hsm.pin_file],
        env=dict(os.environ, SOFTHSM2_CONF=hsm.conf), capture_output=True, text=True,
        timeout=120)
    assert keygen.returncode == 0, keygen.stderr
    first, last = write_kek(tmp_path / "first.kek"), write_kek(tmp_path / "last.kek")
    token = pkcs11_kek(hsm, "kek-2")
    cluster = sealed_cluster(make_cluster, file_kek(first) + next_of(token))
    with cluster.client() as c:
        assert admin(c, "RewrapKeys", timeout=30).kek_generation == 1
    # Promote the token KEK and stage the last file KEK, one node at a time.
    for name in list(cluster.nodes):
        restart(cluster, name, token, file_kek(last))
    cluster.wait_leader()
    with cluster.client() as c:
        c.put(b"under-token", b"x")
        assert admin(c, "RewrapKeys", timeout=30).kek_generation == 2
    for name in list(cluster.nodes):
        restart(cluster, name, file_kek(last))
    cluster.wait_leader()
    assert set(generations(cluster).values()) == {2}
    assert_all_readable(cluster, {**expected_values(), b"under-token": b"x"})
