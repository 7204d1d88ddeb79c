"""`sealkv cert create-ca|create-node|create-client|list`: files, modes, roles, refusals."""
import json
import os
import stat

from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealkv.node.cli.main import register_commands
from sealkv.node.security import pki

cli = register_commands()


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def load(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def test_a_ca_a_node_and_clients_with_roles(tmp_path):
    d = str(tmp_path / "certs")
    assert run("cert", "create-ca", "--certs-dir", d).exit_code == 0
    r = run("cert", "create-node", "n1", "--host", "10.0.0.1", "--host", "n1.internal",
            "--certs-dir", d)
    assert r.exit_code == 0, r.output
    for role in ("readonly", "readwrite", "admin"):
        assert run("cert", "create-client", f"app-{role}", "--role", role,
                   "--certs-dir", d).exit_code == 0
    assert mode(d) == 0o700
    for key in ("ca.key", "node.n1.key", "client.app-admin.key"):
        assert mode(os.path.join(d, key)) == 0o600, key
    node = load(os.path.join(d, "node.n1.crt"))
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["n1.internal"]
    usage = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage and ExtendedKeyUsageOID.CLIENT_AUTH in usage
    reader = load(os.path.join(d, "client.app-readonly.crt"))
    assert reader.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "app-readonly"
    assert reader.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "readonly"
    assert reader.issuer == load(os.path.join(d, "ca.crt")).subject
    listed = json.loads(run("-w", "json", "cert", "list", "--certs-dir", d).output)
    assert {row["name"]: row["role"] for row in listed} == {
        "sealkv CA": "ca", "n1": "node", "app-readonly": "readonly",
        "app-readwrite": "readwrite", "app-admin": "admin"}
    serial = pki.serial_of(os.path.join(d, "client.app-admin.crt"))
    assert pki.serial_of(f"{serial:x}") == serial


def test_nothing_is_overwritten_and_bad_input_is_a_usage_error(tmp_path):
    d = str(tmp_path / "certs")
    assert run("cert", "create-ca", "--certs-dir", d).exit_code == 0
    again = run("cert", "create-ca", "--certs-dir", d)
    assert again.exit_code == 2 and "a CA exists already" in again.stderr
    assert run("cert", "create-client", "ops", "--role", "admin", "--certs-dir", d).exit_code == 0
    twice = run("cert", "create-client", "ops", "--role", "admin", "--certs-dir", d)
    assert twice.exit_code == 2 and "exists already" in twice.stderr
    bad_role = run("cert", "create-client", "x", "--role", "root", "--certs-dir", d)
    assert bad_role.exit_code == 2
    no_ca = run("cert", "create-node", "n1", "--host", "h", "--certs-dir", str(tmp_path / "none"))
    assert no_ca.exit_code == 2 and "create-ca" in no_ca.stderr
