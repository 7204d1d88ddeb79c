"""The raft peer wire's frame codec: AES-256-GCM under per-connection keys (pure, no I/O).

pysyncobj encodes each peer message as Fernet(zlib(pickle)): base64 text over AES-128-CBC and
HMAC-SHA256 under a key PBKDF2'd from the cluster secret. This codec is the cheaper format a
node sends with `peer_wire = "gcm"` (`frames.py` hooks it into pysyncobj's connection, and
accepts both formats on every connection). A frame, inside pysyncobj's 4-byte length prefix:

| offset | size | field |
|---|---|---|
| 0 | 1 | version `0x01` (a Fernet token is base64 text and always starts with `g`) |
| 1 | 1 | flags: bit 0 the body is zlib-compressed, bit 1 hello (a salt follows); others 0 |
| 2 | 16 | salt, only in the hello (the first frame of a connection's direction) |
| . | 8 | frame counter, big-endian: 0 for the hello, then 1, 2, ... |
| . | n | AES-256-GCM ciphertext of the (possibly compressed) pickled message |
| . | 16 | tag |

The header (everything before the ciphertext) is the AAD, so the version, the flags, the salt
and the counter are authenticated. Overhead: 26 bytes, 42 on the hello.

Keys and nonces. `root_key` derives a 32-byte root from the cluster secret with HKDF-SHA256
and its own label (never the Fernet key, which pysyncobj PBKDF2s with a different salt). Each
direction of each connection gets its own AES key, HKDF(root, salt=the sender's fresh 16
random bytes, info=label + the sender's role, dialer or listener), and the nonce is the frame
counter. So a (key, nonce) pair never repeats: within a key the counter only grows (and
refuses to wrap), and two keys coincide only if two random 128-bit salts collide, which at
2^32 connections in the cluster's lifetime has probability ~2^-64; no state survives a
restart and none is needed. The role in the info means a frame reflected back to its sender
opens under a different key and fails.

The receiver expects exactly the next counter, so a replayed, dropped or reordered frame
within a connection is refused before it is decrypted (Fernet's timestamps only refuse
going back a second). A whole connection recorded and replayed from its hello derives the
same key; pysyncobj's per-connection random keys (each side picks one on connecting and the
other must put it in every later message, checked in `frames.py`) make that replay fail at
its second message, as with Fernet.

Compression costs CPU, the node's scarce resource, and saves bandwidth it rarely lacks:
sealed entries and random values do not compress, and zlib level 1 on an 18 KB batch of
64 Puts costs more than sealing it. So only a body of at least `COMPRESS_MIN_BYTES` (64 KiB:
catch-up AppendEntries and snapshot chunks, never a lone write or one live batch) is
compressed, at level 1, only if its first `COMPRESS_PROBE_BYTES` shrink by an eighth, and
sent compressed only when the whole shrank by an eighth (flag bit 0). A compressed body is
inflated only after its tag verified, and never beyond the opener's `max_plaintext`.

Errors: `WireRefused` carries a reason for the log (never frame bytes). Sealers and openers are
not thread-safe: pysyncobj's tick thread owns each connection.
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 0x01
FLAG_COMPRESSED = 0x01
FLAG_HELLO = 0x02
_KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_HELLO
SALT_BYTES = 16
TAG_BYTES = 16
_COUNTER = struct.Struct(">Q")
_NONCE = struct.Struct(">4xQ")  # the 12-byte nonce: 4 zero bytes, then the frame counter
_HEADER = struct.Struct(">BBQ")  # version, flags, counter: a frame's header but the hello's
MAX_COUNTER = 2 ** 64 - 1
COMPRESS_MIN_BYTES = 64 * 1024
COMPRESS_PROBE_BYTES = 8 * 1024
COMPRESS_LEVEL = 1
ROOT_LABEL = b"sealkv raft peer wire v1: root"
KEY_LABEL = b"sealkv raft peer wire v1: frame key, sent by "
ROLE_DIALER = "dialer"
ROLE_LISTENER = "listener"
_ROLES = (ROLE_DIALER, ROLE_LISTENER)
FERNET_FIRST_BYTE = ord("g")  # Fernet's version byte 0x80 in urlsafe base64

# The formats a node can send (the `peer_wire` setting).
FORMAT_FERNET = "fernet"
FORMAT_GCM = "gcm"
FORMATS = (FORMAT_FERNET, FORMAT_GCM)


class WireRefused(Exception):
    """A frame that must not be accepted; the message is a reason, never frame bytes."""


def root_key(secret) -> bytes:
    """Derives the peer wire's 32-byte root key from the cluster secret (str or bytes)."""
    ikm = secret.encode() if isinstance(secret, str) else bytes(secret)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ROOT_LABEL).derive(ikm)


def _frame_key(root: bytes, salt: bytes, sender_role: str) -> AESGCM:
    if sender_role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}")
    info = KEY_LABEL + sender_role.encode()
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(root))


def _saves_enough(size: int, packed: int) -> bool:
    return packed <= size - (size >> 3)


def _compresses(sample: bytes) -> bool:
    return _saves_enough(len(sample), len(zlib.compress(sample, COMPRESS_LEVEL)))


class FrameSealer:
    """Seals the frames of one direction of one connection (its sender's side)."""

    def __init__(self, root: bytes, role: str, salt: Optional[bytes] = None):
        """`role` is this side's: ROLE_DIALER if it opened the connection. `salt` is for
        tests only (known-answer frames); by default 16 fresh random bytes."""
        self._salt = os.urandom(SALT_BYTES) if salt is None else bytes(salt)
        if len(self._salt) != SALT_BYTES:
            raise ValueError(f"the salt must be {SALT_BYTES} bytes")
        self._aead = _frame_key(root, self._salt, role)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        """Returns the next frame carrying `plaintext` (compressed when that pays)."""
        counter = self._counter
        if counter >= MAX_COUNTER:
            raise WireRefused("the connection's frame counter is exhausted")
        flags, body = 0, plaintext
        if len(plaintext) >= COMPRESS_MIN_BYTES and _compresses(plaintext[:COMPRESS_PROBE_BYTES]):
            packed = zlib.compress(plaintext, COMPRESS_LEVEL)
            if _saves_enough(len(plaintext), len(packed)):
                flags, body = FLAG_COMPRESSED, packed
        if counter == 0:
            header = bytes((VERSION, flags | FLAG_HELLO)) + self._salt + _COUNTER.pack(0)
        else:
            header = _HEADER.pack(VERSION, flags, counter)
        self._counter = counter + 1
        return header + self._aead.encrypt(_NONCE.pack(counter), body, header)


class FrameOpener:
    """Opens the frames of one direction of one connection (its receiver's side)."""

    def __init__(self, root: bytes, sender_role: str, max_plaintext: int):
        """`sender_role` is the peer's: ROLE_DIALER if the peer opened the connection.
        `max_plaintext` bounds what a compressed body may inflate to."""
        if sender_role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}")
        self._root = root
        self._role = sender_role
        self._max = max_plaintext
        self._aead: Optional[AESGCM] = None
        self._next = 0

    def open(self, frame) -> bytes:
        """Returns the plaintext of the next frame, or raises `WireRefused` (then the
        connection must be closed: the opener's state is undefined for later frames)."""
        frame = memoryview(frame)
        if len(frame) < 2:
            raise WireRefused("a truncated peer-wire frame")
        version, flags = frame[0], frame[1]
        if version != VERSION:
            raise WireRefused("a peer-wire frame of an unsupported version")
        if flags & ~_KNOWN_FLAGS:
            raise WireRefused("a peer-wire frame with unknown flag bits")
        pos = 2
        if flags & FLAG_HELLO:
            if self._aead is not None:
                raise WireRefused("a second hello frame on one connection")
            if len(frame) < pos + SALT_BYTES:
                raise WireRefused("a truncated peer-wire frame")
            aead = _frame_key(self._root, bytes(frame[pos:pos + SALT_BYTES]), self._role)
            pos += SALT_BYTES
        elif self._aead is None:
            raise WireRefused("the connection's first peer-wire frame is not a hello")
        else:
            aead = self._aead
        if len(frame) < pos + _COUNTER.size + TAG_BYTES:
            raise WireRefused("a truncated peer-wire frame")
        (counter,) = _COUNTER.unpack_from(frame, pos)
        pos += _COUNTER.size
        if counter != self._next:
            raise WireRefused(f"a replayed or reordered peer-wire frame (number {counter}, "
                              f"expected {self._next})")
        try:
            body = aead.decrypt(_NONCE.pack(counter), frame[pos:], frame[:pos])
        except InvalidTag:
            raise WireRefused("a peer-wire frame failed authentication (tampered, truncated "
                              "or sealed under another cluster secret)") from None
        self._aead = aead
        self._next = counter + 1
        if flags & FLAG_COMPRESSED:
            return self._inflate(body)
        return body

    def _inflate(self, body: bytes) -> bytes:
        inflater = zlib.decompressobj()
        try:
            plaintext = inflater.decompress(body, self._max)
        except zlib.error:
            raise WireRefused("a peer-wire frame's compressed body is corrupt") from None
        if inflater.unconsumed_tail:
            raise WireRefused(f"a peer-wire frame inflates beyond {self._max} bytes")
        if not inflater.eof or inflater.unused_data:
            raise WireRefused("a peer-wire frame's compressed body is corrupt")
        return plaintext


def frame_format(frame) -> str:
    """Returns FORMAT_FERNET or FORMAT_GCM by a frame's first byte, or raises WireRefused."""
    first = frame[0] if len(frame) else -1
    if first == VERSION:
        return FORMAT_GCM
    if first == FERNET_FIRST_BYTE:
        return FORMAT_FERNET
    raise WireRefused("a frame that is neither a Fernet token nor a peer-wire frame")


class PeerWire:
    """The cluster-wide wire keys of one node and the format it sends.

    The replication adapter hands this to pysyncobj in place of its Fernet encryptor;
    `frames.BoundedTcpConnection` reads it. `fernet` is pysyncobj's own (it opens Fernet
    frames from peers that still send them, and seals when `send_format` is "fernet").
    """

    def __init__(self, fernet, root: bytes, send_format: str):
        if send_format not in FORMATS:
            raise ValueError(f"peer_wire must be one of {', '.join(FORMATS)}")
        self.fernet = fernet
        self.root = root
        self.send_format = send_format
