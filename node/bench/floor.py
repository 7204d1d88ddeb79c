"""The gRPC floor: the same Put load against a KV server that does nothing.

It answers "how fast could any Python gRPC node be on this machine with these client
processes": a `KV` servicer whose Put returns at once, in its own process, loaded exactly like
a sealkv node (`grpc_load`). Compare its rows with `bench put` to see how much of a Put is the
node's own work. `python -m sealkv.node.bench.floor PORT` runs the server.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc

from sealkv.node.bench import grpc_load
from sealkv.node.bench.workload import Workload
from sealkv.node.security import tls
from sealkv.v1 import kv_pb2, kv_pb2_grpc


class NoopKV(kv_pb2_grpc.KVServicer):
    """A KV servicer that answers every Put at once (for the floor measurement only)."""

    def Put(self, request, context):
        return kv_pb2.PutResponse(header=kv_pb2.ResponseHeader(revision=1))


def serve(port: int) -> None:
    """Serves `NoopKV` on 127.0.0.1:port with the node's worker count until killed."""
    from sealkv.node.server import GRPC_WORKERS

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS))
    kv_pb2_grpc.add_KVServicer_to_server(NoopKV(), server)
    tls.bind(server, f"127.0.0.1:{port}", None)  # the floor of plaintext gRPC itself
    server.start()
    server.wait_for_termination()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workloads: list[Workload]) -> list:
    """Runs each workload against a fresh no-op server process; returns the results."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sealkv.node.bench.floor", str(port)],
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        with tls.channel(f"127.0.0.1:{port}", None) as ch:
            grpc.channel_ready_future(ch).result(timeout=max(0.1, deadline - time.monotonic()))
        return [grpc_load.run(w, [f"127.0.0.1:{port}"], name=f"no-op grpc put c={w.clients}",
                              prefill=False) for w in workloads]
    finally:
        proc.kill()
        proc.wait(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
