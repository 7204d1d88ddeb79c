"""The README's main command runs examples/walkthrough.py: it must work as a newcomer runs it."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_walkthrough_runs_from_a_fresh_directory(tmp_path):
    script = os.path.join(ROOT, "examples", "walkthrough.py")
    try:
        result = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout
        assert "storage envelope active from index" in out
        assert out.count("capable") >= 6  # every member probed, twice
        assert "sealed at rest" in out and "hello, sealkv" in out
        assert "raft envelope active above index" in out
        assert "re-encryption done" in out and "0 values still to seal" in out
        assert "compaction done on 3 members" in out and "sealed in the log too" in out
        # Re-running replaces the cluster it created.
        again = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        subprocess.run([sys.executable, "-m", "sealkv.node.cli", "cluster", "down",
                        "--data-dir", str(tmp_path / ".sealkv")], capture_output=True,
                       timeout=120)
