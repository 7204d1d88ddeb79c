"""State: the pure replicated state machine, its command encoding and the storage stack."""
