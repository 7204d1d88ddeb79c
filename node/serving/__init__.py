"""Serving: the gRPC services, the RPC helpers and the handle plugins use to reach the node."""
