"""The `sealkv` command line, in the manner of etcdctl.

Endpoints come from `--endpoints`, else `SEALKV_ENDPOINTS`, else the local cluster recorded
in `./.sealkv`. Output: `-w table|json|simple`. Exit codes: 0 ok, 1 failed (including key not
found), 2 usage, 3 unreachable or no leader. Errors go to stderr as "Error: ...".
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import click

from sealkv.node import errors
from sealkv.node.cli import local
from sealkv.node.cli.output import emit, emit_json, json_bytes, text

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
ROLE_NAMES = {1: "voter", 2: "learner"}


class CliError(click.ClickException):
    """An error printed as "Error: ..." with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def fail_from(exc: errors.SealkvError) -> CliError:
    """Maps a client error to its CLI exit code."""
    unreachable = isinstance(exc, errors.Unavailable) or (
        isinstance(exc, errors.NotLeader) and not exc.leader)
    return CliError(exc.message, EXIT_UNREACHABLE if unreachable else EXIT_FAILED)


def resolve_endpoints(flag: Optional[str], data_dir: str = local.DEFAULT_DIR) -> list[str]:
    """--endpoints > SEALKV_ENDPOINTS > the local cluster record."""
    raw = flag or os.environ.get("SEALKV_ENDPOINTS")
    if raw:
        return [e.strip() for e in raw.split(",") if e.strip()]
    record = local.LocalCluster.load(data_dir)
    if record is None:
        raise CliError("no endpoints: pass --endpoints, set SEALKV_ENDPOINTS, or run "
                       "`sealkv cluster up` here first", EXIT_USAGE)
    return record.endpoints


class Ctx:
    """Options shared by every client command."""

    def __init__(self, endpoints: Optional[str], write_out: str, timeout: float):
        self._endpoints = endpoints
        self.write_out = write_out
        self.timeout = timeout
        self._client = None

    @property
    def endpoints(self) -> list[str]:
        return resolve_endpoints(self._endpoints)

    @property
    def client(self):
        from sealkv.node.client import Client

        if self._client is None:
            self._client = Client(self.endpoints, timeout=self.timeout)
        return self._client

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.SealkvError as exc:
            raise fail_from(exc) from None


pass_ctx = click.make_pass_decorator(Ctx)


class SealkvGroup(click.Group):
    """The top-level group: admin plugins' commands are imported only when asked for."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None:
            command = _plugin_commands().get(name)
        return command

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_plugin_commands()))


def _plugin_commands() -> dict:
    """Loads the CLI commands of installed admin plugins (only when not a built-in name)."""
    from sealkv.node import plugin_loader

    names = [p.name for p in plugin_loader.installed() if p.group == plugin_loader.ADMIN_GROUP]
    commands = {}
    try:
        for _, cls in plugin_loader.load(names, plugin_loader.ADMIN_GROUP):
            for command in cls.cli_commands():
                commands.setdefault(command.name, command)
    except plugin_loader.PluginError as exc:
        click.echo(f"Warning: {exc}", err=True)
    return commands


@click.group(cls=SealkvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoints", envvar=None, help="Comma-separated gRPC endpoints (host:port).")
@click.option("-w", "--write-out", type=click.Choice(["simple", "table", "json"]),
              default="simple", show_default=True, help="Output format.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Per-request timeout in seconds.")
@click.version_option(package_name="sealkv")
@click.pass_context
def cli(ctx, endpoints, write_out, timeout):
    """sealkv: a replicated key-value store with envelope encryption."""
    ctx.obj = Ctx(endpoints, write_out, timeout)


# -- KV ---------------------------------------------------------------------------------


def kv_json(kv) -> dict:
    return {"key": json_bytes(kv.key), "value": json_bytes(kv.value),
            "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
            "version": kv.version}


@cli.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option("--value-file", type=click.File("rb"), help="Read the value from a file ('-': stdin).")
@pass_ctx
def put(c: Ctx, key, value, value_file):
    """Puts VALUE under KEY."""
    if (value is None) == (value_file is None):
        raise click.UsageError("give exactly one of VALUE or --value-file")
    raw = value.encode() if value is not None else value_file.read()
    r = c.run(c.client.put, key.encode(), raw)
    if c.write_out == "json":
        emit_json({"revision": r.header.revision, "member": r.header.member_id})
    else:
        click.echo("OK")


@cli.command()
@click.argument("key")
@click.argument("range_end", required=False)
@click.option("--prefix", is_flag=True, help="Get every key starting with KEY.")
@click.option("--from-key", is_flag=True, help="Get every key >= KEY.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many keys.")
@click.option("--keys-only", is_flag=True)
@click.option("--consistency", type=click.Choice(["l", "s", "linearizable", "serializable"]),
              default="l", show_default=True, help="l(inearizable) or s(erializable).")
@pass_ctx
def get(c: Ctx, key, range_end, prefix, from_key, limit, keys_only, consistency):
    """Gets KEY, or the keys in [KEY, RANGE_END), or with --prefix."""
    from sealkv.node.client import LINEARIZABLE, SERIALIZABLE

    level = LINEARIZABLE if consistency.startswith("l") else SERIALIZABLE
    if sum(bool(x) for x in (range_end, prefix, from_key)) > 1:
        raise click.UsageError("use only one of RANGE_END, --prefix, --from-key")
    if not (range_end or prefix or from_key) and not limit and not keys_only:
        r = c.run(c.client.get, key.encode(), level)
        if not r.found:
            raise CliError(f"key not found: {key}")
        kvs = [r.kv]
    else:
        end = range_end.encode() if range_end else (b"\0" if from_key else b"")
        r = c.run(c.client.range, key.encode(), end, prefix, limit, keys_only, level)
        kvs = list(r.kvs)
    if c.write_out == "json":
        emit_json({"revision": r.header.revision, "kvs": [kv_json(kv) for kv in kvs]})
    elif c.write_out == "table":
        from sealkv.node.cli.output import emit_table

        emit_table(["key", "value", "mod_revision"],
                   [[text(kv.key), "" if keys_only else text(kv.value), kv.mod_revision]
                    for kv in kvs])
    else:
        for kv in kvs:
            click.echo(text(kv.key))
            if not keys_only:
                click.echo(text(kv.value))


@cli.command(name="del")
@click.argument("key")
@pass_ctx
def delete(c: Ctx, key):
    """Deletes KEY; prints how many keys were deleted (0 or 1)."""
    r = c.run(c.client.delete, key.encode())
    if c.write_out == "json":
        emit_json({"deleted": r.deleted, "revision": r.header.revision})
    else:
        click.echo(str(r.deleted))


# -- members ----------------------------------------------------------------------------


def member_rows(members):
    return [[m.name or "?", ROLE_NAMES.get(m.role, "?"), m.raft_address or "-", m.grpc_address,
             "yes" if m.connected else "no", "yes" if m.is_leader else "no",
             m.replication_lag if m.replication_lag >= 0 else "-"] for m in members]


def member_json(m) -> dict:
    return {"name": m.name, "role": ROLE_NAMES.get(m.role, "?"), "raft_address": m.raft_address,
            "grpc_address": m.grpc_address, "connected": m.connected, "is_leader": m.is_leader,
            "replication_lag": m.replication_lag}


MEMBER_HEADERS = ["name", "role", "raft", "grpc", "connected", "leader", "lag"]


@cli.group()
def member():
    """List, add and remove cluster members."""


@member.command(name="list")
@pass_ctx
def member_list(c: Ctx):
    """Lists the members."""
    r = c.run(c.client.member_list)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})


@member.command(name="add")
@click.argument("name")
@click.option("--raft", "raft_address", help="The new voter's raft HOST:PORT.")
@click.option("--grpc", "grpc_address", required=True, help="The new member's gRPC HOST:PORT.")
@click.option("--learner", is_flag=True, help="Add a learner (no vote, no raft address).")
@pass_ctx
def member_add(c: Ctx, name, raft_address, grpc_address, learner):
    """Adds a voter (--raft) or a learner (--learner)."""
    if learner == bool(raft_address):
        raise click.UsageError("give --raft for a voter or --learner for a learner")
    r = c.run(c.client.member_add, name, raft_address or "", grpc_address, learner,
              timeout=c.timeout * 3)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})


@member.command(name="remove")
@click.argument("name")
@pass_ctx
def member_remove(c: Ctx, name):
    """Removes the member NAME."""
    r = c.run(c.client.member_remove, name, timeout=c.timeout * 3)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})


# -- endpoints --------------------------------------------------------------------------


@cli.group()
def endpoint():
    """Status and health of endpoints."""


def _targets(c: Ctx, cluster: bool) -> list[str]:
    targets = c.endpoints
    if cluster:
        r = c.run(c.client.member_list)
        targets = [m.grpc_address for m in r.members if m.grpc_address]
    return targets


STATUS_HEADERS = ["endpoint", "name", "role", "leader", "term", "commit", "applied", "quorum",
                  "plugins"]


def status_row(endpoint_: str, s) -> list:
    return [endpoint_, s.node_id, ROLE_NAMES.get(s.role, "?"), s.leader or "-", s.term,
            s.commit_index, s.applied_index, "yes" if s.has_quorum else "no",
            ",".join(s.plugins) or "-"]


def status_json(endpoint_: str, s) -> dict:
    return {"endpoint": endpoint_, "name": s.node_id, "role": ROLE_NAMES.get(s.role, "?"),
            "leader": s.leader, "is_leader": s.is_leader, "term": s.term,
            "commit_index": s.commit_index, "applied_index": s.applied_index,
            "has_quorum": s.has_quorum, "plugins": list(s.plugins), "version": s.version,
            "config_version": s.config_version, "log_size": s.log_size,
            "members": [member_json(m) for m in s.members]}


@endpoint.command(name="status")
@click.option("--cluster", is_flag=True, help="Every member, not just the given endpoints.")
@pass_ctx
def endpoint_status(c: Ctx, cluster):
    """Shows each endpoint's view: leader, term, indexes, plugins."""
    rows, data, failed = [], [], []
    for target in _targets(c, cluster):
        try:
            s = c.client.status(endpoint=target)
        except errors.SealkvError as exc:
            failed.append(target)
            click.echo(f"Error: {target}: {exc.message}", err=True)
            continue
        rows.append(status_row(target, s))
        data.append(status_json(target, s))
    emit(c.write_out, STATUS_HEADERS, rows, data)
    if failed:
        sys.exit(EXIT_UNREACHABLE)


@endpoint.command(name="health")
@click.option("--cluster", is_flag=True, help="Every member, not just the given endpoints.")
@pass_ctx
def endpoint_health(c: Ctx, cluster):
    """Checks that each endpoint serves and can reach a quorum (a linearizable read)."""
    from sealkv.node.client import Client

    rows, data, bad = [], [], 0
    for target in _targets(c, cluster):
        start = time.monotonic()
        try:
            with Client([target], timeout=c.timeout) as one:
                one.get(b"health", endpoint=target)
            ok, message = True, ""
        except errors.SealkvError as exc:
            ok, message = False, exc.message
        took = f"{(time.monotonic() - start) * 1000:.1f}ms"
        bad += not ok
        rows.append([target, "healthy" if ok else "unhealthy", took, message])
        data.append({"endpoint": target, "health": ok, "took": took, "error": message})
    emit(c.write_out, ["endpoint", "health", "took", "error"], rows, data)
    if bad:
        click.echo(f"Error: {bad} of {len(rows)} endpoints unhealthy", err=True)
        sys.exit(EXIT_UNREACHABLE)


# -- plugins ----------------------------------------------------------------------------


@cli.group()
def plugins():
    """Installed and enabled plugins."""


@plugins.command(name="list")
@pass_ctx
def plugins_list(c: Ctx):
    """Lists installed plugins, and which the local cluster's nodes enable."""
    from sealkv.node import plugin_loader

    enabled: set[str] = set()
    try:
        s = c.client.status()
        enabled = set(s.plugins)
    except (errors.SealkvError, CliError):
        pass
    found = plugin_loader.installed()
    rows = [[p.kind, p.name, p.distribution, p.version, p.value,
             "yes" if f"{p.kind}:{p.name}" in enabled else "no"] for p in found]
    emit(c.write_out, ["kind", "name", "distribution", "version", "object", "enabled"], rows,
         [dict(zip(["kind", "name", "distribution", "version", "object", "enabled"], r))
          for r in rows])


def register_commands() -> click.Group:
    """Adds the command groups that live in their own modules; returns the CLI (idempotent)."""
    from sealkv.node.cli import bench_cmd, cluster_cmd, node_cmd

    for module in (bench_cmd, cluster_cmd, node_cmd):
        module.register(cli)
    return cli


def main() -> None:
    register_commands()(prog_name="sealkv")
