"""Test hosts in network namespaces, and partitions between them.

Each node of a fault run gets its own network namespace with one veth interface on a bridge
in the root namespace, all in a /24 of the 10.213.0.0/16 range that exists only inside this
sandbox (no traffic leaves the machine). The harness's clients live in the root namespace
and reach every node through the bridge.

A partition is made with routes inside the namespaces: for every pair of hosts on different
sides, each side gets a `blackhole` route to the other's address, so packets between them
are silently dropped (established TCP connections stall and time out, as in a real network
split) while the clients still reach every node. Healing deletes those routes.

Only iproute2 is needed (no iptables or tc, which this kernel lacks). Creating namespaces
needs root; `Network.available()` says whether this machine allows it.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import random
import subprocess

PREFIX = "skv"
# Each live `Network` holds an exclusive lock on LOCK_DIR/<tag>: the machine is shared, and a
# run must never delete the namespaces of another run that is still going.
LOCK_DIR = "/tmp/sealkv-netns-locks"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=10)


class Network:
    """A bridge plus one namespace per host; partitions by blackhole routes."""

    _made = itertools.count()

    def __init__(self, rng: random.Random):
        # Unique within this process: a network deleted a moment ago may still hold its
        # interface names (the kernel frees a namespace's veths asynchronously).
        self.tag = f"{os.getpid() % 10000:04d}{next(Network._made) % 100:02d}"
        rng.randrange(100)  # drawn as before, so every seed keeps its fault schedule
        self.subnet = rng.randrange(1, 250)
        self.bridge = f"{PREFIX}b{self.tag}"
        self.hosts: dict[str, str] = {}      # name -> ip
        self.namespaces: dict[str, str] = {}  # name -> netns
        self.blocked: set[tuple[str, str]] = set()
        os.makedirs(LOCK_DIR, exist_ok=True)
        self._lock = open(os.path.join(LOCK_DIR, self.tag), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.213.{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether namespaces and bridges can be made here (root, iproute2, kernel support)."""
        if os.geteuid() != 0:
            return False, "network namespaces need root"
        probe = f"{PREFIX}probe{os.getpid() % 100000}"
        try:
            _ip("netns", "add", probe)
            _ip("netns", "del", probe)
            _ip("link", "add", probe[:15], "type", "bridge")
            _ip("link", "del", probe[:15])
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"cannot create network namespaces here: {exc}"
        return True, ""

    @staticmethod
    def remove_leftovers() -> list[str]:
        """Deletes namespaces and bridges an interrupted run left behind.

        Other runs may be going on this machine: a tag whose lock is still held belongs to a
        live `Network` and is left alone. Returns what it deleted.
        """
        removed = []
        stale: dict[str, bool] = {}

        def is_stale(tag: str) -> bool:
            if tag not in stale:
                stale[tag] = _lock_is_free(tag)
            return stale[tag]

        listing = _ip("netns", "list", check=False).stdout.split("\n")
        for line in listing:
            ns = line.split(" ", 1)[0]
            if ns.startswith(PREFIX) and is_stale(ns[len(PREFIX):len(PREFIX) + TAG_LENGTH]):
                _ip("netns", "del", ns, check=False)
                removed.append(ns)
        for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.split("\n"):
            parts = line.split(": ")
            if len(parts) > 1 and parts[1].startswith(PREFIX + "b"):
                name = parts[1].split("@")[0]
                if is_stale(name[len(PREFIX) + 1:len(PREFIX) + 1 + TAG_LENGTH]):
                    _ip("link", "del", name, check=False)
                    removed.append(parts[1])
        return removed

    def add_host(self, name: str) -> str:
        """Creates the namespace of host `name`; returns its IP address."""
        index = len(self.hosts) + 1
        ns = f"{PREFIX}{self.tag}{name}"
        veth = f"{PREFIX}v{self.tag}{index}"[:15]
        ip = f"10.213.{self.subnet}.{index}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = ip
        self.namespaces[name] = ns
        return ip

    def exec_prefix(self, name: str) -> list[str]:
        """The command prefix that runs a program inside host `name`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[name]]

    def partition(self, *sides: set[str]) -> None:
        """Cuts every link between hosts on different sides (hosts not named stay linked)."""
        for a_side, b_side in itertools.combinations(sides, 2):
            for a in a_side:
                for b in b_side:
                    self._block(a, b)
                    self._block(b, a)

    def _block(self, src: str, dst: str) -> None:
        if (src, dst) in self.blocked:
            return
        _ip("-n", self.namespaces[src], "route", "add", "blackhole", f"{self.hosts[dst]}/32")
        self.blocked.add((src, dst))

    def heal(self) -> None:
        """Removes every partition."""
        for src, dst in sorted(self.blocked):
            _ip("-n", self.namespaces[src], "route", "del", "blackhole",
                f"{self.hosts[dst]}/32", check=False)
        self.blocked.clear()

    def close(self) -> None:
        """Deletes the namespaces and the bridge (their veths go with them)."""
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.namespaces.clear()
        self._lock.close()  # releases the lock: what is left of this tag is stale now


TAG_LENGTH = 6  # `Network.tag`: 4 digits of the pid, 2 of a per-process counter


def _lock_is_free(tag: str) -> bool:
    """Whether `tag` has a lock no live `Network` holds (a run that died releases it). A tag
    without a lock file may belong to a live run of an older harness: it is left alone."""
    path = os.path.join(LOCK_DIR, tag)
    if not os.path.exists(path):
        return False
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except OSError:
        return True
