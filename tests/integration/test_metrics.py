"""A live node's Prometheus metrics and /health: the names are there and the counters move."""
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import free_port, running_cluster, wait_for
from tests.integration.test_encryption_admin import admin, write_kek

pytestmark = pytest.mark.integration

NAMES = {
    "sealkv_mvcc_db_total_size_in_use_in_bytes",
    "sealkv_server_has_leader", "sealkv_server_is_leader", "sealkv_server_leader_changes_seen",
    "sealkv_server_proposals_committed_total", "sealkv_server_proposals_applied_total",
    "sealkv_server_proposals_pending", "sealkv_server_proposals_failed",
    "sealkv_server_apply_duration_seconds", "sealkv_server_snapshot_duration_seconds",
    "sealkv_disk_wal_fsync_duration_seconds", "sealkv_mvcc_db_total_size_in_bytes",
    "sealkv_server_quota_backend_bytes", "sealkv_server_alarm",
    "grpc_server_handled", "grpc_server_handling_seconds",
    "sealkv_encryption_active_key_id", "sealkv_encryption_envelope_active",
    "sealkv_encryption_nonce_epoch", "sealkv_encryption_envelope_seals",
    "sealkv_encryption_envelope_opens", "sealkv_encryption_auth_failures",
    "sealkv_encryption_reencrypt_done", "sealkv_encryption_reencrypt_total",
}


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples, text


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    base = tmp_path_factory.mktemp("metrics")
    port = free_port()
    kek = write_kek(base / "kek")
    (base / "c").mkdir()
    with running_cluster(str(base / "c"), 1, plugins=["encryption"],
                         extra_args=["--kek-file", kek,
                                     "--listen-metrics", f"127.0.0.1:{port}"]) as c:
        yield c, f"http://127.0.0.1:{port}"


def test_names_are_exposed_and_counters_move(node):
    cluster, url = node
    families, before, _ = scrape(url)
    assert NAMES <= set(families), NAMES - set(families)
    assert value(before, "sealkv_server_has_leader") == 1
    assert value(before, "sealkv_server_is_leader") == 1
    wait_for(lambda: value(scrape(url)[1], "sealkv_server_leader_changes_seen_total") >= 1, 10,
             "the election counted as a leader change")
    with cluster.client() as client:
        admin(client, "BootstrapEncryption")
        admin(client, "EnableStorageEnvelope")
        for i in range(20):
            client.put(f"metrics/{i}".encode(), b"scraped-value-never-labelled")
        assert client.get(b"metrics/3").kv.value == b"scraped-value-never-labelled"
    # The client batches (KV/Batch streams) or calls KV/Put: either way KV calls are counted.
    # A stream is counted when the node has ended it, after the client closed its side.
    kv_ok = lambda samples: sum(v for (name, labels), v in samples.items()  # noqa: E731
                                if name == "grpc_server_handled_total"
                                and ("grpc_service", "sealkv.v1.KV") in labels
                                and ("grpc_code", "OK") in labels)
    wait_for(lambda: kv_ok(scrape(url)[1]) > kv_ok(before), 10,
             "the closed KV stream counted as handled")
    _, after, text = scrape(url)
    admin_ok = dict(grpc_service="sealkv.v1.EncryptionAdmin", grpc_method="BootstrapEncryption",
                    grpc_code="OK")
    assert value(after, "grpc_server_handled_total", **admin_ok) == 1
    assert kv_ok(after) > kv_ok(before)
    assert value(after, "sealkv_server_proposals_applied_total") >= \
        value(before, "sealkv_server_proposals_applied_total") + 22
    assert value(after, "sealkv_server_apply_duration_seconds_count") > \
        value(before, "sealkv_server_apply_duration_seconds_count")
    assert value(after, "sealkv_disk_wal_fsync_duration_seconds_count") > \
        value(before, "sealkv_disk_wal_fsync_duration_seconds_count")
    assert value(after, "sealkv_encryption_envelope_seals_total", purpose="storage") >= 20
    assert value(after, "sealkv_encryption_envelope_opens_total", purpose="storage") >= 1
    assert value(after, "sealkv_encryption_envelope_active", envelope="storage") == 1
    assert value(after, "sealkv_encryption_active_key_id", purpose="storage") > 0
    assert "metrics/" not in text and "scraped-value" not in text


def test_health_on_the_metrics_listener(node):
    _, url = node
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"health": "true", "reason": ""}
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "/nope", timeout=10)
    assert missing.value.code == 404


def test_the_example_alerts_and_dashboard_use_only_metrics_a_node_exposes(node):
    import pathlib
    import re
    _, url = node
    families, _, _ = scrape(url)
    examples = pathlib.Path(__file__).resolve().parents[2] / "examples" / "monitoring"
    text = (examples / "alerts.yml").read_text() + (examples / "grafana-dashboard.json").read_text()
    used = {re.sub(r"_(bucket|total|count|sum)$", "", name)
            for name in re.findall(r"\b((?:sealkv|grpc_server)_[a-z0-9_]+)", text)}
    exposed = {re.sub(r"_total$", "", name) for name in families}
    assert used and used <= exposed, used - exposed
