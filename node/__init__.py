"""sealkv.node: the node, its replication adapter, gRPC services and CLI."""
__version__ = "0.1.0"
