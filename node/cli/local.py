"""The local cluster record (`<data-dir>/cluster.json`) and its node processes.

`sealkv cluster up` writes the record; `cluster down` and the endpoint default read it. Only
processes listed in the record, whose command line still names their data directory, are
ever signalled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from sealkv.node.security import pki
from sealkv.node.security.pki import CertFiles

DEFAULT_DIR = ".sealkv"
RECORD = "cluster.json"
ROOT_CLIENT = "root"


@dataclass
class LocalNode:
    name: str
    raft: str
    grpc: str
    data_dir: str
    log_file: str
    pid: int = 0
    metrics: str = ""  # HOST:PORT of the node's metrics and /health listener


@dataclass
class LocalCluster:
    data_dir: str
    secret_file: str
    nodes: list[LocalNode] = field(default_factory=list)
    kek_file: Optional[str] = None
    kek_provider: Optional[str] = None
    kek_options: dict[str, str] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    fsync: str = "always"
    peer_wire: Optional[str] = None  # every node's --peer-wire (None: the node's default)
    # <data-dir>/pki: the CA, one node certificate per node and the `root` admin client.
    certs_dir: Optional[str] = None
    insecure: bool = False

    @property
    def endpoints(self) -> list[str]:
        return [n.grpc for n in self.nodes]

    def client_files(self) -> Optional[CertFiles]:
        """The `root` (admin) client's TLS files, or None for an --insecure cluster."""
        if self.insecure or not self.certs_dir:
            return None
        return pki.client_files(self.certs_dir, ROOT_CLIENT)

    def node_tls_args(self, node: "LocalNode") -> list[str]:
        """The `node start` flags of `node`'s transport security."""
        if self.insecure or not self.certs_dir:
            return ["--insecure"]
        return ["--certs-dir", self.certs_dir]

    def save(self, directory: Optional[str] = None) -> None:
        """Writes the record into `directory` (default: its own data directory)."""
        path = os.path.join(directory or self.data_dir, RECORD)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, data_dir: str) -> Optional["LocalCluster"]:
        try:
            with open(os.path.join(data_dir, RECORD)) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        raw["nodes"] = [LocalNode(**n) for n in raw["nodes"]]
        return cls(**raw)


def define_nodes(data_dir: str, count: int, base_port: Optional[int]) -> list[LocalNode]:
    """The nodes n1..nN of a local cluster in `data_dir`: raft ports from `base_port`, gRPC
    from `base_port`+100 and metrics from `base_port`+200 (free ports when None)."""
    nodes = []
    for i in range(1, count + 1):
        raft = base_port + 2 * (i - 1) if base_port else free_port()
        grpc_port = base_port + 100 + 2 * (i - 1) if base_port else free_port()
        metrics = base_port + 200 + 2 * (i - 1) if base_port else free_port()
        nodes.append(LocalNode(f"n{i}", f"127.0.0.1:{raft}", f"127.0.0.1:{grpc_port}",
                               os.path.join(data_dir, f"n{i}"),
                               os.path.join(data_dir, f"n{i}.log"),
                               metrics=f"127.0.0.1:{metrics}"))
    return nodes


# Ports handed out by this process, so that one cluster never gets the same port twice.
_HANDED_OUT: set[int] = set()
# Where to look below the kernel's ephemeral range (and above the well-known ports).
_LOWEST_PORT = 10000


def free_port() -> int:
    """Returns a port that was free on 127.0.0.1 a moment ago, chosen below the kernel's
    ephemeral range: a port from that range can be taken by any outgoing connection as its
    source port while a node is down, and the node then cannot bind it when it restarts."""
    top = _ephemeral_low()
    for _ in range(200):
        port = secrets.randbelow(top - _LOWEST_PORT) + _LOWEST_PORT if top > _LOWEST_PORT else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free port on 127.0.0.1")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it is unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def write_secret(path: str, nbytes: int = 32) -> None:
    """Creates `path` (mode 0600, exclusive) holding a fresh random secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(nbytes) + "\n")


def make_pki(certs_dir: str, nodes: list[tuple[str, str]]) -> None:
    """Creates a CA, a certificate per (name, host) node and the `root` admin client."""
    pki.create_ca(certs_dir)
    for name, host in nodes:
        pki.create_node(certs_dir, name, list(dict.fromkeys([host, "localhost", "127.0.0.1"])))
    pki.create_client(certs_dir, ROOT_CLIENT, pki.ROLE_ADMIN)


def is_our_process(node: LocalNode) -> bool:
    """Whether node.pid is alive and is the sealkv node of node.data_dir."""
    if node.pid <= 0:
        return False
    try:
        with open(f"/proc/{node.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"start" in argv and os.fsencode(node.data_dir) in argv


def spawn(node: LocalNode, args: list[str]) -> int:
    """Starts one node in the background, its output going to node.log_file; returns the pid."""
    os.makedirs(node.data_dir, mode=0o700, exist_ok=True)
    log = open(node.log_file, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "sealkv.node.cli", "node", "start",
                             *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    log.close()
    # The child's /proc/PID/cmdline reads empty for a moment after Popen returns (until its
    # exec is visible): wait for it, so `is_our_process` never calls a starting node "exited"
    # (and `cluster down` never leaves one running). No event tells it; poll, bounded.
    starting = dataclasses.replace(node, pid=proc.pid)
    deadline = time.monotonic() + 10
    while not is_our_process(starting) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.pid


def stop_process(node: LocalNode, timeout: float = 10.0) -> str:
    """Stops one recorded node by PID (SIGTERM, then SIGKILL); says what happened."""
    if not is_our_process(node):
        return "not running"
    os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_our_process(node):
            return "stopped"
        time.sleep(0.05)
    os.kill(node.pid, signal.SIGKILL)
    return "killed after no exit within {:.0f}s".format(timeout)
