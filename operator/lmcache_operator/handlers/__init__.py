"""kopf wiring: importing this package registers every handler."""

from lmcache_operator.handlers import lmcachecluster, vllmdeployment

__all__ = ["lmcachecluster", "vllmdeployment"]
