"""The `passphrase` KEK provider: KEK = scrypt(passphrase, salt), held only in memory.

A third-party provider needs three things (see the README's "KEK providers" section):
a class deriving from `sealkv.plugins.encryption.kek.KEKProvider` (here through `LocalKEK`,
which does the AES-256-GCM wrap of ENCRYPTION.md §1 once it has 32 key bytes), a constructor
that takes the provider's options as keyword arguments and refuses bad ones with
`StartupRefused` naming the fix, and an entry point in the group `sealkv.kek_providers`.

Options: `passphrase_file` (owner-only, like a KEK file; surrounding white space is
ignored), `salt` (32 hex characters or more, chosen once per cluster and kept with the
configuration: the same passphrase and salt give the same KEK on every node).
"""
from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from sealkv.plugins.api import StartupRefused
from sealkv.plugins.encryption.kek import KEK_SIZE, LocalKEK, read_owner_only_file

# scrypt cost: 2^15 x 8 x 1 takes ~0.1 s and 32 MiB once per start (RFC 7914 §2 guidance for
# interactive use); a node derives its KEK once, so this is paid at start-up only.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
MIN_PASSPHRASE_CHARS = 12
MIN_SALT_BYTES = 16


class PassphraseKEK(LocalKEK):
    """A KEK derived from an operator's passphrase; nothing key-like is stored anywhere."""

    name = "passphrase"

    def __init__(self, passphrase_file: str = "", salt: str = ""):
        if not passphrase_file:
            raise StartupRefused("the passphrase KEK provider needs the option passphrase_file "
                                 "(--kek-option passphrase_file=PATH)")
        try:
            salt_bytes = bytes.fromhex(salt)
        except ValueError:
            salt_bytes = b""
        if len(salt_bytes) < MIN_SALT_BYTES:
            raise StartupRefused(
                f"the passphrase KEK provider needs the option salt: at least {2 * MIN_SALT_BYTES}"
                " hex characters, the same on every node (e.g. from `head -c 16 /dev/urandom | "
                "xxd -p`)")
        self.path = os.path.abspath(passphrase_file)
        raw = read_owner_only_file(self.path, "passphrase file", "passphrase_file")
        passphrase = raw.strip()
        if len(passphrase) < MIN_PASSPHRASE_CHARS:
            raise StartupRefused(f"passphrase file {self.path} holds fewer than "
                                 f"{MIN_PASSPHRASE_CHARS} characters: use a longer passphrase")
        kdf = Scrypt(salt=salt_bytes, length=KEK_SIZE, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        super().__init__(kdf.derive(passphrase))

    def status(self) -> dict[str, Any]:
        return {"provider": self.name, "passphrase_file": self.path, "kdf": "scrypt",
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "loaded": True}
