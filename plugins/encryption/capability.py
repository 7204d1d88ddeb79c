"""The capability protocol of the encryption plugin (ENCRYPTION.md §7): both sides.

Answering side: `answer_capability` builds this node's honest `GetCapability` answer
(`encryption_capable` only when this node can really read and write envelopes: the layer is
enabled, its KEK unwraps every key it holds, its nonce epoch is usable and its sidecar
directory writable), and `next_kek_ready` for a KEK rewrap. Asking side: `probe_capability`
is the fan-out probe that asks one member, `rewrap_probe` the one a KEK rewrap uses,
`expected_node_id` the id a member must answer with, `capability_rows` the
`capability_summary` rows of a fan-out. Both run on gRPC worker threads.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import grpc

from sealkv.node import __version__
from sealkv.node.replication.membership import MemberRecord, member_raft_id
from sealkv.plugins.fanout import CapabilityVerdict, FanOutResult, Probe, ProbeAnswer
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc

from . import envelope
from .layer import EncryptionLayerAccess
from .nonce import MAX_EPOCH, epoch_in_range, full_node_id
from .sidecar import SidecarError, read_sidecar, sidecar_dir, sidecar_path

BUILD_VERSION = (f"sealkv {__version__}; envelope v{envelope.VERSION}; storage envelope; "
                 "raft envelope")


# ---- answering side -----------------------------------------------------------------------

def answer_capability(node_name: str, data_dir: str,
                      layer: Optional[EncryptionLayerAccess]) -> pb.GetCapabilityResponse:
    """Returns this node's honest capability; `layer` is None when encryption is disabled."""
    response = pb.GetCapabilityResponse(build_version=BUILD_VERSION, node_name=node_name)
    response.sidecar_present = os.path.exists(sidecar_path(data_dir))
    if layer is None:
        response.reason = "the encryption storage layer is not enabled on this node"
        return response
    view = layer.view()
    response.full_node_id = view.full_node_id
    state = view.state
    epoch = view.local_epoch(state.active_storage_id) if state.bootstrapped else None
    response.local_epoch = min(epoch or 0, MAX_EPOCH)
    response.reason = (layer.key_problem(state) or _epoch_problem(state, epoch)
                       or _sidecar_unwritable(data_dir))
    response.encryption_capable = not response.reason
    response.raft_envelope_cutover_index = state.raft_cutover_index
    response.raft_wrap_installed = view.raft_wrap_installed
    response.kek_generation = state.kek_generation
    if state.bootstrapped:
        ready, why, check = layer.next_kek_status(state)
        response.next_kek_ready, response.next_kek_reason = ready, why
        response.next_kek_check = check
    else:
        response.next_kek_reason = "encryption is not bootstrapped: there is no key table"
    return response


def _epoch_problem(state, epoch: Optional[int]) -> str:
    if not state.bootstrapped:
        return ""
    if epoch is None:
        return f"no durable nonce epoch for storage key {state.active_storage_id}"
    if epoch >= MAX_EPOCH:
        return (f"the nonce epoch of storage key {state.active_storage_id} is exhausted: "
                "rotate the key")
    return ""


def _sidecar_unwritable(data_dir: str) -> str:
    """Returns why the sidecar directory cannot be written, or "" (a real create + unlink)."""
    directory = sidecar_dir(data_dir)
    probe = os.path.join(directory, f".capability-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"the sidecar directory {directory} is not writable ({exc.strerror})"
    try:
        read_sidecar(data_dir)
    except SidecarError as exc:
        return f"the sidecar is invalid: {exc}"
    return ""


# ---- asking side ----------------------------------------------------------------------------

def expected_node_id(member: MemberRecord) -> int:
    """Returns the full node id `member` must answer GetCapability with."""
    return full_node_id(member_raft_id(member))


def probe_capability(member: MemberRecord, channel: grpc.Channel, timeout: float) -> ProbeAnswer:
    """Asks one member's EncryptionAdmin.GetCapability (the fan-out probe)."""
    response, details = _ask(channel, timeout)
    if not epoch_in_range(response.local_epoch):
        return ProbeAnswer(response.full_node_id, False,
                           f"reported epoch {response.local_epoch} is above 0xFFFF", details)
    return ProbeAnswer(response.full_node_id, response.encryption_capable, response.reason,
                       details)


def rewrap_probe(layer: EncryptionLayerAccess) -> Probe:
    """Returns the fan-out probe of a KEK rewrap: a member passes only when it says
    `next_kek_ready` and its next-KEK check blob opens under this node's (the leader's) next
    KEK, i.e. both staged the same next KEK."""
    def probe(member: MemberRecord, channel: grpc.Channel, timeout: float) -> ProbeAnswer:
        response, details = _ask(channel, timeout)
        if not response.next_kek_ready:
            return ProbeAnswer(response.full_node_id, False,
                               response.next_kek_reason or "next KEK not ready", details)
        if not layer.next_kek_opens(response.next_kek_check):
            return ProbeAnswer(response.full_node_id, False,
                               "its next KEK is not the leader's next KEK", details)
        return ProbeAnswer(response.full_node_id, True, "", details)
    return probe


def _ask(channel: grpc.Channel, timeout: float) -> tuple[pb.GetCapabilityResponse, dict]:
    """One member's GetCapability answer and the details both probes report of it."""
    response = pb_grpc.EncryptionAdminStub(channel).GetCapability(pb.GetCapabilityRequest(),
                                                                  timeout=timeout)
    return response, {"build_version": response.build_version,
                      "local_epoch": str(response.local_epoch), "node_name": response.node_name}


def capability_rows(result: FanOutResult) -> list[pb.CapabilityRow]:
    """Returns the `capability_summary` rows of a fan-out."""
    return [_row(v) for v in result.verdicts]


def _row(v: CapabilityVerdict) -> pb.CapabilityRow:
    epoch = v.details.get("local_epoch", "0")
    return pb.CapabilityRow(
        member=v.member, grpc_address=v.address, role=v.role, ok=v.ok, reason=v.reason,
        expected_node_id=v.expected_id or 0, responder_node_id=v.responder_id,
        build_version=v.details.get("build_version", ""),
        local_epoch=int(epoch) if epoch.isdigit() and epoch_in_range(int(epoch)) else 0)
