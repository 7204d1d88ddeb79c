import pytest

from tests.cluster import Cluster

# How many of a node's last log lines a failed test's report shows.
NODE_LOG_LINES = 15


@pytest.fixture
def make_cluster(tmp_path):
    """Returns a factory of clusters of real processes; every process is killed at teardown."""
    clusters = []

    def make(size=3, start=True, **kwargs):
        base = tmp_path / f"cluster{len(clusters)}"
        base.mkdir()
        if clusters and clusters[0].certs_dir and kwargs.get("tls", True):
            kwargs.setdefault("ca_from", clusters[0].certs_dir)  # one CA per test
        cluster = Cluster(str(base), size=size, **kwargs)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    make.clusters = clusters  # for the node-log section of a failed test's report
    yield make
    for cluster in clusters:
        cluster.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with each node's state and the last lines of its log, so
    that a failure in CI says which node stopped and why."""
    report = (yield).get_result()
    make = item.funcargs.get("make_cluster") if report.failed else None
    for cluster in getattr(make, "clusters", ()):
        for node in list(cluster.nodes.values()):
            state = "running" if node.alive() else (
                f"exited {node.proc.returncode}" if node.proc else "never started")
            tail = "\n".join(node.log().splitlines()[-NODE_LOG_LINES:])
            report.sections.append((f"node {node.name} ({state})", tail))


@pytest.fixture
def cluster3(make_cluster):
    return make_cluster(3)
