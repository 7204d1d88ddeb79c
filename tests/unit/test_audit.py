"""The audit log: append, fsync, chain and MAC, and `verify` naming each kind of tampering."""
import json
import logging
import os

import pytest

from sealkv.node.serving import audit
from sealkv.v1 import cluster_pb2, kv_pb2

SECRET = "s" * 40


def _log(tmp_path, secret=SECRET):
    return audit.AuditLog(str(tmp_path), "n1", secret, clock=lambda: 1_700_000_000.25)


def _fill(tmp_path, n=5, secret=SECRET):
    log = _log(tmp_path, secret)
    for i in range(n):
        log.append("request", "root", "ipv4:127.0.0.1:1", f"/sealkv.v1.Cluster/M{i}",
                   args={"name": f"n{i}"})
    log.close()
    return os.path.join(str(tmp_path), "audit", "audit.log")


def _lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")[:-1]


def _write(path, lines):
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def test_records_are_chained_durable_and_verify(tmp_path):
    path = _fill(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    v = audit.verify(path, audit.mac_key(SECRET))
    assert (v.ok, v.records, v.macs_checked) == (True, 5, True)
    first, second = (json.loads(x) for x in _lines(path)[:2])
    assert first["prev"] == audit.GENESIS and first["seq"] == 1
    assert first["time"] == "2023-11-14T22:13:20.250Z"
    assert second["prev"] == audit._line_hash(_lines(path)[0])
    reopened = _log(tmp_path)  # the chain goes on after a restart
    assert reopened.append("outcome", "root", "p", "/m", code="OK") == 6
    assert audit.verify(path, audit.mac_key(SECRET)).ok


def test_an_edited_record_is_named_by_its_mac(tmp_path):
    path = _fill(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"root"', b'"mallory"')
    _write(path, lines)
    v = audit.verify(path, audit.mac_key(SECRET))
    assert not v.ok and v.records == 2
    assert "record 3 (seq 3) was edited: its MAC does not match" in v.problem


def test_without_the_secret_an_edit_is_named_by_the_chain(tmp_path):
    path = _fill(tmp_path, secret=None)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"n1"', b'"n9"', 1)
    _write(path, lines)
    v = audit.verify(path, None)
    assert not v.ok and "record 3 (seq 3) does not follow record 2: record 2 was edited" in v.problem


def test_a_removed_record_is_named(tmp_path):
    path = _fill(tmp_path)
    lines = _lines(path)
    del lines[1]
    _write(path, lines)
    v = audit.verify(path, audit.mac_key(SECRET))
    assert not v.ok and "record 2 has seq 3 where 2 was expected: records 2..2 were removed" in v.problem


def test_reordered_records_are_named(tmp_path):
    path = _fill(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    v = audit.verify(path, audit.mac_key(SECRET))
    assert not v.ok and "record 2 has seq 3 where 2 was expected" in v.problem
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    lines.append(lines[1])  # a replayed record
    _write(path, lines)
    assert "were reordered or duplicated" in audit.verify(path, audit.mac_key(SECRET)).problem


def test_a_torn_tail_is_cut_with_a_warning_and_damage_refuses_the_open(tmp_path, caplog):
    path = _fill(tmp_path)
    with open(path, "ab") as f:
        f.write(b'{"seq": 6, "ti')
    with caplog.at_level(logging.WARNING, logger="sealkv.node.serving.audit"):
        log = _log(tmp_path)
    assert "cut a torn last record" in caplog.text
    assert log.next_seq == 6
    log.close()
    lines = _lines(path)
    lines[0] = b"garbage"
    _write(path, lines)
    with pytest.raises(audit.AuditDamaged, match="record 1 is not a record.*move .* aside"):
        _log(tmp_path)


def test_a_record_that_cannot_be_written_is_refused_and_leaves_nothing(tmp_path):
    log = _log(tmp_path)
    log.append("request", "root", "p", "/a")
    os.close(log._fd)
    log._fd = os.open(os.path.join(str(tmp_path), "audit", "audit.log"), os.O_RDONLY)
    with pytest.raises(audit.AuditUnavailable, match="cannot be written.*the call was refused"):
        log.append("request", "root", "p", "/b")
    assert log.next_seq == 2
    assert audit.verify(os.path.join(str(tmp_path), "audit", "audit.log"),
                        audit.mac_key(SECRET)).records == 1


def test_arguments_leave_out_keys_values_and_bytes():
    add = cluster_pb2.MemberAddRequest(name="n4", raft_address="127.0.0.1:1",
                                       grpc_address="127.0.0.1:2", role=cluster_pb2.LEARNER)
    assert audit.redact(add) == {"name": "n4", "raft_address": "127.0.0.1:1",
                                 "grpc_address": "127.0.0.1:2", "role": "LEARNER"}
    put = kv_pb2.PutRequest(key=b"secret-key", value=b"secret-value", prev_kv=True)
    assert audit.redact(put) == {"prev_kv": True}


@pytest.mark.parametrize("method,admin", [
    ("/sealkv.v1.Cluster/MemberAdd", True), ("/sealkv.v1.Cluster/Digest", True),
    ("/sealkv.v1.EncryptionAdmin/EnableStorageEnvelope", True),
    ("/sealkv_consistency_admin.v1.ConsistencyAdmin/CheckConsistency", True),
    ("/sealkv.v1.Cluster/Status", False), ("/sealkv.v1.KV/Put", False),
    ("/sealkv.v1.EncryptionAdmin/GetCapability", False), ("/grpc.health.v1.Health/Check", False),
])
def test_admin_methods_are_every_method_but_the_data_path_and_status(method, admin):
    assert audit.is_admin_method(method) is admin


class _Context:
    """A gRPC servicer context for tests only: a peer, no client certificate, a code."""

    def __init__(self, code=None):
        self._code = code

    def auth_context(self):
        return {}

    def peer(self):
        return "ipv4:127.0.0.1:9"

    def code(self):
        return self._code


def _events(tmp_path):
    path = os.path.join(str(tmp_path), "audit", "audit.log")
    return [(r["event"], r.get("code")) for r in map(json.loads, _lines(path))]


def test_the_interceptor_records_admin_acts_unary_and_streamed_and_refusals(tmp_path):
    log = _log(tmp_path)
    interceptor = audit.AuditInterceptor(log)
    act = "/sealkv.v1.Cluster/MemberRemove"
    assert interceptor._unary(lambda request, context: "done", act)(
        cluster_pb2.MemberRemoveRequest(name="n2"), _Context()) == "done"
    chunks = interceptor._unary_stream(lambda request, context: iter([b"a", b"b"]), act)(
        cluster_pb2.MemberRemoveRequest(name="n3"), _Context())
    assert next(chunks) == b"a"
    chunks.close()  # the client went away mid-stream

    def refused(request, context):
        raise RuntimeError("denied")
        yield  # a generator

    refusal = sorted(audit.REFUSAL_CODES, key=lambda code: code.name)[0]
    with pytest.raises(RuntimeError):
        list(interceptor._unary_stream(refused, "/sealkv.v1.KV/Range")(
            kv_pb2.RangeRequest(), _Context(refusal)))
    log.close()
    assert _events(tmp_path) == [("request", ""), ("outcome", "OK"), ("request", ""),
                                 ("outcome", "CANCELLED"), ("refused", refusal.name)]
