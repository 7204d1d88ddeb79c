"""`sealkv consistency check`: the CLI of the consistency admin service.

Added to the `sealkv` CLI by `ConsistencyAdminPlugin.cli_commands()`. The check runs on the
first endpoint that answers (any member whose node enables the plugin). Honours
`-w json|table|simple`. Exit codes: 0 consistent, 1 members disagree, 3 a member is
unreachable or could not be compared (or no endpoint serves the check), 2 usage.
"""
from __future__ import annotations

import sys

import click
import grpc

from sealkv.node import errors
from sealkv.node.cli.main import EXIT_FAILED, EXIT_UNREACHABLE, CliError, Ctx, fail_from, pass_ctx
from sealkv.node.cli.output import emit, emit_json

from .v1 import consistency_pb2 as pb
from .v1 import consistency_pb2_grpc as pb_grpc

HEADERS = ["name", "grpc", "role", "state", "applied", "digest", "keys", "reason"]
STATE_NAMES = {pb.AGREES: "agrees", pb.DISAGREES: "disagrees", pb.UNREACHABLE: "unreachable",
               pb.NOT_COMPARED: "not compared"}
VERDICT_NAMES = {pb.CONSISTENT: "consistent", pb.INCONSISTENT: "inconsistent",
                 pb.INCOMPLETE: "incomplete"}


@click.group()
def consistency():
    """Cluster-wide consistency checks (the `consistency` admin plugin)."""


@consistency.command(name="check")
@click.option("--wait", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for every member to apply the leader's commit index.")
@pass_ctx
def check(c: Ctx, wait):
    """Compares every member's state digest at the leader's current commit index."""
    request = pb.CheckConsistencyRequest(wait_ms=int(wait * 1000))
    try:
        r = c.client.call(pb_grpc.ConsistencyAdminStub, "CheckConsistency", request,
                          timeout=wait + c.timeout, idempotent=True)
    except errors.SealkvError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            raise CliError("the endpoint does not serve the consistency check: start its node "
                           "with --plugins consistency", EXIT_FAILED) from None
        raise fail_from(exc) from None
    rows = [[m.name or "?", m.grpc_address or "-", m.role, STATE_NAMES.get(m.state, "?"),
             m.applied_index if m.digest else "-", m.digest[:16] or "-",
             m.keys if m.digest else "-", m.reason or "-"] for m in r.members]
    verdict = VERDICT_NAMES.get(r.verdict, "unknown")
    if c.write_out == "json":
        emit_json({
            "verdict": verdict, "target_index": r.target_index,
            "compared_index": r.compared_index, "agreed_digest": r.agreed_digest,
            "config_version": r.config_version, "checked_by": r.checked_by,
            "summary": r.summary,
            "members": [{"name": m.name, "grpc_address": m.grpc_address, "role": m.role,
                         "state": STATE_NAMES.get(m.state, "?"),
                         "applied_index": m.applied_index, "digest": m.digest, "keys": m.keys,
                         "reason": m.reason} for m in r.members]})
    else:
        emit(c.write_out, HEADERS, rows, None)
        click.echo(f"{r.summary} (target index {r.target_index}, checked by {r.checked_by})")
    if r.verdict == pb.CONSISTENT:
        return
    click.echo(f"Error: {r.summary}", err=True)
    sys.exit(EXIT_FAILED if r.verdict == pb.INCONSISTENT else EXIT_UNREACHABLE)
