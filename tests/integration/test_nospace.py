"""The NOSPACE alarm with real node processes: a full disk (a small tmpfs under each node's
database) and the database quota. No node dies, the alarm is replicated, writes answer
RESOURCE_EXHAUSTED, reads go on, nothing acknowledged is lost, and writes resume after space
is freed and the alarm disarmed."""
import contextlib
import os
import subprocess
import sys
import threading
import pytest

from sealkv.node import errors
from sealkv.v1 import kv_pb2
from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.integration

TMPFS_SIZE = "8m"
BALLAST_BYTES = 2 * 1024 * 1024
VALUE = b"x" * 16 * 1024
DISK_FULL = ("NOSPACE alarm: the disk of {member} is full; free space on it, then run "
             "`sealkv alarm disarm`. Writes are refused until then; reads are served")
QUOTA = ("NOSPACE alarm: the database of {member} reached its quota (--quota-backend-bytes); "
         "delete keys or raise the quota, then run `sealkv alarm disarm`. Writes are refused "
         "until then; reads are served")


@contextlib.contextmanager
def tmpfs(path: str, size: str):
    """Mounts a tmpfs of `size` at `path` (root only); skips the test when not permitted."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                             path], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root and mount(8)): "
                    f"{result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


class Filler(threading.Thread):
    """Puts 16 KiB values under unique keys until stopped or refused; records what was
    acknowledged and the refusals (bounded: at most `limit` attempts)."""

    def __init__(self, client, prefix: bytes, limit: int = 5000):
        super().__init__(daemon=True)
        self.client, self.prefix, self.limit = client, prefix, limit
        self.acked: list[bytes] = []
        self.refusals: list[str] = []
        self.stop = threading.Event()

    def run(self):
        for i in range(self.limit):
            if self.stop.is_set():
                return
            key = self.prefix + b"%06d" % i
            try:
                self.client.put(key, VALUE)
                self.acked.append(key)
            except errors.ResourceExhausted as exc:
                self.refusals.append(exc.message)
                self.stop.wait(0.05)
            except errors.SealkvError:
                self.stop.wait(0.05)


def fill_until_refused(cluster: Cluster, writers: int = 3) -> list[Filler]:
    fillers = [Filler(cluster.client(timeout=5), b"f%d/" % i) for i in range(writers)]
    for f in fillers:
        f.start()
    try:
        wait_for(lambda: any(f.refusals for f in fillers), 240, "a write refused for space")
    finally:
        for f in fillers:
            f.stop.set()
        for f in fillers:
            f.join(30)
    return fillers


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """Runs the `sealkv` command line against every node of `cluster`."""
    endpoints = ",".join(n.grpc for n in cluster.nodes.values())
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", "--endpoints", endpoints,
                           *args], capture_output=True, text=True, timeout=60,
                          env=os.environ | cluster.cli_env())


def assert_every_acked_key_reads_back(cluster: Cluster, acked: list[bytes]) -> None:
    with cluster.client() as c:
        revision = c.get(b"probe").header.revision  # linearizable: a barrier after every ack
    for name in cluster.nodes:
        with cluster.client(name) as c:
            wait_for(lambda: c.get(b"probe", consistency=kv_pb2.SERIALIZABLE).header.revision
                     >= revision, 30, f"{name} to apply everything acknowledged")
            got = set()
            start = b"f"
            while True:  # pages: Range stops at its byte limit
                r = c.range(start, range_end=b"g", consistency=kv_pb2.SERIALIZABLE)
                got.update(kv.key for kv in r.kvs)
                if not r.more:
                    break
                start = r.kvs[-1].key + b"\0"
        missing = [k for k in acked if k not in got]
        assert not missing, f"{name} lost {len(missing)} acknowledged writes"


def test_a_full_disk_raises_nospace_and_writes_resume_after_disarm(tmp_path):
    cluster = Cluster(str(tmp_path))
    with contextlib.ExitStack() as stack:
        for node in cluster.nodes.values():
            os.makedirs(node.data_dir, mode=0o700, exist_ok=True)
        mounts = [stack.enter_context(tmpfs(os.path.join(n.data_dir, "db"), TMPFS_SIZE))
                  for n in cluster.nodes.values()]
        stack.callback(cluster.stop_all)  # runs before the unmounts (last in, first out)
        for mount in mounts:
            with open(os.path.join(mount, "ballast"), "wb") as f:
                f.write(b"\0" * BALLAST_BYTES)
        cluster.start()

        fillers = fill_until_refused(cluster)
        acked = [k for f in fillers for k in f.acked]
        assert acked, "nothing was written before the disk filled"
        refusal = next(r for f in fillers for r in f.refusals)
        members = sorted(cluster.nodes)
        assert refusal in [DISK_FULL.format(member=m) for m in members], refusal
        assert all(n.alive() for n in cluster.nodes.values()), cluster.logs()

        # Replicated: every member lists the alarm and refuses writes with the same words.
        for name in cluster.nodes:
            with cluster.client(name) as c:
                wait_for(lambda: any(a.replicated for a in c.alarm_list().alarms), 20,
                         f"{name} to see the replicated alarm")
                assert {a.cause for a in c.alarm_list().alarms} == {"disk-full"}
                with pytest.raises(errors.ResourceExhausted) as refused:
                    c.put(b"refused", b"v")
                assert "is full; free space on it, then run `sealkv alarm disarm`" in \
                    refused.value.message
                status = c.status()
                assert [a.alarm for a in status.alarms][:1] == ["NOSPACE"]
        listed = cli(cluster, "alarm", "list")
        assert listed.returncode == 0 and "alarm:NOSPACE cause:disk-full" in listed.stdout
        # Reads and deletes go on.
        with cluster.client() as c:
            assert c.get(acked[0]).kv.value == VALUE
            assert c.delete(acked[-1]).deleted == 1
        acked.pop()
        assert_every_acked_key_reads_back(cluster, acked)

        for mount in mounts:
            os.unlink(os.path.join(mount, "ballast"))
        disarmed = cli(cluster, "alarm", "disarm")
        assert disarmed.returncode == 0 and "alarm:NOSPACE" in disarmed.stdout
        with cluster.client() as c:
            wait_for(lambda: c.put(b"after-disarm", b"v"), 30, "writes to resume")
            assert c.alarm_list().alarms == []
        assert_every_acked_key_reads_back(cluster, acked)
        assert all(n.alive() for n in cluster.nodes.values()), cluster.logs()


def test_the_quota_raises_nospace_before_the_disk_fills(make_cluster):
    cluster = make_cluster(3, extra_args=["--quota-backend-bytes", str(1024 * 1024)])
    fillers = fill_until_refused(cluster, writers=2)
    acked = [k for f in fillers for k in f.acked]
    refusal = next(r for f in fillers for r in f.refusals)
    assert refusal in [QUOTA.format(member=m) for m in cluster.nodes], refusal
    assert 40 <= len(acked) <= 70, f"{len(acked)} values of 16 KiB under a 1 MiB quota"
    with cluster.client() as c:
        wait_for(lambda: any(a.replicated for a in c.alarm_list().alarms), 20,
                 "the alarm to replicate")
        assert {a.cause for a in c.alarm_list().alarms} == {"quota"}
        status = c.status()
        assert status.quota_backend_bytes == 1024 * 1024
        assert status.db_size_in_use > 900 * 1024
        for key in acked[: len(acked) // 2]:  # deletes are served under the alarm
            c.delete(key)
    assert_every_acked_key_reads_back(cluster, acked[len(acked) // 2:])
    assert cli(cluster, "alarm", "disarm").returncode == 0
    with cluster.client() as c:
        wait_for(lambda: c.put(b"after-disarm", b"v"), 30, "writes to resume")
        assert c.alarm_list().alarms == []


def test_a_commit_that_hits_enospc_pauses_applying_and_resumes_when_space_returns(tmp_path):
    """The last line of defence, below the admission checks: the database write itself
    fails for lack of space. The node must neither halt nor skip the entries."""
    from sealkv.node.replication.adapter import ReplicationAdapter
    from sealkv.node.replication.membership import MemberRecord
    from sealkv.node.state import commands as cmd
    from sealkv.node.state.machine import StateMachine
    from sealkv.node.state.storage.lmdb_store import LmdbStore
    from tests.cluster import free_port

    raft = f"127.0.0.1:{free_port()}"
    halts, full = [], []  # the node raises the NOSPACE alarm from on_disk_full
    with tmpfs(str(tmp_path / "db"), "2m") as mount:
        store = LmdbStore(mount, map_size=64 * 1024 * 1024)
        store.open()
        sm = StateMachine(store, [MemberRecord("n1", raft, "127.0.0.1:1", cmd.ROLE_VOTER)])
        sm.load()
        adapter = ReplicationAdapter(sm, raft_address=raft, partners=[],
                                     data_dir=str(tmp_path / "raft"), secret=None,
                                     halt=halts.append, on_disk_full=full.append)
        adapter.start()
        try:
            wait_for(lambda: adapter.is_leader, 20, "the single node to lead")
            with open(os.path.join(mount, "ballast"), "wb") as f:
                try:
                    f.write(b"\0" * 2 * 1024 * 1024)
                except OSError:
                    pass  # filled the tmpfs up to its last page
            acked, stalled = [], None
            for i in range(200):
                key = b"k%04d" % i
                try:
                    adapter.propose(cmd.encode(cmd.Put(key, VALUE)), 2.0)
                    acked.append(key)
                except errors.OutcomeUnknown:
                    stalled = key
                    break
            assert stalled is not None, "the disk never filled"
            assert halts == [] and full and full[0] == mount
            assert sm.get(stalled)[0] is None  # not applied: nothing half-written
            assert all(sm.get(k)[0] is not None for k in acked)  # reads go on
            os.unlink(os.path.join(mount, "ballast"))
            wait_for(lambda: sm.get(stalled)[0] is not None, 20,
                     "the stalled entry to apply once there is room")
            adapter.propose(cmd.encode(cmd.Put(b"after", b"v")), 5.0)
            assert all(sm.get(k)[0] is not None for k in acked) and halts == []
        finally:
            adapter.stop()
            store.close()
