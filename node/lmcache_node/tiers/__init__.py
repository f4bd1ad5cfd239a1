"""Cache tiers below L1 memory: the local disk tier (L2) and the remote Redis/Valkey tier (L3)."""
