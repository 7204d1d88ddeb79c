"""Tests of the KEK providers: the file checks of §1 and the 60-byte wrap format."""
from __future__ import annotations

import os

import pytest

from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption.kek import (
    EnvKEK, FileKEK, UnwrapError, WRAPPED_SIZE, load_kek_provider,
)

KEK = bytes(range(100, 132))


def _kek_file(tmp_path, data=KEK, mode=0o600):
    path = tmp_path / "kek"
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_file_kek_wraps_and_unwraps(tmp_path, mode):
    provider = FileKEK(_kek_file(tmp_path, mode=mode))
    dek = os.urandom(32)
    blob = provider.wrap(dek)
    assert len(blob) == WRAPPED_SIZE == 60
    assert provider.unwrap(blob) == dek
    assert provider.wrap(dek)[:12] != blob[:12]  # a fresh random nonce each time
    assert KEK.hex() not in repr(provider) and KEK.hex() not in str(provider.status())


def test_wrap_format_is_nonce_ciphertext_tag_under_the_kek(tmp_path):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    provider = FileKEK(_kek_file(tmp_path))
    blob = provider.wrap(b"\x07" * 32)
    assert AESGCM(KEK).decrypt(blob[:12], blob[12:], None) == b"\x07" * 32


def test_unwrap_requires_exactly_60_authentic_bytes(tmp_path):
    provider = FileKEK(_kek_file(tmp_path))
    blob = provider.wrap(b"\x01" * 32)
    for bad in (blob[:-1], blob + b"\x00", b"", bytes(60)):
        with pytest.raises(UnwrapError):
            provider.unwrap(bad)
    other = FileKEK(_kek_file(tmp_path / ".." / tmp_path.name, data=bytes(32)))
    with pytest.raises(UnwrapError):
        other.unwrap(blob)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_file_kek_refuses_group_or_other_bits(tmp_path, mode):
    path = _kek_file(tmp_path, mode=mode)
    with pytest.raises(StartupRefused) as refused:
        FileKEK(path)
    assert path in str(refused.value) and f"chmod 600 {path}" in str(refused.value)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_file_kek_refuses_wrong_size(tmp_path, size):
    path = _kek_file(tmp_path, data=b"\x01" * size)
    with pytest.raises(StartupRefused, match="32"):
        FileKEK(path)


def test_file_kek_refuses_missing_file(tmp_path):
    path = str(tmp_path / "absent")
    with pytest.raises(StartupRefused) as refused:
        FileKEK(path)
    assert path in str(refused.value)


def test_file_kek_refuses_a_fifo_without_hanging(tmp_path):
    path = str(tmp_path / "fifo")
    os.mkfifo(path, 0o600)
    with pytest.raises(StartupRefused, match="not a regular file"):
        FileKEK(path)  # a blocking open would wait forever for a writer


def test_file_kek_refuses_a_directory(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(StartupRefused):
        FileKEK(str(tmp_path))


def test_env_kek(monkeypatch):
    monkeypatch.setenv("SEALKV_TEST_KEK", KEK.hex())
    provider = EnvKEK("SEALKV_TEST_KEK")
    assert provider.unwrap(provider.wrap(b"\x02" * 32)) == b"\x02" * 32
    for bad in ("abc", KEK.hex()[:-2], KEK.hex() + "00", "zz" * 32):
        monkeypatch.setenv("SEALKV_TEST_KEK", bad)
        with pytest.raises(StartupRefused):
            EnvKEK("SEALKV_TEST_KEK")
    monkeypatch.delenv("SEALKV_TEST_KEK")
    with pytest.raises(StartupRefused):
        EnvKEK("SEALKV_TEST_KEK")


def test_load_kek_provider_by_name(tmp_path):
    provider = load_kek_provider("file", path=_kek_file(tmp_path))
    assert isinstance(provider, FileKEK)
    with pytest.raises(StartupRefused, match="unknown KEK provider"):
        load_kek_provider("vault")
    with pytest.raises(StartupRefused, match="rejected its options"):
        load_kek_provider("file", nope=1)
