"""What every TP rank of one SGLang instance agrees on: the bootstrap's :class:`Instance`
(instance name, leader endpoint, page size, kvbm world, layout fingerprint) and SGLang's fields.

Read from SGLang's ``HiCacheStorageConfig`` (duck-typed here, so this module imports neither
SGLang nor torch) and ``DYN_KVBM_*``. The instance name is, in order: the extra config's
``"instance"``; with ``DYN_KVBM_LEADER_ENDPOINT``, one derived from that address; else a unique
name that TP rank 0 picks and broadcasts over SGLang's TP group (:func:`agree_on_name`), plus
``-dp<rank>`` under data-parallel attention, where each DP group is its own kvbm world.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xxhash

from kvbm.config import KvbmConfig, load_config
from kvbm.connector.bootstrap import Instance, leader_endpoint
from kvbm.connector.setup import UnsupportedSetup
from kvbm.ipc.names import safe_name
from kvbm.ipc.transport import instance_endpoint

IPC_PATH_MAX = 100  # a little under the 107 bytes of a Unix socket path

EXTRA_INSTANCE = "instance"
"""Extra-config key naming the kvbm instance (one leader and host pool); optional."""

Broadcast = Callable[[str], str]
"""Rank 0's value, on every rank of the TP group (a collective: every rank calls it)."""


@dataclass(frozen=True)
class RankConfig:
    """What SGLang's storage config says about this rank, checked; known at construction."""

    config: KvbmConfig
    rank: int  # TP rank (attention-TP rank under DP attention)
    tp_size: int
    dp_rank: int
    replicated: bool  # MLA: every rank holds the same KV; one copy is stored (rank 0 writes)
    model: str
    instance: str | None  # the extra config's "instance"

    @property
    def kvbm_world(self) -> int:
        """kvbm ranks: every TP rank, or rank 0 alone when the KV is replicated (MLA)."""
        return 1 if self.replicated else self.tp_size


@dataclass(frozen=True)
class SglangSettings:
    """One rank's settings: the instance every rank agrees on and this rank's place in it."""

    instance: Instance
    coordinator: str  # rank 0's coordinator of the ranks' ops
    rank: int
    tp_size: int
    replicated: bool

    @property
    def config(self) -> KvbmConfig:
        return self.instance.config

    @property
    def endpoint(self) -> str:
        return self.instance.endpoint

    @property
    def kvbm_world(self) -> int:
        return self.instance.world_size

    @property
    def is_kvbm_rank(self) -> bool:
        return self.rank < self.kvbm_world


def rank_config(storage_config: Any, env: Mapping[str, str] | None = None) -> RankConfig:
    """This rank's part of SGLang's ``HiCacheStorageConfig`` and ``DYN_KVBM_*``; refuses what kvbm cannot serve."""
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
    instance = extra.get(EXTRA_INSTANCE)
    if instance is not None and (not isinstance(instance, str) or not instance.strip()):
        raise UnsupportedSetup(f"extra config {EXTRA_INSTANCE!r}={instance!r}: expected a non-empty string")
    return RankConfig(load_config(env), rank, tp, int(getattr(storage_config, "dp_rank", 0) or 0),
                      bool(storage_config.is_mla_model), str(storage_config.model_name or "model"), instance)


def agree_on_name(rc: RankConfig, broadcast: Broadcast | None) -> str:
    """The instance name every TP rank of this server uses (see the module doc). ``broadcast``:
    SGLang's TP group, needed only when neither the extra config nor the endpoint names one."""
    if rc.instance:
        name = rc.instance
    elif rc.config.leader_endpoint:
        name = f"sglang-{safe_name(rc.model)}-{xxhash.xxh3_64_hexdigest(rc.config.leader_endpoint.encode())[:12]}"
    elif rc.tp_size == 1:
        name = f"sglang-{safe_name(rc.model)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    elif broadcast is None:
        raise UnsupportedSetup(f"TP rank {rc.rank} of {rc.tp_size}: no torch.distributed TP group to agree on the kvbm "
                               f"instance with; set the extra config {EXTRA_INSTANCE!r} or DYN_KVBM_LEADER_ENDPOINT")
    else:
        mine = f"sglang-{safe_name(rc.model)}-{os.getpid()}-{uuid.uuid4().hex[:8]}" if rc.rank == 0 else ""
        name = broadcast(mine)
    return f"{name}-dp{rc.dp_rank}" if rc.dp_rank else name


def settings_for(rc: RankConfig, name: str, fingerprint: str, page_tokens: int) -> SglangSettings:
    """The settings of rank ``rc`` in instance ``name`` of layout ``fingerprint``."""
    inst = Instance(rc.config, name, leader_endpoint(rc.config, name), page_tokens, rc.kvbm_world, fingerprint)
    coordinator = instance_endpoint(rc.config.run_dir, f"{name}-ranks")
    if len(coordinator) - len("ipc://") > IPC_PATH_MAX:  # a long instance name: a short, still unique, one
        coordinator = instance_endpoint(rc.config.run_dir, f"sgl-{xxhash.xxh3_64_hexdigest(name.encode())}-ranks")
    return SglangSettings(inst, coordinator, rc.rank, rc.tp_size, rc.replicated)


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
