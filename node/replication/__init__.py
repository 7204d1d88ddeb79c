"""Replication: the pysyncobj adapter (the only importer of pysyncobj), its pickle whitelist, membership and settings."""
