"""`sealkv bench`: load generators and reports for a sealkv cluster and its raw Raft engine.

- `workload`: what one benchmark run does (`Workload`) and what it measured (`Result`).
- `grpc_load`: closed-loop gRPC clients spread over worker processes.
- `raft_engine`: a Raft-only cluster (the node's `ReplicationAdapter` and `RaftSettings`,
  no gRPC, no envelope) with load submitted inside the leader process: the raw reference.
- `compare`: raw engine, gRPC cleartext and gRPC through the storage envelope on fresh
  local clusters in one invocation, as ratios.
"""
