"""Closed-loop gRPC load: C clients spread over worker processes.

Each client is a thread that sends one request, waits for the answer and sends the next. The
clients of one worker process share one gRPC channel per endpoint, so a large C is not limited
by a single Python client process. Workers start together at a common monotonic instant
(CLOCK_MONOTONIC is system-wide on Linux) and report raw latencies back to the parent.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable, Optional, Sequence

from sealkv.node.bench.workers import Tally, Workers, timeline
from sealkv.node.bench.workload import KeyPicker, Result, Workload, key_for

CLIENTS_PER_PROCESS = 16
MAX_PROCESSES = 4


def default_processes(clients: int) -> int:
    """Worker processes for `clients` clients: one per 16, at most 4."""
    return max(1, min(MAX_PROCESSES, math.ceil(clients / CLIENTS_PER_PROCESS)))


def run(w: Workload, endpoints: Sequence[str], *, name: str, processes: int = 0,
        prefill: bool = True, progress: Optional[Callable[[float, int], None]] = None,
        files=None) -> Result:
    """Runs `w` against `endpoints` (each client is pinned to one, round-robin).

    `files` are the clients' TLS files (`CertFiles`; None: plaintext, for --insecure nodes).
    """
    w.validate()
    processes = min(w.clients, processes or default_processes(w.clients))
    workers = Workers(w, processes, _worker,
                      lambda ids, p: (w, list(endpoints), ids, p, processes,
                                      prefill and w.op != "put", files))
    try:
        workers.wait_prefilled(120)
        t0 = workers.start()
        workers.wait_until(t0 + w.warmup + w.duration, progress)
        merged = Result(name, clients=w.clients)
        for _ in workers.procs:
            merged.merge(workers.results.get(timeout=w.warmup + w.duration + w.timeout + 60))
        if progress is not None:
            progress(1.0, workers.ops())
        return merged
    finally:
        workers.stop(5)


def _stub_calls(w: Workload, endpoints: list[str], files=None):
    import grpc

    from sealkv.node.client import _OPTIONS
    from sealkv.node.security import tls
    from sealkv.v1 import kv_pb2, kv_pb2_grpc

    stubs = [kv_pb2_grpc.KVStub(tls.channel(e, files, _OPTIONS)) for e in endpoints]
    level = kv_pb2.LINEARIZABLE if w.consistency == "linearizable" else kv_pb2.SERIALIZABLE
    return stubs, kv_pb2, level, grpc


def _worker(w: Workload, endpoints, ids, index, processes, prefill, files, counters, ready,
            start_at, results) -> None:
    stubs, kv_pb2, level, grpc = _stub_calls(w, endpoints, files)
    value = os.urandom(w.value_size)
    if prefill:
        stub = stubs[index % len(stubs)]
        try:
            for i in range(index, w.keyspace, processes):
                stub.Put(kv_pb2.PutRequest(key=key_for(i, w.key_size), value=value),
                         timeout=w.timeout)
        except grpc.RpcError:
            ready.abort()  # the parent's wait fails at once instead of timing out
            raise
    ready.wait()
    ready.wait()
    t0, measure_from, stop_at = timeline(w, start_at)
    out = Result("worker", clients=len(ids))
    lock = threading.Lock()

    def client(cid: int) -> None:
        picker = KeyPicker(w, seed=cid * 7919 + os.getpid())
        stub = stubs[cid % len(stubs)]
        put, get = stub.Put, stub.Get
        tally = Tally(measure_from, stop_at)
        time.sleep(max(0.0, t0 - time.monotonic()))
        while (began := tally.next_start()) is not None:
            try:
                if picker.is_read():
                    get(kv_pb2.GetRequest(key=picker.key(), consistency=level),
                        timeout=w.timeout)
                else:
                    put(kv_pb2.PutRequest(key=picker.key(), value=picker.value(w.value_size)),
                        timeout=w.timeout)
                status = None
            except grpc.RpcError as exc:
                status = exc.code().name
            counters[index] += 1
            tally.record(began, time.monotonic(), status)
        with lock:
            out.merge(tally.result)

    threads = [threading.Thread(target=client, args=(cid,), daemon=True) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)


def progress_bar(label: str) -> Optional[Callable[[float, int], None]]:
    """A progress callback drawing on stderr, or None when stdout is not a terminal."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None

    def draw(fraction: float, ops: int) -> None:
        width = 30
        done = int(width * min(1.0, fraction))
        sys.stderr.write(f"\r{label:<28} [{'#' * done}{'.' * (width - done)}] "
                         f"{fraction * 100:5.1f}% {ops} ops")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return draw
