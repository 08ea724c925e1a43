"""One bootstrap for every engine adapter (vLLM, TensorRT-LLM, SGLang): what an engine instance
agrees on, the leader it owns, and the wait before its first request.

* :class:`Instance`: the instance name, the leader endpoint (``DYN_KVBM_LEADER_ENDPOINT`` always
  wins, else an ipc socket named after the instance), the block size, the kvbm world size and the
  layout fingerprint. Adapters derive the instance name from the engine's own group (vLLM's
  engine id, an MPI / torch.distributed broadcast, SGLang's TP group), never from OS process
  groups or parent pids: MPI launchers start every rank in its own process group.
* :func:`layout_fingerprint` with :func:`model_identity`: durable blocks (persistent G3 files,
  G4 keys) are named by it, so it names the model's *content* (config and weight files' names,
  sizes and mtimes), not only its path: a model re-saved at the same path never gets old KV.
* :func:`ensure_leader` / :func:`stop_leader`: spawn the instance's leader once per process,
  stop it at shutdown.
* :func:`wait_until_ready`: the engine's last start-up step blocks until the leader and every
  rank are ready, at most ``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``; at the deadline one
  :class:`KvbmNotReady` line names the variable, its value and what was missing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import xxhash

from kvbm.config import KvbmConfig
from kvbm.ipc.stats import LeaderState
from kvbm.ipc.transport import instance_endpoint
from kvbm.leader.client import LeaderClient
from kvbm.leader.spawn import LeaderProcess, LeaderStartError, spawn_leader

log = logging.getLogger("kvbm.connector")

INIT_TIMEOUT_VAR = "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"

# Files whose names, sizes and mtimes identify a model directory's content (weights, config,
# tokenizer: a changed RoPE setting or re-saved weights must change the fingerprint).
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".tiktoken")


class KvbmNotReady(RuntimeError):
    """kvbm was not ready within the init timeout; the engine must not start without saying so."""


@dataclass(frozen=True)
class Instance:
    """What every process of one engine instance agrees on."""

    config: KvbmConfig
    name: str  # instance name: one leader, one host pool
    endpoint: str  # the leader's ZMQ address
    block_size: int  # tokens per block
    world_size: int  # kvbm ranks (TP ranks; 1 when every rank holds the same KV)
    fingerprint: str  # layout fingerprint: caches that must never mix differ here
    # Every rank holds the same KV (MLA): the ranks register one slice for all of them.
    replicated: bool = False


def leader_endpoint(config: KvbmConfig, name: str) -> str:
    """``DYN_KVBM_LEADER_ENDPOINT`` if set, else the instance's ipc socket in the run dir."""
    return config.leader_endpoint or instance_endpoint(config.run_dir, name)


def model_identity(model: str | None) -> str:
    """A short content identity of ``model``: for a local directory (or file), an xxh3 over the
    names, sizes and mtimes of its config, tokenizer and weight files; else the name as given
    (a hub id is resolved by the engine; its revision is part of the engine's own config)."""
    if not model:
        return "?"
    path = os.path.expanduser(model)
    entries: list[str] = []
    try:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith(_MODEL_FILE_SUFFIXES):
                    st = os.stat(os.path.join(path, name))
                    entries.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        elif os.path.isfile(path):
            st = os.stat(path)
            entries.append(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}")
    except OSError as e:  # unreadable: the path alone, and say why (never a silent shared identity)
        log.warning("kvbm: cannot read model files under %s (%s); the cache is keyed by its path only", model, e)
    if not entries:
        return model
    digest = xxhash.xxh3_64_hexdigest("\n".join(entries).encode())
    return f"{model}@{digest}"


def layout_fingerprint(engine: str, model: str | None, dtype: str, block_size: int, world_size: int,
                       *extra: str, replicated: bool = False, by_heads: bool = False) -> str:
    """The layout fingerprint: engine, model content identity, dtype, block size, TP size and any
    engine-specific parts. Every durable block is named by it (with the leader's block format,
    :attr:`kvbm.leader.world.World.layout_fingerprint`). Replicated KV (MLA) names no TP size:
    its one slice is the same bytes at every TP size. Neither does ``by_heads`` (ranks that
    register their KV heads): the leader's block format names the TP size where the blocks
    depend on it (rank slices), and not where they do not (the heads format)."""
    tp = ["tp=replicated"] if replicated else [] if by_heads else [f"tp={world_size}"]
    parts = [engine, model_identity(model), dtype, f"bs={block_size}", *tp, *extra]
    return ";".join(parts)


# Leaders this process spawned, by endpoint: a second adapter instance in the same process
# (vLLM TP=1 runs the worker and the scheduler in one process) must not spawn again.
_owned: dict[str, LeaderProcess] = {}
_owned_lock = threading.Lock()


def ensure_leader(inst: Instance) -> bool:
    """Make sure the instance's leader runs; True if this call spawned it (the caller stops it).

    Never spawns when DYN_KVBM_LEADER_ENDPOINT names a leader. Two spawners racing are harmless:
    the second leader finds the instance lock taken and exits, and its spawner gets a
    non-owning handle. Waits only for the leader to listen (readiness needs every rank); a
    leader that cannot start is logged here and reported by :func:`wait_until_ready`.
    """
    if inst.config.leader_endpoint:
        return False
    with _owned_lock:
        mine = _owned.get(inst.endpoint)
        if mine is not None and mine.alive():
            return False
        try:
            handle = spawn_leader(inst.config, inst.name, endpoint=inst.endpoint)
        except (LeaderStartError, OSError) as e:
            log.error("kvbm: cannot start the leader for %s: %s", inst.name, e)
            return False
        if not handle.spawned:
            return False
        _owned[inst.endpoint] = handle
        log.info("kvbm: spawned leader %s (pid %d) on %s", inst.name,
                 handle.popen.pid if handle.popen else -1, inst.endpoint)
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


def wait_until_ready(inst: Instance, client: LeaderClient, *, what: str,
                     then: Callable[[float], bool] | None = None, poll_s: float = 0.05) -> None:
    """Block until the leader is ready with every rank (and ``then(remaining_s)``, e.g. an index
    replica's sync, returns True), at most the init timeout. Raises :class:`KvbmNotReady` with one
    line: the variable, its value, ``what`` was waiting, and what was missing (the leader's own
    account of missing ranks, or that it never answered)."""
    timeout = inst.config.init_timeout_s
    deadline = time.monotonic() + timeout
    status = None
    while True:
        status = client.refresh(starting=True)
        if status is not None and status.leader_state in (LeaderState.READY, LeaderState.FAILED):
            break
        if time.monotonic() + poll_s > deadline:
            break
        time.sleep(poll_s)
    if status is not None and status.leader_state is LeaderState.READY:
        if then is None or then(max(deadline - time.monotonic(), 0.0)):
            log.info("kvbm: instance %s ready (%d ranks) for %s", inst.name, status.world_size, what)
            return
        missing = "the index replica did not catch up with the leader"
    elif status is None:
        missing = f"the leader at {inst.endpoint} never answered"
    else:
        missing = f"leader {status.state}: {status.error or 'waiting for ranks'}"
    raise KvbmNotReady(f"kvbm: {what} not ready within {INIT_TIMEOUT_VAR}={timeout:g} s "
                       f"(instance {inst.name}): {missing}")
