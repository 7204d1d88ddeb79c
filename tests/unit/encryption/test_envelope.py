"""Tests of the envelope codec: NIST known answers, golden envelopes, tampering, fuzzing."""
from __future__ import annotations

import cryptography_vectors
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from sealkv.plugins.encryption import envelope
from sealkv.plugins.encryption.envelope import (
    AuthenticationFailed, BadFlags, EnvelopeError, EnvelopeTooShort, ReservedKeyId,
    UnknownKeyId, UnknownVersion, open_envelope, parse, raft_aad, seal, storage_aad,
)

DEK = bytes(range(32))
NONCE = bytes.fromhex("1234" "0001" "0000000000000001")


def _cavp_vectors():
    """Yields the 96-bit-IV, 128-bit-tag cases of NIST CAVP gcmEncryptExtIV256.rsp."""
    with cryptography_vectors.open_vector_file("ciphers/AES/GCM/gcmEncryptExtIV256.rsp",
                                               "r") as handle:
        text = handle.read()
    ivlen = taglen = None
    case: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("[IVlen"):
            ivlen = int(line.split("=")[1].strip(" ]"))
        elif line.startswith("[Taglen"):
            taglen = int(line.split("=")[1].strip(" ]"))
        elif "=" in line and not line.startswith("["):
            name, value = (part.strip() for part in line.split("=", 1))
            case[name] = value
        elif not line and case:
            if ivlen == 96 and taglen == 128 and "Key" in case:
                yield {k: bytes.fromhex(v) for k, v in case.items() if k != "Count"}
            case = {}


CAVP = list(_cavp_vectors())


def test_cavp_vectors_were_found():
    assert len(CAVP) >= 100


@pytest.mark.parametrize("vector", CAVP, ids=range(len(CAVP)))
def test_cavp_known_answer_through_the_envelope(vector):
    key_id = 0x01020304
    sealed = seal(vector["Key"], key_id, vector["IV"], vector["PT"], vector["AAD"])
    assert sealed[:6] == b"\x01\x00\x01\x02\x03\x04"
    assert sealed[6:18] == vector["IV"]
    assert sealed[18:-16] == vector["CT"]
    assert sealed[-16:] == vector["Tag"]
    assert open_envelope(vector["Key"], sealed, vector["AAD"]) == vector["PT"]
    assert envelope.Opener(vector["Key"], key_id).open(sealed, vector["AAD"]) == vector["PT"]


def test_golden_storage_envelope():
    # Derivation: key = bytes 0x00..0x1f, key_id 7, nonce = node_id16 0x1234 | epoch 1 |
    # counter 1, plaintext b"hello, sealkv", value header 0x01 (encrypted), user key
    # b"user/alice", mod_revision 42. AAD = 01 00 00000007 | 01 | "user/alice" | 42 as u64 BE.
    # Ciphertext+tag computed once with cryptography's AESGCM directly (not with this module).
    golden = bytes.fromhex(
        "01" "00" "00000007" "123400010000000000000001"
        "f48aad372350b9d330e2cd7aedfb2c29682b13e3394ff9077c96de71ce")
    header6 = envelope.envelope_header(7)
    aad = storage_aad(header6, 0x01, b"user/alice", 42)
    assert aad == bytes.fromhex("010000000007" "01") + b"user/alice" + bytes.fromhex(
        "000000000000002a")
    assert seal(DEK, 7, NONCE, b"hello, sealkv", aad) == golden
    assert open_envelope({7: DEK}, golden, aad) == b"hello, sealkv"
    assert len(golden) == len(b"hello, sealkv") + envelope.OVERHEAD == 13 + 34


def test_golden_raft_envelope_of_empty_payload():
    # Same key and nonce, key_id 9, empty payload, AAD = "R" 01 00000009.
    golden = bytes.fromhex("01" "00" "00000009" "123400010000000000000001"
                           "55dd591c001e9df855ccbb62459d5efb")
    assert raft_aad(9) == b"R\x01\x00\x00\x00\x09"
    assert seal(DEK, 9, NONCE, b"", raft_aad(9)) == golden
    assert open_envelope(DEK, golden, raft_aad(9)) == b""


def test_storage_envelope_fails_on_raft_path_and_reverse():
    header6 = envelope.envelope_header(9)
    stored = seal(DEK, 9, NONCE, b"v", storage_aad(header6, 1, b"k", 1))
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, stored, raft_aad(9))
    raft = seal(DEK, 9, NONCE, b"v", raft_aad(9))
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, raft, storage_aad(header6, 1, b"k", 1))


@pytest.mark.parametrize("data, error", [
    (b"", EnvelopeTooShort),
    (b"\x01\x00" + b"\x00" * 31, EnvelopeTooShort),
    (b"\x02\x00\x00\x00\x00\x01" + b"\x00" * 28, UnknownVersion),
    (b"\x01\x01\x00\x00\x00\x01" + b"\x00" * 28, BadFlags),
    (b"\x01\x80\x00\x00\x00\x01" + b"\x00" * 28, BadFlags),
    (b"\x01\x00\x00\x00\x00\x00" + b"\x00" * 28, ReservedKeyId),
])
def test_parse_rejects_with_typed_errors(data, error):
    with pytest.raises(error):
        parse(data)


def test_parse_minimal_envelope_and_unknown_key():
    data = b"\x01\x00\x00\x00\x00\x05" + b"\x11" * 12 + b"\x22" * 16
    parsed = parse(data)
    assert (parsed.key_id, parsed.ciphertext, parsed.to_bytes()) == (5, b"", data)
    with pytest.raises(UnknownKeyId):
        open_envelope({}, data, b"")
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, data, b"")


def test_seal_refuses_bad_arguments():
    with pytest.raises(ValueError):
        seal(DEK[:16], 1, NONCE, b"", b"")
    with pytest.raises(ValueError):
        seal(DEK, 0, NONCE, b"", b"")
    with pytest.raises(ValueError):
        seal(DEK, 1, NONCE[:8], b"", b"")


def test_a_sealer_makes_the_envelopes_seal_makes_and_checks_the_same_arguments():
    sealer = envelope.Sealer(DEK, 9)
    aad = storage_aad(sealer.header, 1, b"k", 3)
    assert sealer.key_id == 9 and sealer.header == envelope.envelope_header(9)
    assert sealer.seal(NONCE, b"value", aad) == seal(DEK, 9, NONCE, b"value", aad)
    assert open_envelope(DEK, sealer.seal(NONCE, b"value", aad), aad) == b"value"
    with pytest.raises(ValueError):
        envelope.Sealer(DEK[:16], 1)
    with pytest.raises(ValueError):
        envelope.Sealer(DEK, 0)
    with pytest.raises(ValueError):
        sealer.seal(NONCE[:8], b"", b"")


def test_an_opener_opens_what_open_envelope_opens_and_fails_where_it_fails():
    opener = envelope.Opener(DEK, 9)
    sealed = seal(DEK, 9, NONCE, b"payload" * 1000, raft_aad(9))
    assert opener.open(sealed, raft_aad(9)) == open_envelope(DEK, sealed, raft_aad(9))
    assert opener.open(bytearray(sealed), raft_aad(9)) == b"payload" * 1000
    for tampered, aad in ((sealed[:-1] + bytes((sealed[-1] ^ 1,)), raft_aad(9)),
                          (sealed[:10] + bytes((sealed[10] ^ 1,)) + sealed[11:], raft_aad(9)),
                          (sealed, raft_aad(8)),
                          (sealed, storage_aad(sealed[:6], 1, b"k", 3))):
        with pytest.raises(AuthenticationFailed):
            opener.open(tampered, aad)
    with pytest.raises(AuthenticationFailed):
        envelope.Opener(bytes(32), 9).open(sealed, raft_aad(9))
    with pytest.raises(ValueError):
        envelope.Opener(DEK[:16], 9)
    with pytest.raises(ValueError):
        envelope.Opener(DEK, 0)


def test_seal_stored_is_seal_under_the_storage_aad_and_refuses_what_does_not_fit():
    sealer = envelope.Sealer(DEK, 9)
    for header, key, revision in ((1, b"k", 3), (0x11, b"user/alice", 2 ** 64 - 1),
                                  (1, b"", 0), (0x11, b"k", 4)):
        aad = storage_aad(sealer.header, header, key, revision)
        assert sealer.seal_stored(NONCE, b"value", header, key, revision) == \
            seal(DEK, 9, NONCE, b"value", aad)
    for header, revision in ((256, 1), (-1, 1), (1, -1), (1, 2 ** 64)):
        with pytest.raises(ValueError):
            sealer.seal_stored(NONCE, b"v", header, b"k", revision)
    with pytest.raises(ValueError):
        sealer.seal_stored(NONCE[:8], b"v", 1, b"k", 1)


def test_storage_aad_refuses_what_does_not_fit():
    header6 = envelope.envelope_header(1)
    for bad in ((header6[:5], 1, b"k", 1), (header6, 256, b"k", 1), (header6, -1, b"k", 1),
                (header6, 1, b"k", -1), (header6, 1, b"k", 2 ** 64)):
        with pytest.raises(ValueError):
            storage_aad(*bad)
    assert storage_aad(header6, 1, b"k", 2 ** 64 - 1) == header6 + b"\x01k" + b"\xff" * 8


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_and_open_never_crash_on_random_input(data):
    try:
        open_envelope(lambda key_id: DEK, data, b"aad")
    except EnvelopeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.binary(min_size=28, max_size=60).map(lambda b: b"\x01\x00" + b)))
def test_key_id_of_reads_the_header_as_parse_does(data):
    try:
        expected = envelope.parse(data).key_id
    except EnvelopeError as error:
        with pytest.raises(type(error)):
            envelope.key_id_of(data)
    else:
        assert envelope.key_id_of(data) == expected


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=300), key=st.binary(max_size=40),
       revision=st.integers(0, 2**64 - 1), key_id=st.integers(1, 2**32 - 1))
def test_values_round_trip(value, key, revision, key_id):
    aad = storage_aad(envelope.envelope_header(key_id), 1, key, revision)
    sealed = seal(DEK, key_id, NONCE, value, aad)
    assert len(sealed) == len(value) + 34
    assert open_envelope({key_id: DEK}, sealed, lambda h6: storage_aad(h6, 1, key, revision)) \
        == value


@settings(max_examples=300, deadline=None)
@given(value=st.binary(min_size=0, max_size=64), data=st.data())
def test_any_single_bit_flip_of_the_envelope_fails(value, data):
    aad_of = lambda h6: storage_aad(h6, 1, b"key", 7)  # noqa: E731
    sealed = seal(DEK, 3, NONCE, value, aad_of(envelope.envelope_header(3)))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    tampered = bytearray(sealed)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(EnvelopeError):
        open_envelope(lambda _key_id: DEK, bytes(tampered), aad_of)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_bit_flip_of_the_aad_fails(data):
    aad = storage_aad(envelope.envelope_header(3), 1, b"some/key", 99)
    sealed = seal(DEK, 3, NONCE, b"value", aad)
    bit = data.draw(st.integers(0, len(aad) * 8 - 1))
    tampered = bytearray(aad)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, sealed, bytes(tampered))


@settings(max_examples=100, deadline=None)
@given(a=st.binary(min_size=1, max_size=20), b=st.binary(min_size=1, max_size=20),
       va=st.binary(max_size=50), vb=st.binary(max_size=50))
def test_swapping_two_keys_envelopes_fails(a, b, va, vb):
    if a == b:
        return
    header6 = envelope.envelope_header(1)
    sealed_a = seal(DEK, 1, NONCE, va, storage_aad(header6, 1, a, 5))
    sealed_b = seal(DEK, 1, NONCE[:-1] + b"\x02", vb, storage_aad(header6, 1, b, 5))
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, sealed_b, lambda h6: storage_aad(h6, 1, a, 5))
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, sealed_a, lambda h6: storage_aad(h6, 1, b, 5))


def test_moving_to_another_revision_fails():
    header6 = envelope.envelope_header(1)
    sealed = seal(DEK, 1, NONCE, b"v", storage_aad(header6, 1, b"k", 5))
    with pytest.raises(AuthenticationFailed):
        open_envelope(DEK, sealed, storage_aad(header6, 1, b"k", 6))


def test_aesgcm_reference_agrees_with_envelope_layout():
    aad = raft_aad(77)
    sealed = seal(DEK, 77, NONCE, b"payload", aad)
    assert AESGCM(DEK).decrypt(sealed[6:18], sealed[18:], aad) == b"payload"
