"""A local 3-member etcd cluster for `sealkv bench compare --etcd` (stopped and removed on exit).

Uses the `etcd` binary on PATH (Debian: `apt-get install -y etcd-server`) with its default
flags (the write-ahead log is fsynced), plaintext on 127.0.0.1 with ephemeral ports, in a
temporary directory. The load generator drives it through `sealkv.v1.etcd_kv_pb2` (etcd's
KV Put/Range messages). Only the processes started here are ever signalled.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

MISSING = ("etcd is not installed: the etcd rows need the `etcd` binary on PATH "
           "(Debian/Ubuntu: apt-get install -y etcd-server)")


class EtcdMissing(RuntimeError):
    """No etcd binary on PATH."""


def etcd_binary() -> str:
    """Returns the path of `etcd`; raises EtcdMissing (naming the package) when absent."""
    path = shutil.which("etcd")
    if path is None:
        raise EtcdMissing(MISSING)
    return path


class EtcdCluster:
    """`size` etcd members on loopback, as real processes."""

    def __init__(self, size: int = 3):
        from sealkv.node.cli.local import free_port

        self.binary = etcd_binary()
        self.base = tempfile.mkdtemp(prefix="sealkv-bench-etcd-")
        self.members = [(f"e{i}", free_port(), free_port()) for i in range(1, size + 1)]
        self.procs: list[subprocess.Popen] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{client}" for _, client, _ in self.members]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "EtcdCluster":
        initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in self.members)
        try:
            for name, client, peer in self.members:
                log = open(os.path.join(self.base, f"{name}.log"), "ab")
                self.procs.append(subprocess.Popen(
                    [self.binary, "--name", name, "--data-dir", os.path.join(self.base, name),
                     "--listen-client-urls", f"http://127.0.0.1:{client}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--initial-cluster-token", "sealkv-bench"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL))
                log.close()
            self.leader_endpoint(timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.base, ignore_errors=True)

    def leader_endpoint(self, timeout: float = 10.0) -> str:
        """Returns the client endpoint of the member whose /metrics says it leads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for endpoint in self.endpoints:
                try:
                    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=1) as r:
                        text = r.read().decode()
                except OSError:
                    continue
                if re.search(r"^etcd_server_is_leader 1(\.0)?$", text, re.M):
                    return endpoint
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"an etcd member exited with code {proc.returncode}; "
                                       f"its log is in {self.base}")
            time.sleep(0.2)
        raise RuntimeError("the etcd cluster elected no leader in time")
