"""`--log-format json`: every line a node writes is one JSON object with the required fields."""
import json
import signal

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.integration


def test_json_logs_are_one_object_per_line(tmp_path):
    c = Cluster(str(tmp_path), 1, extra_args=["--log-format", "json"])
    try:
        c.start()
        with c.client() as client:
            client.put(b"logs/k", b"never-in-a-log-line")
        c.kill("n1", signal.SIGTERM)
    finally:
        c.stop_all()
    lines = [line for line in c.nodes["n1"].log().splitlines() if line.strip()]
    assert len(lines) >= 3
    records = [json.loads(line) for line in lines]
    for r in records:
        assert {"time", "level", "node", "logger", "message"} <= set(r), r
        assert r["node"] == "n1" and r["time"].endswith("Z")
    assert any("serving gRPC" in r["message"] for r in records)
    assert "never-in-a-log-line" not in c.nodes["n1"].log()
