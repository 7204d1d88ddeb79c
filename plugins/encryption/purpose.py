"""Data-key purposes (ENCRYPTION.md §1): what a data key protects, by wire code and by name.

A purpose is `PURPOSE_STORAGE` (1: values at rest) or `PURPOSE_RAFT` (2: command payloads in
the Raft log). The codes are those of the replicated commands and the snapshot; the names
are those of the sidecar and of messages.
"""
from __future__ import annotations

PURPOSE_STORAGE = 1
PURPOSE_RAFT = 2
PURPOSE_NAMES = {PURPOSE_STORAGE: "storage", PURPOSE_RAFT: "raft"}
PURPOSE_BY_NAME = {name: purpose for purpose, name in PURPOSE_NAMES.items()}
