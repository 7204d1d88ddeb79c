"""`sealkv version` and `sealkv completion bash|zsh|fish`."""
from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from sealkv.node import __version__, errors
from sealkv.node.cli.main import CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit


@click.command()
@pass_ctx
def version(c: Ctx):
    """Prints this client's version and, when reachable, each endpoint's server version."""
    rows, data = [["client", __version__]], {"client": __version__, "servers": {}}
    try:
        endpoints = c.endpoints
    except CliError:
        endpoints = []  # no cluster known here: the client's version alone
    from sealkv.node.client import Client

    for endpoint in endpoints:
        try:
            with Client([endpoint], **dict(c.client_kwargs, timeout=min(c.timeout, 2.0))) \
                    as client:
                server = client.status(endpoint=endpoint).version or "?"
        except errors.SealkvError:
            server = None
        rows.append([f"server {endpoint}", server or "unreachable"])
        data["servers"][endpoint] = server
    emit(c.write_out, ["component", "version"], rows, data)


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx, shell):
    """Prints the shell completion script: `eval "$(sealkv completion bash)"`."""
    cls = get_completion_class(shell)
    click.echo(cls(ctx.find_root().command, {}, "sealkv", "_SEALKV_COMPLETE").source())


def register(cli: click.Group) -> None:
    cli.add_command(version)
    cli.add_command(completion)
