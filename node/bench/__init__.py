"""`sealkv bench`: load generators and reports for a sealkv cluster and its raw Raft engine.

One line per module:

- `workload`: what one benchmark run does (`Workload`) and what it measured (`Result`).
- `workers`: the closed-loop harness both load generators share (worker processes started
  together, one caller's tally of the measured window).
- `grpc_load`: closed-loop gRPC clients on threads, spread over worker processes.
- `async_load`: closed-loop asyncio callers (batched, unary, or etcd's KV), with client and
  server CPU per operation.
- `raft_engine`: a Raft-only cluster (the node's `ReplicationAdapter` and `RaftSettings`,
  no gRPC, no envelope) with load submitted inside the leader process: the raw reference.
- `floor`: the same Put load against a gRPC server that does nothing.
- `compare`: raw engine, gRPC cleartext and gRPC through the envelopes (and etcd) on fresh
  local clusters in one invocation, as ratios.
- `etcd`: a local 3-member etcd cluster for `compare --etcd`.
- `envelope`: the storage envelope codec alone, in-process.
- `peer_wire`: one raft peer message encoded and decoded, Fernet vs AES-GCM, in-process.
- `cutover`: Put latency before, during and after the storage envelope cutover.
- `fill`: a large dataset into a fresh local cluster, then a full restart.
"""
