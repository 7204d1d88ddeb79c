"""The PKCS#11 KEK provider against a real SoftHSM2 token (skipped, naming the package, without it)."""
import os
import subprocess
import sys

import pytest

from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption.kek import FileKEK, UnwrapError, WRAPPED_SIZE, load_kek_provider
from tests.softhsm import make_token


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    token = make_token(str(tmp_path_factory.mktemp("softhsm")))
    from sealkv.plugins.encryption.kek_pkcs11 import generate_key
    generate_key(token.module, token.token_label, "kek-a", token.pin_file)
    generate_key(token.module, token.token_label, "kek-b", token.pin_file)
    return token


def test_wraps_on_the_token_in_the_60_byte_format(hsm):
    kek = load_kek_provider("pkcs11", **hsm.kek_options("kek-a"))
    dek = os.urandom(32)
    blob = kek.wrap(dek)
    assert len(blob) == WRAPPED_SIZE
    assert dek not in blob
    assert kek.unwrap(blob) == dek
    assert kek.wrap(dek) != blob  # a fresh nonce every time
    assert kek.status() == {"provider": "pkcs11", "module": hsm.module,
                            "token_label": hsm.token_label, "key_label": "kek-a", "loaded": True}


def test_a_blob_of_another_key_or_tampered_does_not_unwrap(hsm):
    a = load_kek_provider("pkcs11", **hsm.kek_options("kek-a"))
    b = load_kek_provider("pkcs11", **hsm.kek_options("kek-b"))
    blob = a.wrap(os.urandom(32))
    with pytest.raises(UnwrapError):
        b.unwrap(blob)
    for i in (0, 12, 30, WRAPPED_SIZE - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(UnwrapError):
            a.unwrap(bytes(bad))
    with pytest.raises(UnwrapError):
        a.unwrap(blob[:-1])


def test_a_file_kek_cannot_open_a_token_blob(hsm, tmp_path):
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    blob = load_kek_provider("pkcs11", **hsm.kek_options("kek-a")).wrap(os.urandom(32))
    with pytest.raises(UnwrapError):
        FileKEK(str(path)).unwrap(blob)


def test_the_key_cannot_be_read_out_of_the_token(hsm):
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    load_kek_provider("pkcs11", **hsm.kek_options("kek-a"))  # this process is logged in
    token = pkcs11.lib(hsm.module).get_token(token_label=hsm.token_label)
    with token.open(rw=True) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                              label="kek-a")
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, label="wrapper", store=False)
        with pytest.raises(pkcs11.PKCS11Error):  # CKR_KEY_UNEXTRACTABLE
            wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_start_up_refusals_name_the_fix(hsm, tmp_path):
    with pytest.raises(StartupRefused, match="no single AES key labelled 'missing'"):
        load_kek_provider("pkcs11", **hsm.kek_options("missing"))
    with pytest.raises(StartupRefused, match="no single PKCS#11 token labelled 'nope'"):
        load_kek_provider("pkcs11", **dict(hsm.kek_options("kek-a"), token_label="nope"))
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000\n")
    wrong.chmod(0o644)
    with pytest.raises(StartupRefused, match="readable by group or others: run chmod 600"):
        load_kek_provider("pkcs11", **dict(hsm.kek_options("kek-a"), pin_file=str(wrong)))
    with pytest.raises(StartupRefused, match="needs the option key_label"):
        load_kek_provider("pkcs11", **dict(hsm.kek_options("kek-a"), key_label=""))
    with pytest.raises(StartupRefused, match="cannot load the PKCS#11 library"):
        load_kek_provider("pkcs11", **dict(hsm.kek_options("kek-a"), module=str(tmp_path / "x.so")))


def test_a_wrong_pin_refuses_the_start(hsm, tmp_path):
    # PKCS#11 login belongs to the process: a wrong PIN is seen by a process that starts fresh.
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000\n")
    wrong.chmod(0o600)
    options = dict(hsm.kek_options("kek-a"), pin_file=str(wrong))
    code = ("import sys; from sealkv.plugins.api import StartupRefused\n"
            "from sealkv.plugins.encryption.kek import load_kek_provider\n"
            f"try: load_kek_provider('pkcs11', **{options!r})\n"
            "except StartupRefused as e: print(e); sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, SOFTHSM2_CONF=hsm.conf))
    assert run.returncode == 3, run.stderr
    assert f"the PIN in {wrong} is not token 'sealkv-test''s user PIN: fix the PIN file" in run.stdout


def test_keygen_never_replaces_a_key(hsm):
    from sealkv.plugins.encryption.kek_pkcs11 import generate_key
    with pytest.raises(StartupRefused, match="already holds a key labelled 'kek-a'"):
        generate_key(hsm.module, hsm.token_label, "kek-a", hsm.pin_file)
