"""The AES-GCM peer-wire codec: layout, keys, and every way a frame must be refused."""
import hashlib
import hmac
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealkv.node.replication import peer_wire as w
from sealkv.node.replication.peer_wire import (
    FrameOpener, FrameSealer, WireRefused, ROLE_DIALER, ROLE_LISTENER,
)

SECRET = "a-cluster-secret-of-at-least-32-bytes!"
ROOT = w.root_key(SECRET)
MAX = 1 << 20


def pair(role=ROLE_DIALER, root=ROOT, salt=None):
    return FrameSealer(root, role, salt=salt), FrameOpener(root, role, MAX)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 written out with hmac, independent of `cryptography`'s HKDF (one block)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_hkdf_reference_matches_rfc5869_test_case_1():
    ikm = bytes.fromhex("0b" * 22)
    prk_salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")
    assert _hkdf(ikm, prk_salt, info) == okm  # first 32 bytes of the RFC's 42-byte OKM


def test_frames_are_aes_gcm_under_the_documented_keys_and_layout():
    salt = bytes(range(16))
    sealer = FrameSealer(ROOT, ROLE_DIALER, salt=salt)
    hello, second = sealer.seal(b"first"), sealer.seal(b"second")
    root = _hkdf(SECRET.encode(), b"", w.ROOT_LABEL)
    assert root == ROOT
    key = _hkdf(root, salt, w.KEY_LABEL + b"dialer")
    header = bytes((0x01, w.FLAG_HELLO)) + salt + struct.pack(">Q", 0)
    assert hello == header + AESGCM(key).encrypt(bytes(12), b"first", header)
    header = bytes((0x01, 0)) + struct.pack(">Q", 1)
    assert second == header + AESGCM(key).encrypt(bytes(11) + b"\x01", b"second", header)
    assert len(second) - len(b"second") == 26 and len(hello) - len(b"first") == 42


def test_round_trip_small_and_large_compressed_and_not():
    sealer, opener = pair()
    compressible = b"key-000001" * 8000  # 80,000 bytes
    cases = {b"": False, b"x": False, os.urandom(300): False, b"y" * 65535: False,
             compressible: True, os.urandom(70000): False,
             os.urandom(9000) + bytes(70000): False}  # the head decides (a cheap probe)
    for message, compressed in cases.items():
        frame = sealer.seal(message)
        assert opener.open(frame) == message
        assert bool(frame[1] & w.FLAG_COMPRESSED) == compressed, len(message)
    assert len(sealer.seal(compressible)) < len(compressible) // 4


def test_each_connection_direction_has_its_own_key():
    a, b = FrameSealer(ROOT, ROLE_DIALER), FrameSealer(ROOT, ROLE_DIALER)
    fa, fb = a.seal(b"same"), b.seal(b"same")
    assert fa[2:18] != fb[2:18] and fa[26:] != fb[26:]


def _sealed(n=3):
    sealer = FrameSealer(ROOT, ROLE_DIALER)
    return [sealer.seal(b"message %d " % i * 20) for i in range(n)]


def _opener_after(frames):
    opener = FrameOpener(ROOT, ROLE_DIALER, MAX)
    for frame in frames:
        opener.open(frame)
    return opener


@pytest.mark.parametrize("index", [0, 1])
def test_flipping_any_bit_of_any_byte_is_refused(index):
    frames = _sealed()
    target = frames[index]
    for pos in range(len(target)):
        for bit in (0x01, 0x80):
            tampered = bytearray(target)
            tampered[pos] ^= bit
            opener = _opener_after(frames[:index])
            with pytest.raises(WireRefused):
                opener.open(bytes(tampered))


@pytest.mark.parametrize("index", [0, 1])
def test_every_truncation_is_refused(index):
    frames = _sealed()
    for cut in range(len(frames[index])):
        with pytest.raises(WireRefused):
            _opener_after(frames[:index]).open(frames[index][:cut])


def test_wrong_secret_and_reflected_frames_fail_authentication():
    frames = _sealed()
    other = FrameOpener(w.root_key(SECRET + "x"), ROLE_DIALER, MAX)
    with pytest.raises(WireRefused, match="failed authentication"):
        other.open(frames[0])
    reflected = FrameOpener(ROOT, ROLE_LISTENER, MAX)  # our own frames sent back to us
    with pytest.raises(WireRefused, match="failed authentication"):
        reflected.open(frames[0])


def test_replayed_reordered_and_dropped_frames_are_refused_before_decrypting():
    frames = _sealed(4)
    opener = _opener_after(frames[:2])
    with pytest.raises(WireRefused, match="replayed or reordered"):
        opener.open(frames[1])  # replay
    with pytest.raises(WireRefused, match="replayed or reordered"):
        _opener_after(frames[:2]).open(frames[3])  # frame 2 dropped or reordered
    with pytest.raises(WireRefused, match="second hello"):
        _opener_after(frames[:2]).open(frames[0])
    with pytest.raises(WireRefused, match="not a hello"):
        FrameOpener(ROOT, ROLE_DIALER, MAX).open(frames[1])


def test_a_refused_frame_does_not_advance_the_opener():
    frames = _sealed()
    opener = _opener_after(frames[:1])
    tampered = bytearray(frames[1])
    tampered[-1] ^= 1
    with pytest.raises(WireRefused):
        opener.open(bytes(tampered))
    assert opener.open(frames[1]) == b"message 1 " * 20


def test_a_compressed_body_never_inflates_beyond_the_bound():
    sealer = FrameSealer(ROOT, ROLE_DIALER)
    frame = sealer.seal(bytes(100000))
    assert frame[1] & w.FLAG_COMPRESSED
    with pytest.raises(WireRefused, match="inflates beyond"):
        FrameOpener(ROOT, ROLE_DIALER, 50000).open(frame)
    assert FrameOpener(ROOT, ROLE_DIALER, 100000).open(frame) == bytes(100000)


def test_unknown_version_and_flags_are_refused():
    frame = bytearray(_sealed(1)[0])
    frame[0] = 0x02
    with pytest.raises(WireRefused, match="unsupported version"):
        FrameOpener(ROOT, ROLE_DIALER, MAX).open(bytes(frame))
    frame = bytearray(_sealed(1)[0])
    frame[1] |= 0x04
    with pytest.raises(WireRefused, match="unknown flag"):
        FrameOpener(ROOT, ROLE_DIALER, MAX).open(bytes(frame))


def test_random_and_mutated_input_only_ever_raises_wire_refused():
    rng = random.Random(14)
    frames = _sealed()
    for _ in range(3000):
        data = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                data = data[:rng.randrange(len(data) + 1)]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            _opener_after(frames[:rng.randrange(2)]).open(bytes(data))
        except WireRefused:
            pass


def test_the_first_byte_tells_fernet_from_the_peer_wire():
    from cryptography.fernet import Fernet

    token = Fernet(Fernet.generate_key()).encrypt(b"x")
    assert w.frame_format(token) == w.FORMAT_FERNET
    assert w.frame_format(_sealed(1)[0]) == w.FORMAT_GCM
    for other in (b"", b"\x00abc", b"hAAAA", b"\x80"):
        with pytest.raises(WireRefused):
            w.frame_format(other)


def test_the_counter_refuses_to_wrap():
    sealer = FrameSealer(ROOT, ROLE_DIALER)
    sealer._counter = w.MAX_COUNTER
    with pytest.raises(WireRefused, match="exhausted"):
        sealer.seal(b"x")


def test_peer_wire_settings_are_checked():
    with pytest.raises(ValueError, match="peer_wire must be one of fernet, gcm"):
        w.PeerWire(None, ROOT, "aes")
    with pytest.raises(ValueError):
        FrameSealer(ROOT, "server")
    with pytest.raises(ValueError):
        FrameSealer(ROOT, ROLE_DIALER, salt=b"short")
