"""`sealkv snapshot save|status|restore`: backups of a cluster's state, like etcd's.

`save` streams a consistent snapshot from one node (`Cluster.Snapshot`, admin) into a backup
file (`sealkv.node.state.backup_file`); `status` reads a file and checks its SHA-256;
`restore` builds a new cluster's data directories from one (`sealkv.node.cli.restore`).
"""
from __future__ import annotations

import hashlib
from typing import Any

import click

from sealkv.node import __version__, errors
from sealkv.node.cli.main import EXIT_FAILED, EXIT_USAGE, CliError, Ctx, fail_from, pass_ctx
from sealkv.node.cli.output import emit

STATUS_HEADERS = ["checksum", "sha256", "revision", "term", "keys", "total size", "encrypted",
                  "format"]


@click.group()
def snapshot():
    """Save a cluster's state to a file, inspect a file, restore a new cluster from one."""


class SnapshotStreamError(Exception):
    """The node's snapshot stream broke its contract (ended early, data after the last chunk,
    a SHA-256 that does not match): nothing was saved."""


def save_snapshot(client: Any, file: str, deadline: float) -> dict:
    """Streams a consistent snapshot through `client` into the backup file `file` (written
    atomically: FILE.part, fsync, rename, mode 0600) and returns {"file", "node", "revision",
    "term", "total_size", "sha256"}.

    Called by `sealkv snapshot save` and the fault harness, on the caller's thread. Raises a
    `SealkvError` when the RPC fails (nothing is left behind), `SnapshotStreamError` when the
    stream is not what the node promised, `OSError` when the file cannot be written.
    """
    from sealkv.node.state.backup_file import BackupWriter, utc_now

    digest = hashlib.sha256()
    with BackupWriter(file) as out:
        chunks = client.snapshot(timeout=deadline)
        chunk = next(chunks)
        out.write_meta({"created": utc_now(), "node": chunk.node_id,
                        "applied_index": chunk.applied_index, "term": chunk.term,
                        "sealkv_version": __version__})
        meta = chunk
        while True:
            out.write_body(chunk.blob)
            digest.update(chunk.blob)
            if chunk.last:
                break
            chunk = next(chunks, None)
            if chunk is None:
                raise SnapshotStreamError("the node ended the snapshot stream early; nothing "
                                          "was saved: retry")
        if next(chunks, None) is not None:  # read the stream to its end: the RPC ends OK
            raise SnapshotStreamError("the node sent data after the snapshot's last chunk; "
                                      "nothing was saved: retry")
        if chunk.sha256 != digest.digest():
            raise SnapshotStreamError("the snapshot's SHA-256 does not match what the node "
                                      "sent; nothing was saved: retry")
        sha = out.commit()
    return {"file": out.path, "node": meta.node_id, "revision": meta.applied_index,
            "term": meta.term, "total_size": out.size, "sha256": sha}


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--deadline", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds the whole transfer may take.")
@pass_ctx
def save(c: Ctx, file, deadline):
    """Streams a consistent snapshot from the first endpoint that answers into FILE.

    FILE is written atomically (FILE.part, fsync, rename), mode 0600; it holds values as
    stored at rest and data keys wrapped by the KEK only.
    """
    try:
        data = save_snapshot(c.client, file, deadline)
    except errors.SealkvError as exc:
        raise fail_from(exc) from None
    except SnapshotStreamError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    except OSError as exc:
        raise CliError(f"cannot write {file}: {exc.strerror or exc}", EXIT_FAILED) from None
    if c.write_out == "json":
        emit(c.write_out, [], [], data)
    elif c.write_out == "table":
        emit(c.write_out, ["file", "node", "revision", "total size", "sha256"],
             [[data["file"], data["node"], data["revision"], data["total_size"],
               data["sha256"]]], data)
    else:
        click.echo(f"Snapshot saved at {data['file']} (revision {data['revision']} from "
                   f"{data['node']}, {data['total_size']} bytes, sha256 {data['sha256']})")


def describe_plugin_states(states: dict[str, bytes]) -> dict[str, Any]:
    """{plugin: what it says of its state in a backup} for every non-empty plugin state;
    a plugin that is not installed or cannot describe its state gets its size only."""
    from sealkv.node import plugin_loader
    from sealkv.plugins.api import RestoresSnapshots

    out = {}
    for name, raw in sorted(states.items()):
        if not raw:
            continue
        described: dict[str, Any] = {"state_bytes": len(raw)}
        try:
            loaded = plugin_loader.load([name], plugin_loader.STORAGE_GROUP)
        except plugin_loader.PluginError as exc:
            described["note"] = str(exc)
        else:
            cls = loaded[0][1] if loaded else None
            if isinstance(cls, RestoresSnapshots):
                described.update(cls.describe_snapshot_state(raw))
        out[name] = described
    return out


@snapshot.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def status(c: Ctx, file):
    """Reads FILE whole, checks its SHA-256 and prints what it holds.

    Exit code 1 when the file is damaged (the checksum does not match) or not a backup.
    """
    from sealkv.node.state.backup_file import BackupError, summarize

    try:
        summary = summarize(file)
    except BackupError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror or exc}", EXIT_FAILED) from None
    plugins = describe_plugin_states(summary.pop("plugins"))
    encrypted = any(p.get("encrypted") for p in plugins.values())
    data = dict(summary, encrypted=encrypted, plugins=plugins)
    row = [summary["checksum"], summary["sha256"], summary["revision"], summary["term"],
           summary["keys"], summary["total_size"], "yes" if encrypted else "no",
           summary["format_version"]]
    emit(c.write_out, STATUS_HEADERS, [row], data)


@snapshot.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--data-dir", required=True,
              help="A new (absent or empty) directory for the restored cluster, as `cluster up "
                   "--data-dir` takes it.")
@click.option("--nodes", type=click.IntRange(1, 9),
              help="Members of the restored cluster, n1..nN on 127.0.0.1 (default 3).")
@click.option("--base-port", type=click.IntRange(1024, 65000),
              help="Raft ports from P, gRPC ports from P+100 (default: free ports).")
@click.option("--initial-cluster", metavar="NAME=RAFT/GRPC,...",
              help="Instead of --nodes: the restored members' names and addresses, as "
                   "`node start --initial-cluster` takes them (DATA_DIR/NAME each).")
@click.option("--kek-file", type=click.Path(exists=True, dir_okay=False),
              help="The KEK the backup's data keys are wrapped with (an encrypted backup "
                   "needs it; the restored cluster's nodes use it too).")
@click.option("--kek-provider", help="Instead of --kek-file: a KEK provider (e.g. pkcs11).")
@click.option("--kek-option", "kek_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the KEK provider (repeatable).")
@click.option("--fsync", type=click.Choice(["always", "never"]), default="always",
              show_default=True, help="Every restored node's --fsync.")
@click.option("--insecure", is_flag=True,
              help="The restored cluster serves plaintext gRPC (no PKI is made).")
@pass_ctx
def restore(c: Ctx, file, data_dir, nodes, base_port, initial_cluster, kek_file, kek_provider,
            kek_options, fsync, insecure):
    """Builds a new cluster's data directories from FILE in DATA_DIR.

    Start it with `sealkv cluster up --data-dir DATA_DIR`. The restored cluster gets a new
    identity (a new cluster secret, new members, a new CA) and, when the backup is encrypted,
    fresh data keys and nonce epochs. Nothing is written when FILE is damaged or the KEK
    cannot unwrap its keys.
    """
    import os

    from sealkv.node.cli import restore as restoring
    from sealkv.node.cli.node_cmd import kek_plugin_options
    from sealkv.node.state.backup_file import BackupError

    members = None
    if initial_cluster:
        from sealkv.node.config import ConfigError, parse_initial_cluster

        if nodes or base_port:
            raise CliError("--initial-cluster names the members: leave out --nodes and "
                           "--base-port", EXIT_USAGE)
        try:
            members = parse_initial_cluster(initial_cluster)
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    encryption = kek_plugin_options(kek_file and os.path.abspath(kek_file), kek_provider,
                                    kek_options)
    kek_record = {"kek_file": encryption.get("kek_file"), "kek_provider": kek_provider,
                  "kek_options": encryption.get("kek_options", {})}
    try:
        done = restoring.restore(file, data_dir, nodes=nodes or 3, base_port=base_port,
                                 insecure=insecure, fsync=fsync,
                                 plugin_options={"encryption": encryption},
                                 kek_record=kek_record, members=members)
    except (BackupError, restoring.RestoreError) as exc:
        raise CliError(f"{exc}; nothing was written to {os.path.abspath(data_dir)}",
                       EXIT_FAILED) from None
    record = done.record
    rows = [[n.name, n.grpc, n.raft, n.data_dir] for n in record.nodes]
    data = {"data_dir": record.data_dir, "revision": done.applied_index, "keys": done.keys,
            "plugins": record.plugins, "restored": done.plugin_summaries,
            "nodes": [dict(zip(["name", "grpc", "raft", "data_dir"], r)) for r in rows]}
    emit(c.write_out, ["name", "grpc", "raft", "data dir"], rows, data)
    if c.write_out != "json":
        for name, summary in done.plugin_summaries.items():
            click.echo(f"{name}: " + ", ".join(f"{k} {v}" for k, v in summary.items()),
                       err=True)
        click.echo(f"restored revision {done.applied_index} ({done.keys} keys); start it with:"
                   f" sealkv cluster up --data-dir {record.data_dir}", err=True)
        if members:
            hint = ["sealkv", "node", "start", "--name", "NAME", "--data-dir",
                    f"{record.data_dir}/NAME", "--raft", "RAFT", "--grpc", "GRPC",
                    "--initial-cluster", initial_cluster, "--secret-file", record.secret_file,
                    *record.node_tls_args(record.nodes[0])]
            if record.plugins:
                hint += ["--plugins", ",".join(record.plugins)]
            if record.kek_file:
                hint += ["--kek-file", record.kek_file]
            click.echo("or start each member where its addresses live: " + " ".join(hint),
                       err=True)


def register(cli: click.Group) -> None:
    cli.add_command(snapshot)
