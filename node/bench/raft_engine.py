"""The raw-engine reference: a Raft-only cluster configured exactly like a node's.

Each member is a separate process running the node's own `ReplicationAdapter` with the
default `RaftSettings` over a `StateMachine` on a `MemoryStore` (no gRPC, no storage layers).
The load runs inside the leader process and submits core PUT commands straight to the
adapter, in one of two modes:

- `closed`: C threads, each proposing one command at a time (the gRPC workload's shape);
- `pipelined`: one submitter keeping C proposals in flight with callbacks (the engine's
  throughput ceiling for that window).
"""
from __future__ import annotations

import array
import multiprocessing as mp
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Optional

from sealkv.node.bench.workload import KeyPicker, Result, Workload, key_for

MODES = ("closed", "pipelined")


class RaftEngineCluster:
    """N raft-only member processes on 127.0.0.1; a context manager that stops them all."""

    def __init__(self, size: int = 3, base_dir: Optional[str] = None):
        from sealkv.node.cli.local import free_port

        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="sealkv-bench-raft-")
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(size)]
        self.secret = secrets.token_urlsafe(24)
        self._ctx = mp.get_context("spawn")
        self._members = []

    def __enter__(self) -> "RaftEngineCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        for i, addr in enumerate(self.addresses):
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=_member, name=f"bench-raft-{i + 1}", daemon=True,
                args=(child, addr, self.addresses, os.path.join(self.base_dir, f"r{i + 1}"),
                      self.secret))
            proc.start()
            self._members.append((proc, parent))
        self.leader(timeout)

    def leader(self, timeout: float = 30.0) -> int:
        """Returns the index of the member that leads, waiting for one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (proc, conn) in enumerate(self._members):
                if not proc.is_alive():
                    raise RuntimeError(f"raft member {i + 1} exited (code {proc.exitcode})")
                conn.send(("is_leader",))
                if conn.recv():
                    return i
            time.sleep(0.05)
        raise RuntimeError(f"no raft leader within {timeout:.0f}s")

    def run(self, w: Workload, mode: str = "pipelined", name: str = "") -> Result:
        """Runs the PUT workload `w` inside the leader process and returns what it measured."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        _, conn = self._members[self.leader()]
        conn.send(("run", w, mode))
        result = conn.recv()
        if isinstance(result, BaseException):
            raise result
        result.name = name or f"raft {mode}"
        return result

    def stop(self) -> None:
        for proc, conn in self._members:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc, _ in self._members:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._members.clear()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _member(conn, address: str, addresses: list[str], data_dir: str, secret: str) -> None:
    """One raft-only member (runs in its own process until told to stop)."""
    from sealkv.node.state import commands as cmd
    from sealkv.node.replication.adapter import ReplicationAdapter
    from sealkv.node.replication.membership import MemberRecord
    from sealkv.node.state.machine import StateMachine
    from sealkv.node.state.storage.memory import MemoryStore

    import logging

    # pysyncobj logs a CRITICAL "may have diverged" line per re-appended suffix under load
    # (PYSYNCOBJ.md trap 5); a node keeps it in its log file, the benchmark keeps stderr clean.
    logging.getLogger("pysyncobj").setLevel(logging.CRITICAL + 1)
    members = [MemberRecord(f"r{i + 1}", a, "", cmd.ROLE_VOTER) for i, a in enumerate(addresses)]
    adapter = ReplicationAdapter(StateMachine(MemoryStore(), members), raft_address=address,
                                 partners=addresses, data_dir=data_dir, secret=secret)
    adapter.start()
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "is_leader":
                conn.send(adapter.is_leader)
            elif msg[0] == "run":
                try:
                    conn.send(_load(adapter, msg[1], msg[2]))
                except Exception as exc:  # reported to the parent, which raises it
                    conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
            else:
                break
    except EOFError:
        pass
    finally:
        adapter.stop()


def _load(adapter, w: Workload, mode: str) -> Result:
    from sealkv.node.state import commands as cmd
    from sealkv.node import errors

    value = os.urandom(w.value_size)
    commands = [cmd.encode(cmd.Put(key_for(i, w.key_size), value)) for i in range(w.keyspace)]
    picker = KeyPicker(Workload(op="put", keyspace=w.keyspace, key_size=w.key_size), seed=1)
    t0 = time.monotonic()
    measure_from, stop_at = t0 + w.warmup, t0 + w.warmup + w.duration
    out = Result("raft", clients=w.clients, seconds=w.duration)
    lock = threading.Lock()

    def record(began: float, ended: float, error) -> None:
        if began >= measure_from and ended <= stop_at:
            if error is None:
                out.ops += 1
                out.latencies.append(ended - began)
            else:
                name = type(error).__name__
                out.errors[name] = out.errors.get(name, 0) + 1

    if mode == "closed":
        def client(seed: int) -> None:
            rng = KeyPicker(Workload(op="put", keyspace=w.keyspace, key_size=w.key_size), seed)
            while True:
                began = time.monotonic()
                if began >= stop_at:
                    return
                command = commands[rng._rng.randrange(len(commands))]
                error = None
                try:
                    adapter.propose(command, w.timeout)
                except errors.SealkvError as exc:
                    error = exc
                ended = time.monotonic()
                with lock:
                    record(began, ended, error)

        threads = [threading.Thread(target=client, args=(s,), daemon=True)
                   for s in range(w.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    window = threading.Semaphore(w.clients)
    inflight = [0]
    drained = threading.Event()

    def submit_one() -> None:
        began = time.monotonic()

        def done(result, error) -> None:
            record(began, time.monotonic(), error)
            window.release()
            with lock:
                inflight[0] -= 1
                if inflight[0] == 0 and time.monotonic() >= stop_at:
                    drained.set()

        with lock:
            inflight[0] += 1
        adapter.propose_async(commands[picker._rng.randrange(len(commands))], done)

    while time.monotonic() < stop_at:
        if window.acquire(timeout=w.timeout):
            submit_one()
        else:
            out.errors["WindowTimeout"] = out.errors.get("WindowTimeout", 0) + 1
    with lock:
        if inflight[0] == 0:
            drained.set()
    drained.wait(w.timeout)
    return out
