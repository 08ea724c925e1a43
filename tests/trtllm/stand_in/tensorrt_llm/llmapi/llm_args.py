"""Mirrors tensorrt_llm/llmapi/llm_args.py (KvCacheConfig, KvCacheConnectorConfig, TorchLlmArgs,
parallel_config.to_mapping()), NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361: only the fields a connector reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Mapping:
    """tensorrt_llm.mapping.Mapping: rank is this process's MPI rank."""

    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1


@dataclass
class _ParallelConfig:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def to_mapping(self) -> Mapping:
        return Mapping(self.tp_size * self.pp_size, self.rank, self.tp_size, self.pp_size)


@dataclass
class KvCacheConfig:
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = True
    dtype: str = "auto"
    max_attention_window: Optional[List[int]] = None  # per layer; several sizes: VSWA


@dataclass
class KvCacheConnectorConfig:
    connector_module: str = ""
    connector_scheduler_class: str = ""
    connector_worker_class: str = ""
    connector: Optional[str] = None


@dataclass
class TorchLlmArgs:
    model: str = ""
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    parallel_config: _ParallelConfig = field(default_factory=_ParallelConfig)
    kv_connector_config: Optional[KvCacheConnectorConfig] = None
