"""lmcache_operator: the kopf operator for LMCacheCluster and VLLMDeployment resources."""

__version__ = "0.1.0"
