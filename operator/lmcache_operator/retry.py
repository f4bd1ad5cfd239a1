"""The operator's retry/backoff policies: watch loops and work queues.

The policy object is the node's ``lmcache_node.retry.RetryPolicy`` (standard library only, one
of the pure node modules the operator image keeps): one retry policy in the whole project.
"""

from __future__ import annotations

from lmcache_node.retry import RetryPolicy

__all__ = ["REQUEUE", "WATCH", "RetryPolicy"]

# A watch that failed: list and watch again after 0.5, 1, 2, 4, 8, then every 10 s.
WATCH = RetryPolicy.forever(base_s=0.5, cap_s=10.0)
# A queued run that failed or met a conflict: run again in 2 s (level-based: no give-up).
REQUEUE = RetryPolicy.fixed(2.0)
