"""The AES-256-GCM envelope codec shared by stored values and Raft payloads (ENCRYPTION.md §2).

An envelope is laid out as::

    offset  size  field
    0       1     version, 0x01 (any other value is rejected)
    1       1     flags, 0x00 (bit 0 is reserved for compression; every bit must be 0 today)
    2       4     key_id, big-endian, 0 reserved for "none"
    6       12    nonce
    18      n     AES-256-GCM ciphertext
    18+n    16    tag

so it costs 34 bytes over the plaintext. This module is pure: nonces, keys and additional
authenticated data (AAD) are passed in by the caller. Parsing never crashes on any input: every
malformed envelope raises a subclass of `EnvelopeError`.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 0x01
FLAG_COMPRESSED = 0x01  # reserved; not produced or accepted yet
HEADER_SIZE = 6
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE  # 34
DEK_SIZE = 32
MAX_KEY_ID = 0xFFFFFFFF
MAX_REVISION = 0xFFFFFFFFFFFFFFFF

_HEADER = struct.Struct(">BBI")


class EnvelopeError(ValueError):
    """Base of every error about a malformed or unauthentic envelope."""


class EnvelopeTooShort(EnvelopeError):
    """The data is shorter than the 34-byte envelope overhead."""


class UnknownVersion(EnvelopeError):
    """The version byte is not 0x01."""


class BadFlags(EnvelopeError):
    """The flags byte has a bit set (compression is reserved, the other bits must be 0)."""


class ReservedKeyId(EnvelopeError):
    """The envelope names key id 0, which is reserved for "no key"."""


class UnknownKeyId(EnvelopeError):
    """No data key with the envelope's key id is loaded."""


class AuthenticationFailed(EnvelopeError):
    """The tag did not verify: wrong key, wrong AAD, or tampered bytes."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One parsed envelope; `header` is its first 6 bytes, as they enter the AAD."""

    version: int
    flags: int
    key_id: int
    nonce: bytes
    ciphertext: bytes
    tag: bytes

    @property
    def header(self) -> bytes:
        """The 6 header bytes (version, flags, key_id)."""
        return _HEADER.pack(self.version, self.flags, self.key_id)

    def to_bytes(self) -> bytes:
        """Returns the envelope as stored."""
        return self.header + self.nonce + self.ciphertext + self.tag


def envelope_header(key_id: int) -> bytes:
    """Returns the 6 header bytes an envelope sealed under `key_id` starts with."""
    _check_key_id(key_id)
    return _HEADER.pack(VERSION, 0, key_id)


def parse(data: bytes) -> Envelope:
    """Splits `data` into its fields without decrypting; raises an `EnvelopeError` subclass."""
    data = _checked(data)
    return Envelope(
        version=VERSION,
        flags=0,
        key_id=int.from_bytes(data[2:HEADER_SIZE], "big"),
        nonce=data[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE],
        ciphertext=data[HEADER_SIZE + NONCE_SIZE:len(data) - TAG_SIZE],
        tag=data[len(data) - TAG_SIZE:],
    )


def key_id_of(data: bytes) -> int:
    """Returns the key id of the envelope `data` once its length and header are valid, without
    splitting it into fields or decrypting; raises an `EnvelopeError` subclass."""
    return int.from_bytes(_checked(data)[2:HEADER_SIZE], "big")


def _checked(data: bytes) -> bytes:
    """Returns `data` as bytes once its length and header are valid (see `parse`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"envelope must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < OVERHEAD:
        raise EnvelopeTooShort(f"envelope is {len(data)} bytes, at least {OVERHEAD} are needed")
    version, flags, key_id = _HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise UnknownVersion(f"envelope version 0x{version:02x} is not supported")
    if flags != 0:
        raise BadFlags(f"envelope flags 0x{flags:02x} are not supported")
    if key_id == 0:
        raise ReservedKeyId("envelope names the reserved key id 0")
    return data


def seal(dek: bytes, key_id: int, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypts `plaintext` under `dek` and returns the whole envelope.

    The caller owns nonce uniqueness (see `nonce.NonceFactory`) and builds `aad`, usually with
    `storage_aad(envelope_header(key_id), ...)` or `raft_aad(key_id)`. A caller sealing many
    values under one key uses a `Sealer`, which checks the key once.
    """
    return Sealer(dek, key_id).seal(bytes(nonce), bytes(plaintext), bytes(aad))


class Sealer:
    """Seals envelopes under one data key: the key and its id are checked once, here, and the
    AES-GCM object and the 6 header bytes are built once (the per-value cost is then the
    encryption itself, a few microseconds for a small value). Safe from any thread (its one
    cache, of storage AAD heads, is filled idempotently); the caller still owns nonce
    uniqueness.
    """

    __slots__ = ("key_id", "header", "_encrypt", "_aad_heads")

    def __init__(self, dek: bytes, key_id: int):
        _check_dek(dek)
        self.key_id = key_id
        self.header = envelope_header(key_id)
        self._encrypt = _cipher(bytes(dek)).encrypt
        # value header -> the storage AAD's fixed head (envelope header | value header)
        self._aad_heads: dict[int, bytes] = {}

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Returns the envelope of `plaintext` under this key with `nonce` and `aad` (bytes)."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        # One join: a raft payload is a whole batch (kilobytes), copied once, not twice.
        return b"".join((self.header, nonce, self._encrypt(nonce, plaintext, aad)))

    def seal_stored(self, nonce: bytes, plaintext: bytes, value_header: int, key: bytes,
                    mod_revision: int) -> bytes:
        """`seal(nonce, plaintext, storage_aad(self.header, value_header, key, mod_revision))`:
        the same bytes, with the AAD's fixed head built once per value header (~0.5 µs less
        per value than building the whole AAD each time)."""
        head = self._aad_heads.get(value_header)
        if head is None:
            head = storage_aad(self.header, value_header, b"", 0)[:HEADER_SIZE + 1]
            self._aad_heads[value_header] = head
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        try:
            revision = mod_revision.to_bytes(8, "big")
        except OverflowError:
            raise ValueError("mod_revision must fit in 8 bytes") from None
        # `seal`, inlined: this runs once per stored value on every replica.
        return b"".join((self.header, nonce,
                         self._encrypt(nonce, plaintext, b"".join((head, key, revision)))))


class Opener:
    """Opens envelopes under one data key, the counterpart of `Sealer`: the key and its id are
    checked and the AES-GCM object built once, here, and the nonce and ciphertext are passed
    to AES-GCM as views of the envelope, not copies (a raft payload is a whole batch). Safe
    from any thread.
    """

    __slots__ = ("key_id", "_decrypt")

    def __init__(self, dek: bytes, key_id: int):
        _check_dek(dek)
        _check_key_id(key_id)
        self.key_id = key_id
        self._decrypt = _cipher(bytes(dek)).decrypt

    def open(self, data: bytes, aad: bytes) -> bytes:
        """Returns the plaintext of the envelope `data`, whose header the caller checked
        (`key_id_of`) names this key; raises `AuthenticationFailed` for a bad tag."""
        view = memoryview(data)
        try:
            # ciphertext and tag are contiguous at the end: AES-GCM takes them as one slice.
            return self._decrypt(view[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE],
                                 view[HEADER_SIZE + NONCE_SIZE:], aad)
        except InvalidTag:
            raise AuthenticationFailed(
                f"envelope under key id {self.key_id} failed authentication") from None


DekSource = Union[bytes, bytearray, Mapping[int, bytes], Callable[[int], Optional[bytes]]]
AadSource = Union[bytes, Callable[[bytes], bytes]]


def open_envelope(dek_lookup_or_dek: DekSource, data: bytes, aad: AadSource) -> bytes:
    """Authenticates and decrypts the envelope `data`; returns the plaintext.

    `dek_lookup_or_dek` is either the 32-byte key itself, a mapping from key id to key, or a
    callable returning the key for an id (None when unknown). `aad` is either the AAD bytes or
    a callable that builds them from the envelope's 6 header bytes. Every failure raises an
    `EnvelopeError` subclass (`AuthenticationFailed` for a bad tag).
    """
    data = _checked(data)  # parsed in place: the fields are slices, no Envelope is built
    key_id = int.from_bytes(data[2:HEADER_SIZE], "big")
    if isinstance(dek_lookup_or_dek, (bytes, bytearray)):
        dek: Optional[bytes] = bytes(dek_lookup_or_dek)
    elif isinstance(dek_lookup_or_dek, Mapping):
        dek = dek_lookup_or_dek.get(key_id)
    else:
        dek = dek_lookup_or_dek(key_id)
    if dek is None:
        raise UnknownKeyId(f"no data key with id {key_id} is loaded")
    if len(dek) != DEK_SIZE:
        raise EnvelopeError(f"data key {key_id} is not {DEK_SIZE} bytes")
    aad_bytes = aad(data[:HEADER_SIZE]) if callable(aad) else aad
    try:
        # ciphertext and tag are contiguous at the end: AES-GCM takes them as one slice.
        return _cipher(bytes(dek)).decrypt(data[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE],
                                           data[HEADER_SIZE + NONCE_SIZE:], bytes(aad_bytes))
    except InvalidTag:
        raise AuthenticationFailed(
            f"envelope under key id {key_id} failed authentication") from None


@functools.lru_cache(maxsize=64)
def _cipher(dek: bytes) -> AESGCM:
    # Building an AESGCM object (key schedule, OpenSSL context) costs several times the
    # encryption of a small value; data keys are few and live as long as the process.
    return AESGCM(dek)


def storage_aad(envelope_header6: bytes, value_header: int, key: bytes, mod_revision: int) -> bytes:
    """Returns the AAD of a stored value.

    Layout: the envelope's 6 header bytes | the stored value header (1 byte) | the user key |
    `mod_revision` as 8 bytes big-endian (the store keeps the revision as the version suffix).
    The key is the only variable-length part and the revision has a fixed width, so two
    different (key, revision) pairs never give the same AAD.
    """
    if len(envelope_header6) != HEADER_SIZE:
        raise ValueError(f"envelope header must be {HEADER_SIZE} bytes")
    try:
        return b"".join((envelope_header6, bytes((value_header,)), key,
                         mod_revision.to_bytes(8, "big")))
    except (OverflowError, ValueError):  # bytes() and to_bytes() refuse what does not fit
        if not 0 <= value_header <= 0xFF:
            raise ValueError("value header must fit in one byte") from None
        raise ValueError("mod_revision must fit in 8 bytes") from None


def raft_aad(key_id: int) -> bytes:
    """Returns the AAD of a Raft payload envelope: b'R' | 0x01 | key_id (4 bytes, big-endian)."""
    _check_key_id(key_id)
    return b"R\x01" + key_id.to_bytes(4, "big")


def _check_key_id(key_id: int) -> None:
    if not isinstance(key_id, int) or not 0 < key_id <= MAX_KEY_ID:
        raise ValueError("key_id must be an integer in 1..2**32-1 (0 is reserved)")


def _check_dek(dek: bytes) -> None:
    if not isinstance(dek, (bytes, bytearray)) or len(dek) != DEK_SIZE:
        raise ValueError(f"a data key must be {DEK_SIZE} bytes")
