"""The `sealkv` command line, in the manner of etcdctl.

Endpoints come from `--endpoints`, else `SEALKV_ENDPOINTS`, else the local cluster recorded
in `./.sealkv`. TLS files come from `--cacert/--cert/--key`, else `SEALKV_CACERT/SEALKV_CERT/
SEALKV_KEY`, else the recorded cluster's `root` admin certificate (`<data-dir>/pki`). Output: `-w table|json|simple`. Exit codes: 0 ok, 1 failed (including key not
found), 2 usage, 3 unreachable or no leader. Errors go to stderr as "Error: ...".
"""
from __future__ import annotations

import os
from typing import Optional

import click

from sealkv.node import errors
from sealkv.node.cli import local

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
INSECURE_WARNING = ("WARNING: the cluster serves plaintext gRPC with no client identities "
                    "(--insecure): anyone who reaches a port may read, write and change "
                    "membership")


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

    def __init__(self, endpoints: Optional[str], write_out: str, timeout: float,
                 cacert: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None):
        self._endpoints = endpoints
        self._tls = (cacert, cert, key)
        self.write_out = write_out
        self.timeout = timeout
        self._client = None

    @property
    def endpoints(self) -> list[str]:
        return resolve_endpoints(self._endpoints)

    def explicit_tls_files(self):
        """The TLS files from flags or SEALKV_CACERT/CERT/KEY, or None."""
        from sealkv.node.security.tls import TLSFilesError, files_from

        try:
            return files_from(*self._tls)
        except TLSFilesError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None

    @property
    def tls_files(self):
        """Flags > environment > the local cluster's `root` certificate > None (plaintext)."""
        files = self.explicit_tls_files()
        if files is None:
            record = local.LocalCluster.load(local.DEFAULT_DIR)
            files = record.client_files() if record is not None else None
        return files

    @property
    def client_kwargs(self) -> dict:
        """Keyword arguments for `Client` (timeout and TLS files)."""
        from sealkv.node.security.tls import client_kwargs

        return {"timeout": self.timeout, **client_kwargs(self.tls_files)}

    @property
    def client(self):
        from sealkv.node.client import Client

        if self._client is None:
            self._client = Client(self.endpoints, **self.client_kwargs)
        return self._client

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.SealkvError as exc:
            raise fail_from(exc) from None


pass_ctx = click.make_pass_decorator(Ctx)


class SealkvGroup(click.Group):
    """The top-level group: admin plugins' commands are imported only when asked for.

    Its own options (`-w`, `--endpoints`, `--timeout`, ...) are accepted anywhere on the line,
    as etcdctl accepts them: `sealkv get k -w json` is `sealkv -w json get k`. One given after
    the subcommand wins over one given before it. A subcommand that declares an option of the
    same name keeps it; `--` ends the options.
    """

    def parse_args(self, ctx, args):
        if ctx.parent is None:
            args = self._hoist_global_options(ctx, list(args))
        return super().parse_args(ctx, args)

    def _global_options(self) -> dict[str, bool]:
        """{option string: takes a value} of this group's own options."""
        found = {}
        for param in self.params:
            if isinstance(param, click.Option) and not param.is_eager:
                for name in param.opts + param.secondary_opts:
                    found[name] = not (param.is_flag or param.count)
        return found

    def _hoist_global_options(self, ctx, args: list[str]) -> list[str]:
        options = self._global_options()
        front, rest, i = [], [], 0
        # The part before the subcommand stays as it is.
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            takes = options.get(args[i].split("=", 1)[0])
            front.append(args[i])
            if takes and "=" not in args[i] and i + 1 < len(args):
                front.append(args[i + 1])
                i += 1
            i += 1
        taken = self._options_along(ctx, args[i:])
        hoisted = []
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest.extend(args[i:])
                break
            name, short_value = arg.split("=", 1)[0], None
            if name not in options and len(arg) > 2 and arg[:2] in options and arg[1] != "-":
                name, short_value = arg[:2], arg[2:]  # -wjson
            if name in options and name not in taken:
                hoisted.append(arg)
                if options[name] and "=" not in arg and short_value is None and i + 1 < len(args):
                    hoisted.append(args[i + 1])
                    i += 1
            else:
                rest.append(arg)
            i += 1
        return front + hoisted + rest

    def _options_along(self, ctx, args: list[str]) -> set[str]:
        """The option strings declared by the subcommands named in `args`."""
        taken: set[str] = set()
        group: Optional[click.Command] = self
        for arg in args:
            if not isinstance(group, click.Group) or arg.startswith("-"):
                continue
            command = group.get_command(ctx, arg)
            if command is None:
                continue
            for param in command.params:
                if isinstance(param, click.Option):
                    taken.update(param.opts + param.secondary_opts)
            group = command
        return taken

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
@click.option("--cacert", envvar="SEALKV_CACERT", help="The cluster CA certificate "
              "(env SEALKV_CACERT; default: the local cluster's).")
@click.option("--cert", envvar="SEALKV_CERT", help="Client certificate (env SEALKV_CERT).")
@click.option("--key", envvar="SEALKV_KEY", help="Client private key (env SEALKV_KEY).")
@click.version_option(package_name="sealkv")
@click.pass_context
def cli(ctx, endpoints, write_out, timeout, cacert, cert, key):
    """sealkv: a replicated key-value store with envelope encryption."""
    ctx.obj = Ctx(endpoints, write_out, timeout, cacert, cert, key)


def register_commands() -> click.Group:
    """Adds the command groups that live in their own modules; returns the CLI (idempotent)."""
    from sealkv.node.cli import (alarm_cmd, audit_cmd, bench_cmd, cert_cmd, cluster_cmd,
                                 endpoint_cmd, info_cmd, kv_cmd, member_cmd, node_cmd,
                                 plugins_cmd, snapshot_cmd)

    for module in (kv_cmd, member_cmd, endpoint_cmd, alarm_cmd, plugins_cmd, bench_cmd,
                   cert_cmd, cluster_cmd, node_cmd, audit_cmd, info_cmd, snapshot_cmd):
        module.register(cli)
    return cli


def main() -> None:
    register_commands()(prog_name="sealkv")
