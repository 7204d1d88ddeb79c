"""A SoftHSM2 token for tests: a private token directory, a user PIN file, a KEK in the token.

SoftHSM2 (Debian's `softhsm2` package; `.ci/run` installs it) is a real PKCS#11 module. Its
configuration is chosen by the SOFTHSM2_CONF environment variable, read when the library is
first loaded in a process: the fixture sets it for the whole test session, and node processes
inherit it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

MODULE_PATHS = ("/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
TOKEN_LABEL = "sealkv-test"
USER_PIN = "4242-test"


@dataclass
class SoftHSM:
    module: str
    conf: str
    token_label: str
    pin_file: str

    def kek_options(self, key_label: str) -> dict[str, str]:
        return {"module": self.module, "token_label": self.token_label,
                "key_label": key_label, "pin_file": self.pin_file}


def module_path() -> str | None:
    return next((p for p in MODULE_PATHS if os.path.exists(p)), None)


def require_softhsm() -> str:
    """Returns the module path, or skips naming the package that enables these tests."""
    module = module_path()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("PKCS#11 tests need SoftHSM2: apt-get install softhsm2")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pytest.skip("PKCS#11 tests need python-pkcs11: pip install 'sealkv[pkcs11]'")
    return module


def make_token(base_dir: str) -> SoftHSM:
    """Creates a SoftHSM2 configuration and an initialized token under `base_dir`."""
    module = require_softhsm()
    tokens = os.path.join(base_dir, "tokens")
    os.makedirs(tokens, mode=0o700, exist_ok=True)
    conf = os.path.join(base_dir, "softhsm2.conf")
    with open(conf, "w") as f:
        f.write(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
                    "--pin", USER_PIN, "--so-pin", "so-" + USER_PIN],
                   env=env, check=True, capture_output=True, timeout=30)
    pin_file = os.path.join(base_dir, "pin")
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(USER_PIN + "\n")
    os.environ["SOFTHSM2_CONF"] = conf
    return SoftHSM(module, conf, TOKEN_LABEL, pin_file)
