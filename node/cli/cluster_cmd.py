"""`sealkv cluster up|down|status`: a local cluster on 127.0.0.1 for development."""
from __future__ import annotations

import os
import shutil
import time

import click

from sealkv.node import errors
from sealkv.node.cli import local
from sealkv.node.cli.endpoint_cmd import (STATUS_HEADERS, exit_for, status_json, status_row,
                                          unreachable_row, warn_insecure)
from sealkv.node.cli.node_cmd import parse_kek_options
from sealkv.node.cli.main import (EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, INSECURE_WARNING,
                                  CliError, Ctx, pass_ctx)
from sealkv.node.cli.output import emit


@click.group()
def cluster():
    """Start, inspect and stop a local cluster."""


def _node_args(c: local.LocalCluster, n: local.LocalNode) -> list[str]:
    from sealkv.node.config import format_initial_cluster
    from sealkv.node.replication.membership import MemberRecord

    members = [MemberRecord(m.name, m.raft, m.grpc, 1) for m in c.nodes]
    args = ["--name", n.name, "--data-dir", n.data_dir, "--raft", n.raft, "--grpc", n.grpc,
            "--initial-cluster", format_initial_cluster(members),
            "--secret-file", c.secret_file, *c.node_tls_args(n)]
    if c.plugins:
        args += ["--plugins", ",".join(c.plugins)]
    if c.kek_file:
        args += ["--kek-file", c.kek_file]
    if c.kek_provider:
        args += ["--kek-provider", c.kek_provider]
    for key, value in sorted(c.kek_options.items()):
        args += ["--kek-option", f"{key}={value}"]
    if c.fsync != "always":
        args += ["--fsync", c.fsync]
    if c.peer_wire:
        args += ["--peer-wire", c.peer_wire]
    if n.metrics:
        args += ["--listen-metrics", n.metrics]
    return args


@cluster.command()
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--data-dir", default=local.DEFAULT_DIR, show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 65000),
              help="Raft ports from P, gRPC ports from P+100 (default: free ports).")
@click.option("--encryption", is_flag=True, help="Enable the encryption plugin on every node, "
              "with one 0600 KEK file outside every node's data directory.")
@click.option("--plugins", "plugins_", default="", help="Extra plugins to enable, in order.")
@click.option("--kek-provider", default="file", show_default=True,
              help="With --encryption: file (a generated 0600 KEK file) or pkcs11 (a key in a "
              "token, configured with --kek-option).")
@click.option("--kek-option", "kek_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the KEK provider (repeatable).")
@click.option("--fsync", type=click.Choice(["always", "never"]), default="always",
              show_default=True, help="Every node's --fsync (see the README's Durability).")
@click.option("--peer-wire", type=click.Choice(["gcm", "fernet"]),
              help="Every node's --peer-wire (default: the node's); given to a restart, it "
              "changes the recorded one.")
@click.option("--wait", type=float, default=60.0, show_default=True,
              help="Seconds to wait for a leader and every node serving.")
@click.option("--insecure", is_flag=True,
              help="Plaintext gRPC with no client identities (no PKI is made).")
@pass_ctx
def up(c: Ctx, nodes, data_dir, base_port, encryption, plugins_, kek_provider, kek_options,
       fsync, peer_wire, wait, insecure):
    """Starts N nodes in the background and waits until they serve with a leader.

    Re-running it on a stopped cluster restarts the same nodes with their data.
    """
    data_dir = os.path.abspath(data_dir)
    record = local.LocalCluster.load(data_dir)
    if record is not None:
        running = [n.name for n in record.nodes if local.is_our_process(n)]
        if running:
            raise CliError(f"a cluster is already running in {data_dir} ({', '.join(running)});"
                           " run `sealkv cluster down` first", EXIT_FAILED)
        click.echo(f"restarting the cluster recorded in {data_dir}", err=True)
        if peer_wire:
            record.peer_wire = peer_wire
    else:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        secret = os.path.join(data_dir, "secret")
        if not os.path.exists(secret):
            local.write_secret(secret)
        plugin_names = [p.strip() for p in plugins_.split(",") if p.strip()]
        kek = None
        if encryption:
            plugin_names = ["encryption"] + [p for p in plugin_names if p != "encryption"]
            if kek_provider == "file":
                kek = os.path.join(data_dir, "kek")
                if not os.path.exists(kek):
                    fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(os.urandom(32))
        elif kek_provider != "file" or kek_options:
            raise CliError("--kek-provider and --kek-option go with --encryption", EXIT_USAGE)
        record = local.LocalCluster(
            data_dir, secret, kek_file=kek, plugins=plugin_names,
            kek_provider=None if kek_provider == "file" else kek_provider,
            kek_options=parse_kek_options(kek_options), fsync=fsync, peer_wire=peer_wire,
            insecure=insecure,
            certs_dir=None if insecure else os.path.join(data_dir, "pki"))
        record.nodes.extend(local.define_nodes(data_dir, nodes, base_port))
        if record.certs_dir and not os.path.exists(os.path.join(record.certs_dir, "ca.crt")):
            local.make_pki(record.certs_dir, [(n.name, "127.0.0.1") for n in record.nodes])
    for n in record.nodes:
        n.pid = local.spawn(n, _node_args(record, n))
    record.save()
    leader = _wait_ready(record, wait)
    rows = [[n.name, n.grpc, n.raft, n.pid, "leader" if n.name == leader else "follower"]
            for n in record.nodes]
    emit(c.write_out, ["name", "grpc", "raft", "pid", "role"], rows,
         {"data_dir": data_dir, "leader": leader,
          "nodes": [dict(zip(["name", "grpc", "raft", "pid", "role"], r)) for r in rows]})
    if c.write_out != "json":
        click.echo(f"export SEALKV_ENDPOINTS={','.join(record.endpoints)}", err=True)
        files = record.client_files()
        if files is None:
            click.echo(INSECURE_WARNING, err=True)
        else:
            click.echo(f"export SEALKV_CACERT={files.cacert} SEALKV_CERT={files.cert} "
                       f"SEALKV_KEY={files.key}", err=True)


def _wait_ready(record: local.LocalCluster, wait: float) -> str:
    from sealkv.node.client import Client, health
    from sealkv.node.security.tls import client_kwargs

    files = record.client_files()
    deadline = time.monotonic() + wait
    pending = {n.name for n in record.nodes}
    while time.monotonic() < deadline:
        for n in record.nodes:
            if n.name in pending and not local.is_our_process(n):
                raise CliError(f"node {n.name} exited during start-up; see {n.log_file}",
                               EXIT_FAILED)
            if n.name in pending and health(n.grpc, timeout=0.5, files=files):
                pending.discard(n.name)
        if not pending:
            with Client(record.endpoints, timeout=1.0, **client_kwargs(files)) as client:
                try:
                    s = client.status()
                    if s.leader and all(client.status(endpoint=e).leader for e in record.endpoints):
                        return s.leader
                except errors.SealkvError:
                    pass
        time.sleep(0.1)
    raise CliError(f"the cluster did not become ready within {wait:.0f}s (waiting for: "
                   f"{', '.join(sorted(pending)) or 'a leader'}); logs are in {record.data_dir}",
                   EXIT_UNREACHABLE)


@cluster.command()
@click.option("--data-dir", default=local.DEFAULT_DIR, show_default=True)
@click.option("--purge", is_flag=True, help="Also delete the cluster's data directory.")
def down(data_dir, purge):
    """Stops the processes `cluster up` started (by PID) and says so."""
    data_dir = os.path.abspath(data_dir)
    record = local.LocalCluster.load(data_dir)
    if record is None:
        raise CliError(f"no local cluster recorded in {data_dir}", EXIT_USAGE)
    for n in record.nodes:
        outcome = local.stop_process(n)
        click.echo(f"{n.name} (pid {n.pid}): {outcome}")
    if purge:
        shutil.rmtree(data_dir)
        click.echo(f"removed {data_dir}")


@cluster.command(name="status")
@click.option("--data-dir", default=local.DEFAULT_DIR, show_default=True)
@pass_ctx
def cluster_status(c: Ctx, data_dir):
    """Shows every node of the local cluster: process, leader, term, indexes."""
    from sealkv.node.client import Client
    from sealkv.node.security.tls import client_kwargs

    record = local.LocalCluster.load(os.path.abspath(data_dir))
    if record is None:
        raise CliError(f"no local cluster recorded in {os.path.abspath(data_dir)}", EXIT_USAGE)
    rows, data, down_count = [], [], 0
    files = c.explicit_tls_files() or record.client_files()
    with Client(record.endpoints, timeout=c.timeout, **client_kwargs(files)) as client:
        for n in record.nodes:
            alive = local.is_our_process(n)
            metrics = f"http://{n.metrics}/metrics" if n.metrics else "-"
            try:
                s = client.status(endpoint=n.grpc)
                rows.append(status_row(n.grpc, s) + [metrics])
                data.append(dict(status_json(n.grpc, s), pid=n.pid, running=alive,
                                 metrics=metrics))
            except errors.SealkvError as exc:
                down_count += 1
                reason = "process not running" if not alive else f"unreachable: {exc.message}"
                rows.append(unreachable_row(n.grpc, n.name, reason) + [metrics])
                data.append({"endpoint": n.grpc, "name": n.name, "pid": n.pid,
                             "running": alive, "error": reason, "metrics": metrics})
    emit(c.write_out, STATUS_HEADERS + ["metrics"], rows, data)
    warn_insecure(data)
    exit_for(down_count, len(record.nodes))


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
