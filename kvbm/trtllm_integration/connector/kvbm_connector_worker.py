"""DynamoKVBMConnectorWorker: one TensorRT-LLM rank's copies between its KV pool and G2.

The copies run on the rank agent's thread (:mod:`kvbm.worker.agent`), with the same copy
engines as vLLM's worker side (NumPy on CPU, CuPy on GPU). Per step:

* ``start_load_kv`` submits the plan's loads; the first ``wait_for_layer_load`` waits for them
  (loads are synchronous in TensorRT-LLM: the layers read the blocks this very step);
* ``wait_for_save`` submits the plan's stores, after the forward pass wrote every layer;
* ``get_finished`` reports a finished request (``finished_gen_req_ids``, remembered) once this
  rank's stores of it are done; TensorRT-LLM frees its blocks when every rank reported it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, List, Tuple

from kvbm.connector.ops import LoadOp, StepPlan
from kvbm.trtllm_integration.connector.interface import KvCacheConnectorWorker
from kvbm.trtllm_integration.connector.settings import TrtllmSettings, UnsupportedSetup, settings_for
from kvbm.worker.agent import RankAgent, RankIdentity, numpy_engine
from kvbm.worker.layout import EngineKV, LayoutError

log = logging.getLogger("kvbm.trtllm")

# A load still running after this long is given up: it is logged (TensorRT-LLM has no way to
# recompute it) and the step goes on.
LOAD_WAIT_S = 30.0


class DynamoKVBMConnectorWorker(KvCacheConnectorWorker):
    """One rank's connector state; TensorRT-LLM calls it from the executor thread only."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.settings: TrtllmSettings | None = None
        self.agent: RankAgent | None = None
        self.error: str | None = None
        self._loads: dict[int, LoadOp] = {}  # op id -> load of this step not yet done
        self._req_stores: dict[str, set[int]] = {}  # request -> its store ops in flight
        self._store_req: dict[int, str] = {}  # store op id -> request
        self._finishing: set[int] = set()  # finished requests whose stores still run
        self.load_failures = 0
        try:
            self.settings = settings_for(llm_args)
        except UnsupportedSetup as e:
            self.error = str(e)
            log.error("kvbm: %s; serving without kvbm", e)

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        """Attach this rank's pool tensor ``[blocks, layers, kv_factor, tokens_per_block *
        kv_heads * head_dim]`` (one block-major tensor) and start the init sync."""
        s = self.settings
        if s is None:
            return
        shape = tuple(kv_cache_tensor.shape)
        factory: Any = numpy_engine
        try:
            if len(shape) != 4:
                raise LayoutError(f"TensorRT-LLM pool tensor of shape {shape} is not [blocks, layers, kv_factor, elems]")
            if getattr(kv_cache_tensor, "is_cuda", False):
                from kvbm.worker.cuda_copy import EngineKVDevice, cuda_engine

                kv: Any = EngineKVDevice.from_contiguous(kv_cache_tensor, shape[1], shape[2])
                factory = cuda_engine
            else:
                kv = EngineKV.from_contiguous(kv_cache_tensor, shape[1], shape[2])
        except (LayoutError, ImportError, RuntimeError) as e:
            self.error = f"kvbm cannot use this KV pool: {type(e).__name__}: {e}"
            log.error("rank %d: %s; serving without kvbm", s.rank, self.error)
            return
        ident = RankIdentity(s.rank, s.world_size, s.block_size, s.fingerprint)
        self.agent = RankAgent(s.endpoint, ident, kv, init_timeout_s=s.config.init_timeout_s,
                               heartbeat_interval_s=s.config.heartbeat_interval_s,
                               liveness_timeout_s=s.config.liveness_timeout_s, engine_factory=factory)
        self.agent.start()

    def _plan(self) -> StepPlan:
        meta = self.get_connector_meta()
        return meta if isinstance(meta, StepPlan) else StepPlan()

    # -- per step ------------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        for op in self._plan().loads:
            if op.failed_blocks:
                self.load_failures += 1
                log.error("kvbm: request %s: %d promised blocks cannot be loaded", op.req_id, len(op.failed_blocks))
            if op.op_id and self.agent is not None:
                self._loads[op.op_id] = op
                self.agent.submit_load(op.op_id, op.slots, op.blocks)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """The loads copy whole blocks (every layer): wait for all of them before the first layer."""
        deadline = time.monotonic() + LOAD_WAIT_S
        while self._loads:
            self._drain()
            if not self._loads:
                return
            if time.monotonic() > deadline:
                log.error("kvbm: %d loads still running after %.0f s", len(self._loads), LOAD_WAIT_S)
                self.load_failures += len(self._loads)
                self._loads.clear()
                return
            time.sleep(0.0001)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Stores go out after the whole forward pass (``wait_for_save``), never per layer."""

    def wait_for_save(self, stream: Any) -> None:
        self.wait_for_layer_load(0, stream)  # a forward pass without layers still needs its loads done
        for op in self._plan().stores:
            if self.agent is None:
                continue  # nothing copied: the leader aborts the op when it expires
            self._store_req[op.op_id] = op.req_id
            self._req_stores.setdefault(op.req_id, set()).add(op.op_id)
            self.agent.submit_store(op.op_id, op.blocks, op.slots)

    def _drain(self) -> None:
        if self.agent is None:
            return
        for f in self.agent.take_finished():
            if f.kind == "load":
                if self._loads.pop(f.op_id, None) is not None and not f.ok:
                    self.load_failures += 1
                    log.error("kvbm: load op %d failed", f.op_id)
                continue
            req_id = self._store_req.pop(f.op_id, None)
            if req_id is None:
                continue
            ops = self._req_stores[req_id]
            ops.discard(f.op_id)
            if not ops:
                del self._req_stores[req_id]

    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]:
        """(finished saving, finished loading): loads are synchronous, so the latter is empty."""
        self._drain()
        self._finishing.update(finished_gen_req_ids)
        done = [r for r in self._finishing if str(r) not in self._req_stores]
        self._finishing.difference_update(done)
        return done, list(started_loading_req_ids)

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
