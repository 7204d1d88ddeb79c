"""Key-encryption key (KEK) providers: the node-local keys that wrap and unwrap data keys.

A provider wraps a 32-byte data key (DEK) with AES-256-GCM under its KEK, a fresh random 12-byte
nonce and no AAD, giving the 60-byte blob `nonce(12) | ciphertext(32) | tag(16)`
(ENCRYPTION.md §1). sealkv never writes a KEK to the data directory and never logs it.

Providers are plugins of the entry point group `sealkv.kek_providers`; `load_kek_provider`
imports only the one it is asked for.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import stat
from importlib.metadata import entry_points
from typing import Any, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealkv.plugins.api import StartupRefused

ENTRY_POINT_GROUP = "sealkv.kek_providers"
KEK_SIZE = 32
DEK_SIZE = 32
WRAP_NONCE_SIZE = 12
WRAPPED_SIZE = WRAP_NONCE_SIZE + DEK_SIZE + 16  # 60
# The public plaintext of a KEK check value: a KEK's check blob is `wrap(KEK_CHECK_PLAINTEXT)`.
# Anyone holding the same KEK opens it to this constant; under any other KEK it does not
# authenticate. It identifies a KEK without revealing anything of it (the plaintext is
# public, the nonce fresh), with every provider's own wrap (a PKCS#11 key never leaves its
# token).
KEK_CHECK_PLAINTEXT = hashlib.sha256(b"sealkv KEK check value v1").digest()

# Built-in providers, used when the installed metadata predates their entry points (a source
# checkout that has not been reinstalled). Entry points always win.
_BUILTIN = {
    "file": "sealkv.plugins.encryption.kek:FileKEK",
    "env": "sealkv.plugins.encryption.kek:EnvKEK",
    "pkcs11": "sealkv.plugins.encryption.kek_pkcs11:Pkcs11KEK",
}


class UnwrapError(ValueError):
    """A wrapped key blob has the wrong size or does not authenticate under this KEK."""


class KEKProvider:
    """The interface of a KEK provider: wraps and unwraps 32-byte data keys.

    This is the API third-party providers implement (entry point group `sealkv.kek_providers`,
    the factory called with the provider's options as keyword arguments).

    Contract: `wrap` and `unwrap` are thread-safe; they may be called from the tick thread (at
    apply) and from gRPC threads (pre-checks), so a provider that talks to a device serializes
    its own access. `wrap` returns the 60-byte blob `nonce(12) | ciphertext(32) | tag(16)` of
    AES-256-GCM under the KEK with a fresh nonce and no AAD. `unwrap` raises `UnwrapError` for
    a blob it cannot open and never returns partial bytes. `status()` returns a JSON-ready dict
    that holds no secret material. A provider lives as long as its process (a device session is
    released when the process exits). A provider refuses bad configuration in its constructor
    with `StartupRefused`, naming what to change.
    """

    name: str = ""

    def wrap(self, dek: bytes) -> bytes:
        """Returns the 60-byte wrapped form of the 32-byte `dek`."""
        raise NotImplementedError

    def unwrap(self, blob: bytes) -> bytes:
        """Returns the data key inside the 60-byte `blob`; raises `UnwrapError` otherwise."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """Returns what an operator may see about this provider (no secrets)."""
        return {"provider": self.name, "loaded": True}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} provider={self.name!r}>"


def kek_check_blob(kek: KEKProvider) -> bytes:
    """Returns a fresh check blob of `kek` (its wrap of the public `KEK_CHECK_PLAINTEXT`)."""
    return kek.wrap(KEK_CHECK_PLAINTEXT)


def unwrapped_or_none(kek: Optional[KEKProvider], wrapped: bytes) -> Optional[bytes]:
    """Returns what `wrapped` holds under `kek`, or None when it does not open there (or
    `kek` is None). Any failure means "does not open"; its text is dropped, as a provider's
    could carry bytes."""
    if kek is None:
        return None
    try:
        return kek.unwrap(wrapped)
    except Exception:
        return None


def opens_check(kek: Optional[KEKProvider], blob: bytes) -> bool:
    """Whether `blob` is a check blob made under the same KEK as `kek` (False for None)."""
    opened = unwrapped_or_none(kek, blob) if blob else None
    return opened is not None and hmac.compare_digest(opened, KEK_CHECK_PLAINTEXT)


def kek_of_check(check: bytes, kek: KEKProvider,
                 next_kek: Optional[KEKProvider]) -> Optional[KEKProvider]:
    """Returns which of this node's KEKs, the current `kek` or the staged `next_kek`, made the
    check blob `check` of a key table (`kek` for an empty check: a table never rewrapped), or
    None when neither did."""
    if not check or opens_check(kek, check):
        return kek
    if opens_check(next_kek, check):
        return next_kek
    return None


def check_dek(dek: bytes) -> None:
    """Raises ValueError unless `dek` is a 32-byte data key."""
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a data key must be {DEK_SIZE} bytes")


def split_wrapped(blob: bytes) -> tuple[bytes, bytes]:
    """Returns (nonce, ciphertext+tag) of a 60-byte wrapped key; raises `UnwrapError` otherwise."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != WRAPPED_SIZE:
        raise UnwrapError(f"a wrapped key must be exactly {WRAPPED_SIZE} bytes")
    blob = bytes(blob)
    return blob[:WRAP_NONCE_SIZE], blob[WRAP_NONCE_SIZE:]


class LocalKEK(KEKProvider):
    """A KEK held in this process's memory (the file and env providers)."""

    def __init__(self, kek: bytes):
        if len(kek) != KEK_SIZE:
            raise ValueError(f"a KEK must be {KEK_SIZE} bytes")
        self.__aead = AESGCM(bytes(kek))

    def wrap(self, dek: bytes) -> bytes:
        check_dek(dek)
        nonce = os.urandom(WRAP_NONCE_SIZE)
        return nonce + self.__aead.encrypt(nonce, bytes(dek), None)

    def unwrap(self, blob: bytes) -> bytes:
        nonce, sealed = split_wrapped(blob)
        try:
            return self.__aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise UnwrapError("the wrapped key does not authenticate under this KEK") from None


class FileKEK(LocalKEK):
    """A KEK read from a file of exactly 32 raw bytes, readable by its owner only.

    The file is opened read-only and non-blocking (so a FIFO cannot hang start-up), and the
    opened descriptor is checked with `fstat` (so the checked file is the one read): it must be
    a regular file of 32 bytes without group or other permission bits. Any failure raises
    `StartupRefused` with a message naming the file and the fix.
    """

    name = "file"

    def __init__(self, path: str):
        if not path:
            raise StartupRefused("encryption is enabled but no KEK file is configured: "
                                 "set the encryption option kek_file to a 32-byte key file")
        self.path = os.path.abspath(os.fspath(path))
        super().__init__(_read_kek_file(self.path))

    def status(self) -> dict[str, Any]:
        return {"provider": self.name, "path": self.path, "loaded": True}


def _read_kek_file(path: str) -> bytes:
    return read_owner_only_file(path, "KEK file", "kek_file", exact_size=KEK_SIZE)


def read_owner_only_file(path: str, what: str, option: str, *, exact_size: Optional[int] = None,
                         max_size: int = 4096) -> bytes:
    """Returns the bytes of a secret file that only its owner may read (§1 checks).

    The file is opened read-only and non-blocking (a FIFO cannot hang start-up) and the opened
    descriptor is checked with `fstat`: a regular file, no group or other permission bits,
    and `exact_size` bytes when given (else at most `max_size`). Any failure raises
    `StartupRefused` naming the file (`what`, set by the option `option`) and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fix = (f"create it with {exact_size} random bytes (head -c {exact_size} /dev/urandom > "
               f"{path} && chmod 600 {path})" if exact_size else
               f"create it (chmod 600 {path}) or point {option} at the right file")
        raise StartupRefused(f"{what} {path} does not exist: {fix}") from None
    except OSError as error:
        raise StartupRefused(f"cannot open {what} {path}: {error.strerror}; make it readable "
                             f"by the sealkv user (chmod 600 {path})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StartupRefused(f"{what} {path} is not a regular file: point {option} at a "
                                 "regular file" + (f" holding exactly {exact_size} raw bytes"
                                                   if exact_size else ""))
        if info.st_mode & 0o077:
            raise StartupRefused(
                f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}, readable by group "
                f"or others: run chmod 600 {path}")
        if exact_size is not None and info.st_size != exact_size:
            raise StartupRefused(f"{what} {path} is {info.st_size} bytes, not {exact_size}: "
                                 f"it must hold exactly {exact_size} raw bytes (not hex or base64)")
        limit = exact_size if exact_size is not None else max_size
        if info.st_size > limit:
            raise StartupRefused(f"{what} {path} is {info.st_size} bytes, more than {limit}: "
                                 f"point {option} at the right file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > limit or (exact_size is not None and len(data) != exact_size):
            raise StartupRefused(f"{what} {path} changed while being read: it must hold "
                                 + (f"exactly {exact_size} raw bytes" if exact_size
                                    else f"at most {limit} bytes"))
        return data
    finally:
        os.close(fd)


class EnvKEK(LocalKEK):
    """A KEK read from an environment variable as 64 hex characters; for tests only.

    Environment variables leak into child processes and crash reports: production nodes use
    `FileKEK`. There is no default variable name.
    """

    name = "env"

    def __init__(self, var: str):
        if not var:
            raise StartupRefused("the env KEK provider needs the option var naming the "
                                 "environment variable that holds the KEK")
        self.var = var
        text = os.environ.get(var)
        if text is None:
            raise StartupRefused(f"environment variable {var} is not set: set it to 64 hex "
                                 "characters (32 bytes)")
        try:
            kek = bytes.fromhex(text.strip())
        except ValueError:
            kek = b""
        if len(kek) != KEK_SIZE or len(text.strip()) != 2 * KEK_SIZE:
            raise StartupRefused(f"environment variable {var} must hold exactly 64 hex "
                                 "characters (32 bytes)")
        super().__init__(kek)

    def status(self) -> dict[str, Any]:
        return {"provider": self.name, "var": self.var, "loaded": True}


def load_kek_provider(name: str, **options: Any) -> KEKProvider:
    """Imports only the provider registered as `name` and builds it with `options`.

    Raises `StartupRefused` naming the provider when it is unknown, fails to import, does not
    accept the options, or refuses its key material.
    """
    target = None
    for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
        target = point
        break
    try:
        if target is not None:
            factory = target.load()
        elif name in _BUILTIN:
            module_name, _, attr = _BUILTIN[name].partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
        else:
            known = sorted({p.name for p in entry_points(group=ENTRY_POINT_GROUP)} | set(_BUILTIN))
            raise StartupRefused(f"unknown KEK provider {name!r}: use one of {', '.join(known)}")
    except StartupRefused:
        raise
    except Exception as error:
        raise StartupRefused(f"KEK provider {name!r} failed to load: {error}") from error
    try:
        provider = factory(**options)
    except TypeError as error:
        raise StartupRefused(f"KEK provider {name!r} rejected its options "
                             f"({', '.join(sorted(options)) or 'none'}): {error}") from None
    if not isinstance(provider, KEKProvider):
        raise StartupRefused(f"KEK provider {name!r} is not a KEKProvider")
    return provider
