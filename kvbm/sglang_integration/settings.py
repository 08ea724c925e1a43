"""What every TP rank of one SGLang instance agrees on: instance name, addresses, page identity.

Read from SGLang's ``HiCacheStorageConfig`` (duck-typed here, so this module imports neither
SGLang nor torch) and ``DYN_KVBM_*``. All ranks of one instance are children of one launcher
process, so the default instance name is ``sglang-<model>-<parent pid>`` (plus ``-dp<rank>``
under data-parallel attention, where each DP group is its own kvbm world); the extra config's
``"instance"`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import xxhash

from kvbm.connector.setup import UnsupportedSetup
from kvbm.config import KvbmConfig, load_config
from kvbm.ipc.names import safe_name
from kvbm.ipc.transport import instance_endpoint

IPC_PATH_MAX = 100  # a little under the 107 bytes of a Unix socket path

EXTRA_INSTANCE = "instance"
"""Extra-config key naming the kvbm instance (one leader and host pool); optional."""


@dataclass(frozen=True)
class SglangSettings:
    config: KvbmConfig
    instance: str
    endpoint: str  # the leader
    coordinator: str  # rank 0's coordinator of the ranks' ops
    rank: int  # TP rank (attention-TP rank under DP attention)
    tp_size: int
    replicated: bool  # MLA: every rank holds the same KV; one copy is stored (rank 0 writes)
    model: str

    @property
    def kvbm_world(self) -> int:
        """kvbm ranks: every TP rank, or rank 0 alone when the KV is replicated (MLA)."""
        return 1 if self.replicated else self.tp_size

    @property
    def is_kvbm_rank(self) -> bool:
        return self.rank < self.kvbm_world


def settings_for(storage_config: Any, env: Mapping[str, str] | None = None) -> SglangSettings:
    """Settings of this rank from SGLang's ``HiCacheStorageConfig`` and ``DYN_KVBM_*``."""
    for name in ("pp_size", "attn_cp_size", "dcp_size"):
        value = int(getattr(storage_config, name, 1) or 1)
        if value != 1:
            raise UnsupportedSetup(f"kvbm's SGLang backend supports {name}=1 only, got {name}={value}")
    if getattr(storage_config, "should_split_heads", False):
        raise UnsupportedSetup("kvbm's SGLang backend does not support tp_lcm_size (heterogeneous TP head split)")
    rank, tp = int(storage_config.tp_rank), int(storage_config.tp_size)
    if not 0 <= rank < tp:
        raise UnsupportedSetup(f"tp_rank={rank} is outside tp_size={tp}")
    extra = dict(storage_config.extra_config or {})
    model = str(storage_config.model_name or "model")
    instance = extra.get(EXTRA_INSTANCE)
    if instance is not None and (not isinstance(instance, str) or not instance.strip()):
        raise UnsupportedSetup(f"extra config {EXTRA_INSTANCE!r}={instance!r}: expected a non-empty string")
    if not instance:
        instance = f"sglang-{safe_name(model)}-{os.getppid()}"
    dp = int(getattr(storage_config, "dp_rank", 0) or 0)
    if dp:
        instance = f"{instance}-dp{dp}"
    config = load_config(env)
    endpoint = config.leader_endpoint or instance_endpoint(config.run_dir, instance)
    coordinator = instance_endpoint(config.run_dir, f"{instance}-ranks")
    if len(coordinator) - len("ipc://") > IPC_PATH_MAX:  # a long instance name: a short, still unique, one
        coordinator = instance_endpoint(config.run_dir, f"sgl-{xxhash.xxh3_64_hexdigest(instance.encode())}-ranks")
    return SglangSettings(config, instance, endpoint, coordinator, rank, tp, bool(storage_config.is_mla_model), model)


def page_hashes(fingerprint: str, keys: Sequence[str]) -> np.ndarray:
    """kvbm sequence hashes (u64, never 0) of SGLang page keys, namespaced by ``fingerprint``.

    SGLang's keys are hex digests already chained over the prefix (and seeded by the request's
    extra key / cache salt, LoRA included), so each maps on its own: xxh3-64 of the key, seeded
    with the xxh3-64 of the layout fingerprint. Deterministic across processes and restarts.
    """
    seed = xxhash.xxh3_64_intdigest(fingerprint.encode())
    out = np.fromiter((xxhash.xxh3_64_intdigest(k.encode(), seed) for k in keys), dtype=np.uint64, count=len(keys))
    out[out == 0] = 1  # 0 means "no parent" in kvbm's protocol
    return out
