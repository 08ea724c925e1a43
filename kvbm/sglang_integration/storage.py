"""KvbmHiCacheStorage: kvbm as SGLang's HiCache L3 storage backend (see docs/sglang.md).

SGLang loads it with ``--hicache-storage-backend dynamic`` and the extra config
``{"backend_name": "kvbm", "module_path": "kvbm.sglang_integration.storage",
"class_name": "KvbmHiCacheStorage"}``, and builds one per TP rank, in that rank's process:

* construction (``cls(storage_config, kwargs)``) reads the settings; on rank 0 it starts the
  leader (unless one is running or configured) and the coordinator of the ranks' ops
  (:mod:`.coordinator`); nothing here waits for them;
* ``register_mem_pool_host`` (SGLang's cache controller calls it next) describes SGLang's host
  pool to kvbm (:mod:`.pages`) and registers this rank with the leader in the background;
* every storage call maps SGLang's page keys to kvbm sequence hashes (:func:`.settings.page_hashes`),
  agrees on one op with the other ranks, copies this rank's slice of each page straight between
  SGLang's host pool and kvbm's shared pool, and reports it to the leader, which makes a page
  matchable only once every rank stored its slice.

Every call is bounded in time and never raises into SGLang: an unready or dead leader, a page
that is missing, evicted or fails to copy is a miss (``False`` / ``None`` / 0), never wrong KV.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, List, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError
from kvbm.ipc.transport import ensure_private_dir
from kvbm.leader.client import LeaderClient
from kvbm.leader.spawn import LeaderProcess, LeaderStartError, spawn_leader
from kvbm.sglang_integration.coordinator import LOAD, STORE, Coordinator, Grant, PoolLocation, RankLink
from kvbm.sglang_integration.pages import HostPages, describe, flat_bytes
from kvbm.sglang_integration.settings import SglangSettings, page_hashes, settings_for
from kvbm.worker.agent import RankAgent, RankIdentity
from kvbm.worker.copy import NumpyCopyEngine
from kvbm.worker.layout import EngineKV, LayoutError, host_slice_view

log = logging.getLogger("kvbm.sglang")


class KvbmHiCacheStorage(HiCacheStorage):
    """One SGLang TP rank's kvbm storage backend (thread-safe: SGLang calls it from its
    prefetch and backup threads at once)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.settings: SglangSettings = settings_for(storage_config)
        s = self.settings
        self.pages: HostPages | None = None
        self.fingerprint = ""
        self.agent: RankAgent | None = None
        self.leader: LeaderProcess | None = None
        self._engine: NumpyCopyEngine | None = None  # this rank's copies (kvbm rank: the agent's)
        self._location: PoolLocation | None = None  # where this rank's slice is (kvbm rank 0)
        self._reader_pool: HostPool | None = None  # MLA readers: rank 0's pool, mapped
        self._reader_view: np.ndarray | None = None
        self._reader_lock = threading.Lock()
        self._client = LeaderClient(s.endpoint)
        self._client_lock = threading.Lock()
        self._closed = False
        self._warned: set[str] = set()
        if s.rank == 0:
            ensure_private_dir(s.config.run_dir)  # the coordinator's socket lives there
        self.coordinator = (Coordinator(s.coordinator, s.endpoint, s.tp_size, s.kvbm_world, lambda: self._location)
                            if s.rank == 0 else None)
        self.link = RankLink(s.coordinator, s.rank, self._give_up)
        # Rank 0 starts the leader (in the background: nothing waits for it), so the leader, the
        # coordinator and the writer of MLA pages share one process's fate.
        self._spawner: threading.Thread | None = None
        if s.rank == 0 and not s.config.leader_endpoint:
            self._spawner = threading.Thread(target=self._spawn_leader, name="kvbm-sglang-spawn", daemon=True)
            self._spawner.start()
        atexit.register(self.close)
        log.info("kvbm: SGLang rank %d/%d of instance %s (leader %s)%s", s.rank, s.tp_size, s.instance, s.endpoint,
                 "; MLA: one copy, written by rank 0" if s.replicated else "")

    # -- setup -------------------------------------------------------------------------
    def _spawn_leader(self) -> None:
        try:
            leader = spawn_leader(self.settings.config, self.settings.instance, endpoint=self.settings.endpoint)
        except (LeaderStartError, OSError) as e:
            log.error("kvbm: cannot start the leader for %s (%s); serving misses", self.settings.instance, e)
            return
        if self._closed:
            leader.stop()
        else:
            self.leader = leader

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Describe SGLang's host pool to kvbm and register this rank with the leader (in the background)."""
        super().register_mem_pool_host(mem_pool_host)
        s = self.settings
        try:
            pages = HostPages.of(mem_pool_host)
        except LayoutError as e:
            log.error("kvbm: cannot use this host pool (%s); serving misses", e)
            return
        self.fingerprint = describe(mem_pool_host, pages, s.model, s.tp_size, s.replicated)
        self.pages = pages
        if s.is_kvbm_rank:
            ident = RankIdentity(s.rank, s.kvbm_world, pages.regions.page_tokens, self.fingerprint)
            self.agent = RankAgent(s.endpoint, ident, pages.kv, init_timeout_s=s.config.init_timeout_s,
                                   heartbeat_interval_s=s.config.heartbeat_interval_s,
                                   liveness_timeout_s=s.config.liveness_timeout_s, engine_factory=self._make_engine)
            self.agent.start()

    def _make_engine(self, kv: EngineKV, pool: HostPool, slice_offset: int) -> NumpyCopyEngine:
        """The agent's copy engine, also used by this backend's calls (they copy on SGLang's threads)."""
        engine = NumpyCopyEngine(kv, host_slice_view(pool.array, slice_offset, kv.layout))
        self._engine = engine
        g = pool.geometry
        self._location = PoolLocation(pool.name, g.num_blocks, g.block_bytes, slice_offset)
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

    def _give_up(self, op_id: int) -> None:
        """A grant that came after this rank stopped waiting: fail its part so the leader frees the slots."""
        if self.agent is not None:
            self.agent.report(op_id, False, "the SGLang rank stopped waiting for this op")

    def _store(self, keys: List[str], kv: EngineKV | None, blocks: np.ndarray,
               extra_info: Optional[HiCacheStorageExtraInfo]) -> List[bool]:
        """Store pages ``blocks`` of ``kv`` (None: SGLang's host pool) under ``keys``: per key, stored?"""
        n = len(keys)
        if not self.settings.is_kvbm_rank:
            return [False] * n  # MLA: rank 0 alone writes (SGLang does not call the others)
        host = self._host_view()
        if host is None or self.agent is None:
            self._warn("store-unready", f"kvbm: rank {self.settings.rank} is not attached to a live leader yet; "
                                        "pages are not stored")
            return [False] * n
        grant = self.link.join(STORE, self._hashes(keys), self._parent(extra_info))
        slots = grant.slots
        done = np.zeros(n, bool)
        done[: len(slots)] = slots == -1  # already held
        new = np.flatnonzero(slots >= 0)
        if grant.op_id and len(new):
            ok, error = True, ""
            try:
                engine = self._engine if kv is None else NumpyCopyEngine(kv, host)
                assert engine is not None
                engine.store(blocks[new], slots[new])
            except Exception as e:  # reported: the leader aborts the op, the pages stay unstored
                ok, error = False, f"{type(e).__name__}: {e}"
                log.error("kvbm: store op %d failed on rank %d: %s", grant.op_id, self.settings.rank, error)
            self.agent.report(grant.op_id, ok, error)
            done[new] = ok
        return done.tolist()

    def _load(self, keys: List[str], kv: EngineKV | None, blocks: np.ndarray) -> int:
        """Load the longest prefix of ``keys`` kvbm holds into pages ``blocks`` of ``kv``; its length."""
        if self.pages is None or (self.agent is not None and self._host_view() is None):
            return 0
        grant: Grant = self.link.join(LOAD, self._hashes(keys))
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
        if not keys or self.pages is None:
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
        with self._client_lock:
            return self._guard("clear", False, self._client.reset_cache)

    def close(self) -> None:
        """Stop this rank's threads and sockets, and the leader if this rank started it."""
        if self._closed:
            return
        self._closed = True
        if self.coordinator is not None:
            self.coordinator.close()
        self.link.close()
        if self.agent is not None:
            self.agent.close()
        with self._client_lock:
            self._client.close()
        if self._reader_pool is not None:
            self._reader_pool.close()
        if self.leader is not None:
            self.leader.stop()
            self.leader = None
