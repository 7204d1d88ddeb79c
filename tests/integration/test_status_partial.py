"""Status commands with a member down: every member's row, the missing one marked, exit 1;
reads that fail say what happened to a read (never "outcome unknown")."""
import json
import os
import subprocess
import sys

import pytest

from tests.cluster import running_cluster
from tests.integration.test_encryption_admin import write_kek

pytestmark = pytest.mark.integration


def _sealkv(*args, cluster=None):
    """Runs the CLI, as `cluster`'s `root` identity when given (test clusters serve TLS)."""
    return subprocess.run([sys.executable, "-m", "sealkv.node.cli", *args], capture_output=True,
                          text=True, timeout=120,
                          env=os.environ | (cluster.cli_env() if cluster else {}))


def test_status_with_a_member_down(tmp_path):
    kek = write_kek(tmp_path / "kek")
    (tmp_path / "c").mkdir()
    with running_cluster(str(tmp_path / "c"), 3, plugins=["encryption"],
                         extra_args=["--kek-file", kek]) as cluster:
        cluster.kill("n3")
        cluster.wait_leader()
        endpoints = ",".join(n.grpc for n in cluster.nodes.values())
        r = _sealkv("endpoint", "status", "--endpoints", endpoints, "-w", "json",
                    "--timeout", "2", cluster=cluster)
        assert r.returncode == 1, r.stderr
        rows = json.loads(r.stdout)
        assert len(rows) == 3
        down = [row for row in rows if "error" in row]
        assert [row["endpoint"] for row in down] == [cluster.nodes["n3"].grpc]
        assert down[0]["error"].startswith("unreachable")
        table = _sealkv("endpoint", "status", "--endpoints", endpoints, "-w", "table",
                        "--timeout", "2", cluster=cluster)
        assert table.returncode == 1 and table.stdout.count("unreachable") == 1
        enc = _sealkv("encryption", "status", "--endpoints", endpoints, "-w", "table",
                      "--timeout", "2", cluster=cluster)
        assert enc.returncode == 1
        assert "outcome unknown" not in enc.stdout + enc.stderr
        assert enc.stdout.count("unreachable") == 1
        only_down = _sealkv("endpoint", "status", "--endpoints", cluster.nodes["n3"].grpc,
                            "--timeout", "2", cluster=cluster)
        assert only_down.returncode == 3
