"""Settings shared by both connector roles, read from vLLM's config.

Every process of one vLLM engine sees the same ``VllmConfig``, so every connector instance
derives the same instance name (``vllm-<engine_id>``) and leader address from it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvbm.config import load_config
from kvbm.connector.bootstrap import Instance, layout_fingerprint, leader_endpoint
from kvbm.connector.setup import UnsupportedSetup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvbm.vllm")

# kv_connector_extra_config keys (both optional): give a worker-role instance its rank and
# the world size when torch.distributed is not initialised (tests, custom launchers).
EXTRA_RANK = "kvbm_rank"
EXTRA_WORLD_SIZE = "kvbm_world_size"


def _extra(vllm_config: "VllmConfig") -> dict[str, Any]:
    kvt = vllm_config.kv_transfer_config
    return dict(kvt.kv_connector_extra_config or {}) if kvt is not None else {}


def settings_for(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> Instance:
    """Read DYN_KVBM_* (via load_config) and the engine's config; raises ConfigError on bad env."""
    config = load_config()
    kvt = vllm_config.kv_transfer_config
    assert kvt is not None and kvt.engine_id is not None
    name = f"vllm-{kvt.engine_id}"
    block_size = vllm_config.cache_config.block_size
    if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    extra = _extra(vllm_config)
    par = vllm_config.parallel_config
    world = int(extra.get(EXTRA_WORLD_SIZE, par.tensor_parallel_size))
    mc = vllm_config.model_config
    dtype = vllm_config.cache_config.cache_dtype
    if dtype == "auto" and mc is not None:
        dtype = str(mc.dtype).removeprefix("torch.")
    # MLA: every TP rank caches the same latent KV ([blocks, block_size, latent dim] per layer).
    mla = bool(getattr(mc, "use_mla", False))
    fingerprint = layout_fingerprint("vllm", mc.model if mc is not None else None, dtype, block_size, world,
                                     replicated=mla)
    return Instance(config, name, leader_endpoint(config, name), block_size, world, fingerprint, mla)


def check_supported(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> None:
    """Raise UnsupportedSetup for layouts whose blocks kvbm cannot identify by token ids alone."""
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        raise UnsupportedSetup(f"kvbm supports one KV cache group, this model has "
                               f"{len(kv_cache_config.kv_cache_groups)} (hybrid attention)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedSetup("kvbm does not support pipeline parallelism (pipeline_parallel_size > 1)")
    if getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
        # DCP splits a block's tokens across ranks: a rank's block is not the KV of the block's
        # tokens (and MLA's latent is no longer the same on every rank).
        raise UnsupportedSetup("kvbm does not support decode context parallelism (decode_context_parallel_size > 1)")


def worker_rank(vllm_config: "VllmConfig", world_size: int) -> int:
    """This worker's TP rank: the extra-config override, else vLLM's TP group, else 0."""
    extra = _extra(vllm_config)
    if EXTRA_RANK in extra:
        rank = int(extra[EXTRA_RANK])
    else:
        rank = 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            except AssertionError:  # TP group not set up: plain torch.distributed
                rank = dist.get_rank()
    if not 0 <= rank < world_size:
        raise UnsupportedSetup(f"kvbm rank {rank} is outside the world of {world_size} ranks "
                               f"(set {EXTRA_RANK} / {EXTRA_WORLD_SIZE} consistently)")
    return rank
