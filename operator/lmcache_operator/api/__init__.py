"""The lmcache.dev API: pydantic models of every kind (the single source of the CRDs)."""

from __future__ import annotations

from lmcache_operator.api import lmcachecluster, vllmdeployment
from lmcache_operator.api.common import API_VERSION, GROUP, VERSION, KindDefinition

ALL_KINDS: tuple[KindDefinition, ...] = (lmcachecluster.DEFINITION, vllmdeployment.DEFINITION)

__all__ = ["ALL_KINDS", "API_VERSION", "GROUP", "VERSION", "KindDefinition"]
