"""`sealkv audit verify|tail`: check and read a node's audit log on local disk."""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from typing import Optional

import click

from sealkv.node.cli import local
from sealkv.node.cli.main import EXIT_FAILED, EXIT_USAGE, CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit
from sealkv.node.serving import audit as audit_log

_DATA_DIR = click.option("--data-dir", default=local.DEFAULT_DIR, show_default=True,
                         help="A node's data directory, or a local cluster's (every node).")
_SECRET = click.option("--secret-file", help="The cluster secret, to check the records' MACs "
                       "(default: the local cluster's).")


@click.group()
def audit():
    """The tamper-evident audit log of admin acts and refused calls."""


def _logs(data_dir: str) -> list[tuple[str, str]]:
    """(node, path) of every audit log under `data_dir` (a node's or a local cluster's)."""
    own = os.path.join(data_dir, audit_log.AUDIT_DIR, audit_log.AUDIT_FILE)
    if os.path.exists(own):
        return [(os.path.basename(os.path.abspath(data_dir)), own)]
    record = local.LocalCluster.load(data_dir)
    if record is None:
        raise CliError(f"no audit log in {data_dir}: pass a node's --data-dir", EXIT_USAGE)
    return [(n.name, os.path.join(n.data_dir, audit_log.AUDIT_DIR, audit_log.AUDIT_FILE))
            for n in record.nodes]


def _secret(data_dir: str, secret_file: Optional[str]) -> Optional[str]:
    if secret_file is None:
        record = local.LocalCluster.load(data_dir)
        secret_file = record.secret_file if record else None
    if not secret_file:
        return None
    try:
        with open(secret_file) as f:
            return f.read().strip()
    except OSError as exc:
        raise CliError(f"cannot read secret file {secret_file}: {exc.strerror}", EXIT_USAGE)


@audit.command()
@_DATA_DIR
@_SECRET
@pass_ctx
def verify(c: Ctx, data_dir, secret_file):
    """Checks every record's chain (and MAC, with the secret); names the first bad record."""
    key = audit_log.mac_key(_secret(data_dir, secret_file))
    rows, data, bad = [], [], False
    for node, path in _logs(data_dir):
        v = audit_log.verify(path, key)
        bad |= not v.ok
        rows.append([node, v.records, "ok" if v.ok else "TAMPERED",
                     "yes" if v.macs_checked else "no (no secret)", v.problem or "-"])
        data.append({"node": node, "path": path, "records": v.records, "ok": v.ok,
                     "macs_checked": v.macs_checked, "problem": v.problem})
    emit(c.write_out, ["node", "records", "chain", "macs checked", "problem"], rows, data)
    if bad:
        sys.exit(EXIT_FAILED)


@audit.command()
@_DATA_DIR
@click.option("-n", "--lines", "count", type=click.IntRange(1, 100000), default=20,
              show_default=True, help="How many of the newest records per node.")
@pass_ctx
def tail(c: Ctx, data_dir, count):
    """Prints the newest records of each node's audit log."""
    rows, data = [], []
    for node, path in _logs(data_dir):
        try:
            with open(path, "rb") as f:
                newest = deque(f, maxlen=count)
        except FileNotFoundError:
            continue
        for line in newest:
            try:
                r = json.loads(line)
            except ValueError:
                r = {"event": "(not a record)"}
            rows.append([node, r.get("seq", "?"), r.get("time", "?"), r.get("identity", "?"),
                         r.get("method", "?"), r.get("event", "?"), r.get("code") or "-",
                         json.dumps(r.get("args") or {}, sort_keys=True)])
            data.append(dict(r, node=node))
    emit(c.write_out, ["node", "seq", "time", "identity", "method", "event", "code", "args"],
         rows, data)


def register(cli: click.Group) -> None:
    cli.add_command(audit)
