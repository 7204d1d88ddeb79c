"""The `sealkv` command line, in the manner of etcdctl.

Endpoints come from `--endpoints`, else `SEALKV_ENDPOINTS`, else the local cluster recorded
in `./.sealkv`. Output: `-w table|json|simple`. Exit codes: 0 ok, 1 failed (including key not
found), 2 usage, 3 unreachable or no leader. Errors go to stderr as "Error: ...".
"""
from __future__ import annotations

import os
from typing import Optional

import click

from sealkv.node import errors
from sealkv.node.cli import local

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


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


def register_commands() -> click.Group:
    """Adds the command groups that live in their own modules; returns the CLI (idempotent)."""
    from sealkv.node.cli import (audit_cmd, bench_cmd, cluster_cmd, endpoint_cmd, kv_cmd,
                                 member_cmd, node_cmd, plugins_cmd)

    for module in (kv_cmd, member_cmd, endpoint_cmd, plugins_cmd, bench_cmd, cluster_cmd,
                   node_cmd, audit_cmd):
        module.register(cli)
    return cli


def main() -> None:
    register_commands()(prog_name="sealkv")
