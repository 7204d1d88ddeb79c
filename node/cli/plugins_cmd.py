"""`sealkv plugins list`: installed plugins and which the cluster enables."""
from __future__ import annotations

import click

from sealkv.node import errors
from sealkv.node.cli.main import CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit


@click.group()
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
    except (errors.SealkvError, CliError) as exc:  # bounded by --timeout
        click.echo(f"Warning: cannot ask the cluster which plugins it enables ({exc.message}); "
                   "the enabled column says no", err=True)
    found = plugin_loader.installed()
    rows = [[p.kind, p.name, p.distribution, p.version, p.value,
             "yes" if f"{p.kind}:{p.name}" in enabled else "no"] for p in found]
    emit(c.write_out, ["kind", "name", "distribution", "version", "object", "enabled"], rows,
         [dict(zip(["kind", "name", "distribution", "version", "object", "enabled"], r))
          for r in rows])


def register(cli: click.Group) -> None:
    cli.add_command(plugins)
