"""The worker-role half of DynamoConnector: one TP rank's copies between its KV cache and G2.

The copies run on the rank agent's thread (kvbm.worker.agent); this class only submits the
ops the scheduler side planned and turns their completions into what vLLM asks for:

* loads are submitted in ``start_load_kv`` and reported per request in ``finished_recving``
  (also when they failed: their blocks then go to ``get_block_ids_with_load_errors``);
* stores are submitted in ``wait_for_save``, after the forward pass wrote every layer, never
  earlier; their completions go back to the scheduler as worker metadata, and requests whose
  block free the scheduler delayed are reported in ``finished_sending`` once their stores are
  done;
* ``handle_preemptions`` waits for the stores still reading blocks of preempted requests,
  because this step's forward pass may overwrite them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from kvbm.vllm_integration.connector.common import Settings
from kvbm.vllm_integration.connector.metadata import (
    DynamoConnectorMetadata,
    DynamoWorkerMetadata,
    KvbmConnectorStats,
    LoadOp,
    StoreOp,
)
from kvbm.worker.agent import RankAgent, RankIdentity, numpy_engine
from kvbm.worker.layout import EngineKV, LayoutError

log = logging.getLogger("kvbm.vllm")


class KvbmWorker:
    """One rank's connector state. vLLM calls it from the model runner's thread only."""

    def __init__(self, settings: Settings, rank: int) -> None:
        self.settings = settings
        self.rank = rank
        self.agent: RankAgent | None = None
        self.error: str | None = None
        self.stats = KvbmConnectorStats()
        self._loads: dict[int, LoadOp] = {}  # op id -> load in flight
        self._stores: dict[int, StoreOp] = {}  # op id -> store in flight
        self._req_stores: dict[str, set[int]] = {}  # request -> its stores in flight
        self._delayed: set[str] = set()  # finished requests waiting for their stores
        self._sending: set[str] = set()  # to report as finished_sending
        self._recving: set[str] = set()  # to report as finished_recving
        self._invalid: set[int] = set()  # engine blocks whose load failed
        self._stores_done: dict[int, int] = {}

    def register_kv_caches(self, kv_caches: Mapping[str, Any], num_blocks: int | None) -> None:
        """Describe this rank's KV tensors and start the init sync in the background."""
        first = next(iter(kv_caches.values()), None)
        factory: Any = numpy_engine  # CopyEngineFactory over EngineKV or EngineKVDevice
        try:
            if getattr(first, "is_cuda", False):  # GPU memory: CuPy copies (kvbm.worker.cuda_copy)
                from kvbm.worker.cuda_copy import EngineKVDevice, cuda_engine

                kv: Any = EngineKVDevice.from_layers(kv_caches, num_blocks=num_blocks or None)
                factory = cuda_engine
            else:
                kv = EngineKV.from_layers(kv_caches, num_blocks=num_blocks or None)
        except (LayoutError, ImportError, RuntimeError) as e:
            self.error = f"kvbm cannot use these KV caches: {type(e).__name__}: {e}"
            log.error("rank %d: %s; serving without kvbm", self.rank, self.error)
            return
        s = self.settings
        ident = RankIdentity(self.rank, s.world_size, s.block_size, s.fingerprint)
        self.agent = RankAgent(s.endpoint, ident, kv, init_timeout_s=s.config.init_timeout_s,
                               heartbeat_interval_s=s.config.heartbeat_interval_s,
                               liveness_timeout_s=s.config.liveness_timeout_s, engine_factory=factory)
        self.agent.start()

    # -- per step ------------------------------------------------------------------------
    def start_load_kv(self, meta: DynamoConnectorMetadata) -> None:
        for op in meta.loads:
            if op.op_id and self.agent is not None:
                self._loads[op.op_id] = op
                self.agent.submit_load(op.op_id, op.slots, op.blocks)
            else:
                self._load_done(op, ok=not op.op_id)
        for req_id in meta.delayed_free:
            if self._req_stores.get(req_id):
                self._delayed.add(req_id)
            else:
                self._sending.add(req_id)

    def wait_for_save(self, meta: DynamoConnectorMetadata) -> None:
        for op in meta.stores:
            if self.agent is None:
                self._stores_done[op.op_id] = 1  # nothing copied: the leader aborts it
                self.stats.add("failed_store_ops", 1)
                continue
            self._stores[op.op_id] = op
            self._req_stores.setdefault(op.req_id, set()).add(op.op_id)
            self.agent.submit_store(op.op_id, op.blocks, op.slots)

    def handle_preemptions(self, meta: DynamoConnectorMetadata) -> None:
        """Block until no store reads from an engine block of a request preempted this step."""
        waiting = [r for r in meta.preempted if self._req_stores.get(r)]
        if not waiting:
            return
        t0 = time.monotonic()
        next_warn = t0 + 10.0
        while any(self._req_stores.get(r) for r in waiting):
            self._drain()
            if time.monotonic() > next_warn:
                log.warning("rank %d: still waiting for stores of preempted requests after %.0f s",
                            self.rank, time.monotonic() - t0)
                next_warn += 10.0
            time.sleep(0.0002)

    def _load_done(self, op: LoadOp, ok: bool) -> None:
        self._recving.add(op.req_id)
        self._invalid.update(op.failed_blocks)
        if ok:
            self.stats.add("loaded_blocks", len(op.blocks))
        else:
            self._invalid.update(op.blocks)
            self.stats.add("failed_load_ops", 1)

    def _drain(self) -> None:
        if self.agent is None:
            return
        for f in self.agent.take_finished():
            if f.kind == "load":
                load = self._loads.pop(f.op_id, None)
                if load is not None:
                    self._load_done(load, f.ok)
                continue
            store = self._stores.pop(f.op_id, None)
            if store is None:
                continue
            self._stores_done[f.op_id] = 1
            self.stats.add("stored_blocks" if f.ok else "failed_store_ops", len(store.blocks) if f.ok else 1)
            ops = self._req_stores[store.req_id]
            ops.discard(f.op_id)
            if not ops:
                del self._req_stores[store.req_id]
                if store.req_id in self._delayed:
                    self._delayed.discard(store.req_id)
                    self._sending.add(store.req_id)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        self._drain()
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def take_worker_meta(self) -> DynamoWorkerMetadata | None:
        if not self._stores_done:
            return None
        out, self._stores_done = DynamoWorkerMetadata(self._stores_done), {}
        return out

    def take_stats(self) -> KvbmConnectorStats | None:
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, KvbmConnectorStats()
        return out

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
