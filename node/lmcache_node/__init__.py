"""lmcache_node: the per-node KV cache server for vLLM.

Engine, tiers, copy paths, server, client and the vLLM connector.
"""

__version__ = "0.1.0"
