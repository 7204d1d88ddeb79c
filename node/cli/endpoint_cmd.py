"""`sealkv endpoint status|health`: each endpoint's view and health."""
from __future__ import annotations

import sys
import time

import click

from sealkv.node import errors
from sealkv.node.cli.alarm_cmd import alarm_json
from sealkv.node.cli.main import EXIT_FAILED, EXIT_UNREACHABLE, INSECURE_WARNING, Ctx, pass_ctx
from sealkv.node.state.commands import ROLE_NAMES
from sealkv.node.cli.member_cmd import member_json
from sealkv.node.cli.output import emit


@click.group()
def endpoint():
    """Status and health of endpoints."""


def _targets(c: Ctx, cluster: bool) -> list[str]:
    targets = c.endpoints
    if cluster:
        r = c.run(c.client.member_list)
        targets = [m.grpc_address for m in r.members if m.grpc_address]
    return targets


STATUS_HEADERS = ["endpoint", "name", "role", "leader", "term", "commit", "applied", "quorum",
                  "db size", "alarms", "plugins", "security", "error"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def status_row(endpoint_: str, s) -> list:
    return [endpoint_, s.node_id, ROLE_NAMES.get(s.role, "?"), s.leader or "-", s.term,
            s.commit_index, s.applied_index, "yes" if s.has_quorum else "no",
            _size(s.db_size_in_use),
            ",".join(sorted({f"{a.alarm}:{a.member}" for a in s.alarms})) or "-",
            ",".join(s.plugins) or "-", _security(s), "-"]


def unreachable_row(endpoint_: str, name: str, reason: str) -> list:
    """The row of a member that did not answer: every column "-" but its name and the reason."""
    return [endpoint_, name or "-"] + ["-"] * (len(STATUS_HEADERS) - 3) + [reason]


def exit_for(failed: int, total: int) -> None:
    """Exits 1 when some members did not answer and 3 when none did (0 otherwise)."""
    if failed:
        sys.exit(EXIT_FAILED if failed < total else EXIT_UNREACHABLE)


def _security(s) -> str:
    return "INSECURE" if s.transport_security == "insecure" else (s.transport_security or "?")


def warn_insecure(data: list[dict]) -> None:
    """Prints INSECURE_WARNING on stderr when any status row says "insecure"."""
    if any(d.get("transport_security") == "insecure" for d in data):
        click.echo(INSECURE_WARNING, err=True)


def status_json(endpoint_: str, s) -> dict:
    return {"endpoint": endpoint_, "name": s.node_id, "role": ROLE_NAMES.get(s.role, "?"),
            "leader": s.leader, "is_leader": s.is_leader, "term": s.term,
            "commit_index": s.commit_index, "applied_index": s.applied_index,
            "has_quorum": s.has_quorum, "plugins": list(s.plugins), "version": s.version,
            "config_version": s.config_version, "log_size": s.log_size,
            "members": [member_json(m) for m in s.members],
            "db_size_in_use": s.db_size_in_use, "quota_backend_bytes": s.quota_backend_bytes,
            "alarms": [alarm_json(a) for a in s.alarms],
            "db_applied_index_at_start": s.db_applied_index_at_start,
            "replayed_at_start": s.replayed_at_start,
            "transport_security": s.transport_security}


@endpoint.command(name="status")
@click.option("--cluster", is_flag=True, help="Every member, not just the given endpoints.")
@pass_ctx
def endpoint_status(c: Ctx, cluster):
    """Shows each endpoint's view: leader, term, indexes, plugins."""
    rows, data, failed = [], [], []
    targets = _targets(c, cluster)
    for target in targets:
        try:
            s = c.client.status(endpoint=target)
        except errors.SealkvError as exc:
            failed.append(target)
            click.echo(f"Error: {target}: {exc.message}", err=True)
            rows.append(unreachable_row(target, "", f"unreachable: {exc.message}"))
            data.append({"endpoint": target, "error": f"unreachable: {exc.message}"})
            continue
        rows.append(status_row(target, s))
        data.append(status_json(target, s))
    emit(c.write_out, STATUS_HEADERS, rows, data)
    warn_insecure(data)
    exit_for(len(failed), len(targets))


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
            with Client([target], **c.client_kwargs) as one:
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



def register(cli: click.Group) -> None:
    cli.add_command(endpoint)
