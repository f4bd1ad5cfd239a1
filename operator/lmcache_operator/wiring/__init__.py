"""kopf wiring: importing this package registers every handler.

Each module only translates kopf's arguments into calls on the controllers of the runtime
that kopf hands over in ``memo.runtime`` (see controllers/runtime.py).
"""

from lmcache_operator.wiring import lifecycle, lmcachecluster, vllmdeployment

__all__ = ["lifecycle", "lmcachecluster", "vllmdeployment"]
