"""KvbmHiCacheStorage: kvbm as SGLang's HiCache L3 storage backend (see docs/sglang.md).

SGLang loads it with ``--hicache-storage-backend dynamic`` and the extra config
``{"backend_name": "kvbm", "module_path": "kvbm.sglang_integration.storage",
"class_name": "KvbmHiCacheStorage"}``, and builds one per TP rank, in that rank's process:

* construction (``cls(storage_config, kwargs)``) checks the setup and agrees on the instance
  name with the other TP ranks (:func:`.settings.agree_on_name`: rank 0 picks it and broadcasts
  it over SGLang's TP group);
* ``register_mem_pool_host`` (SGLang's cache controller calls it next) describes SGLang's host
  pool to kvbm (:mod:`.pages`); rank 0 starts the coordinator of the ranks' ops
  (:mod:`.coordinator`) and the leader (unless one is running or configured); every rank
  registers with the leader and blocks until the leader and every rank are ready, at most
  ``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``, else raises :class:`KvbmNotReady`, so SGLang's
  start-up fails instead of serving without its cache;
* every storage call maps SGLang's page keys to kvbm sequence hashes (:func:`.settings.page_hashes`),
  takes the op(s) of its pages from the coordinator, copies this rank's slice of each page
  straight between SGLang's host pool and kvbm's shared pool, and reports it to the leader,
  which makes a page matchable only once every rank stored its slice.

After start-up every call is bounded in time and never raises into SGLang: a dead leader, a
page that is missing, evicted or fails to copy is a miss (``False`` / ``None`` / 0), never wrong KV.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, List, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvbm.connector.bootstrap import ensure_leader, layout_fingerprint, stop_leader, wait_until_ready
from kvbm.connector.setup import UnsupportedSetup
from kvbm.ipc.block_format import Placement
from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError
from kvbm.ipc.transport import ensure_private_dir
from kvbm.leader.client import LeaderClient
from kvbm.sglang_integration.coordinator import HELD, Coordinator, Grant, PoolLocation, RankLink
from kvbm.sglang_integration.pages import HostPages, flat_bytes, layout_parts
from kvbm.sglang_integration.settings import (Broadcast, RankConfig, SglangSettings, agree_on_name, page_hashes,
                                              rank_config, settings_for)
from kvbm.worker.agent import RankAgent, RankIdentity
from kvbm.worker.copy import NumpyCopyEngine
from kvbm.worker.layout import EngineKV, LayoutError, host_slice_view, host_view

log = logging.getLogger("kvbm.sglang")

FLUSH_WAIT_S = 2.0  # how long a store waits for the leader to have applied its report


def _tp_broadcast(rc: RankConfig) -> Broadcast | None:
    """A broadcast from TP rank 0 over the CPU (gloo) group of SGLang's TP group of this rank
    (its attention-TP group under DP attention), or None without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    for name in ("attn_tp_group", "tp_group"):
        try:
            group = getattr(parallel, name)
        except (AttributeError, RuntimeError, ValueError):  # not built in this process
            continue
        if (group is not None and group.cpu_group is not None and group.world_size == rc.tp_size
                and group.rank_in_group == rc.rank):
            cpu_group, src = group.cpu_group, group.ranks[0]

            def broadcast(value: str) -> str:
                objs: list[Any] = [value]
                dist.broadcast_object_list(objs, src=src, group=cpu_group)
                return str(objs[0])

            return broadcast
    return None


class KvbmHiCacheStorage(HiCacheStorage):
    """One SGLang TP rank's kvbm storage backend (thread-safe: SGLang calls it from its
    prefetch and backup threads at once)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self._rc = rank_config(storage_config)
        self.instance_name = agree_on_name(self._rc, _tp_broadcast(self._rc))  # a collective over TP
        self._settings: SglangSettings | None = None  # once SGLang's host pool is registered
        self.pages: HostPages | None = None
        self.fingerprint = ""
        self.agent: RankAgent | None = None
        self.coordinator: Coordinator | None = None
        self.link: RankLink | None = None
        self._engine: NumpyCopyEngine | None = None  # this rank's copies (kvbm rank: the agent's)
        self._location: PoolLocation | None = None  # where this rank's slice is (kvbm rank 0)
        self._reader_pool: HostPool | None = None  # MLA readers: rank 0's pool, mapped
        self._reader_view: np.ndarray | None = None
        self._reader_lock = threading.Lock()
        self._client: LeaderClient | None = None
        self._client_lock = threading.Lock()
        self._closed = False
        self._warned: set[str] = set()
        atexit.register(self.close)

    @property
    def settings(self) -> SglangSettings:
        """This rank's settings (set by ``register_mem_pool_host``)."""
        if self._settings is None:
            raise RuntimeError("kvbm: register_mem_pool_host was not called")
        return self._settings

    # -- setup -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Describe SGLang's host pool to kvbm, register this rank with the leader (rank 0:
        start the leader) and wait until the leader and every rank are ready.

        Raises :class:`kvbm.connector.bootstrap.KvbmNotReady` at the init timeout, and
        :class:`UnsupportedSetup` for a host pool kvbm cannot use: SGLang's start-up fails then.
        """
        super().register_mem_pool_host(mem_pool_host)
        rc = self._rc
        try:
            pages = HostPages.of(mem_pool_host)
        except LayoutError as e:
            raise UnsupportedSetup(f"kvbm cannot use SGLang's host pool: {e}") from e
        ps = pages.regions.page_tokens
        self.fingerprint = layout_fingerprint("sglang", rc.model, pages.dtype, ps, rc.kvbm_world,
                                              *layout_parts(mem_pool_host, pages))
        s = self._settings = settings_for(rc, self.instance_name, self.fingerprint, ps)
        self.pages = pages
        self._client = LeaderClient(s.endpoint)
        if s.rank == 0:
            # Rank 0 owns the coordinator and the leader, so they and the writer of MLA pages
            # share one process's fate.
            ensure_private_dir(s.config.run_dir)  # the coordinator's socket lives there
            self.coordinator = Coordinator(s.coordinator, s.endpoint, s.tp_size, s.kvbm_world, lambda: self._location)
            ensure_leader(s.instance)
        self.link = RankLink(s.coordinator, s.rank, self._give_up)
        if s.is_kvbm_rank:
            ident = RankIdentity(s.rank, s.kvbm_world, ps, self.fingerprint)
            self.agent = RankAgent(s.endpoint, ident, pages.kv, init_timeout_s=s.config.init_timeout_s,
                                   heartbeat_interval_s=s.config.heartbeat_interval_s,
                                   liveness_timeout_s=s.config.liveness_timeout_s, engine_factory=self._make_engine)
            self.agent.start()
        agent = self.agent
        try:
            wait_until_ready(s.instance, self._client, what=f"SGLang TP rank {s.rank} of {s.tp_size}",
                             then=lambda left: agent is None or agent.wait_ready(left))
        except BaseException:
            self.close()  # the leader, coordinator and agent go with the failed start-up
            raise
        log.info("kvbm: SGLang rank %d/%d of instance %s ready (leader %s)%s", s.rank, s.tp_size, s.instance.name,
                 s.endpoint, "; MLA: one copy, written by rank 0" if s.replicated else "")

    def _make_engine(self, kv: EngineKV, pool: HostPool, placement: Placement) -> NumpyCopyEngine:
        """The agent's copy engine, also used by this backend's calls (they copy on SGLang's threads).
        Its bytes are a slice (this backend names no heads), which MLA readers view at the offset."""
        engine = NumpyCopyEngine(kv, host_view(pool.array, placement, kv.layout))
        self._engine = engine
        g = pool.geometry
        self._location = PoolLocation(pool.name, g.num_blocks, g.block_bytes, placement.offset)
        return engine

    def _host_view(self) -> np.ndarray | None:
        """This rank's slice of kvbm's host pool (blocks, regions, 1, region_bytes), if usable now."""
        if self.pages is None:
            return None
        if self.agent is not None:
            engine = self._engine
            return engine.host if engine is not None and self.agent.leader_alive else None
        return self._reader_view

    def _reader_engine(self, loc: PoolLocation | None) -> np.ndarray | None:
        """MLA reader: map rank 0's pool (again, if the leader made a new one) and view its slice."""
        if loc is None or self.pages is None:
            return None
        with self._reader_lock:
            pool = self._reader_pool
            if pool is None or pool.name != loc.segment:
                if pool is not None:
                    pool.close()
                try:
                    pool = HostPool.attach(loc.segment, PoolGeometry(loc.num_blocks, loc.block_bytes))
                except (ShmError, ValueError, OSError) as e:
                    self._warn("attach", f"kvbm: cannot map rank 0's host pool {loc.segment}: {e}")
                    self._reader_pool = None
                    return None
                self._reader_pool = pool
                self._reader_view = host_slice_view(pool.array, loc.slice_offset, self.pages.kv.layout)
            return self._reader_view

    # -- helpers -----------------------------------------------------------------------
    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", text)

    def _hashes(self, keys: List[str]) -> np.ndarray:
        return page_hashes(self.fingerprint, keys)

    def _parent(self, extra_info: Optional[HiCacheStorageExtraInfo]) -> int:
        prefix = extra_info.prefix_keys if extra_info is not None else None
        return int(self._hashes(prefix[-1:])[0]) if prefix else 0

    def _give_up(self, op_ids: list[int]) -> None:
        """Grants that came after this rank stopped waiting: fail its part so the leader frees the slots."""
        if self.agent is not None:
            for op_id in op_ids:
                self.agent.report(op_id, False, "the SGLang rank stopped waiting for this op")

    def _store(self, keys: List[str], kv: EngineKV | None, blocks: np.ndarray,
               extra_info: Optional[HiCacheStorageExtraInfo]) -> List[bool]:
        """Store pages ``blocks`` of ``kv`` (None: SGLang's host pool) under ``keys``: per key,
        stored by this rank (or held already)? Never waits for the other ranks."""
        n = len(keys)
        if not self.settings.is_kvbm_rank:
            return [False] * n  # MLA: rank 0 alone writes (SGLang does not call the others)
        host = self._host_view()
        if host is None or self.agent is None or self.link is None:
            self._warn("store-unready", f"kvbm: rank {self.settings.rank} is not attached to a live leader; "
                                        "pages are not stored")
            return [False] * n
        grant = self.link.store(self._hashes(keys), self._parent(extra_info))
        done = grant.slots == HELD
        ops = grant.ops[grant.ops > 0]
        for op_id in np.unique(ops).tolist():  # usually one: the batch's, or the one another rank allocated
            idx = np.flatnonzero(grant.ops == op_id)
            slots = grant.slots[idx]
            ok, error = True, ""
            try:
                engine = self._engine if kv is None else NumpyCopyEngine(kv, host)
                assert engine is not None
                engine.store(blocks[idx], slots)
            except Exception as e:  # reported: the leader drops these pages, they stay unstored
                ok, error = False, f"{type(e).__name__}: {e}"
                log.error("kvbm: store op %d failed on rank %d: %s", op_id, self.settings.rank, error)
            self.agent.report(op_id, ok, error, slots.tolist())
            done[idx] = ok
        if len(ops) and not self.agent.flush(FLUSH_WAIT_S):
            self._warn("flush", f"kvbm: rank {self.settings.rank}: the leader did not confirm a store's report "
                                f"within {FLUSH_WAIT_S:g} s")
        return done.tolist()

    def _load(self, keys: List[str], kv: EngineKV | None, blocks: np.ndarray) -> int:
        """Load the longest prefix of ``keys`` kvbm holds into pages ``blocks`` of ``kv``; its length."""
        if self.pages is None or self.link is None or (self.agent is not None and self._host_view() is None):
            return 0
        grant: Grant = self.link.load(self._hashes(keys))
        k = len(grant.slots)
        if not grant.op_id or not k:
            return 0
        host = self._host_view() if self.agent is not None else self._reader_engine(grant.pool)
        ok, error = host is not None, "" if host is not None else "host pool not mapped"
        if host is not None:
            try:
                engine = self._engine if kv is None and self.agent is not None else NumpyCopyEngine(kv or self.pages.kv, host)
                assert engine is not None
                engine.load(grant.slots, blocks[:k])
            except Exception as e:
                ok, error = False, f"{type(e).__name__}: {e}"
                log.error("kvbm: load op %d failed on rank %d: %s", grant.op_id, self.settings.rank, error)
        if self.agent is None:  # MLA reader: good only if rank 0 still held the pin
            return k if self.link.copied(grant.op_id, ok) and ok else 0
        if self.settings.replicated and self.settings.tp_size > 1:
            self.link.await_readers(grant.op_id)  # keep the pin while readers copy
        self.agent.report(grant.op_id, ok, error)
        return k if ok else 0

    def _guard(self, what: str, miss: Any, fn: Any, *args: Any) -> Any:
        if self._closed:
            return miss
        try:
            return fn(*args)
        except Exception as e:  # never into SGLang: a miss
            log.exception("kvbm: %s failed: %s", what, e)
            return miss

    # -- zero-copy interface (``"interface_v1": 1`` in the extra config) ----------------
    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Pages held (host pool, then disk) from the first key on."""
        return self._guard("batch_exists", 0, self._exists, keys)

    def _exists(self, keys: List[str]) -> int:
        if not keys or self.pages is None or self._client is None:
            return 0
        with self._client_lock:
            return self._client.match(self._hashes(keys)).total

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Load pages into SGLang's host pool at ``host_indices`` (page i at ``host_indices[i * page_size]``)."""
        return self._guard("batch_get_v1", [False] * len(keys), self._get_v1, keys, host_indices)

    def _get_v1(self, keys: List[str], host_indices: torch.Tensor) -> List[bool]:
        blocks = self.pages.page_indices(host_indices, len(keys)) if self.pages else None
        if blocks is None:
            return [False] * len(keys)
        k = self._load(keys, None, blocks)
        return [True] * k + [False] * (len(keys) - k)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Store pages of SGLang's host pool at ``host_indices`` under ``keys``."""
        return self._guard("batch_set_v1", [False] * len(keys), self._set_v1, keys, host_indices, extra_info)

    def _set_v1(self, keys: List[str], host_indices: torch.Tensor,
                extra_info: Optional[HiCacheStorageExtraInfo]) -> List[bool]:
        blocks = self.pages.page_indices(host_indices, len(keys)) if self.pages else None
        if blocks is None:
            return [False] * len(keys)
        return self._store(keys, None, blocks, extra_info)

    # -- legacy interface: flat page tensors ---------------------------------------------
    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        """Fill SGLang's flat page tensors ``target_locations``; None from the first missing page on."""
        return self._guard("batch_get", [None] * len(keys), self._get_flat, keys, target_locations)

    def _get_flat(self, keys: List[str], targets: Any) -> List[torch.Tensor | None]:
        if self.pages is None or targets is None or len(targets) != len(keys):
            return [None] * len(keys)
        buf, kv = self.pages.scratch(len(keys))
        k = self._load(keys, kv, np.arange(len(keys)))
        order = self.pages.flat_order()
        region = self.pages.regions.region_bytes
        for i in range(k):
            flat_bytes(targets[i]).reshape(-1, region)[:] = buf[i, order]
        return list(targets[:k]) + [None] * (len(keys) - k)

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        if target_location is None:
            return None
        return self.batch_get([key], [target_location])[0]

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        """Store SGLang's flat page tensors ``values`` under ``keys``; True if every page is stored."""
        return self._guard("batch_set", False, self._set_flat, keys, values)

    def _set_flat(self, keys: List[str], values: Any) -> bool:
        if self.pages is None or values is None or len(values) != len(keys):
            return False
        buf, kv = self.pages.scratch(len(keys))
        order = self.pages.flat_order()
        region = self.pages.regions.region_bytes
        for i, value in enumerate(values):
            flat = flat_bytes(value)
            if flat.size != self.pages.regions.page_bytes:
                raise LayoutError(f"a flat page of {flat.size} bytes, expected {self.pages.regions.page_bytes}")
            buf[i, order] = flat.reshape(-1, region)
        return all(self._store(keys, kv, np.arange(len(keys)), None))

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- control ------------------------------------------------------------------------
    def clear(self) -> bool:
        """Drop every page kvbm holds for this instance (SGLang's flush_cache)."""
        if self._client is None:
            return False
        with self._client_lock:
            return self._guard("clear", False, self._client.reset_cache)

    def close(self) -> None:
        """Stop this rank's threads and sockets, and the leader if this rank started it."""
        if self._closed:
            return
        self._closed = True
        if self.coordinator is not None:
            self.coordinator.close()
        if self.link is not None:
            self.link.close()
        if self.agent is not None:
            self.agent.close()
        if self._client is not None:
            with self._client_lock:
                self._client.close()
        if self._reader_pool is not None:
            self._reader_pool.close()
        if self._settings is not None and self._settings.rank == 0:
            stop_leader(self._settings.endpoint)  # only if this process spawned it
