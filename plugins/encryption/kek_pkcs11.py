"""The PKCS#11 KEK provider: the key-encryption key lives in a token and never leaves it.

Data keys are wrapped and unwrapped on the token with AES-256-GCM (CKM_AES_GCM), giving the
same 60-byte blob as the file provider (`nonce(12) | ciphertext(32) | tag(16)`, ENCRYPTION.md
§1); the node holds only the unwrapped data keys it needs. The nonce comes from the node's
CSPRNG (tokens differ in whether they generate GCM IVs themselves; a caller-supplied random
96-bit nonce per wrap is what NIST SP 800-38D §8.2.2 allows for this tiny number of wraps).

Options (`[plugin_options.encryption.kek_options]` or `--kek-option KEY=VALUE`):
`module` (path of the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so), `token_label`,
`key_label`, `pin_file` (the user PIN, a file with the same checks as a KEK file: regular,
mode 0600 or 0400). `python-pkcs11` is imported only when this provider is chosen
(`pip install 'sealkv[pkcs11]'`).
"""
from __future__ import annotations

import os
import threading
from typing import Any

from sealkv.plugins.api import StartupRefused
from .kek import (KEKProvider, UnwrapError, WRAP_NONCE_SIZE, check_dek, read_owner_only_file,
                  split_wrapped)

TAG_BITS = 128


class Pkcs11KEK(KEKProvider):
    """A KEK that is a non-extractable AES-256 secret key object in a PKCS#11 token.

    One logged-in session per token is kept for the process's life and shared by every
    provider on that token (PKCS#11 login state belongs to the application, and closing a
    logged-in session logs all of them out); a lock serializes its use (a session must not run
    two operations at once). Refuses to start, naming the fix, when the
    library, the token, the PIN or the key is wrong, or when the key could leave the token
    (CKA_EXTRACTABLE true or CKA_SENSITIVE false).
    """

    name = "pkcs11"

    def __init__(self, module: str = "", token_label: str = "", key_label: str = "",
                 pin_file: str = ""):
        for option, value in (("module", module), ("token_label", token_label),
                              ("key_label", key_label), ("pin_file", pin_file)):
            if not value:
                raise StartupRefused(f"the pkcs11 KEK provider needs the option {option} "
                                     f"(--kek-option {option}=...)")
        try:
            import pkcs11
            from pkcs11 import Attribute, KeyType, ObjectClass
            from pkcs11.mechanisms import GCMParams
        except ImportError:
            raise StartupRefused("the pkcs11 KEK provider needs python-pkcs11: "
                                 "pip install 'sealkv[pkcs11]'") from None
        self._errors = pkcs11.PKCS11Error
        self._mechanism = pkcs11.Mechanism.AES_GCM
        self._params = GCMParams
        self.module, self.token_label, self.key_label = module, token_label, key_label
        pin = read_owner_only_file(os.path.abspath(pin_file), "PIN file", "pin_file")
        pin_text = pin.decode("utf-8", "strict").strip() if pin else ""
        if not pin_text:
            raise StartupRefused(f"PIN file {pin_file} is empty: write the token's user PIN in it")
        self._session, self._lock = _logged_in_session(pkcs11, module, token_label, pin_text,
                                                       pin_file)
        try:
            with self._lock:
                self._key = self._session.get_key(object_class=ObjectClass.SECRET_KEY,
                                                  key_type=KeyType.AES, label=key_label)
                extractable = bool(self._key[Attribute.EXTRACTABLE])
                sensitive = bool(self._key[Attribute.SENSITIVE])
                length = int(self._key[Attribute.VALUE_LEN])
        except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned):
            raise StartupRefused(f"no single AES key labelled {key_label!r} in token "
                                 f"{token_label!r}: create one with `sealkv encryption "
                                 "pkcs11-keygen` or fix key_label") from None
        if extractable or not sensitive or length != 32:
            raise StartupRefused(f"PKCS#11 key {key_label!r} must be a non-extractable, "
                                 "sensitive AES-256 key (CKA_EXTRACTABLE false, CKA_SENSITIVE "
                                 "true, 32 bytes): generate a new one inside the token")

    def wrap(self, dek: bytes) -> bytes:
        check_dek(dek)
        nonce = os.urandom(WRAP_NONCE_SIZE)
        with self._lock:
            sealed = self._key.encrypt(bytes(dek), mechanism=self._mechanism,
                                       mechanism_param=self._params(nonce, b"", TAG_BITS))
        return nonce + bytes(sealed)

    def unwrap(self, blob: bytes) -> bytes:
        nonce, sealed = split_wrapped(blob)
        try:
            with self._lock:
                dek = bytes(self._key.decrypt(sealed, mechanism=self._mechanism,
                                              mechanism_param=self._params(nonce, b"", TAG_BITS)))
        except self._errors:
            # Tokens report a bad GCM tag differently (CKR_ENCRYPTED_DATA_INVALID, or
            # CKR_GENERAL_ERROR for SoftHSM2): either way nothing was unwrapped.
            raise UnwrapError("the wrapped key does not authenticate under this KEK") from None
        if len(dek) != 32:
            raise UnwrapError("the wrapped key does not hold a 32-byte data key")
        return dek

    def status(self) -> dict[str, Any]:
        return {"provider": self.name, "module": self.module, "token_label": self.token_label,
                "key_label": self.key_label, "loaded": True}


_SESSIONS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_SESSIONS_LOCK = threading.Lock()


def _logged_in_session(pkcs11, module: str, token_label: str, pin: str, pin_file: str):
    """Returns this process's (session, lock) for the token, logging in on first use.

    Within one process the first login decides: a later provider on the same token shares the
    session without a second C_Login (which PKCS#11 answers CKR_USER_ALREADY_LOGGED_IN).
    """
    with _SESSIONS_LOCK:
        found = _SESSIONS.get((module, token_label))
        if found is not None:
            return found
        try:
            lib = pkcs11.lib(module)
        except (RuntimeError, OSError, pkcs11.PKCS11Error) as error:
            raise StartupRefused(f"cannot load the PKCS#11 library {module} "
                                 f"({type(error).__name__}): set kek option module to the path "
                                 "of the token's PKCS#11 module") from None
        try:
            token = lib.get_token(token_label=token_label)
        except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned):
            raise StartupRefused(f"no single PKCS#11 token labelled {token_label!r} in {module}: "
                                 "check token_label (softhsm2-util --show-slots)") from None
        except pkcs11.PKCS11Error as error:
            raise StartupRefused(f"the PKCS#11 module {module} cannot list its tokens "
                                 f"({type(error).__name__}): check the module's configuration "
                                 "(for SoftHSM2, SOFTHSM2_CONF and its token directory)") from None
        try:
            session = token.open(rw=True, user_pin=pin)
        except pkcs11.PinIncorrect:
            raise StartupRefused(f"the PIN in {pin_file} is not token {token_label!r}'s user PIN: "
                                 "fix the PIN file") from None
        except pkcs11.PKCS11Error as error:
            raise StartupRefused(f"cannot log in to PKCS#11 token {token_label!r} "
                                 f"({type(error).__name__}): check the token and the PIN file") from None
        _SESSIONS[(module, token_label)] = found = (session, threading.Lock())
        return found


def generate_key(module: str, token_label: str, key_label: str, pin_file: str) -> None:
    """Creates a non-extractable, sensitive AES-256 key labelled `key_label` in the token.

    The token generates the key (C_GenerateKey); its bytes never exist outside it. Refuses
    (StartupRefused, naming the fix) when a key with that label already exists: a KEK is never
    replaced silently.
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    pin = read_owner_only_file(os.path.abspath(pin_file), "PIN file", "pin_file").decode().strip()
    session, lock = _logged_in_session(pkcs11, module, token_label, pin, pin_file)
    with lock:
        existing = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                             Attribute.LABEL: key_label}))
        if existing:
            raise StartupRefused(f"token {token_label!r} already holds a key labelled "
                                 f"{key_label!r}: choose another key_label")
        session.generate_key(KeyType.AES, 256, label=key_label, store=True,
                             template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True,
                                       Attribute.TOKEN: True})
