"""An executor-like loop that drives kvbm's TensorRT-LLM connector in TensorRT-LLM's call order.

Order followed (NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361,
``tensorrt_llm/_torch/pyexecutor/py_executor.py``, ``resource_manager.py``,
``connectors/kv_cache_connector.py`` and the C++ ``kvCacheManager.cpp`` ``addSequence``):

1. schedule; for each new context request the KV cache manager matches its own prefix cache
   (whole blocks, ``enable_partial_reuse: false``, at least one prompt token left), calls the
   scheduler's ``get_num_new_matched_tokens(req, num_local)`` (``(0, True)`` is an error;
   local + matched must leave a prompt token), sets the prepopulated length, allocates, and
   calls ``update_state_after_alloc(req, all block ids)``;
2. ``build_connector_meta(SchedulerOutput)`` on rank 0 (a request's first report is in
   ``new_requests`` with ``computed_position`` minus the connector's matched tokens), pickled
   to every rank: ``bind_connector_meta``, ``start_load_kv``, per layer ``wait_for_layer_load``,
   the layer, ``save_kv_layer``; then ``wait_for_save``;
3. sampling; finished requests go to ``request_finished(req, block_ids)`` (True: the blocks stay
   allocated), then ``get_finished(newly finished-saving ids, newly loading ids)`` on every
   rank; ids every rank reported are terminated (blocks freed).

Bring-up follows ``py_executor_creator.py`` and ``PyExecutor._maybe_init_kv_connector_manager``
of the same tree: on every rank the worker (and on rank 0 the scheduler, concurrently, from the
same ``llm_args``) is built, the rank's pool registered, then rank 0's scheduler's
``wait_for_initialization`` runs before any request. Ranks > 0 are MPI processes
(``mpirun``): like TensorRT-LLM's ``KvCacheConnectorManager``, rank 0 broadcasts each step's
connector metadata (``mpi_broadcast``, pickled by mpi4py) and ``get_finished`` results are
``mpi_allgather``-ed and intersected.

Each rank's KV pool is one CPU torch tensor in TensorRT-LLM's layout ``[blocks, layers,
kv_factor, tokens_per_block * kv_heads * head_dim]``. The "forward pass" writes the KV
oracle's bytes into the blocks it computes and checks every block the request reads (its
engine-cache hits and everything kvbm loaded) against the oracle; newly allocated blocks are
scrambled first, so a load that did not happen is caught.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tensorrt_llm._utils import global_mpi_size, mpi_allgather, mpi_broadcast, mpi_rank

from kvbm.hashing import SequenceHasher, salt_hash
from kvbm.testing.sim.engine import G1Cache
from kvbm.testing.sim.oracle import Oracle
from kvbm.worker.layout import EngineKV

LAYERS = 2
KV_FACTOR = 2
HEAD_ELEMS = 8  # kv_heads_per_rank * head_dim


def llm_args(block_size: int, tp: int, rank: int, windows: list[int] | None = None) -> Any:
    from tensorrt_llm.llmapi.llm_args import KvCacheConfig, TorchLlmArgs, _ParallelConfig

    kvc = KvCacheConfig(block_size, enable_partial_reuse=False, max_attention_window=windows)
    return TorchLlmArgs(model="stand-in-model", kv_cache_config=kvc, parallel_config=_ParallelConfig(tp_size=tp, rank=rank))


def layer_groups(windows: list[int] | None) -> list[int]:
    """The model's layer groups as their window sizes (one group per size, largest first)."""
    return sorted(set(windows or [0]), reverse=True)


def pool_layout(pool: Any, windows: list[int] | None, block_size: int) -> Any:
    """KVCacheManagerV2's description of the pool: one group per window size, the layers split
    between them (a stand-in: every group addresses the same pool tensor's pages)."""
    from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_layout import (
        KvCacheBufferRef, KvCacheLayerGroupLayout, KvCacheLayout, KvCacheRegion)

    groups = []
    page = pool[0].numel() * pool.element_size()
    for gid, window in enumerate(layer_groups(windows)):
        layers = tuple(i for i, w in enumerate(windows or [0] * LAYERS) if w == window)
        region = KvCacheRegion(pool.data_ptr(), page, page, pool.shape[0],
                               tuple(KvCacheBufferRef(i, "key") for i in layers))
        groups.append(KvCacheLayerGroupLayout(gid, layers, window or None, (region,)))
    return KvCacheLayout(block_size, tuple(groups))


@dataclass
class Forward:
    """One rank's share of a step: blocks to scramble (fresh), to check, to fill (block, hash)."""

    scramble: list[int] = field(default_factory=list)
    check: list[tuple[int, int]] = field(default_factory=list)
    fill: list[tuple[int, int]] = field(default_factory=list)


class RankHost:
    """One TensorRT-LLM rank: the worker connector, its pool tensor (registered) and its oracle."""

    def __init__(self, worker: Any, block_size: int, rank: int, num_blocks: int, seed: int,
                 kv_factor: int = KV_FACTOR, windows: list[int] | None = None) -> None:
        import torch

        self.pool = torch.zeros((num_blocks, LAYERS, kv_factor, block_size * HEAD_ELEMS), dtype=torch.float16)
        self.worker = worker
        if len(layer_groups(windows)) > 1:
            self.worker.register_kv_cache_layout(pool_layout(self.pool, windows, block_size))
        else:
            self.worker.register_kv_caches(self.pool)
        # kv_factor 1 is MLA's K-only cache: every rank computes the same latent KV (rank 0's oracle).
        self.oracle = Oracle(EngineKV.from_contiguous(self.pool, LAYERS, kv_factor), 0 if kv_factor == 1 else rank, seed)
        self.rank = rank

    def step(self, meta: Any, fwd: Forward) -> list[str]:
        w = self.worker
        for b in fwd.scramble:
            self.oracle.scramble(b)
        w.bind_connector_meta(meta)
        w.start_load_kv(None)
        errors: list[str] = []
        for layer in range(LAYERS):
            w.wait_for_layer_load(layer, None)
            if layer == 0:  # the oracle checks and fills every layer of a block at once
                errors += [f"rank {self.rank}: block {b} holds wrong KV" for b, h in fwd.check
                           if not self.oracle.check(b, h)]
                for b, h in fwd.fill:
                    self.oracle.fill(b, h)
            w.save_kv_layer(layer, None)
        w.wait_for_save(None)
        w._clear_connector_meta()
        return errors

    def get_finished(self, saving: list[int], loading: list[int]) -> tuple[list[int], list[int]]:
        return self.worker.get_finished(saving, loading)

    def load_failures(self) -> int:
        return self.worker.load_failures

    def identity(self) -> dict[str, Any]:
        """This rank's process, its process group and the kvbm instance its worker joined."""
        inst = self.worker.instance
        return {"rank": self.rank, "pid": os.getpid(), "pgid": os.getpgrp(),
                "instance": inst.name if inst is not None else None}

    def close(self) -> None:
        self.worker.shutdown()


def start_engine(block_size: int, tp: int, rank: int, num_blocks: int, seed: int,
                 register_after_s: float = 0.0, kv_factor: int = KV_FACTOR,
                 windows: list[int] | None = None) -> tuple[RankHost, Any]:
    """One rank's connector bring-up in TensorRT-LLM's order; returns the rank and (rank 0) the
    scheduler. ``wait_for_initialization``'s error stops the start, as it stops the engine.
    ``register_after_s`` makes this rank slow to reach ``register_kv_caches`` (its model loads
    longer): rank 0 must not serve before it did."""
    from kvbm.trtllm_integration.connector import DynamoKVBMConnectorLeader, DynamoKVBMConnectorWorker

    from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import check_layer_groups

    args = llm_args(block_size, tp, rank, windows)
    # create_py_executor builds both roles concurrently (they may wait for each other).
    with ThreadPoolExecutor(max_workers=2) as pool:
        worker_task = pool.submit(DynamoKVBMConnectorWorker, args)
        scheduler = pool.submit(DynamoKVBMConnectorLeader, args).result() if rank == 0 else None
        worker = worker_task.result()
    try:
        if scheduler is not None:
            check_layer_groups(scheduler, worker, len(layer_groups(windows)))
        time.sleep(register_after_s)
        host = RankHost(worker, block_size, rank, num_blocks, seed, kv_factor, windows)
        if scheduler is not None:
            scheduler.wait_for_initialization()
    except BaseException:
        worker.shutdown()
        if scheduler is not None:
            scheduler.shutdown()
        raise
    return host, scheduler


class Ranks:
    """Every rank, driven from rank 0: a call runs on each rank in lockstep (rank 0 here, the
    others in :func:`serve_rank`) and returns the results in rank order."""

    def __init__(self, host: RankHost) -> None:
        self.host = host

    def call(self, name: str, *a: Any) -> list[Any]:
        mpi_broadcast((name, a), root=0)
        return mpi_allgather(getattr(self.host, name)(*a))


def serve_rank(host: RankHost) -> None:
    """A rank > 0: follow rank 0's calls until it closes the engine."""
    while True:
        name, a = mpi_broadcast(None, root=0)
        mpi_allgather(getattr(host, name)(*a))
        if name == "close":
            return


@dataclass
class Req:
    llm: Any  # LlmRequest
    max_tokens: int
    hasher: SequenceHasher
    hashes: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    generated: int = 0
    reported_blocks: int = 0
    reported_tokens: int = 0
    external: int = 0

    def hashes_upto(self, n_blocks: int) -> list[int]:
        bs = self.hasher.block_size
        toks = self.llm.get_tokens(0)
        while len(self.hashes) < n_blocks:
            i = len(self.hashes)
            self.hashes += self.hasher.extend(toks[i * bs : (i + 1) * bs])
        return self.hashes[:n_blocks]


@dataclass
class Totals:
    steps: int = 0
    local_hit_tokens: int = 0
    external_tokens: int = 0
    finished: int = 0
    errors: list[str] = field(default_factory=list)


class Executor:
    """Rank 0's executor loop over ``tp`` ranks (the others are MPI processes in
    :func:`serve_rank`); serves requests as soon as it is built, as TensorRT-LLM does."""

    def __init__(self, block_size: int = 16, tp: int = 1, num_blocks: int = 48, seed: int = 0,
                 kv_factor: int = KV_FACTOR, windows: list[int] | None = None) -> None:
        assert mpi_rank() == 0, "the executor loop with the scheduler runs on rank 0"
        self.bs = block_size
        self.windows = layer_groups(windows)
        host, self.scheduler = start_engine(block_size, tp, 0, num_blocks, seed, kv_factor=kv_factor, windows=windows)
        self.ranks = Ranks(host)
        self.g1 = G1Cache(num_blocks)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.saving: dict[int, Req] = {}  # finished, blocks kept for async saves
        self._new_saving: list[int] = []
        self._local_done: list[set[int]] = [set() for _ in range(global_mpi_size())]
        self.outputs: dict[int, list[int]] = {}  # finished request -> all its tokens
        self._next_id = 1
        self.totals = Totals()

    def close(self) -> None:
        self.ranks.call("close")
        self.scheduler.shutdown()

    # -- requests ------------------------------------------------------------------------
    def submit(self, tokens: list[int], max_tokens: int = 3, salt: int | None = None, **kw: Any) -> int:
        from tensorrt_llm.bindings.internal.batch_manager import LlmRequest

        rid = self._next_id
        self._next_id += 1
        llm = LlmRequest(rid, tokens, cache_salt_id=salt, **kw)
        self.waiting.append(Req(llm, max_tokens, SequenceHasher(self.bs, salt_hash(salt))))
        return rid

    def run(self, max_steps: int = 10_000) -> Totals:
        """Step until every request finished and every async save was reported."""
        for _ in range(max_steps):
            if not (self.waiting or self.running or self.saving):
                return self.totals
            self.step()
        raise AssertionError("the executor did not drain")

    # -- one iteration -------------------------------------------------------------------
    def _admit(self, req: Req) -> bool:
        """KVCacheManager.add_sequence for a new context request; False if it does not fit."""
        bs, llm = self.bs, req.llm
        prompt = llm.prompt_len
        hashes = req.hashes_upto(prompt // bs)
        local: list[int] = []
        for h in hashes[: (prompt - 1) // bs]:  # reuse leaves at least one prompt token
            b = self.g1.acquire_cached(h)
            if b is None:
                break
            local.append(b)
        need = -(-prompt // bs) - len(local)
        fresh = self.g1.allocate(need)
        if fresh is None:
            self.g1.release(local, hashes)
            return False
        num_local = len(local) * bs
        n, load_async = self.scheduler.get_num_new_matched_tokens(llm, num_local)
        assert isinstance(n, int) and isinstance(load_async, bool)
        assert not (n == 0 and load_async), "(0, True) is an error in TensorRT-LLM"
        assert not load_async, "kvbm's loads are synchronous in TensorRT-LLM"
        assert num_local + n < prompt, "there must be at least one uncomputed token in the prompt"
        llm.set_prepopulated_prompt_len(num_local + n)
        llm.py_num_connector_matched_tokens = n
        req.blocks = local + fresh
        req.external = n
        self.scheduler.update_state_after_alloc_by_layer_group(llm, self._by_group(req.blocks, prompt))
        self.totals.local_hit_tokens += num_local
        self.totals.external_tokens += n
        self._fresh += fresh
        return True

    def _by_group(self, blocks: list[int], tokens: int) -> list[list[int]]:
        """The pages of each layer group, by block ordinal: a sliding-window group has no page
        (BAD_PAGE_INDEX) for a block wholly before its window; a full-attention group (window 0)
        has them all."""
        from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import BAD_PAGE_INDEX

        return [[b if not w or (i + 1) * self.bs > tokens - w else BAD_PAGE_INDEX for i, b in enumerate(blocks)]
                for w in self.windows]

    def _request_data(self, req: Req, computed: int, scheduled: int) -> Any:
        from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import RequestData

        toks = req.llm.get_tokens(0)
        new = req.blocks[req.reported_blocks :]
        by_group = self._by_group(req.blocks, computed + scheduled)
        new_by_group = [g[req.reported_blocks :] for g in by_group]
        # Several groups: the flat list is empty (TensorRT-LLM's V2 manager).
        rd = RequestData(req.llm.request_id, list(toks[req.reported_tokens :]), new if len(by_group) == 1 else [],
                         computed, scheduled, cache_salt_id=req.llm.cache_salt_id,
                         new_block_ids_by_layer_group=new_by_group)
        req.reported_tokens, req.reported_blocks = len(toks), len(req.blocks)
        return rd

    def step(self) -> None:
        from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import SchedulerOutput

        bs = self.bs
        self._fresh: list[int] = []
        so = SchedulerOutput()
        fwd = Forward()
        context: list[Req] = []
        # Generation requests first (TensorRT-LLM schedules them ahead of new context work).
        for req in self.running:
            pos = len(req.llm.get_tokens(0)) - 1  # the token whose KV this step computes
            if pos // bs >= len(req.blocks):
                more = self.g1.allocate(1)
                assert more is not None, "the test sizes the engine pool so decodes always fit"
                req.blocks += more
                self._fresh += more
            so.cached_requests.append(self._request_data(req, pos, 1))
            if pos % bs == bs - 1:
                fwd.fill.append((req.blocks[pos // bs], req.hashes_upto(pos // bs + 1)[pos // bs]))
        while self.waiting and len(context) < 2 and self._admit(self.waiting[0]):
            req = self.waiting.popleft()
            context.append(req)
            llm = req.llm
            start = llm.context_current_position
            # TensorRT-LLM reports the first computed position without the connector's tokens.
            so.new_requests.append(self._request_data(req, start - req.external, llm.context_remaining_length))
            hashes = req.hashes_upto(llm.prompt_len // bs)
            fwd.check += [(req.blocks[i], hashes[i]) for i in range(start // bs)]
            fwd.fill += [(req.blocks[i], hashes[i]) for i in range(start // bs, llm.prompt_len // bs)]
        fwd.scramble = self._fresh
        if so.new_requests or so.cached_requests:
            meta = self.scheduler.build_connector_meta(so)
            for errors in self.ranks.call("step", meta, fwd):
                self.totals.errors += errors
            self.totals.steps += 1
        # Sampling: every scheduled request gets one token.
        for req in context:
            req.llm.set_prepopulated_prompt_len(req.llm.prompt_len)
            self.running.append(req)
        finished = []
        for req in list(self.running):
            rnd = random.Random(req.llm.request_id * 7919 + len(req.llm.get_tokens(0)))
            req.llm.add_new_token(rnd.randrange(1000), 0)
            req.generated += 1
            if req.generated >= req.max_tokens:
                self.running.remove(req)
                finished.append(req)
        for req in finished:
            self.totals.finished += 1
            self.outputs[req.llm.request_id] = req.llm.get_tokens(0)
            by_group = self._by_group(req.blocks, len(req.llm.get_tokens(0)))
            if self.scheduler.request_finished_by_layer_group(req.llm, by_group):
                self.saving[req.llm.request_id] = req
                self._new_saving.append(req.llm.request_id)
            else:
                self._free(req)
        self._get_finished()

    def _get_finished(self) -> None:
        """Every rank's ``get_finished``; an id is terminated once every rank reported it (a rank
        reports an id once: TensorRT-LLM keeps it in local_finished_async_requests till then)."""
        saving, self._new_saving = self._new_saving, []
        for local, (done_saving, done_loading) in zip(self._local_done, self.ranks.call("get_finished", saving, [])):
            assert not done_loading and set(done_saving) <= set(self.saving), (done_saving, done_loading)
            local |= set(done_saving)
        for rid in set.intersection(*self._local_done):
            self._free(self.saving.pop(rid))
            for local in self._local_done:
                local.discard(rid)

    def _free(self, req: Req) -> None:
        bs = self.bs
        n_full = min(len(req.llm.get_tokens(0)) - 1, len(req.blocks) * bs) // bs  # blocks whose KV is computed
        self.g1.release(req.blocks, req.hashes_upto(n_full))

    def drop_engine_cache(self, quiesce: bool = True) -> None:
        """Forget the engine's own reusable blocks (its prefix cache), as if evicted; with
        ``quiesce``, first let the leader commit every store and the index replica catch up."""
        p, f = self.scheduler.planner, self.scheduler.follower
        if quiesce and p is not None:
            p.client.wait_idle()
            if f is not None:
                assert f.sync(), "the index replica did not catch up"
        self.g1.clear()

    def load_failures(self) -> int:
        return sum(self.ranks.call("load_failures"))
