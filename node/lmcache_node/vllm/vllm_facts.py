"""What the connector reads of vLLM: the key namespace's layout and dtype, the KV cache
groups it can serve, a request's salt. Moved out of ``connector.py`` unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


def kv_layout(device: str, block_size: int, use_mla: bool) -> str:
    """The key namespace's layout: device kind, block size and (CPU) the kernel's packing."""
    parts = ["vllm", device, f"blocks{block_size}"]
    if device == "cpu":
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        parts.append("amx" if amx else torch.backends.cpu.get_cpu_capability().lower())
    if use_mla:
        parts.append("mla")
    return "-".join(parts)


def kv_dtype(vllm_config: VllmConfig) -> str:
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        return cache_dtype
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def check_kv_cache_groups(kv_cache_config: KVCacheConfig) -> None:
    """Refuse a model whose KV cache has no group or several (hybrid models).

    The connector moves the blocks of one block table; caching one group of several would
    hand vLLM partial KV, so such a model is refused at start instead.
    """
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) == 1:
        return
    described = "; ".join(
        f"group {i}: {type(g.kv_cache_spec).__name__} ({len(g.layer_names)} layers)"
        for i, g in enumerate(groups)
    )
    raise ValueError(
        f"LMCacheNodeConnector caches models whose KV cache is one group of layers; this model "
        f"has {len(groups)} KV cache groups ({described or 'no KV cache'}). Caching only some "
        "of them would be wrong, so vLLM does not start: serve this model without "
        "--kv-transfer-config (or with a connector that supports vLLM's hybrid KV cache "
        "manager)"
    )


def request_salt(request: Request) -> str:
    parts = []
    cache_salt = getattr(request, "cache_salt", None)
    if cache_salt:
        parts.append(f"salt:{cache_salt}")
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora:{getattr(lora, 'lora_name', lora)}")
    return "|".join(parts)
