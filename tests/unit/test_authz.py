"""Authorization: the policy decision, the interceptor on a real TLS gRPC server, and the
plugin loader's refusal of undeclared methods."""
from concurrent import futures

import grpc
import pytest

from sealkv.node import errors, plugin_loader
from sealkv.node.security import authz, pki, tls
from sealkv.plugins.encryption.admin import EncryptionAdminPlugin

NOT_REVOKED = frozenset().__contains__


def ident(role, serial=7, name="someone"):
    return pki.Identity(name, role, serial)


@pytest.mark.parametrize("role, method, allowed", [
    ("readonly", "/sealkv.v1.KV/Get", True),
    ("readonly", "/sealkv.v1.KV/Range", True),
    ("readonly", "/sealkv.v1.Cluster/Status", True),
    ("readonly", "/sealkv.v1.Cluster/MemberList", True),
    ("readonly", "/sealkv.v1.KV/Put", False),
    ("readonly", "/sealkv.v1.KV/CompareAndSwap", False),
    ("readwrite", "/sealkv.v1.KV/Put", True),
    ("readwrite", "/sealkv.v1.KV/Delete", True),
    ("readwrite", "/sealkv.v1.Cluster/MemberAdd", False),
    ("readwrite", "/sealkv.v1.Cluster/Digest", False),
    ("readwrite", "/sealkv.v1.Cluster/RevokeCertificate", False),
    ("admin", "/sealkv.v1.Cluster/MemberAdd", True),
    ("admin", "/sealkv.v1.Cluster/TransferLeadership", True),
    ("admin", "/sealkv.v1.KV/Put", True),
    ("node", "/sealkv.v1.Cluster/Digest", True),
    ("node", "/sealkv.v1.KV/Get", True),
    ("node", "/sealkv.v1.KV/Put", False),
    ("node", "/sealkv.v1.Cluster/MemberAdd", False),
    ("readonly", "/grpc.health.v1.Health/Check", True),
    ("node", "/grpc.health.v1.Health/Check", True),
])
def test_core_policy(role, method, allowed):
    refusal = authz.decide(authz.CORE_POLICY, method, ident(role), NOT_REVOKED)
    if allowed:
        assert refusal is None
    else:
        assert isinstance(refusal, errors.PermissionDenied)
        assert role in refusal.message and method in refusal.message


def test_unknown_methods_are_denied_even_to_admin():
    refusal = authz.decide(authz.CORE_POLICY, "/sealkv.v1.KV/Watch", ident("admin"), NOT_REVOKED)
    assert isinstance(refusal, errors.PermissionDenied)


def test_revoked_missing_and_roleless_identities_are_unauthenticated():
    revoked = frozenset({7}).__contains__
    for who, is_revoked in ((ident("admin"), revoked), (None, NOT_REVOKED),
                            (ident(""), NOT_REVOKED), (ident("superuser"), NOT_REVOKED)):
        refusal = authz.decide(authz.CORE_POLICY, "/sealkv.v1.KV/Get", who, is_revoked)
        assert isinstance(refusal, errors.Unauthenticated), who


# -- the interceptor on a real server --------------------------------------------------


ECHO = "/test.Echo/Say"
UNDECLARED = "/test.Echo/Undeclared"


@pytest.fixture
def pki_dir(tmp_path):
    d = str(tmp_path / "pki")
    pki.create_ca(d)
    pki.create_node(d, "n1", ["127.0.0.1"])
    for role in pki.CLIENT_ROLES:
        pki.create_client(d, role, role)
    return d


@pytest.fixture
def server(pki_dir):
    revoked: set[int] = set()
    policy = {ECHO: authz.Rule("readwrite")}
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                      interceptors=[authz.AuthorizationInterceptor(policy, revoked.__contains__)])
    handlers = {name: grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"ok:" + req)
                for name in ("Say", "Undeclared")}
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
    port = tls.bind(srv, "127.0.0.1:0", pki.node_files(pki_dir, "n1"))
    srv.start()
    yield f"127.0.0.1:{port}", revoked
    srv.stop(0)


def call(address, files, method=ECHO):
    with tls.channel(address, files) as ch:
        return ch.unary_unary(method)(b"hi", timeout=10)


def test_the_interceptor_checks_role_revocation_and_undeclared_methods(server, pki_dir, caplog):
    address, revoked = server
    writer = pki.client_files(pki_dir, "readwrite")
    assert call(address, writer) == b"ok:hi"
    with pytest.raises(grpc.RpcError) as info:
        call(address, pki.client_files(pki_dir, "readonly"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert isinstance(errors.from_rpc_error(info.value), errors.PermissionDenied)
    assert "'readonly' (role readonly" in caplog.text and ECHO in caplog.text
    # A served method nobody declared is denied, even to admin (fail closed).
    with pytest.raises(grpc.RpcError) as info:
        call(address, pki.client_files(pki_dir, "admin"), UNDECLARED)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    revoked.add(pki.identity_of(open(writer.cert, "rb").read()).serial)
    with pytest.raises(grpc.RpcError) as info:
        call(address, writer)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in info.value.details()


def test_refusals_are_logged_once_per_identity_and_method(server, pki_dir, caplog):
    address, _ = server
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            call(address, pki.client_files(pki_dir, "readonly"))
    assert caplog.text.count("refused " + ECHO) == 1


# -- plugins declare their methods' roles ------------------------------------------------


def test_the_encryption_admin_declares_every_method():
    from sealkv.plugins.encryption.admin import SERVICE_NAME

    rules = plugin_loader.method_rules("encryption", EncryptionAdminPlugin, [SERVICE_NAME])
    assert rules[f"/{SERVICE_NAME}/GetCapability"] == authz.Rule("readonly", peers=True)
    assert rules[f"/{SERVICE_NAME}/EnableStorageEnvelope"] == authz.Rule("admin")
    assert not rules[f"/{SERVICE_NAME}/RotateDEK"].peers


def test_a_plugin_leaving_a_method_undeclared_is_refused():
    from sealkv.plugins.encryption.admin import SERVICE_NAME

    class Partial(EncryptionAdminPlugin):
        method_roles = {k: v for k, v in EncryptionAdminPlugin.method_roles.items()
                        if not k.endswith("/RotateDEK")}

    with pytest.raises(plugin_loader.PluginError, match=r"'partial' does not declare the role "
                       rf"/{SERVICE_NAME}/RotateDEK needs"):
        plugin_loader.method_rules("partial", Partial, [SERVICE_NAME])


def test_a_plugin_declaring_an_unknown_role_or_method_is_refused():
    from sealkv.plugins.encryption.admin import SERVICE_NAME

    class Superuser(EncryptionAdminPlugin):
        method_roles = dict(EncryptionAdminPlugin.method_roles,
                            **{f"/{SERVICE_NAME}/RotateDEK": "root"})

    with pytest.raises(plugin_loader.PluginError, match="unknown role 'root'"):
        plugin_loader.method_rules("superuser", Superuser, [SERVICE_NAME])

    class Extra(EncryptionAdminPlugin):
        method_roles = dict(EncryptionAdminPlugin.method_roles, **{"/x.Y/Z": "admin"})

    with pytest.raises(plugin_loader.PluginError, match="does not serve: /x.Y/Z"):
        plugin_loader.method_rules("extra", Extra, [SERVICE_NAME])


def test_every_core_method_has_a_rule():
    from sealkv.v1 import cluster_pb2, kv_pb2

    for module, service in ((kv_pb2, "KV"), (cluster_pb2, "Cluster")):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            assert path in authz.CORE_POLICY, f"{path} has no rule: it is denied to everyone"
