"""The closed-loop harness both load generators share (`grpc_load`, `async_load`).

`Workers` starts the worker processes of one run and lines them up: each worker prefills its
share of the keyspace, waits at the barrier, waits again for the common start instant the
parent sets (CLOCK_MONOTONIC is system-wide on Linux), runs its callers and puts one result
on the queue. `Tally` is one caller's count of what it did inside the measured window.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Callable, Optional

from sealkv.node.bench.workload import Result, Workload

_START_SLACK = 0.5


class Workers:
    """The worker processes of one run (parent side).

    `target(*args(ids, index), counters, ready, start_at, results)` runs in each spawned
    process: `ids` are the caller ids it owns (round-robin), `index` its slot in `counters`
    (operations done so far, for the progress bar). It calls `ready.wait()` twice (prefilled,
    then started; `ready.abort()` when it cannot prefill), and puts one result on `results`.
    """

    def __init__(self, w: Workload, processes: int, target: Callable,
                 args: Callable[[list[int], int], tuple]):
        ctx = mp.get_context("spawn")
        self.w = w
        self.t0 = 0.0  # the common start instant, once `start` set it
        self.counters = ctx.Array("q", processes, lock=False)
        self.ready = ctx.Barrier(processes + 1)
        self.start_at = ctx.Value("d", 0.0, lock=False)
        self.results = ctx.Queue()
        self.procs = []
        for p in range(processes):
            ids = list(range(p, w.clients, processes))
            proc = ctx.Process(target=target, name=f"bench-worker-{p}", daemon=True,
                               args=(*args(ids, p), self.counters, self.ready, self.start_at,
                                     self.results))
            proc.start()
            self.procs.append(proc)

    def wait_prefilled(self, timeout: float) -> None:
        """Waits until every worker has prefilled; raises RuntimeError when one could not."""
        try:
            self.ready.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            raise RuntimeError("a worker could not prefill the keyspace (is the cluster "
                               "up?)") from None

    def start(self) -> float:
        """Sets the common start instant, releases the workers and returns the instant."""
        self.start_at.value = self.t0 = time.monotonic() + _START_SLACK
        self.ready.wait(timeout=30)
        return self.t0

    def wait_until(self, t: float, progress: Optional[Callable[[float, int], None]]) -> None:
        """Sleeps until the monotonic instant `t`; meanwhile calls `progress(share of warm-up
        and window elapsed, operations so far)` every 0.2 s when it is given."""
        while True:
            now = time.monotonic()
            if now >= t:
                return
            if progress is not None:
                progress(max(0.0, now - self.t0) / (self.w.warmup + self.w.duration), self.ops())
            time.sleep(min(0.2, t - now))

    def ops(self) -> int:
        """Operations the workers have done so far (measured or not)."""
        return int(sum(self.counters))

    def stop(self, timeout: float) -> None:
        """Joins every worker, killing one still alive after `timeout` seconds."""
        for proc in self.procs:
            proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()


def timeline(w: Workload, start_at) -> tuple[float, float, float]:
    """(start instant, start of the measured window, its end) once the parent released the
    workers (worker side, after the second `ready.wait()`)."""
    t0 = start_at.value
    return t0, t0 + w.warmup, t0 + w.warmup + w.duration


class Tally:
    """What one caller did: operations that began after `measure_from` and ended before
    `stop_at` count into `result` (its `seconds` is the window's length)."""

    def __init__(self, measure_from: float, stop_at: float):
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.result = Result("c", seconds=stop_at - measure_from)

    def next_start(self) -> Optional[float]:
        """The start time of the caller's next operation, or None once the window is over."""
        began = time.monotonic()
        return None if began >= self.stop_at else began

    def record(self, began: float, ended: float, status: Optional[str]) -> None:
        """Counts one operation (`status` None: it succeeded) if it lies in the window."""
        if self.measure_from <= began and ended <= self.stop_at:
            self.result.count(began, ended, status)
