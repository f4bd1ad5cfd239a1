"""lmcache_node: the per-node KV cache server for vLLM (engine, tiers, copy paths, server, client)."""

__version__ = "0.1.0"
