"""Settings shared by both connector roles, read from vLLM's config.

Every process of one vLLM engine sees the same ``VllmConfig``, so every connector instance
derives the same instance name (``vllm-<engine_id>``) and leader address from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.config import KvbmConfig, load_config
from kvbm.connector.bootstrap import Instance, layout_fingerprint, leader_endpoint
from kvbm.connector.setup import UnsupportedSetup
from kvbm.ipc.block_format import HeadSplit, kv_head_range

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
    # Other models' ranks register their KV heads (KvbmWorker): no TP size here, the leader's
    # block format names it where a block depends on it.
    fingerprint = layout_fingerprint("vllm", mc.model if mc is not None else None, dtype, block_size, world,
                                     replicated=mla, by_heads=not mla)
    return Instance(config, name, leader_endpoint(config, name), block_size, world, fingerprint, mla)


@dataclass(frozen=True)
class KVGroups:
    """vLLM's KV cache groups in the planner's order (a full-attention group first).

    ``order[i]``: the vLLM group id of planner group ``i``; ``windows[i]``: its sliding window
    in tokens, ``None`` for full attention.
    """

    order: tuple[int, ...]
    windows: tuple[int | None, ...]

    def pick(self, per_group: "tuple[list[int], ...] | list[list[int]]") -> list[list[int]]:
        """vLLM's per-group block id lists in the planner's order, the null block as -1
        (a sliding-window group's blocks that slid out of the window)."""
        out = [list(per_group[g]) for g in self.order]
        if len(out) > 1:
            out = [[b if b != NULL_BLOCK_ID else -1 for b in ids] for ids in out]
        return out


# vLLM's block pool hands out block 0 as its null block: a placeholder for blocks a group does
# not hold (sliding-window blocks outside the window), never written.
NULL_BLOCK_ID = 0


def kv_groups(kv_cache_config: "KVCacheConfig | None") -> KVGroups:
    """The KV cache groups kvbm offloads; UnsupportedSetup for a group it cannot.

    One group: any attention but sliding-window-only (the layout before hybrid models). Several (vLLM's hybrid
    KV cache manager): full-attention and sliding-window attention groups of one block size.
    Any other group (SSM / Mamba state, chunked local attention, ...) holds state kvbm cannot
    restore for loaded tokens, so kvbm stays out of such an engine (the engine runs, kvbm
    offers no hits) instead of offering tokens that group would be left without.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec, SlidingWindowSpec

    if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) <= 1:
        if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
            # Under the hybrid manager a model whose every layer has a sliding window frees
            # blocks behind the window while a request runs; with it off (the engine's
            # --disable-hybrid-kv-cache-manager) the window is kept as full attention.
            if isinstance(spec, (SlidingWindowSpec, MambaSpec)):
                raise UnsupportedSetup(f"the model's only KV cache group is {type(spec).__name__}: kvbm needs a "
                                       f"full-attention group (for sliding-window-only models run vLLM with "
                                       f"--disable-hybrid-kv-cache-manager)")
        return KVGroups((0,), (None,))

    full: list[int] = []
    windowed: list[tuple[int, int]] = []
    sizes = set()
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        sizes.add(spec.block_size)
        if type(spec) in (FullAttentionSpec, MLAAttentionSpec):
            full.append(g)
        elif type(spec) is SlidingWindowSpec:
            windowed.append((g, spec.sliding_window))
        else:
            raise UnsupportedSetup(f"KV cache group {g} is {type(spec).__name__}: kvbm offloads full-attention "
                                   f"and sliding-window groups only (it cannot restore that group's state)")
    if not full:
        raise UnsupportedSetup("kvbm needs a full-attention KV cache group; this model has sliding-window "
                               "attention only")
    if len(sizes) != 1:
        raise UnsupportedSetup(f"kvbm needs one block size for every KV cache group, got {sorted(sizes)}")
    return KVGroups(tuple(full + [g for g, _ in windowed]),
                    tuple([None] * len(full) + [w for _, w in windowed]))


def check_supported(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> KVGroups:
    """The KV cache groups kvbm offloads; UnsupportedSetup for layouts whose blocks kvbm cannot
    identify by token ids alone (see :func:`kv_groups`)."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedSetup("kvbm does not support pipeline parallelism (pipeline_parallel_size > 1)")
    if getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1) > 1:
        # DCP splits a block's tokens across ranks: a rank's block is not the KV of the block's
        # tokens (and MLA's latent is no longer the same on every rank).
        raise UnsupportedSetup("kvbm does not support decode context parallelism (decode_context_parallel_size > 1)")
    return kv_groups(kv_cache_config)


def model_kv_heads(vllm_config: "VllmConfig") -> int:
    """The model's KV heads (all TP ranks together); 0 for MLA (one latent, no heads) or when
    vLLM's config does not say."""
    mc = vllm_config.model_config
    if mc is None or getattr(mc, "use_mla", False):
        return 0
    try:
        return int(mc.get_total_num_kv_heads())
    except (AttributeError, TypeError, ValueError):
        return 0


def head_split(shape: tuple[int, ...], itemsize: int, block_size: int, kv_heads: int, world_size: int,
               rank: int) -> HeadSplit | None:
    """This rank's KV heads as they lie in its per-layer KV tensor of ``shape``, or None where
    kvbm cannot tell them apart (the rank's bytes are then a slice of its own, tied to the TP size).

    The rank holds vLLM's split of the model's ``kv_heads`` (:func:`kv_head_range`). A block's
    interior is told by its shape alone: tokens then heads (``[2, blocks, tokens, heads, dim]``,
    ``[blocks, 2, tokens, heads, dim]``, ``[blocks, tokens, heads, dim]``) or heads then tokens
    (``[..., heads, tokens, dim]``, e.g. vLLM's CPU backend). With as many heads as tokens per
    block the order is ambiguous, so heads are named only when exactly one order fits.
    """
    if kv_heads < 1:
        return None
    try:
        first, count = kv_head_range(kv_heads, world_size, rank)
    except ValueError:
        return None
    if len(shape) not in (4, 5) or count == block_size:
        return None
    inner = tuple(shape[-3:-1])
    if inner not in ((block_size, count), (count, block_size)):
        return None
    return HeadSplit(kv_heads, first, count, shape[-1] * itemsize, head_major=inner[0] == count)


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


def sync_host_loads(config: KvbmConfig, vllm_config: "VllmConfig") -> bool:
    """DYN_KVBM_HOST_LOADS: auto is sync where the engine's KV is in host memory (a load is a
    memcpy nothing could overlap), async on accelerators (the copy overlaps other compute)."""
    if config.host_loads == "auto":
        return vllm_config.device_config.device_type == "cpu"
    return config.host_loads == "sync"
