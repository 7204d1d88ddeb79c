"""`sealkv encryption ...`: the CLI of the encryption admin service.

Added to the `sealkv` CLI by `EncryptionAdminPlugin.cli_commands()`. Mutators may be sent to
any endpoint: the client follows the leader named in a follower's answer. Every command honours
`-w json|table|simple`; exit codes are the CLI's (0 ok, 1 failed, 2 usage, 3 unreachable).
"""
from __future__ import annotations

import sys

import click

from sealkv.node import errors
from sealkv.node.cli.endpoint_cmd import exit_for
from sealkv.node.cli.main import CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit, emit_json
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

STUB = pb_grpc.EncryptionAdminStub
SUMMARY_HEADERS = ["member", "grpc", "role", "ok", "reason", "epoch"]


def _call(c: Ctx, method: str, request, **kw):
    kw.setdefault("timeout", c.timeout * 3)
    return c.run(c.client.call, STUB, method, request, **kw)


def _summary(rows) -> tuple[list, list]:
    table = [[r.member or "?", r.grpc_address or "-", r.role, "yes" if r.ok else "no", r.reason,
              r.local_epoch] for r in rows]
    data = [{"member": r.member, "grpc_address": r.grpc_address, "role": r.role, "ok": r.ok,
             "reason": r.reason, "expected_node_id": r.expected_node_id,
             "responder_node_id": r.responder_node_id, "build_version": r.build_version,
             "local_epoch": r.local_epoch} for r in rows]
    return table, data


@click.group()
def encryption():
    """Encryption at rest: status, bootstrap, envelope cutovers, key rotation, re-encryption."""


STATUS_HEADERS = ["endpoint", "name", "capable", "epoch", "active storage", "active raft",
                  "envelope", "cutover", "raft envelope", "keys", "kek gen", "next kek",
                  "reason"]


@encryption.command()
@click.option("--cluster", is_flag=True, help="Every member, not just the given endpoints.")
@pass_ctx
def status(c: Ctx, cluster):
    """Shows each node's capability, epoch, active keys, envelope state and wrapped key ids."""
    targets = c.endpoints
    if cluster:
        r = c.run(c.client.member_list)
        targets = [m.grpc_address for m in r.members if m.grpc_address]
    rows, data, failed = [], [], []
    for target in targets:
        try:
            cap = c.client.call(STUB, "GetCapability", pb.GetCapabilityRequest(),
                                endpoint=target, follow_leader=False, idempotent=True)
            side = c.client.call(STUB, "GetSidecarState", pb.GetSidecarStateRequest(),
                                 endpoint=target, follow_leader=False, idempotent=True)
        except errors.SealkvError as exc:
            failed.append(target)
            click.echo(f"Error: {target}: {exc.message}", err=True)
            rows.append([target] + ["-"] * (len(STATUS_HEADERS) - 2)
                        + [f"unreachable: {exc.message}"])
            data.append({"endpoint": target, "error": f"unreachable: {exc.message}"})
            continue
        key_ids = [k.key_id for k in side.keys]
        envelope = "active" if side.storage_envelope_active else "off"
        rows.append([target, cap.node_name, "yes" if cap.encryption_capable else "no",
                     cap.local_epoch, side.active_storage_key_id or "-",
                     side.active_raft_key_id or "-", envelope,
                     side.storage_envelope_cutover_index or "-",
                     f"above {cap.raft_envelope_cutover_index}"
                     if cap.raft_envelope_cutover_index else "off",
                     ",".join(map(str, key_ids)) or "-", cap.kek_generation,
                     "ready" if cap.next_kek_ready else "-", cap.reason or "-"])
        data.append({
            "endpoint": target, "name": cap.node_name, "capable": cap.encryption_capable,
            "reason": cap.reason, "build_version": cap.build_version,
            "full_node_id": cap.full_node_id, "local_epoch": cap.local_epoch,
            "sidecar_present": side.present,
            "active_storage_key_id": side.active_storage_key_id,
            "active_raft_key_id": side.active_raft_key_id,
            "storage_envelope_active": side.storage_envelope_active,
            "storage_envelope_cutover_index": side.storage_envelope_cutover_index,
            "raft_envelope_cutover_index": side.raft_envelope_cutover_index,
            "raft_wrap_installed": cap.raft_wrap_installed,
            "kek_generation": cap.kek_generation, "next_kek_ready": cap.next_kek_ready,
            "next_kek_reason": cap.next_kek_reason,
            "keys": [{"key_id": k.key_id, "purpose": k.purpose, "created": k.created,
                      "local_epoch": k.local_epoch} for k in side.keys],
        })
    job = None
    if len(failed) < len(targets):
        try:
            job = c.client.call(STUB, "GetReencryptionStatus", pb.GetReencryptionStatusRequest(),
                                idempotent=True)
        except errors.SealkvError as exc:
            click.echo(f"Error: re-encryption status: {exc.message}", err=True)
    for row in data:  # the job is replicated: the same on every row
        row["reencryption"] = _job_data(job) if job is not None else None
    emit(c.write_out, STATUS_HEADERS, rows, data)
    if job is not None and c.write_out != "json":
        click.echo(_job_line(job))
    exit_for(len(failed), len(targets))


@encryption.command()
@pass_ctx
def bootstrap(c: Ctx):
    """Generates the first data keys on the leader (after every member passes the probe)."""
    r = _call(c, "BootstrapEncryption", pb.BootstrapEncryptionRequest())
    table, data = _summary(r.capability_summary)
    if c.write_out == "json":
        emit_json({"storage_key_id": r.storage_key_id, "raft_key_id": r.raft_key_id,
                   "index": r.index, "capability_summary": data})
        return
    emit(c.write_out, SUMMARY_HEADERS, table, data)
    click.echo(f"bootstrapped at index {r.index}: storage key {r.storage_key_id}, "
               f"raft key {r.raft_key_id}")


@encryption.command(name="enable-storage-envelope")
@pass_ctx
def enable_storage_envelope(c: Ctx):
    """Switches the cluster to envelope storage, once every member proves it is capable."""
    r = _call(c, "EnableStorageEnvelope", pb.EnableStorageEnvelopeRequest())
    _cutover_output(c, r, "storage", {"storage_key_id": r.storage_key_id},
                    f"from index {r.cutover_index} (storage key {r.storage_key_id})")


def _cutover_output(c: Ctx, r, what: str, fields: dict, active_line: str) -> bool:
    """Prints a cutover answer; returns whether it enabled the envelope just now."""
    table, data = _summary(r.capability_summary)
    if c.write_out == "json":
        emit_json({"cutover_index": r.cutover_index, "was_already_active": r.was_already_active,
                   **fields, "capability_summary": data})
        return False
    if r.was_already_active:
        click.echo(f"{what} envelope was already active since index {r.cutover_index}")
        return False
    emit(c.write_out, SUMMARY_HEADERS, table, data)
    click.echo(f"{what} envelope active {active_line}")
    return True


@encryption.command(name="enable-raft-envelope")
@pass_ctx
def enable_raft_envelope(c: Ctx):
    """Seals every later Raft log entry with the raft data key, once every member is capable."""
    r = _call(c, "EnableRaftEnvelope", pb.EnableRaftEnvelopeRequest())
    fresh = _cutover_output(c, r, "raft", {"raft_key_id": r.raft_key_id,
                                           "wrap_pending": list(r.wrap_pending)},
                            f"above index {r.cutover_index} (raft key {r.raft_key_id})")
    if fresh and r.wrap_pending:
        click.echo(f"not yet confirmed by: {', '.join(r.wrap_pending)} (they seal once they "
                   "apply the cutover entry)", err=True)


@encryption.command(name="rotate-dek")
@click.option("--purpose", type=click.Choice(["storage", "raft"]), required=True)
@pass_ctx
def rotate_dek(c: Ctx, purpose):
    """Adds a fresh data key for PURPOSE and makes it active (old keys stay for reading)."""
    value = pb.STORAGE if purpose == "storage" else pb.RAFT
    r = _call(c, "RotateDEK", pb.RotateDEKRequest(purpose=value))
    if c.write_out == "json":
        emit_json({"key_id": r.key_id, "purpose": purpose, "index": r.index})
    else:
        click.echo(f"{purpose} key {r.key_id} active from index {r.index}")


@encryption.command(name="rewrap-keys")
@pass_ctx
def rewrap_keys(c: Ctx):
    """Moves the key table to the next KEK staged on every member (--next-kek-*).

    Every member must first prove it is ready (its KEK opens the table, its next KEK is the
    leader's); then the table rewrapped under the next KEK goes through the log and every
    node switches to it and rewrites its sidecar. Afterwards configure the next KEK as each
    node's --kek-* (a node restarted with only the old KEK refuses to start). Safe to re-run.
    """
    r = _call(c, "RewrapKeys", pb.RewrapKeysRequest())
    table, data = _summary(r.capability_summary)
    if c.write_out == "json":
        emit_json({"kek_generation": r.kek_generation, "index": r.index,
                   "was_already_done": r.was_already_done, "key_ids": list(r.key_ids),
                   "capability_summary": data})
        return
    if r.was_already_done:
        click.echo(f"the key table was already rewrapped under the next KEK (KEK generation "
                   f"{r.kek_generation}, index {r.index})")
        return
    emit(c.write_out, SUMMARY_HEADERS, table, data)
    click.echo(f"key table rewrapped under the next KEK: KEK generation {r.kek_generation} at "
               f"index {r.index} (keys {','.join(map(str, r.key_ids))}); now make the next KEK "
               "each node's --kek-* and drop --next-kek-* at its next restart")


@encryption.command(name="resync-sidecar")
@pass_ctx
def resync_sidecar(c: Ctx):
    """Rewrites the sidecar of the (first) endpoint from the replicated state."""
    target = c.endpoints[0]
    r = _call(c, "ResyncSidecar", pb.ResyncSidecarRequest(), endpoint=target,
              follow_leader=False)
    if c.write_out == "json":
        emit_json({"endpoint": target, "name": r.node_name,
                   "raft_applied_index": r.raft_applied_index,
                   "keys": [{"key_id": k.key_id, "purpose": k.purpose, "created": k.created,
                             "local_epoch": k.local_epoch} for k in r.keys]})
    else:
        click.echo(f"{r.node_name}: sidecar rewritten (key changes up to index "
                   f"{r.raft_applied_index}; keys "
                   f"{','.join(str(k.key_id) for k in r.keys) or 'none'})")


@encryption.command(name="pkcs11-keygen")
@click.option("--module", required=True, help="Path of the token's PKCS#11 library.")
@click.option("--token-label", required=True)
@click.option("--key-label", required=True, help="Label of the new KEK object.")
@click.option("--pin-file", required=True, help="A 0600 file holding the token's user PIN.")
def pkcs11_keygen(module, token_label, key_label, pin_file):
    """Generates a non-extractable AES-256 KEK inside a PKCS#11 token (runs locally).

    The key is created by the token itself (C_GenerateKey) with CKA_EXTRACTABLE false and
    CKA_SENSITIVE true: its bytes never exist outside the token. Nodes then use it with
    `--kek-provider pkcs11 --kek-option module=... --kek-option token_label=...
    --kek-option key_label=... --kek-option pin_file=...`.
    """
    from sealkv.plugins.api import StartupRefused
    from .kek_pkcs11 import generate_key

    try:
        generate_key(module, token_label, key_label, pin_file)
    except StartupRefused as exc:
        raise CliError(str(exc)) from None
    except ImportError:
        raise CliError("pkcs11-keygen needs python-pkcs11: "
                                   "pip install 'sealkv[pkcs11]'") from None
    click.echo(f"created non-extractable AES-256 key {key_label!r} in token {token_label!r}")


def _job_data(s) -> dict:
    return {"state": s.state, "job_id": s.job_id, "target_key_id": s.target_key_id,
            "done": s.done, "total": s.total, "rewritten": s.rewritten, "skipped": s.skipped,
            "rate": round(s.rate, 1), "eta_seconds": round(s.eta_seconds, 1),
            "remaining": s.remaining, "started_index": s.started_index,
            "finished_index": s.finished_index, "compaction": s.compaction}


def _job_line(s) -> str:
    if s.state == "idle":
        return "no re-encryption job has run"
    line = (f"re-encryption {s.state}: {s.done}/{s.total} examined, {s.rewritten} rewritten, "
            f"{s.skipped} skipped (newer client writes), {s.remaining} values still to seal")
    if s.state == "running" and s.rate > 0:
        line += f", {s.rate:.0f}/s, about {s.eta_seconds:.0f}s left"
    if s.compaction:
        line += f"; compaction {s.compaction}"
    return line


def _bar(s, rate: float, eta: float, width: int = 30) -> str:
    total = max(s.total, 1)
    filled = min(width, int(width * s.done / total))
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {s.done}/{s.total} "
            f"{rate:.0f}/s eta {eta:.0f}s  ")


@encryption.command()
@click.option("--rate", type=click.FloatRange(min=1), default=None,
              help="Values examined per second at most (default 2000).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None,
              help="Values per replicated batch (default 256).")
@click.option("--no-compact", is_flag=True, help="Do not compact every member at the end.")
@click.option("--no-wait", is_flag=True, help="Start (or report) the job and return at once.")
@click.option("--wait-timeout", type=float, default=3600.0, show_default=True,
              help="Seconds to wait for the job (and its compaction) to finish.")
@pass_ctx
def reencrypt(c: Ctx, rate, batch_size, no_compact, no_wait, wait_timeout):
    """Rewrites every value stored in cleartext or under an old storage key, online.

    The leader drives a replicated job in throttled batches; a client write of the same key
    wins over the rewrite. The job survives a leader change and a restart. By default every
    member is compacted at the end, so no old copy stays in the journal or the dump.
    """
    import time

    status = _call(c, "StartReencryption", pb.StartReencryptionRequest(
        rate=rate or 0, batch_size=batch_size or 0, no_compact=no_compact))
    deadline = time.monotonic() + wait_timeout
    tty = sys.stderr.isatty() and c.write_out != "json"
    last = (time.monotonic(), status.done)
    own_rate = 0.0
    while not no_wait and (status.state == "running"
                           or (not no_compact
                               and status.compaction in ("", "running", "pending"))):
        if time.monotonic() > deadline:
            click.echo(f"Error: the job did not finish within {wait_timeout:.0f}s; it goes on "
                       "(see `sealkv encryption status`)", err=True)
            sys.exit(1)
        time.sleep(0.5)  # polling the replicated progress (pacing only)
        status = _call(c, "GetReencryptionStatus", pb.GetReencryptionStatusRequest())
        now = time.monotonic()
        if now > last[0] and status.done >= last[1]:
            own_rate = (status.done - last[1]) / (now - last[0])
        last = (now, status.done)
        shown = status.rate or own_rate
        if tty and status.state == "running":
            eta = max(0, status.total - status.done) / shown if shown else 0
            click.echo(_bar(status, shown, eta), nl=False, err=True)
    if tty:
        click.echo("", err=True)
    if c.write_out == "json":
        emit_json(_job_data(status))
    else:
        click.echo(_job_line(status))
    if status.compaction.startswith("failed"):
        sys.exit(1)


@encryption.command(name="retire-dek")
@click.argument("key_id", type=click.IntRange(1, 0xFFFFFFFF))
@pass_ctx
def retire_dek(c: Ctx, key_id):
    """Removes data key KEY_ID once no stored value and no retained log entry uses it."""
    r = _call(c, "RetireDEK", pb.RetireDEKRequest(key_id=key_id))
    purpose = "storage" if r.purpose == pb.STORAGE else "raft"
    if c.write_out == "json":
        emit_json({"key_id": r.key_id, "purpose": purpose, "index": r.index})
    else:
        click.echo(f"{purpose} key {r.key_id} retired at index {r.index}")


COMPACT_HEADERS = ["member", "grpc", "ok", "snapshot index", "dump bytes", "journal bytes",
                   "reason"]


@encryption.command()
@pass_ctx
def compact(c: Ctx):
    """Compacts every member: a new snapshot and a new journal, old files replaced."""
    r = _call(c, "Compact", pb.CompactRequest(cluster=True), timeout=max(c.timeout * 12, 60))
    rows = [[n.member, n.grpc_address, "yes" if n.ok else "no", n.snapshot_index,
             n.dump_bytes, n.journal_bytes, n.reason or "-"] for n in r.nodes]
    data = [{"member": n.member, "grpc_address": n.grpc_address, "ok": n.ok,
             "snapshot_index": n.snapshot_index, "dump_bytes": n.dump_bytes,
             "journal_bytes": n.journal_bytes, "reason": n.reason} for n in r.nodes]
    emit(c.write_out, COMPACT_HEADERS, rows, data)
    if not all(n.ok for n in r.nodes):
        sys.exit(1)
