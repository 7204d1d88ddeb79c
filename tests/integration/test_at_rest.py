"""What a node leaves on disk: private file modes, and no core dumps once it holds keys."""
from __future__ import annotations

import os
import stat

import pytest

from tests.cluster import wait_for
from tests.integration.test_encryption_admin import admin, write_kek

pytestmark = pytest.mark.integration


def loose_modes(root) -> list[str]:
    """Returns every path under `root` that is not a 0700 directory or a 0600 file."""
    bad = []
    for path in [root] + [os.path.join(d, n) for d, dirs, files in os.walk(root)
                          for n in dirs + files]:
        st = os.lstat(path)
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            bad.append(f"{path} {stat.S_IMODE(st.st_mode):04o}")
    return bad


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max core file size"))


def test_nodes_keep_private_modes_whatever_the_umask_and_disable_core_dumps(make_cluster,
                                                                            tmp_path):
    kek = write_kek(tmp_path / "kek")
    cluster = make_cluster(3, start=False, plugins=["encryption"], extra_args=["--kek-file", kek])
    # A data directory made by hand, world-readable, with a stray world-readable file.
    n1 = cluster.nodes["n1"].data_dir
    os.makedirs(os.path.join(n1, "old"), mode=0o755)
    os.chmod(n1, 0o755)
    with open(os.path.join(n1, "old", "notes"), "w") as f:
        f.write("left by an operator")
    os.chmod(os.path.join(n1, "old", "notes"), 0o644)
    previous = os.umask(0o022)
    try:
        cluster.start()
    finally:
        os.umask(previous)
    with cluster.client() as c:
        c.put(b"k", b"v")
        admin(c, "BootstrapEncryption", timeout=15)
        admin(c, "EnableStorageEnvelope", timeout=15)
        c.put(b"k2", b"v2")
    for node in cluster.nodes.values():
        wait_for(lambda: os.path.exists(os.path.join(node.data_dir, "encryption", "keys.json")),
                 30, f"{node.name}'s sidecar")
        assert loose_modes(node.data_dir) == [], node.name
        assert core_limit(node.pid).split()[4:6] == ["0", "0"], core_limit(node.pid)
        assert "core dumps disabled for this process" in node.log()
    log = cluster.nodes["n1"].log()
    assert "tightened the modes of 3 paths" in log and f"{n1} (0755)" in log
