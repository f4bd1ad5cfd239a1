"""The node's HTTP API (health, readiness, metrics, stats, config and admin calls)."""

from lmcache_node.httpapi.app import HttpApi, build_app, http_hosts
from lmcache_node.httpapi.auth import TokenFile, TokenFileError, is_loopback

__all__ = ["HttpApi", "TokenFile", "TokenFileError", "build_app", "http_hosts", "is_loopback"]
