"""A test harness that runs real sealkv node processes on 127.0.0.1.

Every node is a `python -m sealkv.node.cli node start` process with its own data directory
and ephemeral ports. Clusters serve mutual TLS by default: the harness makes a CA, a node
certificate per node (for its gRPC host) and a `root` admin client under `<base>/pki`, so
forwarding and the capability fan-out run over TLS; `tls=False` starts them --insecure. The harness only ever signals the PIDs it started, and `stop_all()`
(called by the fixtures) kills whatever is left. Waits poll conditions with deadlines.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from sealkv.node import errors
from sealkv.node.cli.local import free_port  # noqa: F401 (tests import it from here)
from sealkv.node.client import Client, health
from sealkv.node.security import pki
from sealkv.node.security.tls import client_kwargs

PYTHON = sys.executable


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Polls `condition` until it returns a truthy value; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (errors.SealkvError, OSError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class NodeProc:
    name: str
    raft: Optional[str]
    grpc: str
    data_dir: str
    log_file: str
    extra_args: list[str] = field(default_factory=list)
    proc: Optional[subprocess.Popen] = None
    # The --initial-cluster it was first started with (None: the cluster's initial members),
    # used again when it restarts: a node added later must be listed in it.
    initial_cluster: Optional[str] = None
    # Set by a test that removed the node from the cluster and stopped it for good.
    retired: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Cluster:
    """N voters (and any learners added later) as real processes."""

    def __init__(self, base_dir: str, size: int = 3, plugins: Optional[list[str]] = None,
                 extra_args: Optional[list[str]] = None, tls: bool = True,
                 ca_from: Optional[str] = None):
        """`ca_from` is another cluster's certificates directory whose CA signs this
        cluster's certificates too (clusters of one test then trust each other's nodes)."""
        self.base_dir = base_dir
        self.secret_file = os.path.join(base_dir, "secret")
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"test-cluster-secret-" + os.urandom(16).hex().encode())
        os.close(fd)
        self.certs_dir: Optional[str] = os.path.join(base_dir, "pki") if tls else None
        if self.certs_dir:
            if ca_from:
                os.makedirs(self.certs_dir, mode=0o700)
                for name in ("ca.crt", "ca.key"):
                    shutil.copy(os.path.join(ca_from, name), self.certs_dir)
            else:
                pki.create_ca(self.certs_dir)
            pki.create_client(self.certs_dir, "root", pki.ROLE_ADMIN)
        self.plugins = plugins or []
        self.extra_args = extra_args or []
        self.nodes: dict[str, NodeProc] = {}
        for i in range(1, size + 1):
            self._define(f"n{i}")
        self.initial = list(self.nodes.values())

    def _define(self, name: str, learner: bool = False) -> NodeProc:
        raft, grpc_address = self.addresses(name)
        node = NodeProc(name, None if learner else raft, grpc_address,
                        os.path.join(self.base_dir, name),
                        os.path.join(self.base_dir, f"{name}.log"), list(self.extra_args))
        if self.certs_dir:
            host = grpc_address.rsplit(":", 1)[0]
            pki.create_node(self.certs_dir, name, list(dict.fromkeys([host, "127.0.0.1"])))
            node.extra_args += ["--certs-dir", self.certs_dir]
        else:
            node.extra_args.append("--insecure")
        self.nodes[name] = node
        return node

    @property
    def tls_files(self) -> Optional[pki.CertFiles]:
        """The `root` (admin) client's TLS files, or None for an --insecure cluster."""
        return pki.client_files(self.certs_dir, "root") if self.certs_dir else None

    def client_files(self, name: str, role: str) -> pki.CertFiles:
        """Creates (once) and returns a client certificate `name` with `role`."""
        files = pki.client_files(self.certs_dir, name)
        if not os.path.exists(files.cert):
            pki.create_client(self.certs_dir, name, role)
        return files

    def cli_env(self) -> dict:
        """SEALKV_CACERT/CERT/KEY of the `root` identity, for CLI runs (empty when insecure)."""
        files = self.tls_files
        if files is None:
            return {}
        return {"SEALKV_CACERT": files.cacert, "SEALKV_CERT": files.cert,
                "SEALKV_KEY": files.key}

    @property
    def client_kwargs(self) -> dict:
        """Client keyword arguments with the `root` admin identity (none when insecure)."""
        return client_kwargs(self.tls_files)

    def healthy(self, name: str) -> bool:
        """Whether the node's gRPC health service says SERVING (as root)."""
        return health(self.nodes[name].grpc, files=self.tls_files)

    def addresses(self, name: str) -> tuple[str, str]:
        """Returns (raft, grpc) addresses for a new node: ephemeral ports on 127.0.0.1."""
        return f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    def launch_prefix(self, node: NodeProc) -> list[str]:
        """Returns what runs before the node's command line (a network namespace, say)."""
        return []

    def initial_cluster(self, members: Optional[list[NodeProc]] = None) -> str:
        members = members if members is not None else self.initial
        return ",".join(f"{n.name}={n.raft or 'learner'}/{n.grpc}" for n in members)

    def start_node(self, name: str, initial: Optional[str] = None,
                   env: Optional[dict] = None) -> NodeProc:
        """Starts node `name`; `env` adds variables to its environment (a test hook)."""
        node = self.nodes[name]
        args = [PYTHON, "-m", "sealkv.node.cli", "node", "start", "--name", name,
                "--data-dir", node.data_dir, "--grpc", node.grpc,
                "--initial-cluster", initial or node.initial_cluster or self.initial_cluster(),
                "--secret-file", self.secret_file, *node.extra_args]
        args += ["--raft", node.raft] if node.raft else ["--learner"]
        if self.plugins:
            args += ["--plugins", ",".join(self.plugins)]
        log = open(node.log_file, "ab")
        node.proc = subprocess.Popen(self.launch_prefix(node) + args, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env} if env else None)
        log.close()
        return node

    def start(self, timeout: float = 30.0) -> "Cluster":
        for node in self.initial:
            self.start_node(node.name)
        self.wait_leader(timeout)
        return self

    def add_node(self, name: str, learner: bool = False, extra_args=None) -> NodeProc:
        """Defines and starts a new node that knows the current members plus itself."""
        node = self._define(name, learner)
        node.extra_args += list(extra_args or [])
        members = [n for n in self.nodes.values() if n.alive() or n is node]
        node.initial_cluster = self.initial_cluster(members)
        self.start_node(name)
        return node

    def client(self, *names: str, timeout: float = 5.0) -> Client:
        nodes = [self.nodes[n] for n in names] if names else list(self.nodes.values())
        return Client([n.grpc for n in nodes], timeout=timeout, **self.client_kwargs)

    def status(self, name: str):
        with Client([self.nodes[name].grpc], timeout=2.0, **self.client_kwargs) as c:
            return c.status()

    def leader(self) -> Optional[str]:
        for node in list(self.nodes.values()):  # a copy: a fault thread may add nodes
            if not node.alive():
                continue
            try:
                s = self.status(node.name)
            except errors.SealkvError:
                continue
            if s.is_leader:
                return s.node_id
        return None

    def wait_leader(self, timeout: float = 30.0, exclude: Optional[str] = None) -> str:
        def found():
            leader = self.leader()
            if leader and leader != exclude:
                # Every live node agrees on who leads.
                views = {self.status(n.name).leader for n in self.nodes.values() if n.alive()}
                return leader if views == {leader} else None
            return None

        return wait_for(found, timeout, "a leader every live node agrees on")

    def wait_applied_everywhere(self, timeout: float = 30.0) -> int:
        """Waits until every live node has applied the leader's commit index; returns it.

        An idle leader tells its followers a new commit index a few milliseconds after it
        applied the entry (with its next AppendEntries), so a follower's applied index lags
        the leader's briefly after every write: a test that compares applied indexes before
        and after a step takes its "before" once this returned.
        """
        def settled():
            leader = self.leader()
            if leader is None:
                return None
            commit = self.status(leader).commit_index
            live = [n.name for n in list(self.nodes.values()) if n.alive()]
            if all(self.status(name).applied_index >= commit for name in live):
                return commit
            return None

        return wait_for(settled, timeout, "every live node to apply the leader's commit index")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[name]
        if node.alive():
            os.kill(node.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                node.proc.wait(timeout=15)

    def restart(self, name: str, timeout: float = 60.0,
                ready: Optional[Callable[[], object]] = None) -> str:
        """One step of a rolling restart: stops `name` (SIGTERM, as an operator does), starts
        it again and waits until it serves, `ready()` (a test's extra condition) holds and
        every live node names one leader; returns that leader.

        Health alone is not enough: a node serves before it has heard from the leader, and
        restarting the next node then could leave a majority without one.
        """
        self.kill(name, signal.SIGTERM)
        self.start_node(name)
        wait_for(lambda: self.healthy(name), timeout, f"{name} serving again")
        if ready is not None:
            wait_for(ready, timeout, f"{name} ready")
        return self.wait_leader(timeout)

    def crash_restart_all(self, timeout: float = 60.0) -> str:
        """Kills every node with SIGKILL, starts them all again, returns the agreed leader."""
        for name in list(self.nodes):
            self.kill(name, signal.SIGKILL)
        for name in list(self.nodes):
            self.start_node(name)
        return self.wait_leader(timeout)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                try:
                    os.kill(node.pid, signal.SIGCONT)
                    os.kill(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.proc.wait(timeout=15)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log()[-4000:]}" for n in self.nodes.values())


@contextlib.contextmanager
def running_cluster(base_dir: str, size: int = 3, **kwargs):
    """Starts a `Cluster` and always kills its processes on the way out."""
    cluster = Cluster(base_dir, size, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop_all()
