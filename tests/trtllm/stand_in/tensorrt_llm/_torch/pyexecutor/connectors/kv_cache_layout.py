"""Mirrors tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_layout.py, NVIDIA/TensorRT-LLM @ 035ab91c:
the layout a KVCacheManagerV2 hands a connector in place of one pool tensor (one page index space
per layer group). The fields only; the device views are the engine's business."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class KvCacheBufferRef:
    layer_id: int  # global model layer index
    role: str  # "key" / "value" as the manager spells it
    expansion: int = 1


@dataclass(frozen=True)
class KvCacheRegion:
    """Page slot ``i`` of this region lives at ``base + stride * i`` for ``size`` bytes."""

    base: int
    size: int
    stride: int
    num_slots: int
    buffers: Tuple[KvCacheBufferRef, ...]


@dataclass(frozen=True)
class KvCacheLayerGroupLayout:
    layer_group_id: int
    layer_ids: Tuple[int, ...]
    window_size: Optional[int]  # None: full attention
    regions: Tuple[KvCacheRegion, ...]

    @property
    def bytes_per_page(self) -> int:
        return sum(region.size for region in self.regions)


@dataclass(frozen=True)
class KvCacheLayout:
    tokens_per_block: int
    groups: Tuple[KvCacheLayerGroupLayout, ...]
    gpu_pool_mapping_bytes: Optional[int] = None
