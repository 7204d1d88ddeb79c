"""The raft peer wire in a mixed cluster: Fernet and AES-GCM senders, then a rolling flip."""
import pickle
import re
import signal
import socket
import struct

import pytest

from sealkv.node.replication import peer_wire
from tests.cluster import wait_for
from tests.integration.test_security import Touch
from tests.integration.test_failover import assert_all_readable
from tests.load import Writer

pytestmark = pytest.mark.integration


def formats_seen(cluster, reader: str, since: int = 0) -> list:
    """The formats `reader` logged for its peers' connections, in order (from log offset
    `since`: the log file is kept across restarts)."""
    return re.findall(r"raft port: \S+ sends (\w+) frames", cluster.nodes[reader].log()[since:])


def restart(cluster, name: str, wire: str) -> None:
    node = cluster.nodes[name]
    cluster.kill(name, signal.SIGTERM)
    node.extra_args = [a for a in node.extra_args if not a.startswith("--peer-wire")]
    node.extra_args.append(f"--peer-wire={wire}")
    mark = len(node.log())
    cluster.start_node(name)
    wait_for(lambda: re.search(r"raft port: \S+ sends \w+ frames", node.log()[mark:]), 30,
             f"{name} to talk to a peer again")


def test_a_mixed_cluster_stays_consistent_through_a_rolling_switch_to_gcm(make_cluster):
    cluster = make_cluster(3, start=False)
    cluster.nodes["n1"].extra_args.append("--peer-wire=fernet")
    for name in ("n2", "n3"):
        cluster.nodes[name].extra_args.append("--peer-wire=gcm")
    cluster.start()
    with Writer(cluster.client(timeout=5), b"wire/") as writer:
        writer.wait_acked(30)
        # Every node hears both formats from the right peers: n1 gets GCM from n2 and n3,
        # they get Fernet from n1 and GCM from each other.
        wait_for(lambda: formats_seen(cluster, "n1").count("gcm") >= 2, 20,
                 "n1 to receive GCM from both peers")
        for name in ("n2", "n3"):
            wait_for(lambda: {"fernet", "gcm"} <= set(formats_seen(cluster, name)), 20,
                     f"{name} to receive Fernet from n1 and GCM from its other peer")
        assert "fernet" not in formats_seen(cluster, "n1")
        # The second pass of the upgrade: n1 (and, for the restart, n2) send GCM.
        marks = {name: len(cluster.nodes[name].log()) for name in ("n2", "n3")}
        for name in ("n1", "n2"):
            count = len(writer.acked)
            restart(cluster, name, "gcm")
            cluster.wait_leader(30)
            writer.wait_acked(count + 20)
    assert writer.acked
    for node in cluster.nodes.values():
        assert "dropped the connection" not in node.log(), node.log()[-4000:]
    # After the flip nobody sends Fernet: every connection made since is GCM.
    assert set(formats_seen(cluster, "n1")) == {"gcm"}
    for name in ("n2", "n3"):
        assert set(formats_seen(cluster, name, marks[name])) == {"gcm"}
    assert_all_readable(cluster, writer.acked, ["n1", "n2", "n3"])


def exchange(address: str, frames: list) -> None:
    """Sends `frames` on one connection to a raft port, reading what the node answers."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(1)
        try:
            for frame in frames:
                s.sendall(struct.pack("i", len(frame)) + frame)
                s.recv(65536)
        except (socket.timeout, ConnectionError):
            pass


def test_the_raft_port_refuses_bad_peer_wire_frames_and_says_why(cluster3, tmp_path):
    with open(cluster3.secret_file) as f:
        root = peer_wire.root_key(f.read().strip())
    node = cluster3.nodes["n1"]
    stranger = peer_wire.FrameSealer(peer_wire.root_key("another-secret" * 3),
                                     peer_wire.ROLE_DIALER)
    exchange(node.raft, [stranger.seal(pickle.dumps(b"k" * 32))])
    sealer = peer_wire.FrameSealer(root, peer_wire.ROLE_DIALER)
    first = sealer.seal(pickle.dumps(b"k" * 32))  # pysyncobj's first message: a random key
    exchange(node.raft, [first, first])  # replayed on its own connection
    marker = tmp_path / "pwned-over-gcm"
    forged = pickle.dumps(Touch(marker))
    exchange(node.raft, [peer_wire.FrameSealer(root, peer_wire.ROLE_DIALER).seal(forged)])
    for reason in ("a peer-wire frame failed authentication",
                   "a second hello frame on one connection",
                   "forbidden global in pickle: posix.system"):
        wait_for(lambda: reason in node.log(), 10, f"{reason!r} to be logged")
    assert "raft port: dropped the connection from 127.0.0.1: a peer-wire frame failed" \
        in node.log()
    assert not marker.exists()
    with cluster3.client("n1") as c:
        c.put(b"still", b"serving")
        assert c.get(b"still").found
