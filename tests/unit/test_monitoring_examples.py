"""The Prometheus configuration and alert rules in examples/monitoring pass promtool, and the
Grafana dashboard is well-formed (the metric names are checked against a live node in
tests/integration/test_metrics.py)."""
import json
import pathlib
import shutil
import subprocess

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "monitoring"


def _promtool():
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is missing: apt-get install prometheus")
    return tool


def test_promtool_checks_the_scrape_config_and_rules():
    tool = _promtool()
    config = subprocess.run([tool, "check", "config", str(EXAMPLES / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run([tool, "check", "rules", str(EXAMPLES / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout


def test_the_dashboard_is_grafana_json_with_queries():
    dash = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    assert dash["title"] == "sealkv" and dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
