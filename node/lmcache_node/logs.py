"""Logging set-up shared by the node's commands."""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure root logging; ``LMCACHE_LOG_LEVEL`` wins when no level is given."""
    name = (level or os.environ.get("LMCACHE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=getattr(logging, name, logging.INFO), format=LOG_FORMAT, force=True)
