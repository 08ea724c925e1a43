"""SGLang ranks for the tests: real host pools and storage factory, driven like HiCacheController.

Each :class:`Rank` is a forked process holding SGLang's CPU device pool, its host pool and the
storage backend SGLang's ``StorageBackendFactory`` builds from the ``dynamic`` extra config. The
test sends it commands; a rank stores pages whose bytes are an oracle of (key, rank) (MLA: of the
key alone, every rank holds the same KV), and checks every byte of what it loads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE, HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_storage_hash_str

from kvbm.leader.client import LeaderClient
from kvbm.ipc.stats import LeaderStats
from kvbm.leader.process import lock_path

PAGE = 16
LAYERS = 3
HEADS = 4  # in total; each TP rank holds HEADS / tp
HEAD_DIM = 8
DEVICE_TOKENS = 2048  # the host pool holds twice as many: 256 pages

EXTRA = {"backend_name": "kvbm", "module_path": "kvbm.sglang_integration.storage", "class_name": "KvbmHiCacheStorage"}


def page_keys(tokens: list[int], salt: str | None = None) -> list[str]:
    """SGLang's own storage keys of the full pages of ``tokens`` (chained SHA-256 hex)."""

    class Key(list):
        extra_key = None
        cache_salt = salt

    return get_storage_hash_str(Key(tokens), None, page_size=PAGE)


def oracle(key: str, rank: int, nbytes: int) -> np.ndarray:
    seed = int(key[:16], 16) ^ (rank * 0x9E3779B97F4A7C15 % (1 << 64))
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@dataclass
class RankSpec:
    rank: int
    tp: int
    layout: str = "page_first"
    mla: bool = False
    v1: bool = True  # the zero-copy calls; False: the legacy flat-page ones
    instance: str | None = "sgl-test"  # None: the ranks agree on one over their TP group
    env: dict[str, str] = field(default_factory=dict)
    controller: bool = False  # let SGLang's HiCacheController build and drive the backend
    model: str = "test/model"
    dist_port: int = 0  # TP > 1 with the controller: torch.distributed (gloo) rendezvous port


def _pools(spec: RankSpec) -> tuple[Any, Any]:
    if spec.mla:
        dev = MLATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
                               layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        host = MLATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, spec.layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS,
                                    start_layer=0, end_layer=LAYERS - 1, target_layer_num=LAYERS)
    else:
        dev = MHATokenToKVPool(DEVICE_TOKENS, PAGE, torch.bfloat16, head_num=HEADS // spec.tp, head_dim=HEAD_DIM,
                               layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        host = MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, spec.layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=DEVICE_TOKENS,
                                    start_layer=0, end_layer=LAYERS - 1)
    return dev, host


class _RankState:
    """Inside the rank process: the pools and the backend, built the cache controller's way."""

    def __init__(self, spec: RankSpec) -> None:
        os.environ.update(spec.env)
        self.spec = spec
        self.dev, self.host = _pools(spec)
        extra: dict[str, Any] = dict(EXTRA, interface_v1=int(spec.v1))
        if spec.instance is not None:
            extra["instance"] = spec.instance
        self.controller: Any = None
        if spec.controller:
            self.controller = _controller(spec, self.dev, self.host, extra)
            self.backend = self.controller.storage_backend
            self.page_bytes = self.host.get_dummy_flat_data_page().numel() * 2
            return
        cfg = HiCacheStorageConfig(tp_rank=spec.rank, tp_size=spec.tp, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                   attn_cp_size=1, is_mla_model=spec.mla, enable_storage_metrics=False,
                                   is_page_first_layout=spec.layout == "page_first", model_name=spec.model,
                                   extra_config=extra)
        self.backend = StorageBackendFactory.create_backend("dynamic", cfg, self.host)
        try:
            self.backend.register_mem_pool_host(self.host)
        except BaseException:
            self.backend.close()  # as SGLang's attach_storage_backend does when start-up fails
            raise
        self.backend.on_host_pools_registered()
        self.page_bytes = self.host.get_dummy_flat_data_page().numel() * 2

    def _slice_rank(self) -> int:
        return 0 if self.spec.mla else self.spec.rank

    def _fill(self, idx: int, key: str) -> None:
        data = torch.from_numpy(oracle(key, self._slice_rank(), self.page_bytes)).view(torch.bfloat16)
        self.host.set_from_flat_data_page(idx, data)

    def _check(self, idx: int, key: str) -> bool:
        got = self.host.get_data_page(idx, flat=True).contiguous().view(torch.uint8).numpy()
        return bool(np.array_equal(got, oracle(key, self._slice_rank(), self.page_bytes)))

    def store(self, keys: list[str]) -> list[bool]:
        """HiCacheController.write_storage -> _page_backup: pages from the host pool, batch by batch."""
        host_indices = self.host.alloc(len(keys) * PAGE)
        try:
            for i, key in enumerate(keys):
                self._fill(int(host_indices[i * PAGE]), key)
            out: list[bool] = []
            prefix: list[str] = []
            for b in range(0, len(keys), STORAGE_BATCH_SIZE):
                batch = keys[b : b + STORAGE_BATCH_SIZE]
                idx = host_indices[b * PAGE : (b + len(batch)) * PAGE]
                if self.spec.v1:
                    out += self.backend.batch_set_v1(batch, idx, HiCacheStorageExtraInfo(prefix_keys=list(prefix)))
                else:
                    pages = [self.host.get_data_page(int(idx[i * PAGE])) for i in range(len(batch))]
                    out += [self.backend.batch_set(batch, pages)] * len(batch)
                prefix += batch
            return out
        finally:
            self.host.free(host_indices)

    def exists(self, keys: list[str]) -> int:
        """HiCacheController._storage_hit_query."""
        hits = 0
        for b in range(0, len(keys), STORAGE_BATCH_SIZE):
            batch = keys[b : b + STORAGE_BATCH_SIZE]
            n = self.backend.batch_exists(batch, HiCacheStorageExtraInfo(prefix_keys=keys[:b]))
            hits += n
            if n < len(batch):
                break
        return hits

    def load(self, keys: list[str]) -> tuple[int, int]:
        """HiCacheController._page_transfer into fresh host pages: (pages loaded, of which wrong)."""
        host_indices = self.host.alloc(len(keys) * PAGE)
        try:
            self.host.kv_buffer.zero_()
            loaded = 0
            for b in range(0, len(keys), STORAGE_BATCH_SIZE):
                batch = keys[b : b + STORAGE_BATCH_SIZE]
                idx = host_indices[b * PAGE : (b + len(batch)) * PAGE]
                if self.spec.v1:
                    res = self.backend.batch_get_v1(batch, idx, HiCacheStorageExtraInfo(prefix_keys=keys[:b]))
                    n = res.index(False) if False in res else len(res)
                else:
                    dummies = [self.host.get_dummy_flat_data_page() for _ in batch]
                    pages = self.backend.batch_get(batch, dummies)
                    n = 0
                    for i, page in enumerate(pages):
                        if page is None:
                            break
                        self.host.set_from_flat_data_page(int(idx[i * PAGE]), page)
                        n += 1
                loaded += n
                if n < len(batch):
                    break
            wrong = sum(not self._check(int(host_indices[i * PAGE]), keys[i]) for i in range(loaded))
            return loaded, wrong
        finally:
            self.host.free(host_indices)

    def ctrl_store(self, tokens: list[int]) -> int:
        """HiCacheController.write_storage of pages in the host pool; tokens its backup thread stored."""
        keys = page_keys(tokens)
        host_indices = self.host.alloc(len(keys) * PAGE)
        try:
            for i, key in enumerate(keys):
                self._fill(int(host_indices[i * PAGE]), key)
            self.controller.write_storage(host_indices, tokens, hash_value=keys)
            op = self.controller.ack_backup_queue.get(timeout=60)
            return int(op.completed_tokens)
        finally:
            self.host.free(host_indices)

    def ctrl_prefetch(self, tokens: list[int]) -> tuple[int, int, int]:
        """HiCacheController.prefetch, with the scheduler's part (allocate host pages for the hit)
        done here: (tokens its hit query found, tokens loaded, of which pages with a wrong byte)."""
        cc = self.controller
        cc.prefetch("req-1", tokens)
        op = cc.prefetch_hit_queue.get(timeout=60)
        hit = int(op.storage_hit_count)
        if hit == 0:
            return 0, 0, 0
        host_indices = self.host.alloc(hit)
        try:
            self.host.kv_buffer.zero_()
            op.host_indices = host_indices
            cc.prefetch_buffer.put(op)
            done = 0
            while True:
                ack = cc.ack_prefetch_queue.get(timeout=60)
                if ack.completed_tokens is not None:
                    done = max(done, int(ack.completed_tokens))
                if ack.completed_req:
                    break
            keys = op.hash_value
            wrong = sum(not self._check(int(host_indices[i * PAGE]), keys[i]) for i in range(done // PAGE))
            return hit, done, wrong
        finally:
            self.host.free(host_indices)

    def instance(self) -> tuple[str, str]:
        """The kvbm instance name and leader endpoint this rank uses."""
        inst = self.backend.settings.instance
        return inst.name, inst.endpoint

    def idle(self) -> LeaderStats:
        """Wait until the leader applied every rank's report (stores commit asynchronously)."""
        client = LeaderClient(self.backend.settings.endpoint)
        try:
            return client.wait_idle(30)
        finally:
            client.close()

    def break_copies(self) -> None:
        """Make this rank's copies into kvbm's pool fail (as a bad mapping or a bug would)."""
        def fail(*args: Any) -> None:
            raise OSError("injected copy failure")

        assert self.backend._engine is not None
        self.backend._engine.store = fail

    def kill_leader(self) -> None:
        """SIGKILL the instance's leader (whichever rank started it; its pid is in the lock file)."""
        s = self.backend.settings
        with open(lock_path(s.config.run_dir, s.instance.name)) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self.controller is not None:
            self.controller.detach_storage_backend()  # stops its threads, closes the backend
        else:
            self.backend.close()


def _controller(spec: RankSpec, dev: Any, host: Any, extra: dict[str, Any]) -> Any:
    """SGLang's HiCacheController over the CPU pools: its storage threads are real. TP > 1: the
    ranks' torch.distributed world (gloo, on CPU) and SGLang's TP group coordinator over it, as
    SGLang's model runner builds them; the controller syncs hits and prefetches over it."""
    import threading

    from sglang.srt.distributed.parallel_state import init_distributed_environment, init_model_parallel_group
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.runtime_context import get_parallel

    tp_group: Any = None
    groups: dict[str, Any] = {}
    if spec.tp > 1:
        init_distributed_environment(world_size=spec.tp, rank=spec.rank, local_rank=spec.rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{spec.dist_port}")
        coordinator = init_model_parallel_group([list(range(spec.tp))], spec.rank, "gloo", use_pynccl=False,
                                                use_custom_allreduce=False, use_mscclpp=False,
                                                use_torch_symm_mem_allreduce=False, group_name="tp")
        tp_group, groups = coordinator.cpu_group, {"tp_group": coordinator}
    # What SGLang's launcher publishes for this server.
    get_parallel().override_permanently(attn_dcp_size=1, attn_dcp_rank=0, tp_rank=spec.rank, tp_size=spec.tp,
                                        pp_rank=0, pp_size=1, **groups)
    alloc = TokenToKVPoolAllocator(dev.size, torch.bfloat16, "cpu", dev, False)
    return HiCacheController(alloc, host, PAGE, tp_group, threading.Event(), io_backend="direct",
                             storage_backend="dynamic", model_name=spec.model, storage_backend_extra_config=extra)


def _serve(spec: RankSpec, conn: Any) -> None:
    # pytest's log capture, inherited through fork, would swallow the rank's log: print it instead.
    logging.getLogger().handlers.clear()
    logging.basicConfig(level=logging.WARNING, format=f"rank{spec.rank} %(name)s %(levelname)s: %(message)s")
    state = None
    try:
        state = _RankState(spec)
        conn.send(("ok", None))
        while True:
            cmd, args = conn.recv()
            try:
                result = getattr(state, cmd)(*args)
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))
            if cmd == "close":
                return
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Rank:
    """One SGLang TP rank in its own (forked) process; :meth:`started` is SGLang's start-up
    (the backend built and its host pool registered) returning."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        parent, child = mp.get_context("fork").Pipe()
        self.conn = parent
        self.proc = mp.get_context("fork").Process(target=_serve, args=(spec, child), daemon=True)
        self.proc.start()

    def started(self, timeout_s: float = 120) -> None:
        """Wait for the rank's start-up; its error (e.g. KvbmNotReady) is raised as RuntimeError."""
        self._take(timeout_s)

    def _take(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"rank {self.spec.rank} did not answer within {timeout_s} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"rank {self.spec.rank}:\n{value}")
        return value

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def call(self, cmd: str, *args: Any, timeout_s: float = 120) -> Any:
        self.send(cmd, *args)
        return self._take(timeout_s)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout_s=60)
            except (RuntimeError, TimeoutError, OSError, EOFError):
                pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class World:
    """The TP ranks of one SGLang instance; commands go to every rank at once, like SGLang's."""

    def __init__(self, tp: int, **kw: Any) -> None:
        self.ranks: list[Rank] = []
        try:
            # Every rank starts at once, as SGLang's do: each one's start-up waits for the others.
            for r in range(tp):
                self.ranks.append(Rank(RankSpec(rank=r, tp=tp, **kw)))
            for rank in self.ranks:
                rank.started()
        except BaseException:
            self.close()
            raise

    def all(self, cmd: str, *args: Any, timeout_s: float = 120) -> list[Any]:
        for r in self.ranks:
            r.send(cmd, *args)
        return [r._take(timeout_s) for r in self.ranks]

    def close(self) -> None:
        for r in reversed(self.ranks):  # rank 0 (coordinator, usually the leader's spawner) last
            r.close()

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
