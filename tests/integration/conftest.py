import pytest

from tests.cluster import Cluster


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

    yield make
    for cluster in clusters:
        cluster.stop_all()


@pytest.fixture
def cluster3(make_cluster):
    return make_cluster(3)
