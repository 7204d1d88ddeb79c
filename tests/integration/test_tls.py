"""Mutual TLS and roles on a real 3-node cluster (TLS is the default of `tests/cluster.py`).

Who gets in: a plaintext client, a certificate from another CA, an expired one and a revoked
one do not; what each role may do: readonly reads, readwrite writes, admin administers; a
node certificate may do only what peers need.
"""
import datetime
import json
import os
import subprocess
import sys

import grpc
import pytest

from sealkv.node import errors
from sealkv.node.client import Client
from sealkv.node.security import pki, tls
from sealkv.v1 import encryption_admin_pb2 as pb
from sealkv.v1 import encryption_admin_pb2_grpc as pb_grpc
from tests.cluster import running_cluster, wait_for

pytestmark = pytest.mark.integration

STUB = pb_grpc.EncryptionAdminStub


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls-cluster")
    kek = base / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    with running_cluster(str(base), 3, plugins=["encryption"],
                         extra_args=["--kek-file", str(kek)]) as c:
        yield c


def as_(cluster, name, role, batching=True) -> Client:
    """A client of every node with a certificate `name` of `role` (made once)."""
    files = cluster.client_files(name, role)
    return Client([n.grpc for n in cluster.nodes.values()], timeout=5.0, batching=batching,
                  **tls.client_kwargs(files))


def refused(client: Client, call) -> errors.SealkvError:
    with pytest.raises(errors.SealkvError) as info:
        call(client)
    return info.value


def test_a_plaintext_client_is_refused(cluster):
    with Client([cluster.nodes["n1"].grpc], timeout=3) as plain:
        error = refused(plain, lambda c: c.get(b"k"))
    assert isinstance(error, errors.Unavailable), error
    assert "a plaintext client (give --cacert, --cert and --key)" in error.message
    with cluster.client("n1") as root:
        assert root.status().transport_security == "mutual-tls"


def test_certificates_from_another_ca_expired_or_unsigned_are_refused(cluster, tmp_path):
    other = str(tmp_path / "other-ca")
    pki.create_ca(other)
    forged = pki.create_client(other, "mallory", pki.ROLE_ADMIN)
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = pki.create_client(cluster.certs_dir, "expired", pki.ROLE_ADMIN,
                                not_before=now - datetime.timedelta(days=2),
                                not_after=now - datetime.timedelta(days=1))
    for cert, key in ((forged.cert, forged.key), (expired.cert, expired.key)):
        with Client([cluster.nodes["n2"].grpc], timeout=3, cacert=cluster.tls_files.cacert,
                    cert=cert, key=key) as c:
            error = refused(c, lambda c: c.put(b"intruder", b"x"))
        assert isinstance(error, errors.Unavailable), (cert, error)
        assert "signed by another CA, expired" in error.message
    with cluster.client() as root:
        assert not root.get(b"intruder").found
    # A client that does not trust the node's certificate refuses it itself.
    with Client([cluster.nodes["n2"].grpc], timeout=3, cacert=f"{other}/ca.crt",
                cert=forged.cert, key=forged.key) as c:
        error = refused(c, lambda c: c.get(b"intruder"))
    assert isinstance(error, errors.Unauthenticated) and "TLS handshake failed" in error.message


def test_readonly_reads_and_cannot_write(cluster):
    with cluster.client() as root:
        root.put(b"shared", b"v1")
    with as_(cluster, "reader", pki.ROLE_READONLY) as reader:
        assert reader.get(b"shared").kv.value == b"v1"
        assert reader.range(b"", range_end=b"\0").count >= 1
        assert reader.member_list().members
        assert reader.call(STUB, "GetSidecarState", pb.GetSidecarStateRequest())
        # The client batches by default: the stream authorizes each request.
        error = refused(reader, lambda c: c.put(b"xyzzy-key", b"plugh-value"))
        assert isinstance(error, errors.PermissionDenied)
        assert "'reader' (role readonly) may not call /sealkv.v1.KV/Batch put" in error.message
        assert isinstance(refused(reader, lambda c: c.delete(b"shared")),
                          errors.PermissionDenied)
    with as_(cluster, "reader", pki.ROLE_READONLY, batching=False) as unary:
        assert unary.get(b"shared").kv.value == b"v1"
        error = refused(unary, lambda c: c.put(b"xyzzy-key", b"plugh-value"))
        assert isinstance(error, errors.PermissionDenied)
        assert "'reader' (role readonly) may not call /sealkv.v1.KV/Put" in error.message
    with cluster.client() as root:
        assert root.get(b"shared").kv.value == b"v1"
    logs = "".join(n.log() for n in cluster.nodes.values())
    assert "refused /sealkv.v1.KV/Put for 'reader' (role readonly" in logs
    assert "refused /sealkv.v1.KV/Batch put for 'reader' (role readonly" in logs
    assert "xyzzy" not in logs and "plugh" not in logs


def test_readwrite_writes_and_cannot_administer(cluster):
    with as_(cluster, "writer", pki.ROLE_READWRITE) as writer:
        writer.put(b"w", b"1")
        assert writer.compare_and_swap(b"w", b"2", expected_mod_revision=writer.get(
            b"w").kv.mod_revision).succeeded
        for call in (lambda c: c.call(STUB, "EnableStorageEnvelope",
                                      pb.EnableStorageEnvelopeRequest()),
                     lambda c: c.member_add("n9", "127.0.0.1:1", "127.0.0.1:2"),
                     lambda c: c.digest(),
                     lambda c: c.revoke_certificate(12345)):
            assert isinstance(refused(writer, call), errors.PermissionDenied)


def test_admin_writes_and_administers_with_the_fan_out_over_tls(cluster):
    with cluster.client() as root:
        root.put(b"before", b"cleartext")
        root.call(STUB, "BootstrapEncryption", pb.BootstrapEncryptionRequest(), timeout=30)
        # The capability fan-out probes every member with node certificates.
        r = root.call(STUB, "EnableStorageEnvelope", pb.EnableStorageEnvelopeRequest(),
                      timeout=30)
        assert r.cutover_index > 0 and not r.was_already_active
        assert sorted(row.member for row in r.capability_summary) == ["n1", "n2", "n3"]
        assert all(row.ok for row in r.capability_summary), r.capability_summary
        root.put(b"after", b"sealed")
        assert root.get(b"after").kv.value == b"sealed"
        # MemberAdd passes authorization; the capability fence then refuses an address where
        # nothing answers, naming the member and the reason class.
        error = refused(root, lambda c: c.member_add("ghost", "", "127.0.0.1:1",
                                                     learner=True, timeout=15))
        assert isinstance(error, errors.FailedPrecondition), error
        assert "ghost" in error.message


def test_a_node_certificate_may_only_do_what_peers_need(cluster):
    files = pki.node_files(cluster.certs_dir, "n1")
    with Client([cluster.nodes["n2"].grpc], timeout=5, **tls.client_kwargs(files)) as peer:
        assert peer.digest().node_id == "n2"
        assert peer.status().node_id == "n2"
        assert isinstance(refused(peer, lambda c: c.put(b"k", b"v")), errors.PermissionDenied)
        assert isinstance(refused(peer, lambda c: c.member_list()), errors.PermissionDenied)


def test_a_revoked_certificate_is_refused_on_every_node(cluster):
    files = cluster.client_files("leaver", pki.ROLE_READWRITE)
    with Client([n.grpc for n in cluster.nodes.values()], timeout=5,
                **tls.client_kwargs(files)) as leaver:
        leaver.put(b"leaver", b"was here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALKV_")}
    env.update(SEALKV_ENDPOINTS=",".join(n.grpc for n in cluster.nodes.values()),
               SEALKV_CACERT=cluster.tls_files.cacert, SEALKV_CERT=cluster.tls_files.cert,
               SEALKV_KEY=cluster.tls_files.key)
    r = subprocess.run([sys.executable, "-m", "sealkv.node.cli", "-w", "json", "cert",
                        "revoke", files.cert], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    serial = pki.serial_of(files.cert)
    assert json.loads(r.stdout)["serial"] == f"{serial:x}"
    for node in cluster.nodes.values():
        with Client([node.grpc], timeout=5, **tls.client_kwargs(files)) as one:
            def refused_here():
                try:
                    one.get(b"leaver", endpoint=node.grpc)
                except errors.Unauthenticated as exc:
                    return "revoked" in exc.message
                return False

            wait_for(refused_here, 15, f"{node.name} to refuse the revoked certificate")
    with cluster.client() as root:
        assert f"{serial:x}" in root.list_revoked().revoked


def test_the_batch_stream_authorizes_each_request_by_its_operation(cluster):
    from tests.integration.test_batch import Stream, op
    from sealkv.v1 import kv_pb2

    with cluster.client() as root:
        root.put(b"batch-shared", b"v")
    files = cluster.client_files("batch-reader", pki.ROLE_READONLY)
    s = Stream(cluster.nodes["n1"].grpc, files)
    s.send(op(1, get=kv_pb2.GetRequest(key=b"batch-shared")),
           op(2, put=kv_pb2.PutRequest(key=b"batch-shared", value=b"overwritten")),
           op(3, delete=kv_pb2.DeleteRequest(key=b"batch-shared")))
    answers = s.collect(3)
    s.close()
    assert answers[1].status.code == 0 and answers[1].get.kv.value == b"v"
    for denied in (2, 3):
        assert answers[denied].status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "'batch-reader' (role readonly) may not call" in answers[denied].status.message
    with cluster.client() as root:
        assert root.get(b"batch-shared").kv.value == b"v"
