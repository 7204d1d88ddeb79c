"""Raft under load and after a partition: the rules sealkv enforces around pysyncobj."""
import re
import threading

import pytest

from sealkv.node import errors
from tests.cluster import wait_for

pytestmark = pytest.mark.integration

LOAD_SECONDS = 30
CLIENTS = 64
CHANNELS = 8
# A line a node logs at CRITICAL, or the start of a Python traceback.
BAD_LINE = re.compile(r" CRITICAL |^Traceback \(most recent call last\)", re.MULTILINE)


def bad_lines(node) -> list[str]:
    return [line for line in node.log().splitlines() if BAD_LINE.search(line)]


def test_64_clients_of_puts_leave_no_critical_line_and_no_traceback(cluster3):
    leader = cluster3.wait_leader()
    channels = [cluster3.client(leader, timeout=10) for _ in range(CHANNELS)]
    stop = threading.Event()
    acked = [0] * CLIENTS
    failed = [0] * CLIENTS

    def put_loop(i: int) -> None:
        client, n = channels[i % CHANNELS], 0
        while not stop.is_set():
            try:
                client.put(b"load/%02d/%07d" % (i, n), b"v" * 100)
                acked[i] += 1
            except errors.SealkvError:
                failed[i] += 1
            n += 1

    threads = [threading.Thread(target=put_loop, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    stop.wait(LOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join(15)
    for c in channels:
        c.close()
    assert sum(acked) > CLIENTS, f"only {sum(acked)} puts acknowledged ({sum(failed)} failed)"

    def converged():
        digests = set()
        for node in cluster3.nodes.values():
            with cluster3.client(node.name, timeout=5) as c:
                digests.add(c.digest().digest)
        return len(digests) == 1

    wait_for(converged, 30, "every replica to hold the same data")
    for node in cluster3.nodes.values():
        assert node.alive(), f"{node.name} exited:\n{node.log()[-3000:]}"
        assert bad_lines(node) == [], (f"{node.name} logged CRITICAL lines or tracebacks under "
                                       f"{CLIENTS}-client load:\n{node.log()[-4000:]}")
