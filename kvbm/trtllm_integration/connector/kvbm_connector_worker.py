"""DynamoKVBMConnectorWorker: one TensorRT-LLM rank's copies between its KV pool and G2.

The engine-neutral worker side (:class:`kvbm.connector.worker.WorkerOps`, shared with vLLM's
worker side: the rank agent, NumPy copies on CPU, CuPy on GPU) submits and tracks the ops; this
class translates TensorRT-LLM's calls. Per step:

* ``start_load_kv`` submits the plan's loads; the first ``wait_for_layer_load`` waits for them
  (loads are synchronous in TensorRT-LLM: the layers read the blocks this very step);
* ``wait_for_save`` submits the plan's stores, after the forward pass wrote every layer;
* ``get_finished`` reports a finished request (``finished_gen_req_ids``, remembered) once this
  rank's stores of it are done; TensorRT-LLM frees its blocks when every rank reported it.
"""

from __future__ import annotations

import logging
from typing import Any, List, Tuple

from kvbm.connector.bootstrap import Instance
from kvbm.connector.ops import StepPlan
from kvbm.connector.worker import LoadDone, StoreDone, WorkerOps
from kvbm.trtllm_integration.connector.interface import KvCacheConnectorWorker
from kvbm.trtllm_integration.connector.settings import UnsupportedSetup, replicated_instance, settings_for
from kvbm.worker.agent import RankAgent, RankIdentity
from kvbm.worker.layout import LayoutError

log = logging.getLogger("kvbm.trtllm")


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """One rank's connector state; TensorRT-LLM calls it from the executor thread only."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.instance: Instance | None = None
        self.ops = WorkerOps(0)
        self._error: str | None = None  # unsupported setup (before any KV is attached)
        self._finishing: set[int] = set()  # finished requests whose stores still run
        self.load_failures = 0
        try:
            # Every rank builds its worker: the instance name's broadcast happens here.
            self.instance, self.ops.rank = settings_for(llm_args)
        except UnsupportedSetup as e:
            self._error = str(e)
            log.error("kvbm: %s; serving without kvbm", e)

    @property
    def agent(self) -> RankAgent | None:
        return self.ops.agent

    @property
    def error(self) -> str | None:
        return self._error or self.ops.error

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        """Attach this rank's pool tensor ``[blocks, layers, kv_factor, tokens_per_block *
        kv_heads * head_dim]`` (one block-major tensor) and start the init sync."""
        s = self.instance
        if s is None:
            return
        shape = tuple(kv_cache_tensor.shape)
        if len(shape) == 4 and shape[2] == 1:
            # kv_factor 1 is TensorRT-LLM's K-only cache, which it uses for MLA: every rank holds
            # the same latent KV, so the world keeps one copy of each block.
            s = self.instance = replicated_instance(s, self._llm_args)

        def build(cls: Any) -> Any:
            if len(shape) != 4:
                raise LayoutError(f"TensorRT-LLM pool tensor of shape {shape} is not [blocks, layers, kv_factor, elems]")
            return cls.from_contiguous(kv_cache_tensor, shape[1], shape[2])

        self.ops.attach(kv_cache_tensor, build, endpoint=s.endpoint,
                        identity=RankIdentity(self.ops.rank, s.world_size, s.block_size, s.fingerprint, s.replicated),
                        config=s.config, what="this KV pool")

    def register_kv_cache_layout(self, layout: Any) -> None:
        """KVCacheManagerV2's pools per layer group. One group is one pool (TensorRT-LLM hands it
        to ``register_kv_caches``); several (VSWA) are declined by the settings already (kvbm
        off); a multi-group pool kvbm did not expect is refused, so the start fails saying why
        instead of serving blocks whose other groups were never stored."""
        if self.instance is None:
            return
        if len(layout.groups) == 1:
            super().register_kv_cache_layout(layout)
            return
        self._error = (f"kvbm serves one KV layer group; this pool has {len(layout.groups)} "
                       f"(windows {[g.window_size for g in layout.groups]})")
        log.error("kvbm: %s; this rank does not join the instance", self._error)

    def _plan(self) -> StepPlan:
        meta = self.get_connector_meta()
        return meta if isinstance(meta, StepPlan) else StepPlan()

    # -- per step ------------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        for op in self._plan().loads:
            if op.failed_blocks:
                self.load_failures += 1
                log.error("kvbm: request %s: %d promised blocks cannot be loaded", op.req_id, len(op.failed_blocks))
            self.ops.submit_load(op)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """The loads copy whole blocks (every layer): wait for all of them before the first layer."""
        # A load given up is logged (TensorRT-LLM has no way to recompute it); the step goes on.
        self.load_failures += len(self.ops.wait_loads(self._completed))

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Stores go out after the whole forward pass (``wait_for_save``), never per layer."""

    def wait_for_save(self, stream: Any) -> None:
        self.wait_for_layer_load(0, stream)  # a forward pass without layers still needs its loads done
        for op in self._plan().stores:
            self.ops.submit_store(op)  # kvbm off: nothing copied, the leader aborts the op when it expires

    def _completed(self, done: list[LoadDone | StoreDone]) -> None:
        for d in done:
            if isinstance(d, LoadDone) and not d.ok:
                self.load_failures += 1
                log.error("kvbm: load op %d failed", d.op.op_id)

    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]:
        """(finished saving, finished loading): loads are synchronous, so the latter is empty."""
        self._completed(self.ops.drain())
        self._finishing.update(finished_gen_req_ids)
        done = [r for r in self._finishing if not self.ops.storing(str(r))]
        self._finishing.difference_update(done)
        return done, list(started_loading_req_ids)

    def shutdown(self) -> None:
        self.ops.shutdown()
