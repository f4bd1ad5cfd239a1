"""The node's HTTP API (health, readiness, metrics, stats, config and admin calls)."""

from lmcache_node.httpapi.app import HttpApi, build_app

__all__ = ["HttpApi", "build_app"]
