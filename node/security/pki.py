"""The cluster's certificates: a CA, node certificates and client certificates with roles.

Files in a certificates directory (`--certs-dir DIR`), in the manner of `cockroach cert`:

    DIR/ca.crt   DIR/ca.key                    the cluster CA (keep ca.key offline)
    DIR/node.NAME.crt   DIR/node.NAME.key      a node: serves gRPC and calls its peers
    DIR/client.NAME.crt DIR/client.NAME.key    a client identity (operator, application)

Keys are ECDSA P-256, written 0600 (directories 0700), never overwritten. A certificate's
identity is its subject common name (CN); its role is the subject's organizational unit (OU),
one of `readonly`, `readwrite`, `admin` (clients) or `node` (nodes). The OU is trusted because
the cluster CA signed it: a certificate from another CA never gets past the TLS handshake.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLE_READONLY = "readonly"
ROLE_READWRITE = "readwrite"
ROLE_ADMIN = "admin"
ROLE_NODE = "node"
CLIENT_ROLES = (ROLE_READONLY, ROLE_READWRITE, ROLE_ADMIN)
ROLES = CLIENT_ROLES + (ROLE_NODE,)
ORGANIZATION = "sealkv"

CA_DAYS = 3650
CERT_DAYS = 365
# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
BACKDATE = datetime.timedelta(minutes=5)


class PKIError(ValueError):
    """A certificate operation that cannot proceed; the message says what to change."""


@dataclass(frozen=True)
class CertFiles:
    """Paths of one identity's TLS material: the cluster CA, its certificate and its key."""

    cacert: str
    cert: str
    key: str


def ca_paths(certs_dir: str) -> tuple[str, str]:
    return os.path.join(certs_dir, "ca.crt"), os.path.join(certs_dir, "ca.key")


def node_files(certs_dir: str, name: str) -> CertFiles:
    """The files `create_node(certs_dir, name, ...)` writes."""
    return CertFiles(os.path.join(certs_dir, "ca.crt"),
                     os.path.join(certs_dir, f"node.{name}.crt"),
                     os.path.join(certs_dir, f"node.{name}.key"))


def client_files(certs_dir: str, name: str) -> CertFiles:
    """The files `create_client(certs_dir, name, ...)` writes."""
    return CertFiles(os.path.join(certs_dir, "ca.crt"),
                     os.path.join(certs_dir, f"client.{name}.crt"),
                     os.path.join(certs_dir, f"client.{name}.key"))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Creates `path` with `mode`; refuses to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PKIError(f"{path} exists already: remove it first, or use another --certs-dir")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, role: Optional[str] = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise PKIError(f"certificate name {name!r} must be 1-64 letters, digits, '-', '_' or '.'")


def create_ca(certs_dir: str, *, common_name: str = "sealkv CA",
              days: int = CA_DAYS) -> str:
    """Creates DIR/ca.crt and DIR/ca.key (0600); returns the certificate's path."""
    os.makedirs(certs_dir, mode=0o700, exist_ok=True)
    crt_path, key_path = ca_paths(certs_dir)
    if os.path.exists(crt_path) or os.path.exists(key_path):
        raise PKIError(f"a CA exists already in {certs_dir}: reuse it, or use another "
                       "--certs-dir")
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return crt_path


def _load_ca(certs_dir: str, ca_key: Optional[str]):
    crt_path, default_key = ca_paths(certs_dir)
    key_path = ca_key or default_key
    try:
        with open(crt_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as exc:
        raise PKIError(f"{exc.filename} is missing: run `sealkv cert create-ca --certs-dir "
                       f"{certs_dir}` first (or give --ca-key)") from None
    except ValueError as exc:
        raise PKIError(f"cannot read the CA in {certs_dir}: {exc}") from None
    return ca_cert, key


def issue(certs_dir: str, kind: str, name: str, role: str, *, hosts: Sequence[str] = (),
          days: int = CERT_DAYS, ca_key: Optional[str] = None,
          not_before: Optional[datetime.datetime] = None,
          not_after: Optional[datetime.datetime] = None) -> CertFiles:
    """Signs a new key pair with the cluster CA; writes DIR/KIND.NAME.crt|key.

    `kind` is "node" (server and client use, subject alternative names from `hosts`) or
    "client" (client use only). `not_before`/`not_after` override the validity window (tests
    make expired certificates with them).
    """
    _check_name(name)
    if role not in ROLES:
        raise PKIError(f"unknown role {role!r}: use one of {', '.join(CLIENT_ROLES)}")
    ca_cert, ca_private = _load_ca(certs_dir, ca_key)
    files = node_files(certs_dir, name) if kind == "node" else client_files(certs_dir, name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    start = not_before or now - BACKDATE
    end = not_after or now + datetime.timedelta(days=days)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(_name(name, role))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_private.public_key()), critical=False))
    if kind == "node":
        if not hosts:
            raise PKIError("a node certificate needs at least one --host (the addresses "
                           "clients and peers dial)")
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_san(h) for h in hosts]), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca_private, hashes.SHA256())
    _write_new(files.key, _key_pem(key), 0o600)
    _write_new(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_node(certs_dir: str, name: str, hosts: Sequence[str], **kw) -> CertFiles:
    """Creates DIR/node.NAME.crt|key for a node reachable at `hosts` (IPs or DNS names)."""
    return issue(certs_dir, "node", name, ROLE_NODE, hosts=hosts, **kw)


def create_client(certs_dir: str, name: str, role: str, **kw) -> CertFiles:
    """Creates DIR/client.NAME.crt|key for a client identity with `role`."""
    if role not in CLIENT_ROLES:
        raise PKIError(f"unknown client role {role!r}: use one of {', '.join(CLIENT_ROLES)}")
    return issue(certs_dir, "client", name, role, **kw)


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: its CN, its role (OU) and its serial number."""

    name: str
    role: str
    serial: int


def identity_of(pem: bytes) -> Identity:
    """Reads the identity of a PEM certificate (already verified by the TLS handshake)."""
    cert = x509.load_pem_x509_certificate(pem)
    return identity_of_cert(cert)


def identity_of_cert(cert: x509.Certificate) -> Identity:
    def first(oid) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return Identity(first(NameOID.COMMON_NAME), first(NameOID.ORGANIZATIONAL_UNIT_NAME),
                    cert.serial_number)


def serial_of(text: str) -> int:
    """Parses a certificate file's serial, or a serial in hex (as `cert list` shows it; an
    optional 0x prefix and colons are accepted)."""
    if os.path.isfile(text):
        try:
            with open(text, "rb") as f:
                return x509.load_pem_x509_certificate(f.read()).serial_number
        except ValueError:
            raise PKIError(f"{text} is not a PEM certificate") from None
    raw = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        serial = int(raw, 16)
    except ValueError:
        raise PKIError(f"{text!r} is neither a certificate file nor a hexadecimal serial") \
            from None
    if serial <= 0:
        raise PKIError(f"{text!r} is not a certificate serial")
    return serial


def describe(path: str) -> dict:
    """Returns what `sealkv cert list` shows of one certificate file."""
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    ident = identity_of_cert(cert)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in sans.get_values_for_type(x509.IPAddress)] + \
            sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        hosts = []
    return {"file": os.path.basename(path), "name": ident.name, "role": ident.role or "ca",
            "serial": f"{ident.serial:x}", "expires": cert.not_valid_after_utc.isoformat(),
            "hosts": hosts}
