"""`sealkv cert create-ca|create-node|create-client|list|revoke`: the cluster's certificates."""
from __future__ import annotations

import glob
import os

import click

from sealkv.node.cli.main import EXIT_USAGE, CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit, emit_json

CERTS_DIR_HELP = "The certificates directory (ca.crt, node.NAME.crt|key, client.NAME.crt|key)."


def _pki():
    from sealkv.node.security import pki

    return pki


def _run(fn, *args, **kwargs):
    pki = _pki()
    try:
        return fn(*args, **kwargs)
    except pki.PKIError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


@click.group()
def cert():
    """Create the cluster's CA, node and client certificates; revoke certificates."""


@cert.command(name="create-ca")
@click.option("--certs-dir", required=True, help=CERTS_DIR_HELP)
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True)
def create_ca(certs_dir, days):
    """Creates DIR/ca.crt and DIR/ca.key (keep ca.key off the nodes)."""
    path = _run(_pki().create_ca, certs_dir, days=days)
    click.echo(f"wrote {path} and {os.path.join(certs_dir, 'ca.key')} (0600)")


@cert.command(name="create-node")
@click.argument("name")
@click.option("--host", "hosts", multiple=True, required=True,
              help="An IP address or DNS name clients and peers dial (repeatable).")
@click.option("--certs-dir", required=True, help=CERTS_DIR_HELP)
@click.option("--ca-key", help="The CA key, if not DIR/ca.key.")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
def create_node(name, hosts, certs_dir, ca_key, days):
    """Creates DIR/node.NAME.crt|key (role node) for the node NAME at --host ..."""
    files = _run(_pki().create_node, certs_dir, name, list(hosts), ca_key=ca_key, days=days)
    click.echo(f"wrote {files.cert} and {files.key} (0600)")


@cert.command(name="create-client")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["readonly", "readwrite", "admin"]),
              help="What the identity may do.")
@click.option("--certs-dir", required=True, help=CERTS_DIR_HELP)
@click.option("--ca-key", help="The CA key, if not DIR/ca.key.")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
def create_client(name, role, certs_dir, ca_key, days):
    """Creates DIR/client.NAME.crt|key: the identity NAME with ROLE."""
    files = _run(_pki().create_client, certs_dir, name, role, ca_key=ca_key, days=days)
    click.echo(f"wrote {files.cert} and {files.key} (0600)")


@cert.command(name="list")
@click.option("--certs-dir", required=True, help=CERTS_DIR_HELP)
@pass_ctx
def list_(c: Ctx, certs_dir):
    """Lists the certificates in DIR: name, role, serial, expiry, hosts."""
    pki = _pki()
    rows = [pki.describe(p) for p in sorted(glob.glob(os.path.join(certs_dir, "*.crt")))]
    headers = ["file", "name", "role", "serial", "expires", "hosts"]
    emit(c.write_out, headers, [[r[h] if h != "hosts" else ",".join(r[h]) for h in headers]
                                for r in rows], rows)


@cert.command()
@click.argument("certificate")
@pass_ctx
def revoke(c: Ctx, certificate):
    """Revokes CERTIFICATE (a .crt file or a serial, hex) on the whole cluster (admin).

    The serial joins the replicated revocation list: every node refuses that certificate on
    every call from then on, including a node certificate's peer calls.
    """
    serial = _run(_pki().serial_of, certificate)
    r = c.run(c.client.revoke_certificate, serial)
    if c.write_out == "json":
        emit_json({"serial": f"{serial:x}", "added": r.added, "revoked": list(r.revoked)})
    else:
        click.echo(f"revoked {serial:x}" + ("" if r.added else " (already revoked)"))


@cert.command(name="revoked")
@pass_ctx
def revoked(c: Ctx):
    """Lists the cluster's revoked certificate serials (hex)."""
    serials = list(c.run(c.client.list_revoked).revoked)
    emit(c.write_out, ["serial"], [[s] for s in serials], serials)


def register(cli: click.Group) -> None:
    cli.add_command(cert)
