"""What a benchmark run does (`Workload`) and what it measured (`Result`).

Latencies are recorded per operation in seconds, only for operations that start after the
warm-up and finish before the end of the measured window; throughput is the number of
successful operations in that window divided by its length.
"""
from __future__ import annotations

import array
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

OPS = ("put", "get", "mixed")


@dataclass
class Workload:
    """One benchmark run's parameters (picklable: it is sent to worker processes)."""

    op: str = "put"
    clients: int = 1
    duration: float = 10.0
    warmup: float = 2.0
    key_size: int = 16
    value_size: int = 256
    keyspace: int = 1000
    consistency: str = "linearizable"
    read_ratio: float = 0.5
    timeout: float = 5.0

    def validate(self) -> None:
        """Raises ValueError naming the option to change."""
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}")
        if self.clients < 1:
            raise ValueError("--clients must be at least 1")
        if self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.warmup < 0:
            raise ValueError("--warmup must not be negative")
        if self.key_size < len(str(self.keyspace - 1)) + 1 or self.key_size > 4096:
            raise ValueError(f"--key-size must be between {len(str(self.keyspace - 1)) + 1} "
                             "(enough for --keyspace) and 4096")
        if not 0 <= self.value_size <= 1024 * 1024:
            raise ValueError("--value-size must be between 0 and 1048576")
        if self.keyspace < 1:
            raise ValueError("--keyspace must be at least 1")
        if self.consistency not in ("linearizable", "serializable"):
            raise ValueError("--consistency must be linearizable or serializable")
        if not 0 <= self.read_ratio <= 1:
            raise ValueError("--read-ratio must be between 0 and 1")


def key_for(i: int, key_size: int) -> bytes:
    """Returns key number `i`, zero-padded to exactly `key_size` bytes."""
    return b"k" + str(i).zfill(key_size - 1).encode()


class KeyPicker:
    """Uniform random keys from the keyspace (one per client thread: not thread-safe)."""

    def __init__(self, w: Workload, seed: int):
        self._rng = random.Random(seed)
        self._keys = [key_for(i, w.key_size) for i in range(w.keyspace)]
        self.is_read = (lambda: False) if w.op == "put" else (lambda: True) if w.op == "get" \
            else (lambda: self._rng.random() < w.read_ratio)

    def key(self) -> bytes:
        return self._keys[self._rng.randrange(len(self._keys))]

    def value(self, size: int) -> bytes:
        """A fresh pseudo-random value for each write: a value repeated across the writes of
        one Raft entry would let the peer wire's zlib shrink cleartext entries (and not
        sealed ones), which no real workload of distinct values gets."""
        return self._rng.randbytes(size)


@dataclass
class Result:
    """What one run measured, merged over every client."""

    name: str
    ops: int = 0
    seconds: float = 0.0
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    errors: dict = field(default_factory=dict)
    clients: int = 0
    note: str = ""
    # CPU seconds over the measured window: load workers together, server processes together
    # (0 when not measured), and the busiest worker's share of one core.
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    client_busiest: float = 0.0
    # What the servers would have used over the window with no load (their background: tick
    # loops, heartbeats, timers), measured just before the run; 0 when not measured.
    server_idle_cpu: float = 0.0

    def count(self, began: float, ended: float, status: Optional[str]) -> None:
        """Counts one operation: a success (`status` None) with its latency, or a failure by
        its status name."""
        if status is None:
            self.ops += 1
            self.latencies.append(ended - began)
        else:
            self.errors[status] = self.errors.get(status, 0) + 1

    def merge(self, other: "Result") -> None:
        self.ops += other.ops
        self.seconds = max(self.seconds, other.seconds)
        self.latencies.extend(other.latencies)
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    @property
    def ops_per_sec(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """A JSON-ready summary: ops/s, latency percentiles (ms), errors by status."""
        ordered = sorted(self.latencies)

        def pct(p):
            if not ordered:
                return None
            i = min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 100)) - 1))
            return round(ordered[i] * 1000.0, 3)

        def per_op(cpu):
            return round(cpu * 1e6 / self.ops, 1) if cpu and self.ops else None

        return {"name": self.name, "clients": self.clients, "ops": self.ops,
                "seconds": round(self.seconds, 3), "ops_per_sec": round(self.ops_per_sec, 1),
                "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
                "max_ms": round(ordered[-1] * 1000.0, 3) if ordered else None,
                "errors": dict(sorted(self.errors.items())), "note": self.note,
                "client_cpu_us_per_op": per_op(self.client_cpu),
                "server_cpu_us_per_op": per_op(self.server_cpu),
                "server_cpu_us_per_op_above_idle": per_op(
                    max(0.0, self.server_cpu - self.server_idle_cpu)) if self.server_cpu
                else None,
                "client_busiest": round(self.client_busiest, 3)}


SUMMARY_HEADERS = ["run", "clients", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
                   "server µs/op", "above idle", "client µs/op"]


def summary_row(s: dict) -> list:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    def us(v):
        return "-" if v is None else f"{v:.0f}"

    errs = ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "0"
    return [s["name"], s["clients"], f"{s['ops_per_sec']:.0f}", ms(s["p50_ms"]),
            ms(s["p90_ms"]), ms(s["p99_ms"]), ms(s["max_ms"]), errs,
            us(s.get("server_cpu_us_per_op")), us(s.get("server_cpu_us_per_op_above_idle")),
            us(s.get("client_cpu_us_per_op"))]


def to_dict(w: Workload) -> dict:
    return asdict(w)
