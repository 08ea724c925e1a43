"""Settings shared by both connector roles, and the leader this engine spawns.

Every process of one vLLM engine sees the same ``VllmConfig``, so every connector instance
derives the same instance name (``vllm-<engine_id>``) and leader address from it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.connector.setup import UnsupportedSetup
from kvbm.config import KvbmConfig, load_config
from kvbm.ipc.transport import instance_endpoint
from kvbm.leader.spawn import LeaderProcess, LeaderStartError, spawn_leader

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvbm.vllm")

# kv_connector_extra_config keys (both optional): give a worker-role instance its rank and
# the world size when torch.distributed is not initialised (tests, custom launchers).
EXTRA_RANK = "kvbm_rank"
EXTRA_WORLD_SIZE = "kvbm_world_size"


@dataclass(frozen=True)
class Settings:
    """What every connector instance of one engine agrees on."""

    config: KvbmConfig
    instance: str
    endpoint: str
    block_size: int
    world_size: int
    fingerprint: str


def _extra(vllm_config: "VllmConfig") -> dict[str, Any]:
    kvt = vllm_config.kv_transfer_config
    return dict(kvt.kv_connector_extra_config or {}) if kvt is not None else {}


def settings_for(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> Settings:
    """Read DYN_KVBM_* (via load_config) and the engine's config; raises ConfigError on bad env."""
    config = load_config()
    kvt = vllm_config.kv_transfer_config
    assert kvt is not None and kvt.engine_id is not None
    instance = f"vllm-{kvt.engine_id}"
    endpoint = config.leader_endpoint or instance_endpoint(config.run_dir, instance)
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
    fingerprint = f"vllm;{mc.model if mc is not None else '?'};{dtype};bs={block_size};tp={world}"
    return Settings(config, instance, endpoint, block_size, world, fingerprint)


def check_supported(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig | None") -> None:
    """Raise UnsupportedSetup for layouts whose blocks kvbm cannot identify by token ids alone."""
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        raise UnsupportedSetup(f"kvbm supports one KV cache group, this model has "
                               f"{len(kv_cache_config.kv_cache_groups)} (hybrid attention)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedSetup("kvbm does not support pipeline parallelism (pipeline_parallel_size > 1)")


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


# Leaders this process spawned, by endpoint: a second connector instance in the same process
# (TP=1 runs the worker and the scheduler in one process) must not spawn again.
_owned: dict[str, LeaderProcess] = {}
_owned_lock = threading.Lock()


def ensure_leader(settings: Settings) -> bool:
    """Make sure the engine's leader runs; True if this call spawned it (the caller stops it).

    Never spawns when DYN_KVBM_LEADER_ENDPOINT names a leader. Two spawners racing (the
    scheduler and rank 0 in different processes) are harmless: the second leader finds the
    instance lock taken and exits, and its spawner gets a non-owning handle. Waits only for
    the leader to listen, never for it to be ready (that needs every rank).
    """
    if settings.config.leader_endpoint:
        return False
    with _owned_lock:
        mine = _owned.get(settings.endpoint)
        if mine is not None and mine.alive():
            return False
        try:
            handle = spawn_leader(settings.config, settings.instance, endpoint=settings.endpoint)
        except (LeaderStartError, OSError) as e:
            log.error("kvbm: cannot start the leader for %s (%s); serving without kvbm", settings.instance, e)
            return False
        if not handle.spawned:
            return False
        _owned[settings.endpoint] = handle
        log.info("kvbm: spawned leader %s (pid %d) on %s", settings.instance,
                 handle.popen.pid if handle.popen else -1, settings.endpoint)
        return True


def stop_leader(endpoint: str) -> None:
    """Stop the leader this process spawned on ``endpoint`` (no-op if none)."""
    with _owned_lock:
        handle = _owned.pop(endpoint, None)
    if handle is not None:
        handle.stop()


def owned_leader(endpoint: str) -> LeaderProcess | None:
    """The leader this process spawned on ``endpoint``, if any (tests use its pid)."""
    return _owned.get(endpoint)
