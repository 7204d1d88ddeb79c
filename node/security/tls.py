"""The one place gRPC transport security is decided: server credentials and every channel.

Every gRPC channel sealkv opens (the client library, a node calling a peer for the capability
fan-out or a forwarded read, the benchmarks, the CLI) comes from `channel(target, files)`; every
server port is bound with `bind(server, address, files)`. `files` is a `CertFiles` (mutual TLS:
the cluster CA, this side's certificate and key) or None, which means plaintext and is only
ever passed when the operator asked for `--insecure`.

The server requires and verifies a client certificate signed by the cluster CA
(`require_client_auth=True`): a plaintext client, a certificate from another CA and an
expired certificate never get past the handshake. What a verified identity may do is decided
by the authorization interceptor (`sealkv.node.security.authz`).

Safe to call from any thread. Files are read when the credentials are built; a missing or
unreadable file raises `TLSFilesError` naming it.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import grpc

from sealkv.node.security.pki import CertFiles

SECURITY_MUTUAL_TLS = "mutual-tls"
SECURITY_INSECURE = "insecure"

Options = Sequence[tuple[str, object]]


class TLSFilesError(ValueError):
    """A TLS file is missing or unreadable; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSFilesError(f"cannot read the {what} {path}: {exc.strerror}") from None


def read_files(files: CertFiles) -> tuple[bytes, bytes, bytes]:
    """Returns (CA certificate, certificate, key) bytes."""
    return (_read(files.cacert, "CA certificate (--cacert)"),
            _read(files.cert, "certificate (--cert)"), _read(files.key, "key (--key)"))


_credentials: dict[CertFiles, grpc.ChannelCredentials] = {}
_credentials_lock = threading.Lock()


def channel_credentials(files: CertFiles) -> grpc.ChannelCredentials:
    """Returns (cached per file set) client credentials presenting `files.cert`."""
    with _credentials_lock:
        creds = _credentials.get(files)
        if creds is None:
            ca, cert, key = read_files(files)
            creds = _credentials[files] = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert)
        return creds


def channel(target: str, files: Optional[CertFiles],
            options: Optional[Options] = None) -> grpc.Channel:
    """Opens a channel to `target`: mutual TLS with `files`, plaintext when `files` is None.

    The server's certificate must be signed by `files.cacert` and name the target's host (an
    IP or DNS subject alternative name).
    """
    opts = list(options or ())
    if files is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, channel_credentials(files), options=opts)


def aio_channel(target: str, files: Optional[CertFiles],
                options: Optional[Options] = None) -> "grpc.aio.Channel":
    """The asyncio twin of `channel` (same rules), for asyncio clients."""
    opts = list(options or ())
    if files is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, channel_credentials(files), options=opts)


def server_credentials(files: CertFiles) -> grpc.ServerCredentials:
    """Server credentials that present `files.cert` and require a client certificate signed
    by `files.cacert`."""
    ca, cert, key = read_files(files)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def bind(server: grpc.Server, address: str, files: Optional[CertFiles]) -> int:
    """Binds `address` on `server` (mutual TLS, or plaintext when `files` is None); returns
    the port (0 when the address cannot be bound)."""
    if files is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(files))


def security_name(files: Optional[CertFiles]) -> str:
    """"mutual-tls" or "insecure", as Status reports it."""
    return SECURITY_INSECURE if files is None else SECURITY_MUTUAL_TLS


def client_kwargs(files: Optional[CertFiles]) -> dict:
    """Returns the Client keyword arguments (cacert=, cert=, key=) for `files`."""
    if files is None:
        return {}
    return {"cacert": files.cacert, "cert": files.cert, "key": files.key}


def files_from(cacert: Optional[str], cert: Optional[str], key: Optional[str],
               what: str = "") -> Optional[CertFiles]:
    """Returns CertFiles for three paths, None for none; raises TLSFilesError for a partial set.

    `what` names where the paths came from, for the message ("flags", "SEALKV_* variables").
    """
    given = [p for p in (cacert, cert, key) if p]
    if not given:
        return None
    if len(given) != 3:
        missing = [n for n, p in (("cacert", cacert), ("cert", cert), ("key", key)) if not p]
        raise TLSFilesError(f"mutual TLS needs --cacert, --cert and --key together"
                            f"{' (' + what + ')' if what else ''}: missing "
                            + ", ".join(f"--{m}" for m in missing))
    return CertFiles(cacert, cert, key)
