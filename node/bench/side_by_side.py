"""The envelope rows of `sealkv bench compare`: identical clusters side by side, runs interleaved.

One cluster per envelope state, all started fresh and alike (3 nodes, the encryption plugin,
every setting at its default), the state set before any key is written:

- `off`: the plugin loaded, encryption not bootstrapped (cleartext values and Raft entries);
- `storage`: bootstrapped, storage envelope on (values sealed at rest);
- `both`: storage envelope and raft-log envelope on (values and Raft entries sealed).

Each cluster gets the same keyspace written once (so every measured Put overwrites a key), then
`repeats` rounds of one short Put run per cluster, the order rotating each round (off, storage,
both; storage, both, off; ...). Only the measured cluster carries load at any moment; the
others idle beside it. A row gives the median over the rounds of ops/s and of the server CPU
per Put (its cluster's three nodes together) and of the Puts per Raft entry (the leader's
batching, warm-up included), with every run's figures; a ratio compares the medians.
Interleaving puts every state through the same spells of machine load, and separate clusters
keep database growth, time order and the cutover itself out of the ratio.

On a machine whose load swings faster than a round (a shared one), `together` loads the three
clusters at once in each round instead: they then share the noise exactly, each gets its
share of the cores, and a ratio compares how much Put throughput each state draws from the
same CPU (the throughput of a cluster alone is not measured then).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import statistics
from typing import Callable, Optional

from sealkv.node.bench.workload import Workload, key_for

STATES = ("off", "storage", "both")
NAMES = {"off": "envelopes off", "storage": "storage envelope", "both": "both envelopes"}
DEFAULT_REPEATS = 5
DEFAULT_SECONDS = 2.0
WARMUP = 0.5


def row_name(state: str, clients: int, repeats: int) -> str:
    """The name of a state's median row, e.g. 'sealkv both envelopes put c=64 median of 5'."""
    return f"sealkv {NAMES[state]} put c={clients} median of {repeats}"


def one_name(state: str) -> str:
    """The name of a state's single sequential-Put row."""
    return f"sealkv {NAMES[state]} put c=1"


def prefill(w: Workload, endpoint: str, client_kwargs: dict, value_size: int) -> None:
    """Writes every key of `w`'s keyspace once through the Batch stream (64 in flight)."""
    from sealkv.node.client import AsyncClient

    async def fill() -> None:
        import os

        client = AsyncClient([endpoint], timeout=max(w.timeout, 30.0), **client_kwargs)
        try:
            for lo in range(0, w.keyspace, 64):
                await asyncio.gather(*(client.put(key_for(i, w.key_size),
                                                  os.urandom(value_size), endpoint=endpoint)
                                       for i in range(lo, min(w.keyspace, lo + 64))))
        finally:
            await client.close()

    asyncio.run(fill())


def leader_counters(endpoint: str, client_kwargs: dict) -> Optional[tuple[int, int]]:
    """(Raft entries proposed, commands they carried) so far by the node at `endpoint`
    (its Status), or None when it does not answer."""
    from sealkv.node import errors
    from sealkv.node.client import Client

    try:
        with Client([endpoint], timeout=5.0, **client_kwargs) as client:
            c = client.status().kv_counters
            return c.entries, c.entry_commands
    except errors.SealkvError:
        return None


def per_entry(before: Optional[tuple[int, int]],
              after: Optional[tuple[int, int]]) -> Optional[float]:
    """Commands per Raft entry between two `leader_counters` readings (None if unknown)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]), 1)


def median_row(name: str, runs: list[dict]) -> dict:
    """One row from `runs` (summaries of identical runs): the run of median throughput (its
    latencies), with ops/s, the CPU figures per Put and the Puts per entry replaced by their
    medians over every run (each run's above-idle CPU is at most its total, so the medians
    keep that order), and the runs' figures beside them."""
    ordered = sorted(runs, key=lambda r: r["ops_per_sec"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    def median_of(field: str) -> Optional[float]:
        values = [r.get(field) for r in runs if r.get(field) is not None]
        return round(statistics.median(values), 1) if values else None

    row.update(name=name, ops=sum(r["ops"] for r in runs),
               ops_per_sec=round(statistics.median(r["ops_per_sec"] for r in runs), 1),
               server_cpu_us_per_op=median_of("server_cpu_us_per_op"),
               server_cpu_us_per_op_above_idle=median_of("server_cpu_us_per_op_above_idle"),
               client_cpu_us_per_op=median_of("client_cpu_us_per_op"),
               runs_ops_per_sec=[r["ops_per_sec"] for r in runs],
               runs_server_cpu_us_per_op=[r["server_cpu_us_per_op"] for r in runs],
               puts_per_entry=median_of("puts_per_entry"),
               runs_puts_per_entry=[r.get("puts_per_entry") for r in runs],
               errors=_summed_errors(runs),
               note="; ".join(sorted({r["note"] for r in runs if r["note"]})))
    return row


def round_ratios(runs: dict[str, list[dict]]) -> list[str]:
    """One note per enveloped state: its ops/s ÷ the `off` cluster's in each round (runs of
    one round are neighbours in time), and the median of those, beside the ratio of medians."""
    off = runs.get("off")
    out = []
    for state in STATES[1:]:
        mine = runs.get(state)
        if not off or not mine:
            continue
        ratios = [round(a["ops_per_sec"] / b["ops_per_sec"], 2)
                  for a, b in zip(mine, off) if b["ops_per_sec"]]
        if ratios:
            out.append(f"{NAMES[state]} ÷ envelopes off, ops/s round by round: "
                       f"{', '.join(f'{r:.2f}' for r in ratios)} (median "
                       f"{statistics.median(ratios):.2f})")
    return out


def _summed_errors(runs: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def run(base: Workload, *, repeats: int = DEFAULT_REPEATS, seconds: float = DEFAULT_SECONDS,
        processes: int = 0, together: bool = False,
        progress: Callable[[str], Optional[Callable]] = lambda label: None,
        log: Callable[[str], None] = lambda msg: None) -> tuple[list[dict], list[str]]:
    """Runs the side-by-side envelope rows; returns (rows, notes).

    Each state gets a fresh local cluster with the encryption plugin, switched to its state
    by the admin RPCs of `compare`; a state that cannot be enabled is skipped with a note.
    `together`: each round loads every cluster at once instead of one after the other.
    """
    from sealkv.node.bench import async_load, compare

    enable = {"storage": compare.enable_storage_envelope, "both": _enable_both}
    C = base.clients
    put = dataclasses.replace(base, op="put", duration=seconds, warmup=min(base.warmup, WARMUP))
    one = dataclasses.replace(put, clients=1)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        clusters = {}
        for state in STATES:
            log(f"sealkv: a fresh 3-node cluster for the side-by-side rows: {NAMES[state]}")
            cluster = stack.enter_context(compare.LocalNodeCluster(encryption=True))
            if state in enable:
                try:
                    enable[state](cluster.leader_endpoint(), files=cluster.files)
                except RuntimeError as exc:
                    notes.append(f"{NAMES[state]} rows skipped: {exc}")
                    continue
            clusters[state] = cluster
        targets = {}
        for state, cluster in clusters.items():
            kw = compare.cluster_client_kwargs(cluster)
            targets[state] = ([cluster.leader_endpoint()], [n.pid for n in cluster.record.nodes],
                              kw)
            prefill(put, targets[state][0][0], kw["client_kwargs"], put.value_size)
        order = list(clusters)
        runs: dict[str, list[dict]] = {s: [] for s in order}
        def measure(state: str, r: int) -> dict:
            leader, pids, kw = targets[state]
            label = f"{NAMES[state]} put c={C} run {r + 1}/{repeats}"
            before = leader_counters(leader[0], kw["client_kwargs"])
            result = async_load.run(put, leader, name=label, mode="batched",
                                    processes=processes, server_pids=pids,
                                    progress=None if together else progress(label), **kw)
            summary = result.summary()
            summary["puts_per_entry"] = per_entry(
                before, leader_counters(leader[0], kw["client_kwargs"]))
            return summary

        for r in range(repeats):
            if together:  # every cluster under load at once: they share the machine's noise
                log(f"sealkv: envelope round {r + 1}/{repeats}, the {len(order)} clusters "
                    "loaded together")
                with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
                    done = {s: pool.submit(measure, s, r) for s in order}
                for state in order:
                    runs[state].append(done[state].result())
                continue
            for i in range(len(order)):
                state = order[(r + i) % len(order)]
                runs[state].append(measure(state, r))
        rows = [median_row(row_name(s, C, repeats), runs[s]) for s in order]
        if together:
            notes.append("envelope rows: the clusters were loaded together, each round; a "
                         "row's ops/s is its cluster's share of a machine the three shared")
        notes.extend(round_ratios(runs))
        for row in rows:
            row["kind"] = "side-by-side"
        for state in order:
            if state == "off":
                continue  # the batched put c=1 row of the first cluster is its reference
            leader, pids, kw = targets[state]
            s = async_load.run(one, leader, name=one_name(state), mode="batched",
                               processes=processes, server_pids=pids,
                               progress=progress(one_name(state)), **kw).summary()
            s["kind"] = "side-by-side"
            rows.append(s)
    return rows, notes


def _enable_both(endpoint: str, files=None) -> None:
    from sealkv.node.bench import compare

    compare.enable_storage_envelope(endpoint, files=files)
    compare.enable_raft_envelope(endpoint, files=files)
