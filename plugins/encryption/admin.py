"""The encryption admin service (`sealkv.v1.EncryptionAdmin`, ENCRYPTION.md §7).

`EncryptionAdminPlugin` (entry point `encryption` of `sealkv.admin_services`) serves the
capability probe and the sidecar view on every node, and the leader-only mutators: bootstrap,
DEK rotation, writer registration, the envelope cutovers and the KEK rewrap. Mutators are
serialized by one admin lock, confirm leadership through a quorum, and pre-check every command
before it is proposed, so nothing that would halt a replica is ever proposed. Bootstrap, the
cutovers and the rewrap run the capability fan-out (`sealkv.plugins.fanout`; the rewrap with
its own probe, `capability.rewrap_probe`) first and act while holding the membership lock at
the probed configuration version, so no member can join between check and action.
Once either envelope is active, a member-add check (the capability fence) refuses any new
member that does not pass the same probe.

No RPC ever returns key bytes, wrapped or not; nothing here logs a key or a value.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator, Optional

import grpc

from sealkv.node import errors
from sealkv.node.serving.rpc import deadline, rpc_method
from sealkv.node.replication.membership import MemberRecord, member_raft_id
from sealkv.node.errors import ApplyHalt
from sealkv.plugins.api import AdminPlugin
from sealkv.plugins.fanout import FanOutResult, fan_out_and_act, probe_member
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

from . import commands, proposals
from .admin_at_rest import AtRestAdminMixin, compact_cluster_from_leader
from .capability import (
    answer_capability, capability_rows, expected_node_id, probe_capability, rewrap_probe,
)
from .commands import RegisterCommand, WriterRow
from .layer import EncryptionLayerAccess
from .nonce import epoch_in_range, node_id16
from .purpose import PURPOSE_NAMES, PURPOSE_RAFT, PURPOSE_STORAGE
from .reencryption_driver import ReencryptionDriver
from .sidecar import SidecarError, read_sidecar
from .state import AlreadyActive, EncryptionState, Outcome

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EncryptionAdmin"].full_name
FANOUT_DEADLINE = 5.0
MUTATOR_TIMEOUT = 15.0
# Time kept back from a request's deadline for what follows the fan-out (propose, apply).
PROPOSE_RESERVE = 1.0
CHECKED_ROUNDS = 3


class EncryptionAdminPlugin(AdminPlugin):
    """The built-in encryption admin plugin (see the module docstring).

    Built by the node with its `NodeHandle` after the storage layers started; registers the
    capability fence with `handle.add_member_check`. Handlers run on gRPC worker threads.
    """

    name = "encryption"
    # Reads of state may be asked by any identity; every mutator is admin-only; peers probe
    # each other's capability during the fan-out.
    method_roles = {f"/{SERVICE_NAME}/{method}": role for method, role in (
        ("GetCapability", "readonly"), ("GetSidecarState", "readonly"),
        ("GetReencryptionStatus", "readonly"), ("GetKeyUsage", "readonly"),
        ("BootstrapEncryption", "admin"), ("RotateDEK", "admin"),
        ("RegisterEncryptionWriter", "admin"), ("EnableStorageEnvelope", "admin"),
        ("EnableRaftEnvelope", "admin"), ("StartReencryption", "admin"),
        ("RetireDEK", "admin"), ("Compact", "admin"), ("ResyncSidecar", "admin"),
        ("RewrapKeys", "admin"))}
    # What members ask each other: the capability probe; a follower forwards the
    # re-encryption status to the leader; a cluster-wide compaction and key-usage count ask
    # every member for its own part.
    peer_methods = frozenset(f"/{SERVICE_NAME}/{method}" for method in (
        "GetCapability", "GetReencryptionStatus", "GetKeyUsage", "Compact"))

    def __init__(self, node: Any):
        super().__init__(node)
        self.handle = node
        self.admin_lock = threading.Lock()
        self.probe = probe_capability  # the fan-out's probe (tests script it)
        node.add_member_check(self.check_new_member)
        self.driver = ReencryptionDriver(node, lambda: self.layer,
                                         lambda: compact_cluster_from_leader(node))
        self.driver.start()

    def stop(self) -> None:
        """Stops the re-encryption driver."""
        self.driver.stop()

    def add_services(self, server: Any) -> list[str]:
        """Adds `sealkv.v1.EncryptionAdmin`; returns its full name."""
        pb_grpc.add_EncryptionAdminServicer_to_server(EncryptionAdminService(self), server)
        return [SERVICE_NAME]

    @classmethod
    def cli_commands(cls) -> list[Any]:
        """Returns the `encryption` command group of the CLI."""
        from .cli import encryption

        return [encryption]

    # ---- shared ----------------------------------------------------------------------------

    @property
    def layer(self) -> Optional[EncryptionLayerAccess]:
        """The encryption storage layer, or None when it is not enabled on this node."""
        return self.handle.storage_layer("encryption")

    def require_layer(self) -> EncryptionLayerAccess:
        """Returns the encryption storage layer; FAILED_PRECONDITION when it is not enabled."""
        layer = self.layer
        if layer is None:
            raise errors.FailedPrecondition(
                "the encryption storage layer is not enabled on this node: start it with "
                "--encryption --kek-file PATH")
        return layer

    @contextlib.contextmanager
    def exclusive(self, end: float) -> Iterator[None]:
        """Holds the admin lock (mutators are serialized) until `end`, else Unavailable."""
        if not self.admin_lock.acquire(timeout=max(0.0, end - time.monotonic())):
            raise errors.Unavailable("another encryption admin operation is in progress: retry")
        try:
            yield
        finally:
            self.admin_lock.release()

    # ---- capability --------------------------------------------------------------------------

    def capability(self) -> pb.GetCapabilityResponse:
        """Returns this node's honest capability (ENCRYPTION.md §7; `capability.py`)."""
        return answer_capability(self.handle.name, self.handle.data_dir, self.layer)

    def check_new_member(self, member: MemberRecord, timeout: float) -> None:
        """The capability fence: a member-add check run on the leader under the membership lock.

        Refuses (FAILED_PRECONDITION, naming the member) a member whose node_id16 collides with
        another node's writer rows, and, once either envelope is active, a member that does
        not pass the capability probe at its gRPC address.
        """
        layer = self.layer
        if layer is None:
            return
        state = layer.view().state
        if not state.bootstrapped:
            return
        new_id = expected_node_id(member)
        for (dek_id, node16), record in sorted(state.registry.items()):
            if node16 == node_id16(new_id) and record.full_node_id != new_id:
                raise errors.FailedPrecondition(
                    f"member {member.name} cannot be added: its node_id16 0x{node16:04x} is "
                    f"already used by another node under key {dek_id}; give it another raft id")
        if not (state.storage_envelope_active or state.raft_envelope_active):
            return
        verdict = probe_member(self.handle, member, self.probe, new_id,
                               max(0.1, min(FANOUT_DEADLINE, timeout / 2)))
        if not verdict.ok:
            which = "storage" if state.storage_envelope_active else "raft-log"
            raise errors.FailedPrecondition(
                f"member {member.name} ({member.grpc_address or 'no gRPC address'}) cannot be "
                f"added: the {which} envelope is active and it failed the capability probe: "
                f"{verdict.reason}")

    # ---- the checked action --------------------------------------------------------------------

    def run_checked(self, end: float, what: str, action,
                    probe=None) -> tuple[FanOutResult, Any]:
        """Runs the capability fan-out (`probe`, default the capability probe), then
        `action(snapshot)` under the membership lock at the probed configuration version
        (`fanout.fan_out_and_act`)."""
        return fan_out_and_act(self.handle, probe or self.probe, expected_node_id, action,
                               what=what, end=end, reserve=PROPOSE_RESERVE,
                               deadline=FANOUT_DEADLINE, max_rounds=CHECKED_ROUNDS)

    def propose(self, command: Any, end: float) -> Any:
        """Proposes an encryption command; on return it is applied here (NodeHandle.propose)."""
        return self.handle.propose(commands.encode_command(command),
                                   max(0.1, end - time.monotonic()))


class EncryptionAdminService(AtRestAdminMixin, pb_grpc.EncryptionAdminServicer):
    """The gRPC servicer of `sealkv.v1.EncryptionAdmin` (see the proto for each RPC)."""

    def __init__(self, plugin: EncryptionAdminPlugin):
        self.plugin = plugin
        self.handle = plugin.handle

    def _end(self, context) -> float:
        return time.monotonic() + deadline(context, MUTATOR_TIMEOUT)

    @contextlib.contextmanager
    def _leader_mutation(self, context) -> Iterator[tuple[float, Any]]:
        """The prelude of every leader-only mutator: the admin lock, the layer, and leadership
        confirmed through a quorum. Yields (deadline as a monotonic time, the storage layer)."""
        end = self._end(context)
        with self.plugin.exclusive(end):
            layer = self.plugin.require_layer()
            self.handle.confirm_leadership(max(0.1, end - time.monotonic()))
            yield end, layer

    # ---- read-only, any node ------------------------------------------------------------------

    @rpc_method
    def GetCapability(self, request, context):
        return self.plugin.capability()

    @rpc_method
    def GetSidecarState(self, request, context):
        try:
            sidecar = read_sidecar(self.handle.data_dir)
        except SidecarError as exc:
            raise errors.FailedPrecondition(f"the sidecar is invalid: {exc}; rewrite it with "
                                            "ResyncSidecar") from None
        response = pb.GetSidecarStateResponse(node_name=self.handle.name)
        if sidecar is None:
            return response
        response.present = True
        response.version = sidecar.version
        response.raft_applied_index = sidecar.raft_applied_index
        response.storage_envelope_active = sidecar.storage_envelope_active
        response.storage_envelope_cutover_index = sidecar.storage_envelope_cutover_index
        response.raft_envelope_cutover_index = sidecar.raft_envelope_cutover_index
        response.active_storage_key_id = sidecar.active.get("storage", 0)
        response.active_raft_key_id = sidecar.active.get("raft", 0)
        response.keys.extend(_key_infos(sidecar))
        return response

    # ---- leader-only mutators -----------------------------------------------------------------

    @rpc_method
    def BootstrapEncryption(self, request, context):
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            state = layer.view().state
            if state.bootstrapped:
                raise errors.FailedPrecondition(
                    f"encryption is already bootstrapped (storage key {state.active_storage_id}, "
                    f"raft key {state.active_raft_id}): rotate keys with RotateDEK instead")

            def bootstrap(snapshot):
                command = proposals.bootstrap_command(
                    layer, [member_raft_id(m) for m in snapshot.members])
                return command, plugin.propose(command, end)

            result, (command, applied) = plugin.run_checked(end, "bootstrap", bootstrap)
            if applied.outcome is not Outcome.APPLIED:
                raise errors.FailedPrecondition("bootstrap did not apply: another bootstrap "
                                                "raced it; check GetSidecarState")
            log.info("encryption bootstrapped at index %d (storage key %d, raft key %d)",
                     applied.index, command.storage_id, command.raft_id)
            return pb.BootstrapEncryptionResponse(
                storage_key_id=command.storage_id, raft_key_id=command.raft_id,
                index=applied.index, capability_summary=capability_rows(result))

    @rpc_method
    def RotateDEK(self, request, context):
        if request.purpose not in (pb.STORAGE, pb.RAFT):
            raise errors.InvalidArgument("purpose must be STORAGE or RAFT")
        purpose = PURPOSE_STORAGE if request.purpose == pb.STORAGE else PURPOSE_RAFT
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            if not layer.view().state.bootstrapped:
                raise errors.FailedPrecondition("encryption is not bootstrapped: run "
                                                "BootstrapEncryption first")
            # Trial unwrap, fresh id, registry rules.
            command = proposals.rotation_command(layer, purpose)
            applied = plugin.propose(command, end)
            if applied.outcome is not Outcome.APPLIED:
                raise errors.FailedPrecondition(f"rotation did not apply ({applied.outcome.value})"
                                                ": retry")
            log.info("rotated the %s key: key %d active from index %d", PURPOSE_NAMES[purpose],
                     command.dek_id, applied.index)
            return pb.RotateDEKResponse(key_id=command.dek_id, purpose=request.purpose,
                                        index=applied.index)

    @rpc_method
    def RegisterEncryptionWriter(self, request, context):
        if not epoch_in_range(request.local_epoch):
            raise errors.InvalidArgument(f"local_epoch {request.local_epoch} is above 0xFFFF")
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            view = layer.view()
            state = view.state
            if not state.bootstrapped:
                raise errors.FailedPrecondition("encryption is not bootstrapped: run "
                                                "BootstrapEncryption first")
            if request.dek_id:
                if request.dek_id not in state.keys:
                    raise errors.NotFound(f"no key {request.dek_id}")
                dek_ids = [request.dek_id]
            else:
                dek_ids = sorted({state.active_storage_id, state.active_raft_id} - {0})
            rows = []
            for dek_id in dek_ids:
                epoch = view.local_epoch(dek_id)
                if epoch is None:
                    raise errors.FailedPrecondition(f"this node has no nonce epoch for key "
                                                    f"{dek_id}")
                if request.local_epoch and request.local_epoch != epoch:
                    raise errors.FailedPrecondition(
                        f"this node's epoch for key {dek_id} is {epoch}, not "
                        f"{request.local_epoch}: epochs are filled in server-side")
                rows.append(WriterRow(dek_id, view.full_node_id, epoch))
            out = []
            for row in rows:
                command = RegisterCommand(row)
                case = layer.view().state.check_register(command)
                index, outcome = 0, "already registered"
                if case != "noop":
                    applied = plugin.propose(command, end)
                    index = applied.index
                    outcome = ("registered" if applied.outcome is Outcome.APPLIED
                               else "already registered")
                out.append(pb.WriterRegistration(dek_id=row.dek_id, full_node_id=row.full_node_id,
                                                 local_epoch=row.local_epoch, outcome=outcome,
                                                 index=index))
            return pb.RegisterEncryptionWriterResponse(registrations=out)

    @rpc_method
    def EnableStorageEnvelope(self, request, context):
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            state = _bootstrapped_for_cutover(layer)
            if state.storage_envelope_active:
                return _already_active(state)

            def cut_over(_snapshot):
                try:
                    command = proposals.cutover_command(layer.view(), PURPOSE_STORAGE)
                except AlreadyActive:
                    return None, None
                return command, plugin.propose(command, end)

            result, (command, applied) = plugin.run_checked(end, "storage envelope cutover",
                                                            cut_over)
            state = layer.view().state
            if not _cutover_took_effect(state, PURPOSE_STORAGE, command, applied):
                return _already_active(state)
            log.info("storage envelope active from index %d (key %d)",
                     state.storage_cutover_index, command.dek_id)
            return pb.EnableStorageEnvelopeResponse(
                cutover_index=state.storage_cutover_index, was_already_active=False,
                capability_summary=capability_rows(result), storage_key_id=command.dek_id)

    @rpc_method
    def EnableRaftEnvelope(self, request, context):
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            state = _bootstrapped_for_cutover(layer)
            if state.raft_envelope_active:
                return _raft_already_active(state)
            codec = layer.raft_codec

            def cut_over(_snapshot):
                try:
                    command = proposals.cutover_command(layer.view(), PURPOSE_RAFT)
                except AlreadyActive:
                    return None, None
                # The intake barrier: proposals on this node wait until the marker's outcome
                # is known; anything already queued is appended before the marker.
                codec.close_intake()
                try:
                    return command, plugin.propose(command, end)
                except errors.OutcomeUnknown:
                    raise  # intake stays closed until the marker applies or leadership moves
                except BaseException:
                    codec.reopen_intake()  # refused before it was appended: nothing changed
                    raise

            try:
                result, (command, applied) = plugin.run_checked(end, "raft envelope cutover",
                                                                cut_over)
                state = layer.view().state
                if not _cutover_took_effect(state, PURPOSE_RAFT, command, applied):
                    return _raft_already_active(state)
                pending = self._wait_wraps_installed(result, end)
            finally:
                # Known outcomes reopen here or when the marker applies (`cutover_applied`);
                # an unknown one keeps the intake closed until the marker applies.
                if layer.view().state.raft_envelope_active:
                    codec.reopen_intake()
            log.info("raft envelope active above index %d (key %d); %d members still to "
                     "install the wrap", state.raft_cutover_index, command.dek_id, len(pending))
            return pb.EnableRaftEnvelopeResponse(
                cutover_index=state.raft_cutover_index, was_already_active=False,
                capability_summary=capability_rows(result), raft_key_id=command.dek_id,
                wrap_pending=pending)

    @rpc_method
    def RewrapKeys(self, request, context):
        plugin = self.plugin
        with self._leader_mutation(context) as (end, layer):
            state = layer.view().state
            if not state.bootstrapped:
                raise errors.FailedPrecondition("encryption is not bootstrapped: there is no "
                                                "key table to rewrap")
            if layer.next_kek_opens(state.kek_check):
                return _rewrap_done(state)
            ready, why, _ = layer.next_kek_status(state)
            if not ready:
                raise errors.FailedPrecondition(f"the leader cannot rewrap: {why}")
            layer.rewrap_command(state)  # refuses early what the action would refuse

            def rewrap(_snapshot):
                command = layer.rewrap_command(layer.view().state)
                return command, plugin.propose(command, end)

            result, (command, applied) = plugin.run_checked(
                end, "KEK rewrap", rewrap, probe=rewrap_probe(layer))
            state = layer.view().state
            if applied.outcome is Outcome.NOOP_REPLAY and state.kek_check == command.check:
                return _rewrap_done(state)
            if applied.outcome is not Outcome.APPLIED:
                raise errors.FailedPrecondition(
                    f"the rewrap did not apply ({applied.outcome.value}): the key table "
                    "changed meanwhile (a rotation or retirement); retry")
            log.info("key table rewrapped under a new KEK: generation %d at index %d (%d keys)",
                     command.generation, applied.index, len(command.keys))
            return pb.RewrapKeysResponse(
                kek_generation=command.generation, index=applied.index,
                key_ids=[key_id for key_id, _, _ in command.keys],
                capability_summary=capability_rows(result))

    def _wait_wraps_installed(self, result: FanOutResult, end: float) -> list[str]:
        """Waits (bounded by the request deadline, at most FANOUT_DEADLINE) until every probed
        member reports the raft wrap installed; returns the members that did not."""
        pending = {v.member: v for v in result.verdicts}
        wait_end = min(end - 0.2, time.monotonic() + FANOUT_DEADLINE)
        while pending and time.monotonic() < wait_end:
            for name, verdict in list(pending.items()):
                try:
                    answer = pb_grpc.EncryptionAdminStub(self.handle.channel(verdict.address)) \
                        .GetCapability(pb.GetCapabilityRequest(),
                                       timeout=max(0.1, min(1.0, wait_end - time.monotonic())))
                except grpc.RpcError:
                    continue
                if answer.raft_wrap_installed:
                    del pending[name]
            if pending:
                time.sleep(0.05)  # pacing between polls of remote members
        return sorted(pending)

    # ---- node-local ---------------------------------------------------------------------------

    @rpc_method
    def ResyncSidecar(self, request, context):
        end = self._end(context)
        plugin = self.plugin
        with plugin.exclusive(end):
            layer = plugin.require_layer()
            try:
                index = layer.resync_sidecar()
            except ApplyHalt as exc:
                raise errors.FailedPrecondition(str(exc)) from None
            sidecar = read_sidecar(self.handle.data_dir)
            log.info("sidecar rewritten from the replicated state (key changes up to %d)", index)
            return pb.ResyncSidecarResponse(raft_applied_index=index,
                                            keys=_key_infos(sidecar) if sidecar else [],
                                            node_name=self.handle.name)


def _cutover_took_effect(state: EncryptionState, purpose: int, command: Any,
                         applied: Any) -> bool:
    """Whether a cutover proposal enabled the envelope (False: it was already active, the
    caller answers `was_already_active`); raises FailedPrecondition when a key rotation raced
    it and nothing was enabled."""
    if command is None or applied.outcome is Outcome.ALREADY_ACTIVE:
        return False
    active = (state.storage_envelope_active if purpose == PURPOSE_STORAGE
              else state.raft_envelope_active)
    if applied.outcome is not Outcome.APPLIED or not active \
            or state.active[purpose] != command.dek_id:
        raise errors.FailedPrecondition(f"a key rotation raced the {PURPOSE_NAMES[purpose]} "
                                        "envelope cutover; nothing was enabled: retry")
    return True


def _rewrap_done(state: EncryptionState) -> pb.RewrapKeysResponse:
    """The answer of a rewrap that already happened (the leader's next KEK is current)."""
    return pb.RewrapKeysResponse(kek_generation=state.kek_generation,
                                 index=state.kek_rewrap_index, was_already_done=True,
                                 key_ids=sorted(state.keys))


def _bootstrapped_for_cutover(layer: EncryptionLayerAccess) -> EncryptionState:
    """Returns a copy of the state; FAILED_PRECONDITION before bootstrap (ENCRYPTION.md §7
    step 2: a cutover never bootstraps implicitly)."""
    state = layer.view().state
    if not state.bootstrapped:
        raise errors.FailedPrecondition(
            "encryption is not bootstrapped: run BootstrapEncryption first (the cutover "
            "never bootstraps implicitly)")
    return state


def _raft_already_active(state: EncryptionState) -> pb.EnableRaftEnvelopeResponse:
    return pb.EnableRaftEnvelopeResponse(cutover_index=state.raft_cutover_index,
                                         was_already_active=True,
                                         raft_key_id=state.active_raft_id)


def _already_active(state: EncryptionState) -> pb.EnableStorageEnvelopeResponse:
    return pb.EnableStorageEnvelopeResponse(cutover_index=state.storage_cutover_index,
                                            was_already_active=True,
                                            storage_key_id=state.active_storage_id)


def _key_infos(sidecar) -> list[pb.SidecarKeyInfo]:
    return [pb.SidecarKeyInfo(key_id=key_id, purpose=key.purpose, created=key.created,
                              local_epoch=key.local_epoch)
            for key_id, key in sorted(sidecar.keys.items())]
