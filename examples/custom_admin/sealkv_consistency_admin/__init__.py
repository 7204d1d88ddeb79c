"""sealkv-consistency-admin: an example admin plugin for sealkv (`--plugins consistency`).

It adds the `sealkv_consistency_admin.v1.ConsistencyAdmin` gRPC service, whose
`CheckConsistency` compares every member's `Cluster.Digest` once all of them applied the
leader's commit index, and the `sealkv consistency check` CLI command. The plugin class is
`sealkv_consistency_admin.admin.ConsistencyAdminPlugin`; the comparison itself, with no I/O, is
in `sealkv_consistency_admin.check`.
"""

__version__ = "0.1.0"
