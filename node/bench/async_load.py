"""Closed-loop load from asyncio callers: C callers spread over a few worker processes.

Each caller sends one request, waits for its answer and sends the next. A worker process runs
its callers on one event loop, which costs far less client CPU per request than a thread per
client: the load generator leaves the cores to the nodes it measures. Modes:

- `batched`: one `AsyncClient` per worker; its callers share one Batch stream per endpoint.
- `unary`: the same client with `batching=False` (one RPC per request).
- `etcd`: raw `etcdserverpb.KV` Put/Range stubs against etcd members (the same load shape).

Callers are pinned to endpoints round-robin. Workers start together at a common monotonic
instant (CLOCK_MONOTONIC is system-wide on Linux) and report their latencies and the CPU they
used during the measured window; the parent reads the servers' CPU (by PID, from /proc) over
the same window, so a result carries client and server CPU per operation.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Callable, Optional, Sequence

from sealkv.node.bench.workers import Tally, Workers, timeline
from sealkv.node.bench.workload import KeyPicker, Result, Workload, key_for

MODES = ("batched", "unary", "etcd")
CALLERS_PER_PROCESS = 32
MAX_PROCESSES = 4
# A worker busier than this share of one core is the bottleneck, not the server.
SATURATED = 0.85
# Seconds of no load over which the servers' background CPU is measured (ticks, heartbeats).
IDLE_WINDOW = 1.0


def default_processes(clients: int) -> int:
    """Worker processes for `clients` callers: one per 32, at most 4."""
    return max(1, min(MAX_PROCESSES, math.ceil(clients / CALLERS_PER_PROCESS)))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(w: Workload, endpoints: Sequence[str], *, name: str, mode: str = "batched",
        processes: int = 0, prefill: bool = True, server_pids: Sequence[int] = (),
        client_kwargs: Optional[dict] = None,
        progress: Optional[Callable[[float, int], None]] = None) -> Result:
    """Runs `w` against `endpoints`; returns the merged result with CPU per operation.

    `server_pids` are the processes whose CPU counts as server CPU (e.g. the three nodes);
    `client_kwargs` go to `AsyncClient` (cacert=, cert=, key=).
    """
    w.validate()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    processes = min(w.clients, processes or default_processes(w.clients))
    workers = Workers(w, processes, _worker,
                      lambda ids, p: (w, mode, list(endpoints), dict(client_kwargs or {}), ids,
                                      p, processes, prefill and w.op != "put"))
    try:
        workers.wait_prefilled(180)
        idle = 0.0
        if server_pids:  # what the servers burn with no load at all, per second
            idle0 = sum(process_cpu(pid) for pid in server_pids)
            time.sleep(IDLE_WINDOW)
            idle = (sum(process_cpu(pid) for pid in server_pids) - idle0) / IDLE_WINDOW
        t0 = workers.start()
        measure_from = t0 + w.warmup
        end = measure_from + w.duration
        workers.wait_until(measure_from, progress)
        server0 = sum(process_cpu(pid) for pid in server_pids)
        workers.wait_until(end, progress)
        server1 = sum(process_cpu(pid) for pid in server_pids)
        merged = Result(name, clients=w.clients)
        busiest = 0.0
        for _ in workers.procs:
            part, cpu = workers.results.get(timeout=w.duration + w.timeout + 60)
            merged.merge(part)
            merged.client_cpu += cpu
            busiest = max(busiest, cpu / w.duration)
        merged.server_cpu = server1 - server0 if server_pids else 0.0
        merged.server_idle_cpu = idle * w.duration
        merged.client_busiest = busiest
        if busiest >= SATURATED:
            merged.note = (f"client side saturated: a load worker used {busiest:.0%} of a "
                           f"core; rerun with more --processes (the figures under-report)")
        if progress is not None:
            progress(1.0, workers.ops())
        return merged
    finally:
        workers.stop(10)


def _worker(w: Workload, mode, endpoints, client_kwargs, ids, index, processes, prefill,
            counters, ready, start_at, results) -> None:
    asyncio.run(_worker_main(w, mode, endpoints, client_kwargs, ids, index, processes, prefill,
                             counters, ready, start_at, results))


class _Calls:
    """put(endpoint, key, value) and get(endpoint, key) coroutines for one mode."""

    def __init__(self, w: Workload, mode: str, endpoints: list[str], client_kwargs: dict):
        self.timeout = w.timeout
        self.serializable = w.consistency == "serializable"
        if mode == "etcd":
            from sealkv.node.security import tls
            from sealkv.v1 import etcd_kv_pb2, etcd_kv_pb2_grpc

            self._pb = etcd_kv_pb2
            self._channels = [tls.aio_channel(e, None) for e in endpoints]  # etcd: plaintext
            self._stubs = {e: etcd_kv_pb2_grpc.KVStub(ch)
                           for e, ch in zip(endpoints, self._channels)}
            self.put, self.get = self._etcd_put, self._etcd_get
            self._client = None
        else:
            from sealkv.node.client import LINEARIZABLE, SERIALIZABLE, AsyncClient

            self._client = AsyncClient(endpoints, timeout=w.timeout,
                                       batching=mode == "batched", **client_kwargs)
            self._level = SERIALIZABLE if self.serializable else LINEARIZABLE
            self.put, self.get = self._sealkv_put, self._sealkv_get

    async def _sealkv_put(self, endpoint, key, value):
        await self._client.put(key, value, endpoint=endpoint)

    async def _sealkv_get(self, endpoint, key):
        await self._client.get(key, consistency=self._level, endpoint=endpoint)

    async def _etcd_put(self, endpoint, key, value):
        await self._stubs[endpoint].Put(self._pb.PutRequest(key=key, value=value),
                                        timeout=self.timeout)

    async def _etcd_get(self, endpoint, key):
        await self._stubs[endpoint].Range(
            self._pb.RangeRequest(key=key, serializable=self.serializable), timeout=self.timeout)

    async def close(self):
        if self._client is not None:
            await self._client.close()
        else:
            for ch in self._channels:
                await ch.close()


def _status_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        return code().name
    if code is not None:  # SealkvError
        return code.name
    return type(exc).__name__


async def _worker_main(w: Workload, mode, endpoints, client_kwargs, ids, index, processes,
                       prefill, counters, ready, start_at, results) -> None:
    calls = _Calls(w, mode, endpoints, client_kwargs)
    value = os.urandom(w.value_size)
    try:
        if prefill:
            keys = [key_for(i, w.key_size) for i in range(index, w.keyspace, processes)]
            for i in range(0, len(keys), 64):
                await asyncio.gather(*(calls.put(endpoints[0], k, value)
                                       for k in keys[i:i + 64]))
    except Exception:
        ready.abort()  # the parent's wait fails at once instead of timing out
        raise
    await asyncio.to_thread(ready.wait)
    await asyncio.to_thread(ready.wait)
    t0, measure_from, stop_at = timeline(w, start_at)
    out = Result("worker", clients=len(ids))
    loop = asyncio.get_running_loop()

    async def caller(cid: int) -> None:
        picker = KeyPicker(w, seed=cid * 7919 + os.getpid())
        endpoint = endpoints[cid % len(endpoints)]
        tally = Tally(measure_from, stop_at)
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        while (began := tally.next_start()) is not None:
            try:
                if picker.is_read():
                    await calls.get(endpoint, picker.key())
                else:
                    await calls.put(endpoint, picker.key(), picker.value(w.value_size))
                status = None
            except Exception as exc:
                status = _status_name(exc)
            counters[index] += 1
            tally.record(began, time.monotonic(), status)
        out.merge(tally.result)

    async def cpu_window() -> float:
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        c0 = time.process_time()
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        return time.process_time() - c0

    window = loop.create_task(cpu_window())
    await asyncio.gather(*(caller(cid) for cid in ids))
    cpu = await window
    await calls.close()
    results.put((out, cpu))
