"""The one authorization interceptor: which verified identity may call which method.

Every RPC a node serves passes `AuthorizationInterceptor` (installed on the server unless the
node runs --insecure). The TLS handshake has already proven the client certificate was signed
by the cluster CA and is within its validity window; the interceptor then reads the identity
(CN), role (OU) and serial of that certificate (`sealkv.node.security.pki`) and decides:

- the certificate's serial is on the replicated revocation list -> UNAUTHENTICATED;
- no verified certificate, or a role sealkv does not know -> UNAUTHENTICATED;
- the method is not in the policy -> PERMISSION_DENIED (fail closed: a method nobody declared
  is denied to everyone);
- client roles are ordered readonly < readwrite < admin: a method needs at least its rule's
  role; `admin` may call every declared method;
- a node certificate (role `node`) may call only the methods whose rule says `peers` (what a
  peer needs: the capability probe, the read point and digest of a consistency check,
  health) and nothing else.

Each refusal is answered through the error table (`errors.Unauthenticated`,
`errors.PermissionDenied`) and logged once per (identity, method, reason) with the identity's
name, role and the method; never a key, value or request field.

A stream whose requests carry different operations (a batch stream) is declared with
`per_request=True` and the minimum role of its cheapest operation; its servicer must call
`require(context, role, what)` for every request it reads.

Thread contract: `intercept_service` runs on gRPC worker threads; the policy is built once
before the server starts and never changes; `is_revoked` must be fast and thread-safe.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import grpc

from sealkv.node import errors
from sealkv.node.security import pki
from sealkv.node.serving.rpc import WrappedHandlers, rewrap_handler

log = logging.getLogger(__name__)

OPEN = "open"  # any verified identity, any role (health)
RANK = {pki.ROLE_READONLY: 1, pki.ROLE_READWRITE: 2, pki.ROLE_ADMIN: 3}
RULE_ROLES = (OPEN,) + pki.CLIENT_ROLES


@dataclass(frozen=True)
class Rule:
    """What one method needs: a minimum client role (or OPEN), and whether node
    certificates may call it."""

    role: str
    peers: bool = False
    per_request: bool = False

    def __post_init__(self) -> None:
        if self.role not in RULE_ROLES:
            raise ValueError(f"unknown role {self.role!r} (use one of {', '.join(RULE_ROLES)})")


KV = "/sealkv.v1.KV/"
CLUSTER = "/sealkv.v1.Cluster/"

CORE_POLICY: dict[str, Rule] = {
    KV + "Get": Rule(pki.ROLE_READONLY, peers=True),
    KV + "Range": Rule(pki.ROLE_READONLY),
    KV + "Put": Rule(pki.ROLE_READWRITE),
    KV + "Delete": Rule(pki.ROLE_READWRITE),
    KV + "CompareAndSwap": Rule(pki.ROLE_READWRITE),
    # The batch stream needs readonly to open; each request in it is authorized by its
    # operation (BATCH_OP_ROLES) inside the stream.
    KV + "Batch": Rule(pki.ROLE_READONLY, per_request=True),
    CLUSTER + "Status": Rule(pki.ROLE_READONLY, peers=True),
    CLUSTER + "MemberList": Rule(pki.ROLE_READONLY),
    CLUSTER + "MemberAdd": Rule(pki.ROLE_ADMIN),
    CLUSTER + "MemberRemove": Rule(pki.ROLE_ADMIN),
    CLUSTER + "TransferLeadership": Rule(pki.ROLE_ADMIN),
    # Digest decrypts the whole database: admins, and peers running a consistency check.
    CLUSTER + "Digest": Rule(pki.ROLE_ADMIN, peers=True),
    CLUSTER + "RevokeCertificate": Rule(pki.ROLE_ADMIN),
    # Lists or disarms alarms: admin, as etcd's Alarm.
    CLUSTER + "Alarm": Rule(pki.ROLE_ADMIN),
    CLUSTER + "ListRevoked": Rule(pki.ROLE_READONLY),
    # A backup holds every value as stored (envelopes, or cleartext before a cutover) and
    # the wrapped data keys: admin, as etcd's snapshot save needs root.
    CLUSTER + "Snapshot": Rule(pki.ROLE_ADMIN),
    "/grpc.health.v1.Health/Check": Rule(OPEN, peers=True),
    "/grpc.health.v1.Health/Watch": Rule(OPEN, peers=True),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(pki.ROLE_READONLY),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule(pki.ROLE_READONLY),
}


# The role each operation of a KV.Batch request needs; an operation not listed is denied.
BATCH_OP_ROLES = {"get": pki.ROLE_READONLY, "range": pki.ROLE_READONLY,
                  "put": pki.ROLE_READWRITE, "delete": pki.ROLE_READWRITE,
                  "compare_and_swap": pki.ROLE_READWRITE}


def rule_from(role: str, peers: bool = False) -> Rule:
    """Builds a Rule from a plugin's declaration; raises ValueError for an unknown role."""
    return Rule(role, peers=peers)


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: bytes) -> pki.Identity:
    return pki.identity_of(pem)


def identity(context: grpc.ServicerContext) -> Optional[pki.Identity]:
    """The verified client certificate's identity, or None (no TLS, or no certificate)."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert")
    if not pems:
        return None
    return _identity_of_pem(pems[0])


class Refusals:
    """Logs each refusal once per (identity, method, reason); counts the rest."""

    LIMIT = 10000

    def __init__(self) -> None:
        self._seen: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def report(self, who: str, method: str, error: errors.SealkvError) -> None:
        key = (who, method, type(error).__name__)
        with self._lock:
            count = self._seen.get(key, 0)
            if count == 0 and len(self._seen) >= self.LIMIT:
                self._seen.clear()
            self._seen[key] = count + 1
        if count == 0:
            log.warning("refused %s for %s: %s (%s); further refusals of this identity and "
                        "method are not logged", method, who, error.code.name, error.message)


_STREAM_REFUSALS = Refusals()


def decide(policy: Mapping[str, Rule], method: str, ident: Optional[pki.Identity],
           is_revoked: Callable[[int], bool]) -> Optional[errors.SealkvError]:
    """Returns the refusal for `ident` calling `method`, or None when it may. Pure."""
    if ident is None:
        return errors.Unauthenticated("no verified client certificate: connect with mutual "
                                      "TLS (--cacert, --cert, --key)")
    if is_revoked(ident.serial):
        return errors.Unauthenticated(f"the certificate of {ident.name!r} (serial "
                                      f"{ident.serial:x}) is revoked")
    if ident.role not in pki.ROLES:
        return errors.Unauthenticated(f"the certificate of {ident.name!r} carries no sealkv "
                                      f"role (its OU must be one of {', '.join(pki.ROLES)})")
    rule = policy.get(method)
    if rule is None:
        return errors.PermissionDenied(f"{method} is not an authorized method of this node")
    if ident.role == pki.ROLE_NODE:
        if rule.peers:
            return None
        return errors.PermissionDenied(f"node certificate {ident.name!r} may not call {method}")
    if rule.role == OPEN or RANK[ident.role] >= RANK[rule.role]:
        return None
    return errors.PermissionDenied(f"{ident.name!r} (role {ident.role}) may not call {method}: "
                                   f"it needs role {rule.role}")


class Caller:
    """The verified identity of one call, for per-request checks inside a stream declared
    `per_request` (built once per stream: reading the TLS auth context has a cost)."""

    def __init__(self, context: grpc.ServicerContext):
        self.identity = identity(context)

    def check_op(self, kind: Optional[str], what: str) -> Optional[errors.SealkvError]:
        """Returns the refusal of one batch operation `kind`, or None when it may run.

        Without TLS (--insecure: no identity at all) everything is allowed; an operation kind
        not in BATCH_OP_ROLES is denied (fail closed).
        """
        ident = self.identity
        if ident is None:
            return None
        role = BATCH_OP_ROLES.get(kind or "")
        if role is None:
            refusal = errors.PermissionDenied(f"{what} is not an authorized operation")
        elif ident.role == pki.ROLE_NODE or RANK.get(ident.role, 0) < RANK[role]:
            refusal = errors.PermissionDenied(f"{ident.name!r} (role {ident.role}) may not "
                                              f"call {what}: it needs role {role}")
        else:
            return None
        _STREAM_REFUSALS.report(f"{ident.name!r} (role {ident.role}, serial {ident.serial:x})",
                                what, refusal)
        return refusal


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Checks every call against `policy` before its handler runs (see the module docstring)."""

    def __init__(self, policy: Mapping[str, Rule], is_revoked: Callable[[int], bool]):
        """`policy` is read, not copied: the server's builder completes it (plugins'
        declarations) before the server starts, and nobody changes it after."""
        self._policy = policy
        self._is_revoked = is_revoked
        self._refusals = Refusals()
        self._wrapped = WrappedHandlers(
            lambda method, handler: _wrap(handler, functools.partial(self._check, method)))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler)

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        try:
            ident = identity(context)
        except ValueError:
            ident = None
        refusal = decide(self._policy, method, ident, self._is_revoked)
        if refusal is None:
            return
        who = f"{ident.name!r} (role {ident.role or '-'}, serial {ident.serial:x})" \
            if ident is not None else f"an unauthenticated peer {context.peer()}"
        self._refusals.report(who, method, refusal)
        errors.abort_with(context, refusal)


def _wrap(handler: grpc.RpcMethodHandler, check: Callable) -> grpc.RpcMethodHandler:
    """Returns `handler` with `check(context)` run before its behaviour (for a streaming
    response, before the first message)."""
    def wrap(kind, streams_out, inner):
        if streams_out:
            def behaviour(request, context):
                check(context)
                yield from inner(request, context)
        else:
            def behaviour(request, context):
                check(context)
                return inner(request, context)
        return behaviour

    return rewrap_handler(handler, wrap)
