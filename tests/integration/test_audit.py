"""The audit log on real nodes: admin acts recorded before they run, `sealkv audit verify`,
and a node whose audit log cannot be written refuses the act (a full tmpfs, as root)."""
import json
import os
import subprocess
import sys

import pytest

from sealkv.node import errors
from tests.cluster import Cluster, free_port

pytestmark = pytest.mark.integration


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                          capture_output=True, timeout=30).returncode == 0


def _records(node):
    with open(os.path.join(node.data_dir, "audit", "audit.log")) as f:
        return [json.loads(line) for line in f]


def _sealkv(*args):
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("audit-cluster")), 3)
    mounted = [n for n in c.nodes.values()
               if _mount_tmpfs(os.path.join(n.data_dir, "audit"), "256k")]
    try:
        c.start()
        c.mounted = {n.name for n in mounted}
        yield c
    finally:
        c.stop_all()
        for n in mounted:
            subprocess.run(["umount", os.path.join(n.data_dir, "audit")], capture_output=True,
                           timeout=30)


def test_admin_acts_are_recorded_before_and_after_with_arguments(cluster):
    grpc_address = f"127.0.0.1:{free_port()}"
    with cluster.client() as client:
        client.member_add("audited", "", grpc_address, learner=True)
        client.member_remove("audited")
        with pytest.raises(errors.SealkvError):
            client.member_remove("never-was-a-member")
        client.put(b"audit/k", b"a value that must never be audited")
    leader = cluster.nodes[cluster.wait_leader()]
    records = _records(leader)
    acts = [(r["event"], r["method"].rsplit("/", 1)[-1], r["code"]) for r in records]
    assert acts[:2] == [("request", "MemberAdd", ""), ("outcome", "MemberAdd", "OK")]
    assert acts[2:4] == [("request", "MemberRemove", ""), ("outcome", "MemberRemove", "OK")]
    assert acts[4][:2] == ("request", "MemberRemove") and acts[5][2] not in ("", "OK")
    assert records[0]["args"] == {"name": "audited", "grpc_address": grpc_address,
                                  "role": "LEARNER"}
    assert all(r["node"] == leader.name and r["identity"] for r in records)
    everything = open(os.path.join(leader.data_dir, "audit", "audit.log"), "rb").read()
    assert b"must never be audited" not in everything and b"audit/k" not in everything
    assert "Put" not in {a[1] for a in acts}


def test_verify_accepts_the_log_and_names_an_edited_record(cluster, tmp_path):
    leader = cluster.nodes[cluster.wait_leader()]
    ok = _sealkv("-w", "json", "audit", "verify", "--data-dir", leader.data_dir,
                 "--secret-file", cluster.secret_file)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["ok"] is True and json.loads(ok.stdout)[0]["macs_checked"]
    tail = _sealkv("audit", "tail", "--data-dir", leader.data_dir, "-n", "2")
    assert tail.returncode == 0 and "MemberRemove" in tail.stdout, tail.stderr
    # A copy is tampered with (the live file stays intact for the node).
    copy = tmp_path / "node"
    (copy / "audit").mkdir(parents=True)
    lines = open(os.path.join(leader.data_dir, "audit", "audit.log"), "rb").read().split(b"\n")
    lines[1] = lines[1].replace(b'"OK"', b'"PERMISSION_DENIED"')
    (copy / "audit" / "audit.log").write_bytes(b"\n".join(lines))
    bad = _sealkv("audit", "verify", "--data-dir", str(copy), "--secret-file", cluster.secret_file)
    assert bad.returncode == 1
    assert "record 2 (seq 2) was edited: its MAC does not match" in bad.stdout


def test_an_act_whose_record_cannot_be_written_is_refused(cluster):
    leader = cluster.nodes[cluster.wait_leader()]
    if leader.name not in cluster.mounted:
        pytest.skip("needs root to mount a small tmpfs as the audit directory")
    filler = os.path.join(leader.data_dir, "audit", "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1000"],
                   capture_output=True, timeout=30)  # fills the 256 KiB tmpfs (ENOSPC is fine)
    added = []
    try:
        with cluster.client(leader.name) as client:
            # The file's last page may still have room: act until a record no longer fits.
            for i in range(200):
                name = f"unaudited{i}"
                try:
                    client.member_add(name, "", f"127.0.0.1:{free_port()}", learner=True)
                except errors.Unavailable as exc:
                    assert "audit log cannot be written" in exc.message
                    break
                added.append(name)
            else:
                pytest.fail("the audit tmpfs never filled up")
            names = {m.name for m in client.member_list().members}
            assert name not in names  # the refused act did not happen
    finally:
        os.unlink(filler)
    with cluster.client(leader.name) as client:
        for name in added:
            client.member_remove(name)
    assert _sealkv("audit", "verify", "--data-dir", leader.data_dir, "--secret-file",
                   cluster.secret_file).returncode == 0
