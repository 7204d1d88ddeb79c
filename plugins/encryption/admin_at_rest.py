"""The encryption admin's "nothing stale at rest" RPCs: re-encryption, key retirement and
cluster-wide compaction (mixed into `EncryptionAdminService`).

- `StartReencryption` (leader): starts the replicated re-encryption job, or reports the one
  that runs (idempotent); the leader's `ReencryptionDriver` does the work.
- `GetReencryptionStatus` (any node): the replicated job, the rate the leader measures, the
  values this node still holds in cleartext or under a non-active key, the compaction outcome.
- `RetireDEK` (leader): asks every member what still uses the key (`GetKeyUsage`: stored
  values, entries of its retained log); refuses with the counts, else proposes ROTATION
  sub-tag 0x03. The key leaves the replicated table, the sidecars and every keystore; its id
  is never reused.
- `Compact` (any node): this node, or with `cluster` every member concurrently, each writing a
  new snapshot and dropping its log before it (new files renamed into place).

Nothing here logs a key or a value.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import grpc

from sealkv.node import errors
from sealkv.node.serving.rpc import rpc_method
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

from . import proposals, reencryption
from .reencryption import DEFAULT_BATCH, DEFAULT_RATE, MAX_BATCH, ReencryptStart
from .reencryption_driver import count_store
from .state import PURPOSE_STORAGE, Outcome

log = logging.getLogger(__name__)

COMPACT_TIMEOUT = 60.0
USAGE_TIMEOUT = 5.0


def local_key_usage(handle: Any, layer: Any, key_id: int) -> tuple[int, int]:
    """Returns (stored values sealed under `key_id`, retained log entries sealed under it)."""
    stored = 0
    start = b""
    while True:
        chunk = handle.stored_records(start, 1000)
        stored += sum(1 for _, entry in chunk if reencryption.envelope_key_id(entry) == key_id)
        if len(chunk) < 1000:
            break
        start = reencryption.key_after(chunk[-1][0])
    return stored, layer.raft_codec.log_users(key_id)


def compact_members(handle: Any, min_index: int, timeout: float) -> list[pb.NodeCompaction]:
    """Compacts every member (voters and learners) concurrently; one row per member."""
    members = handle.membership_snapshot().members

    def one(member) -> pb.NodeCompaction:
        row = pb.NodeCompaction(member=member.name, grpc_address=member.grpc_address)
        if not member.grpc_address:
            row.reason = "no gRPC address"
            return row
        try:
            answer = pb_grpc.EncryptionAdminStub(handle.channel(member.grpc_address)).Compact(
                pb.CompactRequest(cluster=False, min_index=min_index), timeout=timeout)
        except grpc.RpcError as exc:
            row.reason = f"{exc.code().name}: {exc.details()}"
            return row
        row.CopyFrom(answer.nodes[0])
        row.member = member.name
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        return list(pool.map(one, members))


def compaction_summary(rows: list[pb.NodeCompaction]) -> str:
    failed = [f"{r.member}: {r.reason}" for r in rows if not r.ok]
    if failed:
        return "failed: " + "; ".join(failed)
    return f"done on {len(rows)} members"


class AtRestAdminMixin:
    """RPC handlers of `EncryptionAdminService` (see the module docstring). The service
    provides `plugin`, `handle`, `_end(context)` and `_leader_mutation(context)`."""

    @rpc_method
    def StartReencryption(self, request, context):
        if request.rate < 0 or request.batch_size > MAX_BATCH:
            raise errors.InvalidArgument(f"rate must be >= 0 and batch_size at most {MAX_BATCH}")
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            state = layer.view().state
            if not state.storage_envelope_active:
                raise errors.FailedPrecondition(
                    "the storage envelope is not active: run enable-storage-envelope first "
                    "(re-encryption seals values under the active storage key)")
            job = state.job
            if job is None or job.state != reencryption.RUNNING:
                total, _ = count_store(self.handle, state.active_storage_id)
                rate = int(request.rate) if request.rate >= 1 else DEFAULT_RATE
                command = ReencryptStart(rate, request.batch_size or DEFAULT_BATCH,
                                         not request.no_compact, total)
                applied = self.handle.propose(reencryption.encode_command(command),
                                              max(0.1, end - time.monotonic()))
                if applied.outcome is not Outcome.APPLIED:
                    raise errors.FailedPrecondition("the re-encryption job did not start: retry")
                log.info("re-encryption job %d started over %d records (rate %d/s)",
                         applied.index, total, rate)
            plugin.driver.wake()
            return self.reencryption_status(layer)

    @rpc_method
    def GetReencryptionStatus(self, request, context):
        layer = self.plugin.require_layer()
        leader = None if self.handle.is_leader() else self.handle.leader_grpc_address()
        if leader:
            # The leader drives the job: its rate, ETA and compaction outcome are the ones
            # that mean something. Our own view is the fallback.
            try:
                return pb_grpc.EncryptionAdminStub(self.handle.channel(leader)) \
                    .GetReencryptionStatus(request, timeout=2.0)
            except grpc.RpcError:
                pass
        return self.reencryption_status(layer)

    def reencryption_status(self, layer: Any) -> pb.ReencryptionStatus:
        state = layer.view().state
        _, remaining = count_store(self.handle, state.active_storage_id) \
            if state.storage_envelope_active else (0, 0)
        status = pb.ReencryptionStatus(state="idle", node_name=self.handle.name,
                                       remaining=remaining)
        job = state.job
        if job is None:
            return status
        local = self.plugin.driver.compaction
        if job.compaction == reencryption.COMPACTION_DONE:
            status.compaction = "done" + (local[4:] if local.startswith("done") else "")
        elif job.compaction == reencryption.COMPACTION_FAILED:
            status.compaction = local if local.startswith("failed") else "failed"
        elif job.needs_compaction:
            status.compaction = "running" if local == "running" else "pending"
        status.state, status.job_id, status.target_key_id = job.state, job.job_id, job.target_key
        status.done, status.total = job.done, max(job.total, job.done)
        status.rewritten, status.skipped = job.rewritten, job.skipped
        status.started_index, status.finished_index = job.started_index, job.finished_index
        status.rate = self.plugin.driver.rate()
        if status.rate > 0 and job.state == reencryption.RUNNING:
            status.eta_seconds = max(0, status.total - status.done) / status.rate
        return status

    @rpc_method
    def GetKeyUsage(self, request, context):
        layer = self.plugin.require_layer()
        stored, entries = local_key_usage(self.handle, layer, request.key_id)
        return pb.GetKeyUsageResponse(key_id=request.key_id, stored_values=stored,
                                      log_entries=entries, node_name=self.handle.name,
                                      full_node_id=layer.view().full_node_id)

    @rpc_method
    def RetireDEK(self, request, context):
        if request.key_id == 0:
            raise errors.InvalidArgument("key_id is required (0 is reserved)")
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            # Refused when the key is unknown, retired or active.
            command = proposals.retire_command(layer.view(), request.key_id)
            users = []
            for member in self.handle.membership_snapshot().members:
                try:
                    usage = pb_grpc.EncryptionAdminStub(
                        self.handle.channel(member.grpc_address)).GetKeyUsage(
                            pb.GetKeyUsageRequest(key_id=request.key_id),
                            timeout=min(USAGE_TIMEOUT, max(0.1, end - time.monotonic())))
                except grpc.RpcError as exc:
                    raise errors.FailedPrecondition(
                        f"key {request.key_id} not retired: member {member.name} did not say "
                        f"what uses it ({exc.code().name}); retry when every member is up") \
                        from None
                if usage.stored_values or usage.log_entries:
                    users.append((member.name, usage.stored_values, usage.log_entries))
            if users:
                # Every replica holds its own copy: the counts are per member, not summed.
                values = max(u[1] for u in users)
                entries = max(u[2] for u in users)
                detail = ", ".join(f"{name}: {v} values, {e} log entries"
                                   for name, v, e in sorted(users))
                raise errors.FailedPrecondition(
                    f"key {request.key_id} is still used by {values} stored values and {entries} "
                    f"retained log entries ({detail}): run `sealkv encryption reencrypt` (and "
                    "compaction) first")
            applied = plugin.propose(command, end)
            if applied.outcome is not Outcome.APPLIED:
                raise errors.FailedPrecondition(f"key {request.key_id} was not retired "
                                                f"({applied.outcome.value}): retry")
            log.info("retired key %d at index %d", request.key_id, applied.index)
            purpose = pb.STORAGE if command.purpose == PURPOSE_STORAGE else pb.RAFT
            return pb.RetireDEKResponse(key_id=request.key_id, purpose=purpose,
                                        index=applied.index)

    @rpc_method
    def Compact(self, request, context):
        end = self._end(context)
        if request.cluster:
            index = self.handle.confirm_leadership(max(0.1, end - time.monotonic())) \
                if self.handle.is_leader() else max(request.min_index,
                                                    self.handle.applied_index())
            rows = compact_members(self.handle, index, max(1.0, end - time.monotonic() - 0.5))
            return pb.CompactResponse(nodes=rows)
        result = self.handle.compact(request.min_index, max(0.1, end - time.monotonic()))
        log.info("compacted: a new snapshot up to index %d (%d bytes) and a new journal (%d "
                 "bytes)", result["snapshot_index"], result["dump_bytes"],
                 result["journal_bytes"])
        return pb.CompactResponse(nodes=[pb.NodeCompaction(
            member=self.handle.name, grpc_address=self.handle.grpc_address, ok=True,
            snapshot_index=result["snapshot_index"], dump_bytes=result["dump_bytes"],
            journal_bytes=result["journal_bytes"])])


def compact_cluster_from_leader(handle: Any) -> str:
    """The driver's end-of-job compaction: every member, after a barrier of the leader."""
    index = handle.confirm_leadership(10.0)
    return compaction_summary(compact_members(handle, index, COMPACT_TIMEOUT))

