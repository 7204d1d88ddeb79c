"""The clients batch by themselves: observed through the leader's Status counters."""
import asyncio
import threading

import pytest

from sealkv.node import errors
from sealkv.node.client import LINEARIZABLE, SERIALIZABLE, AsyncClient, Client
from tests.cluster import free_port, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("client-batching"))) as c:
        yield c


def counters(cluster, name):
    return cluster.status(name).kv_counters


def test_a_lone_call_leaves_at_once_in_its_own_message(cluster):
    leader = cluster.leader()
    with Client([cluster.nodes[leader].grpc], **cluster.client_kwargs) as c:
        c.put(b"lone/warm", b"v")
        before = counters(cluster, leader)
        for i in range(5):
            assert c.put(b"lone/%d" % i, b"v").header.revision > 0
        after = counters(cluster, leader)
    assert after.batch_messages - before.batch_messages == 5
    assert after.batch_requests - before.batch_requests == 5


def test_concurrent_calls_from_threads_share_messages_and_entries(cluster):
    leader = cluster.leader()
    n = 48
    with Client([cluster.nodes[leader].grpc], timeout=20, **cluster.client_kwargs) as c:
        c.put(b"warm", b"v")
        before = counters(cluster, leader)
        start = threading.Barrier(n)
        results, failures = [], []

        def one(i):
            start.wait()
            try:
                results.append(c.put(b"together/%d" % i, b"v%d" % i).header.revision)
            except errors.SealkvError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after = counters(cluster, leader)
        assert not failures and len(results) == n
        assert after.batch_requests - before.batch_requests == n
        assert after.batch_messages - before.batch_messages < n
        assert after.entry_commands - before.entry_commands == n
        assert after.entries - before.entries < n
        got = c.range(b"together/", prefix=True)
        assert got.count == n


def test_async_client_has_the_same_calls_and_batches_concurrent_ones(cluster):
    leader = cluster.leader()
    endpoints = [cluster.nodes[name].grpc for name in ("n1", "n2", "n3")]

    async def scenario():
        async with AsyncClient(endpoints, timeout=20, **cluster.client_kwargs) as c:
            put = await c.put(b"aio/k", b"1")
            second = await c.put(b"aio/k", b"2", prev_kv=True)
            assert second.prev_kv.value == b"1"
            got = await c.get(b"aio/k", consistency=LINEARIZABLE)
            assert got.found and got.kv.value == b"2" and got.kv.create_revision == put.header.revision
            assert (await c.get(b"aio/k", consistency=SERIALIZABLE)).header.member_id
            cas = await c.compare_and_swap(b"aio/k", b"3",
                                           expected_mod_revision=got.kv.mod_revision)
            assert cas.succeeded
            lost = await c.compare_and_swap(b"aio/k", b"4", must_not_exist=True)
            assert not lost.succeeded and lost.kv.value == b"3"
            assert (await c.range(b"aio/", prefix=True)).count == 1
            assert (await c.delete(b"aio/k", prev_kv=True)).prev_kv.value == b"3"
            with pytest.raises(errors.InvalidArgument, match="empty"):
                await c.put(b"", b"v")
            assert (await c.status()).leader == leader
            before = counters(cluster, leader)
            answers = await asyncio.gather(*(c.put(b"aio/many/%d" % i, b"v", endpoint=endpoints[
                int(leader[1:]) - 1]) for i in range(64)))
            after = counters(cluster, leader)
            assert len({a.header.member_id for a in answers}) == 1
            assert after.batch_requests - before.batch_requests == 64
            assert after.batch_messages - before.batch_messages < 64

    asyncio.run(scenario())


def test_both_clients_fail_over_from_a_dead_endpoint(cluster):
    dead = f"127.0.0.1:{free_port()}"
    live = cluster.nodes["n2"].grpc
    with Client([dead, live], timeout=10, **cluster.client_kwargs) as c:
        assert c.put(b"over/sync", b"v").header.revision > 0
        with pytest.raises(errors.Unavailable):
            c.get(b"over/sync", endpoint=dead)

    async def scenario():
        async with AsyncClient([dead, live], timeout=10, **cluster.client_kwargs) as c:
            assert (await c.put(b"over/aio", b"v")).header.revision > 0
            assert (await c.get(b"over/sync")).kv.value == b"v"

    asyncio.run(scenario())


def test_client_tls_arguments_are_accepted_and_checked():
    with pytest.raises(ValueError, match="cacert"):
        Client(["127.0.0.1:1"], cert="c.pem")
    with pytest.raises(ValueError, match="cacert"):
        AsyncClient(["127.0.0.1:1"], key="k.pem")


def test_no_batch_entries_proposes_one_entry_per_write(make_cluster):
    cluster = make_cluster(3, extra_args=["--no-batch-entries"])
    leader = cluster.leader()
    with Client([cluster.nodes[leader].grpc], timeout=20, **cluster.client_kwargs) as c:
        before = counters(cluster, leader)
        done = []
        threads = [threading.Thread(target=lambda i=i: done.append(
            c.put(b"unbatched/%d" % i, b"v").header.revision)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after = counters(cluster, leader)
        assert len(done) == 24 and len(set(done)) == 24  # every write its own log index
        assert after.entry_commands - before.entry_commands == 24
        assert after.entries - before.entries == 24
        assert c.range(b"unbatched/", prefix=True).count == 24
