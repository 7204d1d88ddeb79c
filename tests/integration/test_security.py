"""The raft port: bound to the configured address only, authenticated, and pickle-safe."""
import os
import pickle
import socket
import struct
import subprocess
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor

from tests.cluster import PYTHON, free_port, wait_for

pytestmark = pytest.mark.integration


class Touch:
    """A pickle that, if ever unpickled with the standard unpickler, creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def frame(payload: bytes) -> bytes:
    return struct.pack("i", len(payload)) + payload


def send_frames(address: str, frames: list[bytes]) -> None:
    """Sends each frame on its own connection; the node may hang up at any point."""
    host, port = address.rsplit(":", 1)
    for f in frames:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(f)
                s.settimeout(2)
                s.recv(1024)  # the node closes the connection on a bad frame
            except (socket.timeout, ConnectionError):
                pass


def forged(path) -> bytes:
    return zlib.compress(pickle.dumps(Touch(path), protocol=2))


def test_forged_pickle_without_the_secret_executes_nothing(cluster3, tmp_path):
    marker = tmp_path / "pwned-without-secret"
    send_frames(cluster3.nodes["n1"].raft, [frame(forged(marker))] * 3)
    with cluster3.client("n1") as c:
        c.put(b"still", b"serving")
        assert c.get(b"still").found
    assert not marker.exists()


def test_forged_pickle_with_the_secret_is_refused_by_the_whitelist(cluster3, tmp_path):
    marker = tmp_path / "pwned-with-secret"
    with open(cluster3.secret_file) as f:
        secret = f.read().strip()
    token = getEncryptor(secret).encrypt(forged(marker))
    send_frames(cluster3.nodes["n2"].raft, [frame(token)])
    with cluster3.client("n2") as c:
        c.put(b"still", b"serving")
        assert c.get(b"still").found
    assert not marker.exists()
    wait_for(lambda: "forbidden global in pickle: posix.system" in cluster3.nodes["n2"].log(),
             10, "the refusal to be logged")


def test_raft_port_binds_only_the_configured_address(cluster3):
    port = int(cluster3.nodes["n1"].raft.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_multi_node_start_without_a_secret_is_refused(tmp_path):
    raft, grpc_port, other = free_port(), free_port(), free_port()
    result = subprocess.run(
        [PYTHON, "-m", "sealkv.node.cli", "node", "start", "--name", "n1",
         "--data-dir", str(tmp_path / "n1"), "--raft", f"127.0.0.1:{raft}",
         "--grpc", f"127.0.0.1:{grpc_port}",
         "--initial-cluster", f"n1=127.0.0.1:{raft}/127.0.0.1:{grpc_port},"
                              f"n2=127.0.0.1:{other}/127.0.0.1:{free_port()}", "--insecure"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "needs a cluster secret" in result.stderr


def test_secret_file_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-cluster-secret-of-32-bytes-or-more")
    secret.chmod(0o644)
    raft, grpc_port = free_port(), free_port()
    result = subprocess.run(
        [PYTHON, "-m", "sealkv.node.cli", "node", "start", "--name", "n1",
         "--data-dir", str(tmp_path / "n1"), "--raft", f"127.0.0.1:{raft}",
         "--grpc", f"127.0.0.1:{grpc_port}", "--secret-file", str(secret), "--insecure"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"chmod 600 {secret}" in result.stderr


def vm_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_an_oversized_raft_frame_is_dropped_before_it_is_buffered(cluster3):
    node = cluster3.nodes["n1"]
    host, port = node.raft.rsplit(":", 1)
    before = vm_rss_bytes(node.pid)
    offered, sent = 256 * 1024 * 1024, 0
    chunk = os.urandom(1024 * 1024)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(struct.pack("i", 1 << 30))  # announces a 1 GiB frame
            while sent < offered:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
    # The node hung up at the length prefix: what it took is what the kernel buffered.
    assert sent < 32 * 1024 * 1024, f"the node accepted {sent} bytes of a 1 GiB frame"
    wait_for(lambda: "raft port: dropped the connection from 127.0.0.1: a frame of 1073741824 "
             "bytes exceeds" in node.log(), 10, "the drop to be logged")
    grown = vm_rss_bytes(node.pid) - before
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown} bytes"
    with cluster3.client("n1") as c:
        c.put(b"after-flood", b"ok")
        assert c.get(b"after-flood").found


def test_unproven_raft_connections_per_host_are_capped(cluster3):
    node = cluster3.nodes["n2"]
    host, port = node.raft.rsplit(":", 1)
    held = []
    try:
        for _ in range(24):
            held.append(socket.create_connection((host, int(port)), timeout=5))
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except ConnectionError:
                closed += 1
        # At most 16 unproven connections from one host are kept; the rest are closed at once.
        assert closed >= 24 - 16, closed
        wait_for(lambda: "connections from it have not proven the cluster secret" in node.log(),
                 10, "the refusal to be logged")
    finally:
        for s in held:
            s.close()
    with cluster3.client("n2") as c:
        c.put(b"after-hold", b"ok")
        assert c.get(b"after-hold").found
