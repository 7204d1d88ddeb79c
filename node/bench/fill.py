"""`sealkv bench fill`: a large dataset into a fresh local cluster, then a full restart.

Writes `keys` distinct keys of `value_size` bytes through the KV Batch stream (worker
processes, each with one stream and a window of requests in flight) into a fresh 3-node local
cluster, for at most `max_seconds`. Meanwhile it samples the nodes' resident memory (anonymous
and file-backed separately: LMDB's pages are file-backed page cache, the heap is anonymous)
at each quarter of the fill. Then it stops every node (SIGTERM), starts them again and times
how long until every node serves and a linearizable read answers, reading what each node
replayed from its status, and checks a sample of keys on every node.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

KEY_FORMAT = b"fill/%010d"


@dataclass
class FillSettings:
    keys: int = 1_000_000
    value_size: int = 1024
    processes: int = 2
    batch: int = 256
    window: int = 1024
    max_seconds: float = 1800.0
    nodes: int = 3
    sample: int = 1000


def rss(pid: int) -> dict:
    """Resident memory of a process in bytes: total, anonymous and file-backed."""
    out = {"rss": 0, "anon": 0, "file": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                key = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}.get(name)
                if key:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _worker(endpoint: str, first: int, last: int, s: FillSettings, acked, failed, by_code,
            stop_at: float, files=None):
    import grpc

    from sealkv.node.security import tls
    from sealkv.v1 import kv_pb2, kv_pb2_grpc

    value = os.urandom(s.value_size)
    channel = tls.channel(endpoint, files, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = kv_pb2_grpc.KVStub(channel)
    cond = threading.Condition()
    state = {"outstanding": 0, "sent_all": False}

    def requests():
        next_id = first
        while next_id < last and time.monotonic() < stop_at:
            with cond:
                while state["outstanding"] + s.batch > s.window:
                    cond.wait(1.0)
                n = min(s.batch, last - next_id)
                state["outstanding"] += n
            yield kv_pb2.BatchRequest(requests=[
                kv_pb2.RequestOp(id=i, timeout_ms=30000,
                                 put=kv_pb2.PutRequest(key=KEY_FORMAT % i, value=value))
                for i in range(next_id, next_id + n)])
            next_id += n
        with cond:
            state["sent_all"] = True
            while state["outstanding"] > 0 and time.monotonic() < stop_at + 60:
                cond.wait(1.0)

    try:
        for response in stub.Batch(requests()):
            ok = sum(1 for op in response.responses if op.status.code == 0)
            with by_code.get_lock():
                for op in response.responses:
                    if op.status.code:
                        by_code[min(op.status.code, 16)] += 1
            with acked.get_lock():
                acked.value += ok
            with failed.get_lock():
                failed.value += len(response.responses) - ok
            with cond:
                state["outstanding"] -= len(response.responses)
                cond.notify_all()
                if state["sent_all"] and state["outstanding"] <= 0:
                    break
    except grpc.RpcError:
        pass
    finally:
        channel.close()


def fill(endpoint: str, pids: list[int], s: FillSettings,
         log: Callable[[str], None], files=None) -> dict:
    """Fills through `endpoint` (as the client of TLS `files`; None: plaintext); returns the
    rate and the memory samples."""
    ctx = mp.get_context("spawn")
    acked, failed, by_code = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Array("q", 17)
    start = time.monotonic()
    stop_at = start + s.max_seconds
    per = -(-s.keys // s.processes)
    workers = [ctx.Process(target=_worker, args=(endpoint, i * per, min(s.keys, (i + 1) * per),
                                                 s, acked, failed, by_code, stop_at, files),
                           daemon=True)
               for i in range(s.processes)]
    for w in workers:
        w.start()
    samples = []
    marks = [s.keys * q // 4 for q in (1, 2, 3)]
    while any(w.is_alive() for w in workers):
        time.sleep(1.0)
        done = acked.value + failed.value  # answered, either way
        if marks and done >= marks[0]:
            marks.pop(0)
            samples.append(_sample(done, start, pids))
            log(f"fill: {done} keys in {time.monotonic() - start:.0f}s")
    for w in workers:
        w.join(5)
    elapsed = time.monotonic() - start
    samples.append(_sample(acked.value, start, pids))
    import grpc

    names = {c.value[0]: c.name for c in grpc.StatusCode}
    return {"keys_acked": acked.value, "keys_failed": failed.value,
            "failed_by_status": {names.get(i, str(i)): n for i, n in enumerate(by_code) if n},
            "seconds": round(elapsed, 1), "keys_per_second": round(acked.value / elapsed, 1),
            "memory": samples}


def _sample(done: int, start: float, pids: list[int]) -> dict:
    per_node = [rss(pid) for pid in pids]
    return {"keys": done, "at_seconds": round(time.monotonic() - start, 1),
            "max_rss": max(m["rss"] for m in per_node),
            "max_anon": max(m["anon"] for m in per_node),
            "max_file": max(m["file"] for m in per_node)}


def run(s: FillSettings, log: Callable[[str], None] = lambda m: None) -> dict:
    """The whole benchmark on a fresh local cluster (removed afterwards)."""
    from sealkv.node.bench.compare import LocalNodeCluster, leader_endpoint
    from sealkv.node.cli.cluster_cmd import _node_args, _wait_ready
    from sealkv.node.client import Client
    from sealkv.v1 import kv_pb2

    with LocalNodeCluster(nodes=s.nodes, encryption=False) as cluster:
        record = cluster.record
        leader = cluster.leader_endpoint()
        log(f"cluster of {s.nodes} up; filling {s.keys} keys of {s.value_size} B via {leader}")
        report = {"settings": vars(s), "fill": fill(leader, [n.pid for n in record.nodes], s,
                                                     log, cluster.files)}
        db_bytes = {n.name: _dir_bytes(os.path.join(n.data_dir, "db")) for n in record.nodes}
        report["db_file_bytes"] = db_bytes
        report["journal_and_dump_bytes"] = {n.name: _dir_bytes(os.path.join(n.data_dir, "raft"))
                                            for n in record.nodes}
        log("stopping every node (SIGTERM), then restarting")
        for n in record.nodes:
            cluster.local.stop_process(n, timeout=60)
            _wait_unlocked(n.data_dir, 30)
        started = time.monotonic()
        for n in record.nodes:
            n.pid = cluster.local.spawn(n, _node_args(record, n))
        record.save()
        _wait_ready(record, 600)
        with Client(record.endpoints, timeout=30, **cluster.client_kwargs) as client:
            client.get(b"fill/probe")
            restart = time.monotonic() - started
            statuses = {n.name: client.status(endpoint=n.grpc) for n in record.nodes}
            # Keys are sampled over every requested key: a failed request may or may not have
            # written its key (DEADLINE_EXCEEDED is "outcome unknown").
            keys = random.Random(7).sample(range(s.keys), min(s.sample, s.keys))
            missing = 0
            for n in record.nodes:
                for i in keys:
                    r = client.get(KEY_FORMAT % i, consistency=kv_pb2.SERIALIZABLE,
                                   endpoint=n.grpc)
                    missing += not r.found
        report["restart"] = {
            "seconds_until_all_serve_and_a_linearizable_read": round(restart, 1),
            "nodes": {name: {"db_applied_index_at_start": st.db_applied_index_at_start,
                             "replayed_at_start": st.replayed_at_start,
                             "db_size_in_use": st.db_size_in_use}
                      for name, st in statuses.items()},
            "memory_after": [dict(rss(n.pid), node=n.name) for n in record.nodes],
            "sampled_keys_missing": missing, "sampled_keys": len(keys) * len(record.nodes)}
        return report


def _wait_unlocked(data_dir: str, timeout: float) -> None:
    """Waits until no process holds the data directory's lock (an exiting node may still hold
    it after its command line is gone)."""
    import fcntl

    deadline = time.monotonic() + timeout
    fd = os.open(os.path.join(data_dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{data_dir} is still locked {timeout:.0f}s after its "
                                       "node was stopped") from None
                time.sleep(0.05)
    finally:
        os.close(fd)


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total
