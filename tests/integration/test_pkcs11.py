"""A local cluster whose KEK is a non-extractable key in a real PKCS#11 token (SoftHSM2).

Skipped, naming the package, where SoftHSM2 or python-pkcs11 is missing (`.ci/run` installs
SoftHSM2).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.softhsm import make_token

pytestmark = pytest.mark.integration


def _sealkv(*args, cwd, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cluster_up_with_a_pkcs11_kek_bootstraps_seals_and_restarts(tmp_path):
    hsm = make_token(str(tmp_path / "hsm"))
    env = dict(os.environ, SOFTHSM2_CONF=hsm.conf)
    env.pop("SEALKV_ENDPOINTS", None)
    keygen = _sealkv("encryption", "pkcs11-keygen", "--module", hsm.module, "--token-label",
                     hsm.token_label, "--key-label", "cluster-kek", "--pin-file", hsm.pin_file,
                     cwd=tmp_path, env=env)
    assert keygen.returncode == 0, keygen.stderr
    options = [a for k, v in hsm.kek_options("cluster-kek").items()
               for a in ("--kek-option", f"{k}={v}")]
    try:
        up = _sealkv("cluster", "up", "--encryption", "--kek-provider", "pkcs11", *options,
                     cwd=tmp_path, env=env)
        assert up.returncode == 0, up.stderr
        assert not os.path.exists(tmp_path / ".sealkv" / "kek")  # no KEK file anywhere
        for step in (["encryption", "bootstrap"], ["encryption", "enable-storage-envelope"],
                     ["put", "pkcs11/k", "sealed by the token"]):
            r = _sealkv(*step, cwd=tmp_path, env=env)
            assert r.returncode == 0, (step, r.stderr)
        status = _sealkv("-w", "json", "encryption", "status", cwd=tmp_path, env=env)
        assert status.returncode == 0, status.stderr
        rows = json.loads(status.stdout)
        assert len(rows) == 3 and all(row["capable"] for row in rows), status.stdout
        down = _sealkv("cluster", "down", cwd=tmp_path, env=env)
        assert down.returncode == 0, down.stderr
        # Restart: every node unwraps the key table on the token again.
        up = _sealkv("cluster", "up", cwd=tmp_path, env=env)
        assert up.returncode == 0, up.stderr
        got = _sealkv("get", "pkcs11/k", cwd=tmp_path, env=env)
        assert (got.returncode, got.stdout) == (0, "pkcs11/k\nsealed by the token\n"), got.stderr
    finally:
        _sealkv("cluster", "down", cwd=tmp_path, env=env)
