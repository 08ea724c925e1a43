"""What both connector roles of one TensorRT-LLM engine agree on, read from ``llm_args``.

TensorRT-LLM runs one MPI process per rank; the scheduler role lives in rank 0's process next to
rank 0's worker. Every rank must reach the same leader, so the instance name is agreed through
the engine's own group, never through OS process groups or parent pids (Open MPI's launcher
puts every rank in a process group of its own): rank 0 picks a name and broadcasts it with
TensorRT-LLM's ``mpi_broadcast`` (what its connector manager uses for the scheduler's results),
else mpi4py's ``COMM_WORLD``, else the ``torch.distributed`` default group; a process alone
keeps its own name. ``DYN_KVBM_LEADER_ENDPOINT`` always wins: the name is then derived from it
and no collective runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import sys
import threading
import weakref
from typing import Any, Callable

import xxhash

from kvbm.config import KvbmConfig, load_config
from kvbm.connector.bootstrap import Instance, layout_fingerprint, leader_endpoint
from kvbm.connector.setup import UnsupportedSetup

log = logging.getLogger("kvbm.trtllm")

__all__ = ["UnsupportedSetup", "agree_instance_name", "settings_for"]


def _trtllm_broadcast() -> Callable[[str], str] | None:
    """TensorRT-LLM's own broadcast over its MPI session (a no-op in a one-rank session)."""
    try:
        from tensorrt_llm._utils import mpi_broadcast
    except ImportError:
        return None
    return lambda name: str(mpi_broadcast(name, root=0))


def _mpi4py_broadcast() -> Callable[[str], str] | None:
    """mpi4py's COMM_WORLD, only if the process already initialised MPI with more than one rank
    (importing ``mpi4py.MPI`` here would initialise MPI in processes that never use it)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() < 2:
        return None
    comm = mpi.COMM_WORLD
    return lambda name: str(comm.bcast(name, root=0))


def _torch_broadcast() -> Callable[[str], str] | None:
    """The torch.distributed default group, if initialised with more than one rank."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None

    def bcast(name: str) -> str:
        box: list[Any] = [name]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    return bcast


# Tried in this order; the first available one carries rank 0's name to every rank.
_BROADCASTS = (_trtllm_broadcast, _mpi4py_broadcast, _torch_broadcast)

# Agreed names by engine: the worker and the scheduler of rank 0 are built concurrently from the
# same llm_args and must join one collective between them (the other ranks build a worker only).
_agreed: dict[int, tuple[weakref.ref[Any], str]] = {}
_agreed_lock = threading.Lock()


def _candidate() -> str:
    host = socket.gethostname().split(".")[0][:16]
    return f"trtllm-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def agree_instance_name(llm_args: Any, config: KvbmConfig) -> str:
    """The instance name every rank of this engine shares.

    With ``DYN_KVBM_LEADER_ENDPOINT`` it is derived from the endpoint (the same env on every rank,
    no collective). Else rank 0's pick (``trtllm-<host>-<pid of rank 0>-<random>``) is broadcast
    over the first group available (TensorRT-LLM's MPI session, mpi4py, torch.distributed); the
    broadcast is a collective, so it runs once per engine and process, whichever role asks first:
    every rank builds one worker, and both roles of rank 0 get the same name.
    """
    if config.leader_endpoint:
        return f"trtllm-{xxhash.xxh3_64_hexdigest(config.leader_endpoint.encode())}"
    key = id(llm_args)
    with _agreed_lock:
        hit = _agreed.get(key)
        if hit is not None and hit[0]() is llm_args:
            return hit[1]
        name = _candidate()
        for make in _BROADCASTS:
            bcast = make()
            if bcast is not None:
                name = bcast(name)
                break
        # The entry goes with the engine's llm_args, so a later engine whose llm_args reuses the
        # address joins a collective of its own.
        def forget(_ref: weakref.ref[Any], k: int = key) -> None:
            _agreed.pop(k, None)

        _agreed[key] = (weakref.ref(llm_args, forget), name)
        log.debug("kvbm: instance %s", name)
        return name


def settings_for(llm_args: Any) -> tuple[Instance, int]:
    """The instance and this process's rank, from DYN_KVBM_* and ``llm_args``
    (kv_cache_config.tokens_per_block and dtype, parallel_config, model)."""
    config = load_config()
    mapping = llm_args.parallel_config.to_mapping()
    world = int(mapping.world_size)
    rank = int(mapping.rank)
    if getattr(mapping, "pp_size", 1) > 1:
        raise UnsupportedSetup(f"kvbm does not support pipeline parallelism (pp_size={mapping.pp_size})")
    if getattr(mapping, "cp_size", 1) > 1:
        # Context parallelism splits a block's tokens across ranks: a rank's block is not the
        # KV of the block's tokens (and MLA's latent is no longer the same on every rank).
        raise UnsupportedSetup(f"kvbm does not support context parallelism (cp_size={mapping.cp_size})")
    if not 0 <= rank < world:
        raise UnsupportedSetup(f"kvbm rank {rank} is outside the world of {world} ranks")
    kvc = llm_args.kv_cache_config
    block_size = int(kvc.tokens_per_block)
    if getattr(kvc, "enable_partial_reuse", False):
        raise UnsupportedSetup("kvbm needs kv_cache_config.enable_partial_reuse: false "
                               "(partial block reuse leaves hits that are not block aligned)")
    windows = set(getattr(kvc, "max_attention_window", None) or ())
    if len(windows) > 1:
        # Several window sizes: one layer group (own page index space) per size. A hit needs every
        # group's pages of the prefix, which kvbm's one-slice-per-rank blocks cannot hold apart.
        raise UnsupportedSetup(f"kvbm does not cache variable sliding window attention "
                               f"(max_attention_window has {len(windows)} sizes: several layer groups)")
    name = agree_instance_name(llm_args, config)
    return Instance(config, name, leader_endpoint(config, name), block_size, world,
                    _fingerprint(llm_args, block_size, world, replicated=False)), rank


def replicated_instance(inst: Instance, llm_args: Any) -> Instance:
    """``inst`` for a pool whose KV every rank holds alike (MLA: TensorRT-LLM's K-only cache,
    ``kv_factor`` 1): one slice for all ranks, named without a TP size."""
    return dataclasses.replace(inst, replicated=True,
                               fingerprint=_fingerprint(llm_args, inst.block_size, inst.world_size, replicated=True))


def _fingerprint(llm_args: Any, block_size: int, world: int, *, replicated: bool) -> str:
    model = getattr(llm_args, "model", None)
    dtype = str(getattr(llm_args.kv_cache_config, "dtype", "auto"))
    return layout_fingerprint("trtllm", str(model) if model else None, dtype, block_size, world, replicated=replicated)
