"""The audit log: a tamper-evident record of every admin act and every refused call, per node.

Every admin and membership RPC is appended as a `request` record, fsynced, *before* its
handler runs — if the record cannot be written the call is refused (UNAVAILABLE) and nothing
happens — and then as an `outcome` record with its status code. A call that authentication
or authorization refused is appended as one `refused` record. Records are JSON lines in
`<data-dir>/audit/audit.log` (0600): time, node, identity (the client certificate's name, or
`anonymous` with the peer address), method, the request's arguments with every key, value
and byte field left out, the event and its code, `prev` (SHA-256 of the previous line) and
`mac` (HMAC-SHA256 of the record under a key derived from the cluster secret, when the node
has one). `verify` recomputes the chain and names the first record that was edited, removed
or reordered; without the secret an editor could recompute the hashes, with it they cannot.
Removing the newest records is visible only against `next_seq` of a running node.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from typing import Callable, Iterable, Optional

import grpc

from sealkv.node import durable, errors
from sealkv.node.serving.rpc import WrappedHandlers, rewrap_handler

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.log"
GENESIS = "0" * 64
MAC_INFO = b"sealkv audit log v1"
# Calls that are audited although they are not admin acts: their refusal is an event too.
REFUSAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Read-only or data-path services and methods: audited only when refused.
NOT_ADMIN_SERVICES = frozenset({"sealkv.v1.KV", "grpc.health.v1.Health",
                                "grpc.reflection.v1alpha.ServerReflection",
                                "grpc.reflection.v1.ServerReflection"})
NOT_ADMIN_METHODS = frozenset({"/sealkv.v1.Cluster/Status", "/sealkv.v1.Cluster/MemberList",
                               "/sealkv.v1.EncryptionAdmin/GetCapability",
                               "/sealkv.v1.EncryptionAdmin/GetSidecarState"})
OMITTED_NAMES = frozenset({"key", "value", "range_end", "prev_value", "wrapped", "wrapped_dek",
                           "kek", "secret", "token", "password"})


class AuditUnavailable(Exception):
    """The audit record could not be made durable; the act it describes must not happen."""


class AuditDamaged(Exception):
    """The audit log on disk does not verify; the message names the record and the fix."""


def is_admin_method(method: str) -> bool:
    """Whether `method` ("/package.Service/Method") is an admin act (audited before it runs).

    Every method of a service that is not the data path, health or reflection is an admin
    act unless it is one of the few read-only status calls: a plugin's new admin method is
    audited without being listed anywhere.
    """
    service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else ""
    return service not in NOT_ADMIN_SERVICES and method not in NOT_ADMIN_METHODS


def mac_key(secret: Optional[str]) -> Optional[bytes]:
    """The HMAC key of the audit log, derived from the cluster secret (None without one)."""
    if not secret:
        return None
    return hmac.new(secret.encode(), MAC_INFO, hashlib.sha256).digest()


def redact(message) -> dict:
    """The request's scalar arguments for the log: keys, values and every bytes field left out."""
    out: dict = {}
    for field, value in message.ListFields():
        name = field.name
        if name in OMITTED_NAMES or field.type == field.TYPE_BYTES or name.endswith("_key"):
            continue
        if field.type == field.TYPE_MESSAGE:
            if field.is_repeated:
                out[name] = [redact(v) for v in value]
            else:
                out[name] = redact(value)
        elif field.is_repeated:
            out[name] = list(value)
        elif field.type == field.TYPE_ENUM:
            out[name] = field.enum_type.values_by_number[value].name \
                if value in field.enum_type.values_by_number else value
        else:
            out[name] = value
    return out


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _encode(record: dict, key: Optional[bytes]) -> bytes:
    body = dict(record)
    body.pop("mac", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["mac"] = hmac.new(key, canonical, hashlib.sha256).hexdigest() if key else None
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` found: `ok`, the number of records read, and the first problem."""

    ok: bool
    records: int
    problem: str = ""
    macs_checked: bool = False


def verify(path: str, key: Optional[bytes]) -> Verdict:
    """Checks the chain (and MACs, with `key`); names the first edited, removed or reordered record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Verdict(True, 0, "", key is not None)
    prev, expected_seq, count = GENESIS, 1, 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        where = f"{path}: record {number}"
        try:
            record = json.loads(line)
            seq = record["seq"]
            if not isinstance(record, dict) or not isinstance(seq, int):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return Verdict(False, count, f"{where} is not a record (edited)", key is not None)
        if seq > expected_seq:
            return Verdict(False, count, f"{where} has seq {seq} where {expected_seq} was "
                           f"expected: records {expected_seq}..{seq - 1} were removed",
                           key is not None)
        if seq < expected_seq:
            return Verdict(False, count, f"{where} has seq {seq} where {expected_seq} was "
                           "expected: records were reordered or duplicated", key is not None)
        if key is not None and _encode(record, key) != line:
            return Verdict(False, count, f"{where} (seq {seq}) was edited: its MAC does not "
                           "match", True)
        if record.get("prev") != prev:
            return Verdict(False, count, f"{where} (seq {seq}) does not follow record "
                           f"{number - 1}: record {number - 1} was edited", key is not None)
        prev, expected_seq, count = _line_hash(line), seq + 1, count + 1
    return Verdict(True, count, "", key is not None)


class AuditLog:
    """An append-only, fsynced, hash-chained audit file of one node.

    `append` is thread-safe (gRPC worker threads) and returns only once the record is on
    disk; it raises `AuditUnavailable` otherwise, after which nothing was appended (a
    partial write is cut back). Opening verifies the whole file: a torn last line (a crash
    mid-append) is cut with a WARNING; any other damage raises `AuditDamaged`.
    """

    def __init__(self, data_dir: str, node: str, secret: Optional[str],
                 clock: Callable[[], float] = time.time):
        self.dir = os.path.join(data_dir, AUDIT_DIR)
        self.path = os.path.join(self.dir, AUDIT_FILE)
        self.node = node
        self._key = mac_key(secret)
        self._clock = clock
        self._lock = threading.Lock()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._cut_torn_tail()
        verdict = verify(self.path, self._key)
        if not verdict.ok:
            raise AuditDamaged(f"the audit log does not verify: {verdict.problem}; inspect it "
                               f"with `sealkv audit verify --data-dir {data_dir}`, then move "
                               f"{self.path} aside to start a new chain")
        self._prev, self.next_seq = GENESIS, 1
        for line in self._lines():
            self._prev, self.next_seq = _line_hash(line), json.loads(line)["seq"] + 1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        durable.sync_dir(self.dir, durable.FSYNC_ALWAYS)

    def _lines(self) -> Iterable[bytes]:
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    yield line.rstrip(b"\n")
        except FileNotFoundError:
            return

    def _cut_torn_tail(self) -> None:
        try:
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    keep = data.rfind(b"\n") + 1
                    f.truncate(keep)
                    os.fsync(f.fileno())
                    log.warning("audit log %s: cut a torn last record at offset %d", self.path,
                                keep)
        except FileNotFoundError:
            pass

    def append(self, event: str, identity: str, peer: str, method: str, *,
               args: Optional[dict] = None, code: str = "") -> int:
        """Appends one record and fsyncs it; returns its seq or raises `AuditUnavailable`."""
        with self._lock:
            record = {"seq": self.next_seq, "time": _iso(self._clock()), "node": self.node,
                      "event": event, "identity": identity, "peer": peer, "method": method,
                      "args": args or {}, "code": code, "prev": self._prev}
            line = _encode(record, self._key)
            size = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                written = os.write(self._fd, line + b"\n")
                if written != len(line) + 1:
                    raise OSError("short write")
                os.fsync(self._fd)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, size)
                except OSError:
                    pass
                log.warning("audit log %s cannot be written (%s): refusing %s", self.path,
                            exc.strerror or exc, method)
                raise AuditUnavailable(f"the audit log cannot be written "
                                       f"({exc.strerror or exc}): the call was refused") from None
            self._prev, self.next_seq = _line_hash(line), self.next_seq + 1
            return record["seq"]

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def caller(context: grpc.ServicerContext) -> tuple[str, str]:
    """(identity, peer) of a call: the client certificate's common name, else `anonymous`."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    identity = names[0].decode(errors="replace") if names else "anonymous"
    return identity, context.peer()


class AuditInterceptor(grpc.ServerInterceptor):
    """Writes the audit records around admin calls and for refused calls.

    Installed outermost, so a refusal by the authorization interceptor is seen as the call's
    outcome. Unary calls and server-streaming calls (Cluster.Snapshot) carry admin acts: the
    request record is written before the handler runs, the outcome once the stream ended; a
    refused bidirectional stream is recorded once.
    """

    def __init__(self, audit: AuditLog):
        self.audit = audit
        self._wrapped = WrappedHandlers(self._audited)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler)

    def _audited(self, method: str, handler):
        wrappers = {"unary_unary": self._unary, "unary_stream": self._unary_stream,
                    "stream_stream": self._stream}

        def wrap(kind, streams_out, behavior):
            wrapper = wrappers.get(kind)
            return None if wrapper is None else wrapper(behavior, method)

        return rewrap_handler(handler, wrap)

    def _unary(self, behavior, method: str):
        if not is_admin_method(method):
            def refusals_only(request, context):
                try:
                    return behavior(request, context)
                except BaseException:
                    self._refused(method, context)
                    raise

            return refusals_only

        def admin_act(request, context):
            with self._admin_act(method, request, context):
                return behavior(request, context)

        return admin_act

    def _unary_stream(self, behavior, method: str):
        if not is_admin_method(method):
            return self._stream(behavior, method)  # refusals only, as for a stream

        def admin_act(request, context):
            with self._admin_act(method, request, context):
                yield from behavior(request, context)

        return admin_act

    def _stream(self, behavior, method: str):
        """Wraps a streaming handler (its request or request iterator, then the context) so
        that a refused call is recorded."""
        def wrapper(request, context):
            try:
                yield from behavior(request, context)
            except BaseException:
                self._refused(method, context)
                raise

        return wrapper

    @contextlib.contextmanager
    def _admin_act(self, method: str, request, context):
        """Around an admin act: its request record before it runs (the call is aborted with
        UNAVAILABLE when that cannot be written), its outcome record once it ended."""
        identity, peer = caller(context)
        try:
            self.audit.append("request", identity, peer, method, args=redact(request))
        except AuditUnavailable as exc:
            errors.abort_with(context, errors.Unavailable(str(exc)))
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED  # the client went away mid-stream
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._append_quietly("outcome", identity, peer, method, code)

    def _refused(self, method: str, context) -> None:
        code = context.code()
        if code in REFUSAL_CODES:
            identity, peer = caller(context)
            self._append_quietly("refused", identity, peer, method, code)

    def _append_quietly(self, event: str, identity: str, peer: str, method: str, code) -> None:
        try:
            self.audit.append(event, identity, peer, method, code=code.name)
        except AuditUnavailable:
            pass  # already logged at WARNING; the act itself is over
