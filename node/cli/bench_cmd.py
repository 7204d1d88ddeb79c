"""`sealkv bench put|get|mixed|raft|compare|envelope|peer-wire|cutover|fill`: load generators and reports.

put/get/mixed run closed-loop gRPC clients (spread over worker processes) against the given
endpoints (default: the local cluster); `raft` measures the raw Raft engine configured like a
node; `compare` runs raw engine, gRPC cleartext and gRPC through the storage envelope on fresh
local clusters in one invocation; `envelope` times the storage envelope codec in-process;
`cutover` measures Put latency around EnableStorageEnvelope on fresh local clusters; `fill`
writes a large dataset into a fresh cluster and restarts it (rate, memory, restart time). Output: a table (default) or `-w json`; a progress bar on
stderr when stdout is a terminal. Exit codes: 0 ok (even if some requests failed: they are
reported by status), 1 the benchmark could not run, 2 usage, 3 no endpoint or leader.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import click

from sealkv.node.bench import side_by_side
from sealkv.node.cli.main import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit, emit_json


@contextlib.contextmanager
def _failure_says(what: str) -> Iterator[None]:
    """Turns a benchmark that fails to run into "Error: <what> did not run: <type>: <message>"
    (exit 1). A benchmark is a tool an operator runs: any exception is its failure to report,
    so this catches Exception (not BaseException: Ctrl-C still stops it); a CliError passes."""
    try:
        yield
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"{what} did not run: {type(exc).__name__}: {exc}", EXIT_FAILED) from None


def workload_options(fn):
    """The options every load shares."""
    opts = [
        click.option("--clients", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Concurrent clients, each with one request in flight."),
        click.option("--duration", type=click.FloatRange(min=0.1), default=10.0,
                     show_default=True, help="Measured seconds."),
        click.option("--warmup", type=click.FloatRange(min=0.0), default=2.0,
                     show_default=True, help="Seconds of load before measuring."),
        click.option("--key-size", type=click.IntRange(2, 4096), default=16, show_default=True),
        click.option("--value-size", type=click.IntRange(0, 1024 * 1024), default=256,
                     show_default=True),
        click.option("--keyspace", type=click.IntRange(min=1), default=1000,
                     show_default=True, help="Distinct keys, picked uniformly."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def grpc_options(fn):
    opts = [
        click.option("--consistency", type=click.Choice(["l", "s", "linearizable",
                                                         "serializable"]),
                     default="l", show_default=True, help="Of Gets: l(inearizable) or "
                     "s(erializable)."),
        click.option("--processes", type=click.IntRange(min=0), default=0,
                     help="Load worker processes (0: one per 32 clients, at most 4)."),
        click.option("--mode", type=click.Choice(["batched", "unary"]), default="batched",
                     show_default=True, help="batched: each worker's clients share one Batch "
                     "stream per endpoint (the client library's default); unary: one RPC "
                     "per request."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def local_server_pids(endpoints: list[str]) -> list[int]:
    """PIDs of the local cluster's nodes (`sealkv cluster up`) serving `endpoints`, if any."""
    from sealkv.node.cli import local

    record = local.LocalCluster.load(local.DEFAULT_DIR)
    if record is None:
        return []
    return [n.pid for n in record.nodes if n.pid and local.is_our_process(n)
            and n.grpc in endpoints]


def _workload(op, clients, duration, warmup, key_size, value_size, keyspace,
              consistency="l", read_ratio=0.5, timeout=5.0):
    from sealkv.node.bench.workload import Workload

    w = Workload(op=op, clients=clients, duration=duration, warmup=warmup, key_size=key_size,
                 value_size=value_size, keyspace=keyspace,
                 consistency="linearizable" if consistency.startswith("l") else "serializable",
                 read_ratio=read_ratio, timeout=timeout)
    try:
        w.validate()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return w


def _report(c: Ctx, results: list[dict], extra: dict) -> None:
    from sealkv.node.bench.workload import SUMMARY_HEADERS, summary_row

    if c.write_out == "json":
        emit_json(dict(extra, results=results))
    else:
        emit("table" if c.write_out == "table" else c.write_out, SUMMARY_HEADERS,
             [summary_row(s) for s in results], None)


@click.group()
def bench():
    """Benchmark a cluster (put, get, mixed), the raw Raft engine (raft), or both (compare);
    the envelope codec (envelope) or the storage envelope cutover under load (cutover)."""


def _grpc_command(op: str):
    @workload_options
    @grpc_options
    @click.option("--target", type=click.Choice(["leader", "all"]), default="leader",
                  show_default=True, help="Send every request to the leader, or spread the "
                  "clients over every endpoint.")
    @pass_ctx
    def command(c: Ctx, target, processes, mode, **kw):
        from sealkv.node.bench import async_load, grpc_load
        from sealkv.node.bench.compare import leader_endpoint
        from sealkv.node.security.tls import client_kwargs as tls_client_kwargs

        w = _workload(op, timeout=c.timeout, **kw)
        endpoints = c.endpoints
        if target == "leader":
            try:
                endpoints = [leader_endpoint(endpoints, files=c.tls_files)]
            except RuntimeError as exc:
                raise CliError(str(exc), EXIT_UNREACHABLE) from None
        name = f"{op} c={w.clients}" + (f" {w.consistency}" if op != "put" else "") + \
            f" {mode}"
        with _failure_says("the benchmark"):
            result = async_load.run(w, endpoints, name=name, mode=mode, processes=processes,
                                    server_pids=local_server_pids(c.endpoints),
                                    client_kwargs=tls_client_kwargs(c.tls_files),
                                    progress=grpc_load.progress_bar(name))
        _report(c, [result.summary()], {"workload": w.__dict__, "endpoints": endpoints,
                                        "target": target, "mode": mode})
        if result.note:
            click.echo(f"warning: {result.note}", err=True)

    return command


bench.command(name="put", help="Sequential Puts from each client.")(_grpc_command("put"))
bench.command(name="get", help="Gets of prefilled keys from each client.")(_grpc_command("get"))
mixed = _grpc_command("mixed")
mixed = click.option("--read-ratio", type=click.FloatRange(0, 1), default=0.5,
                     show_default=True, help="Fraction of Gets.")(mixed)
bench.command(name="mixed", help="Gets and Puts, --read-ratio of them Gets.")(mixed)


@bench.command(name="raft")
@workload_options
@click.option("--mode", type=click.Choice(["pipelined", "closed"]), default="pipelined",
              show_default=True, help="pipelined: one submitter keeps --clients proposals in "
              "flight; closed: --clients threads, one proposal each at a time.")
@pass_ctx
def raft_cmd(c: Ctx, mode, **kw):
    """Puts straight into a fresh 3-member Raft-only cluster (no gRPC, no envelope).

    Each member is its own process running the node's replication adapter with the node's
    default RaftSettings; the load runs inside the leader process.
    """
    from sealkv.node.bench.raft_engine import RaftEngineCluster

    w = _workload("put", timeout=c.timeout, **kw)
    try:
        with RaftEngineCluster() as cluster:
            result = cluster.run(w, mode, f"raft put {mode} c={w.clients}")
    except RuntimeError as exc:
        raise CliError(f"the raft benchmark did not run: {exc}", EXIT_FAILED) from None
    _report(c, [result.summary()], {"workload": w.__dict__, "mode": mode})


@bench.command(name="compare")
@workload_options
@click.option("--processes", type=click.IntRange(min=0), default=0,
              help="Load worker processes (0: one per 32 clients, at most 4).")
@click.option("--etcd", "with_etcd", is_flag=True,
              help="Also run the same loads against a fresh 3-member etcd cluster (needs the "
              "etcd binary: apt-get install -y etcd-server) and give ratios to it.")
@click.option("--raw", "with_raw", is_flag=True, help="Also run the raw Raft engine rows.")
@click.option("--repeats", type=click.IntRange(min=1), default=side_by_side.DEFAULT_REPEATS,
              show_default=True,
              help="Envelope rows: measured runs per envelope state, interleaved across the "
              "side-by-side clusters (each row is their median).")
@click.option("--envelope-seconds", type=click.FloatRange(min=0.1),
              default=side_by_side.DEFAULT_SECONDS,
              show_default=True, help="Envelope rows: measured seconds of each run.")
@click.option("--envelope-only", is_flag=True,
              help="Run the envelope rows alone (their clusters, ratios and targets).")
@click.option("--envelope-load", type=click.Choice(["interleaved", "together"]),
              default="interleaved", show_default=True,
              help="Envelope rows: load one cluster at a time, rotating, or all of them at "
              "once in each round (they share the machine's noise; for a loaded machine).")
@pass_ctx
def compare_cmd(c: Ctx, processes, with_etcd, with_raw, repeats, envelope_seconds,
                envelope_only, envelope_load, **kw):
    """sealkv batched vs unary, envelope on vs off, and optionally etcd: one run, ratios.

    Starts its own clusters (a 3-node sealkv cluster with encryption in a temporary
    directory, settings at their defaults; three more alike side by side for the envelope
    rows, off / storage envelope / both envelopes, measured in --repeats interleaved runs of
    --envelope-seconds each, a row per state giving the medians; then the same with --fsync
    never to name the cost of durability; with --etcd a 3-member etcd) and stops them
    afterwards. --clients is the concurrent load (default 64); Puts go to the leader, Gets
    are spread over every member.
    """
    from sealkv.node.bench import compare, grpc_load
    from sealkv.node.bench.workload import SUMMARY_HEADERS, summary_row

    if kw["clients"] == 1:
        kw["clients"] = 64
    w = _workload("put", timeout=c.timeout, **kw)
    log = (lambda m: click.echo(m, err=True)) if c.write_out != "json" else (lambda m: None)
    with _failure_says("the comparison"):
        report = compare.run(w, processes=processes, etcd=with_etcd, raw=with_raw,
                             repeats=repeats, ab_seconds=envelope_seconds,
                             envelope_only=envelope_only,
                             envelope_together=envelope_load == "together",
                             progress=grpc_load.progress_bar, log=log)
    if c.write_out == "json":
        emit_json(report)
        return
    from sealkv.node.cli.output import emit_table

    def fmt(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    emit_table(SUMMARY_HEADERS, [summary_row(s) for s in report["rows"]])
    emit_table(["figure", "sealkv", "reference", "value", "ratio", "bar", "holds"],
               [[t["what"], fmt(t["sealkv"]), t["reference"], fmt(t["reference_value"]),
                 fmt(t["ratio"]), t["bar"] or "-",
                 "-" if t["holds"] is None else "yes" if t["holds"] else "NO"]
                for t in report["targets"]])
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 100,4096") from None
    if not out:
        raise click.BadParameter("at least one value is needed")
    return out


@bench.command(name="envelope")
@click.option("--sizes", default="100,4096", show_default=True, callback=_int_list,
              help="Comma-separated value sizes in bytes.")
@click.option("--iterations", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Seal+open round trips per size.")
@pass_ctx
def envelope_cmd(c: Ctx, sizes, iterations):
    """Seal+open time per value of the storage envelope codec, in-process (no cluster).

    Uses the real codec (plugins/encryption/envelope.py) with the storage AAD and a
    NonceFactory, as the encryption storage layer does; times each call (µs, p50/p99) and
    reports values/s. Names the AES-GCM implementation (cryptography over OpenSSL).
    """
    from sealkv.node.bench import envelope

    if any(not 0 <= s <= 16 * 1024 * 1024 for s in sizes):
        raise CliError("--sizes must be between 0 and 16777216 bytes", EXIT_USAGE)
    with _failure_says("the envelope benchmark"):
        report = envelope.run(sizes, iterations)
    if c.write_out == "json":
        emit_json(report)
        return
    from sealkv.node.cli.output import emit_table

    click.echo(envelope.describe(report))
    emit_table(envelope.HEADERS, envelope.table_rows(report))
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)


@bench.command(name="peer-wire")
@click.option("--iterations", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Encode+decode round trips per message and format.")
@pass_ctx
def peer_wire_cmd(c: Ctx, iterations):
    """Encode+decode time of one raft peer message, Fernet vs AES-GCM, in-process.

    Uses the connection codec a node runs (replication/frames.py WireCodec): pickle and
    Fernet over zlib as pysyncobj does, or the AES-GCM peer wire; an AppendEntries with one
    Put (16-byte key, 256-byte value), one with a 64-Put batch, and a follower's reply.
    """
    from sealkv.node.bench import peer_wire

    with _failure_says("the peer-wire benchmark"):
        report = peer_wire.run(iterations)
    if c.write_out == "json":
        emit_json(report)
        return
    from sealkv.node.cli.output import emit_table

    emit_table(peer_wire.HEADERS, peer_wire.table_rows(report))


@bench.command(name="grpc-floor")
@click.option("--clients", "clients_", default="1,64", show_default=True, callback=_int_list,
              help="Comma-separated client counts; one run each.")
@click.option("--duration", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--warmup", type=click.FloatRange(min=0.0), default=1.0, show_default=True)
@pass_ctx
def floor_cmd(c: Ctx, clients_, duration, warmup):
    """The same Put load against a gRPC server that does nothing: this machine's floor.

    Starts a no-op KV server in its own process (the node's gRPC worker count) and loads it
    with the client processes `bench put` uses; a sealkv node cannot beat these rows.
    """
    from sealkv.node.bench import floor

    workloads = [_workload("put", n, duration, warmup, 16, 256, 1000) for n in clients_]
    with _failure_says("the floor benchmark"):
        results = floor.run(workloads)
    _report(c, [r.summary() for r in results], {"server": "no-op grpc KV.Put"})


@bench.command(name="cutover")
@click.option("--nodes", "nodes_", default="3,5", show_default=True, callback=_int_list,
              help="Comma-separated cluster sizes; a fresh cluster for each.")
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True,
              help="Closed-loop Put clients on the leader.")
@click.option("--duration-before", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, help="Measured seconds of steady load before the cutover.")
@click.option("--duration-after", type=click.FloatRange(min=0.1), default=None,
              help="Measured seconds after the cutover call returns (default: "
              "--duration-before).")
@click.option("--warmup", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Seconds of load before the 'before' window.")
@click.option("--value-size", type=click.IntRange(0, 1024 * 1024), default=256,
              show_default=True)
@click.option("--keyspace", type=click.IntRange(min=1), default=1000, show_default=True)
@pass_ctx
def cutover_cmd(c: Ctx, nodes_, clients, duration_before, duration_after, warmup, value_size,
                keyspace):
    """Put p50/p99 before, during and after EnableStorageEnvelope, per cluster size.

    For each N: starts a fresh N-node local cluster with --encryption in a temporary directory
    (real node processes, stopped by PID at the end, even on error), bootstraps encryption,
    runs the Put load and calls EnableStorageEnvelope on the leader mid-run. The call duration
    is client-measured (the server does not report the fan-out's own duration).
    """
    from sealkv.node.bench import cutover
    from sealkv.node.cli.output import emit_table

    if any(not 1 <= n <= 9 for n in nodes_):
        raise CliError("--nodes must be between 1 and 9", EXIT_USAGE)
    if len(str(keyspace - 1)) + 1 > 16:
        raise CliError("--keyspace is too large for 16-byte keys", EXIT_USAGE)
    s = cutover.CutoverSettings(clients=clients, duration_before=duration_before,
                                duration_after=duration_after or duration_before,
                                warmup=warmup, value_size=value_size, keyspace=keyspace,
                                timeout=c.timeout)
    log = (lambda m: click.echo(m, err=True)) if c.write_out != "json" else (lambda m: None)
    with _failure_says("the cutover benchmark"):
        report = cutover.run(nodes_, s, log=log)
    if c.write_out == "json":
        emit_json(report)
        return
    for r in report["runs"]:
        click.echo(f"N={r['nodes']}  clients={s.clients}  EnableStorageEnvelope RPC "
                   f"{r['enable_rpc_ms']:.1f} ms (client-measured; fan-out not reported "
                   f"separately)  bootstrap RPC {r['bootstrap_rpc_ms']:.1f} ms  "
                   f"cutover index {r['cutover_index']}  envelope active: "
                   f"{'yes' if r['storage_envelope_active'] else 'NO'}")
        emit_table(cutover.HEADERS, cutover.table_rows(r))


@bench.command(name="fill")
@click.option("--keys", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--value-size", type=click.IntRange(0, 1024 * 1024), default=1024,
              show_default=True)
@click.option("--processes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Client processes, each with one Batch stream.")
@click.option("--max-seconds", type=click.FloatRange(min=1), default=1800.0, show_default=True,
              help="Stop filling after this long and report how many keys were written.")
@pass_ctx
def fill_cmd(c: Ctx, keys, value_size, processes, max_seconds):
    """A large dataset into a fresh 3-node local cluster, then a full restart.

    Reports the write rate, the nodes' resident memory (anonymous and file-backed) at each
    quarter of the fill, the database sizes, the time until every node serves again after a
    restart of all of them, what each replayed, and a sampled read-back. The cluster lives in
    a temporary directory and is removed afterwards.
    """
    from sealkv.node.bench import fill

    s = fill.FillSettings(keys=keys, value_size=value_size, processes=processes,
                          max_seconds=max_seconds)
    log = (lambda m: click.echo(m, err=True)) if c.write_out != "json" else (lambda m: None)
    try:
        report = fill.run(s, log=log)
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"the fill benchmark did not run: {type(exc).__name__}: {exc}",
                       EXIT_FAILED) from None
    if c.write_out == "json":
        emit_json(report)
        return
    from sealkv.node.cli.output import emit_table

    f = report["fill"]
    click.echo(f"filled {f['keys_acked']} of {keys} keys ({value_size} B values) in "
               f"{f['seconds']}s: {f['keys_per_second']} keys/s; {f['keys_failed']} failed "
               f"{f['failed_by_status'] or ''}")
    mib = 1024 * 1024
    emit_table(["keys", "at s", "max rss MiB", "max anon MiB", "max file MiB"],
               [[m["keys"], m["at_seconds"], round(m["max_rss"] / mib), round(m["max_anon"] / mib),
                 round(m["max_file"] / mib)] for m in f["memory"]])
    r = report["restart"]
    click.echo(f"restart of every node: {r['seconds_until_all_serve_and_a_linearizable_read']}s "
               f"until all serve and a linearizable read answers; sampled keys missing: "
               f"{r['sampled_keys_missing']} of {r['sampled_keys']}")
    emit_table(["node", "db index at start", "replayed", "db MiB", "rss MiB", "anon MiB"],
               [[name, n["db_applied_index_at_start"], n["replayed_at_start"],
                 round(report["db_file_bytes"][name] / mib),
                 round(next(m["rss"] for m in r["memory_after"] if m["node"] == name) / mib),
                 round(next(m["anon"] for m in r["memory_after"] if m["node"] == name) / mib)]
                for name, n in r["nodes"].items()])


def register(cli: click.Group) -> None:
    cli.add_command(bench)
