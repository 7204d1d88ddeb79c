"""The third-party KEK provider example (examples/kek_provider), installed and used by a cluster."""
import json
import os
import subprocess
import sys

import pytest

from tests.examples import installed_example

pytestmark = pytest.mark.integration

DIST = "sealkv-passphrase-kek"
SALT = "00112233445566778899aabbccddeeff"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    with installed_example("kek_provider", DIST, tmp_path_factory.mktemp("kek-provider-src"),
                           "sealkv_passphrase_kek"):
        yield


def _sealkv(*args, cwd, timeout=180):
    env = dict(os.environ)
    env.pop("SEALKV_ENDPOINTS", None)
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _passphrase(path, text="correct horse battery staple", mode=0o600):
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


def test_the_provider_is_listed_and_derives_a_stable_kek(example, tmp_path):
    r = _sealkv("-w", "json", "plugins", "list", cwd=tmp_path)
    rows = [p for p in json.loads(r.stdout) if p["name"] == "passphrase"]
    assert rows and rows[0]["kind"] == "kek" and rows[0]["distribution"] == DIST, r.stdout
    from sealkv.plugins.encryption.kek import load_kek_provider
    path = _passphrase(tmp_path / "pass")
    first = load_kek_provider("passphrase", passphrase_file=path, salt=SALT)
    blob = first.wrap(os.urandom(32))
    again = load_kek_provider("passphrase", passphrase_file=path, salt=SALT)
    assert again.unwrap(blob) == first.unwrap(blob)  # same passphrase and salt: same KEK
    other = load_kek_provider("passphrase", passphrase_file=path, salt="ff" * 16)
    from sealkv.plugins.encryption.kek import UnwrapError
    with pytest.raises(UnwrapError):
        other.unwrap(blob)


def test_bad_options_refuse_naming_the_fix(example, tmp_path):
    from sealkv.plugins.api import StartupRefused
    from sealkv.plugins.encryption.kek import load_kek_provider
    good = _passphrase(tmp_path / "pass")
    with pytest.raises(StartupRefused, match="needs the option salt"):
        load_kek_provider("passphrase", passphrase_file=good, salt="abc")
    with pytest.raises(StartupRefused, match="readable by group or others"):
        load_kek_provider("passphrase", passphrase_file=_passphrase(tmp_path / "open", mode=0o644),
                          salt=SALT)
    with pytest.raises(StartupRefused, match="fewer than 12 characters"):
        load_kek_provider("passphrase", passphrase_file=_passphrase(tmp_path / "short", "short"),
                          salt=SALT)


def test_a_cluster_runs_on_the_third_party_provider(example, tmp_path):
    path = _passphrase(tmp_path / "pass")
    try:
        up = _sealkv("cluster", "up", "--encryption", "--kek-provider", "passphrase",
                     "--kek-option", f"passphrase_file={path}", "--kek-option", f"salt={SALT}",
                     cwd=tmp_path)
        assert up.returncode == 0, up.stderr
        for step in (["encryption", "bootstrap"], ["encryption", "enable-storage-envelope"],
                     ["put", "example/k", "under a passphrase KEK"]):
            r = _sealkv(*step, cwd=tmp_path)
            assert r.returncode == 0, (step, r.stderr)
        got = _sealkv("get", "example/k", cwd=tmp_path)
        assert (got.returncode, got.stdout) == (0, "example/k\nunder a passphrase KEK\n"), got.stderr
    finally:
        _sealkv("cluster", "down", cwd=tmp_path)
