"""What both connector roles of one TensorRT-LLM engine agree on, read from ``llm_args``.

TensorRT-LLM runs one process per rank; the scheduler role lives in rank 0's process. Every
rank derives the same leader address: ``DYN_KVBM_LEADER_ENDPOINT`` if set, else an ipc socket
named after the launch's process group (MPI ranks started together share it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvbm.connector.setup import UnsupportedSetup
from kvbm.config import KvbmConfig, load_config
from kvbm.ipc.transport import instance_endpoint


@dataclass(frozen=True)
class TrtllmSettings:
    config: KvbmConfig
    instance: str
    endpoint: str
    block_size: int
    world_size: int
    rank: int
    fingerprint: str


def settings_for(llm_args: Any) -> TrtllmSettings:
    """Read DYN_KVBM_* and ``llm_args`` (kv_cache_config.tokens_per_block, parallel_config)."""
    config = load_config()
    mapping = llm_args.parallel_config.to_mapping()
    world = int(mapping.world_size)
    rank = int(mapping.rank)
    if getattr(mapping, "pp_size", 1) > 1:
        raise UnsupportedSetup(f"kvbm does not support pipeline parallelism (pp_size={mapping.pp_size})")
    if not 0 <= rank < world:
        raise UnsupportedSetup(f"kvbm rank {rank} is outside the world of {world} ranks")
    kvc = llm_args.kv_cache_config
    block_size = int(kvc.tokens_per_block)
    if getattr(kvc, "enable_partial_reuse", False):
        raise UnsupportedSetup("kvbm needs kv_cache_config.enable_partial_reuse: false "
                               "(partial block reuse leaves hits that are not block aligned)")
    instance = f"trtllm-{os.getpgrp()}"
    endpoint = config.leader_endpoint or instance_endpoint(config.run_dir, instance)
    dtype = getattr(kvc, "dtype", "auto")
    fingerprint = f"trtllm;{getattr(llm_args, 'model', '?')};{dtype};bs={block_size};tp={world}"
    return TrtllmSettings(config, instance, endpoint, block_size, world, rank, fingerprint)
