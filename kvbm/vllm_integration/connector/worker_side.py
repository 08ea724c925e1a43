"""The worker-role half of DynamoConnector: one TP rank's copies between its KV cache and G2.

The engine-neutral worker side (:class:`kvbm.connector.worker.WorkerOps`) submits the ops the
scheduler side planned and reports their completions; this class turns them into what vLLM
asks for:

* loads are submitted in ``start_load_kv``; a synchronous one (``LoadOp.sync``, its request is
  computed in this step) is waited for there, before the forward pass, and its failed blocks
  go to ``get_block_ids_with_load_errors``; the others are reported per request in
  ``finished_recving`` (also when they failed: their blocks then go to ``get_block_ids_with_load_errors``; for a
  hybrid model, whose block ids vLLM cannot map back to requests, the request goes to
  ``failed_recving`` instead and is recomputed whole);
* stores are submitted in ``wait_for_save``, after the forward pass wrote every layer, never
  earlier; their completions go back to the scheduler as worker metadata, and requests whose
  block free the scheduler delayed are reported in ``finished_sending`` once their stores are
  done;
* ``handle_preemptions`` waits for the stores still reading blocks of preempted requests,
  because this step's forward pass may overwrite them.

Under vLLM's hybrid KV cache manager the layers of different KV cache groups share KV tensors
(layer ``i`` of every group views tensor ``i``) and block ids are unique across groups: a block
is copied as every distinct tensor's bytes of that block, whichever group holds it now.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from kvbm.connector.ops import IDLE_STEP_WAIT_S
from kvbm.connector.worker import LoadDone, StoreDone, WorkerOps
from kvbm.connector.bootstrap import Instance
from kvbm.vllm_integration.connector.common import head_split
from kvbm.vllm_integration.connector.metadata import (
    DynamoConnectorMetadata,
    DynamoWorkerMetadata,
    KvbmConnectorStats,
    LoadOp,
)
from kvbm.worker.agent import RankAgent, RankIdentity
from kvbm.worker.layout import LayoutError

log = logging.getLogger("kvbm.vllm")


def distinct_tensors(kv_caches: Mapping[str, Any]) -> dict[str, Any]:
    """The first layer of each distinct KV tensor (by its data address), in registration order:
    the layers of a hybrid model's groups view the same tensors, copied once per block.

    Raises LayoutError for layers that overlap another's memory without being the same view
    (another shape or start): a block id would then name different bytes in each, and copying
    one group's block could overwrite another block.
    """
    seen: dict[int, tuple[Any, int]] = {}  # start -> (first layer's tensor, end)
    out: dict[str, Any] = {}
    for name, t in kv_caches.items():
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first = seen.get(start)
        if first is not None and tuple(first[0].shape) == tuple(t.shape) and first[1] == end:
            continue
        if first is not None or any(s < end and start < e for s, (_, e) in seen.items()):
            raise LayoutError(f"layer {name}'s KV tensor overlaps another layer's without being the same view")
        seen[start] = (t, end)
        out[name] = t
    return out


class KvbmWorker:
    """One rank's connector state. vLLM calls it from the model runner's thread only."""

    def __init__(self, settings: Instance, rank: int, *, hybrid: bool = False, kv_heads: int = 0) -> None:
        self.settings = settings
        self.rank = rank
        self.hybrid = hybrid
        self.kv_heads = kv_heads  # the model's KV heads (0: unknown, or MLA)
        self.ops = WorkerOps(rank)
        self.stats = KvbmConnectorStats()
        self._delayed: set[str] = set()  # finished requests waiting for their stores
        self._sending: set[str] = set()  # to report as finished_sending
        self._recving: set[str] = set()  # to report as finished_recving
        self._invalid: set[int] = set()  # engine blocks whose load failed
        self._failed: set[str] = set()  # hybrid models: requests whose load failed
        self._stores_done: dict[int, int] = {}

    @property
    def agent(self) -> RankAgent | None:
        return self.ops.agent

    @property
    def error(self) -> str | None:
        return self.ops.error

    def register_kv_caches(self, kv_caches: Mapping[str, Any], num_blocks: int | None) -> None:
        """Describe this rank's KV tensors and start the init sync in the background."""
        s = self.settings
        # (a LayoutError of distinct_tensors is attach's: logged, and this rank serves without kvbm)
        layers = (lambda: distinct_tensors(kv_caches)) if self.hybrid else (lambda: kv_caches)
        sample = next(iter(kv_caches.values()), None)
        heads = None
        if sample is not None and not s.replicated:
            heads = head_split(tuple(sample.shape), sample.element_size(), s.block_size, self.kv_heads,
                               s.world_size, self.rank)
        self.ops.attach(sample, lambda cls: cls.from_layers(layers(), num_blocks=num_blocks or None),
                        endpoint=s.endpoint,
                        identity=RankIdentity(self.rank, s.world_size, s.block_size, s.fingerprint, s.replicated, heads),
                        config=s.config, what="these KV caches")

    # -- per step ------------------------------------------------------------------------
    def start_load_kv(self, meta: DynamoConnectorMetadata) -> None:
        sync = False
        for op in meta.loads:
            if self.ops.submit_load(op):
                sync |= op.sync
            else:
                self._load_done(op, ok=not op.op_id)
        if sync:  # this step's forward pass reads them (loads run in order: wait for all)
            for op in self.ops.wait_loads(self._completed):
                self._load_done(op, ok=False)
        for req_id in meta.delayed_free:
            if self.ops.storing(req_id):
                self._delayed.add(req_id)
            else:
                self._sending.add(req_id)

    def wait_for_save(self, meta: DynamoConnectorMetadata) -> None:
        for op in meta.stores:
            if not self.ops.submit_store(op):
                self._stores_done[op.op_id] = 1  # nothing copied: the leader aborts it
                self.stats.add("failed_store_ops", 1)

    def handle_preemptions(self, meta: DynamoConnectorMetadata) -> None:
        """Block until no store reads from an engine block of a request preempted this step."""
        self.ops.wait_stores_of(meta.preempted, self._completed)

    def _load_done(self, op: LoadOp, ok: bool) -> None:
        if not op.sync:  # a synchronous load's request is running already: it waits for nothing
            self._recving.add(op.req_id)
        if self.hybrid and (op.failed_blocks or not ok):
            self._failed.add(op.req_id)
        else:
            self._invalid.update(op.failed_blocks)
        if ok:
            self.stats.add("loaded_blocks", len(op.blocks))
        else:
            if not self.hybrid:
                self._invalid.update(op.blocks)
            self.stats.add("failed_load_ops", 1)

    def _completed(self, done: list[LoadDone | StoreDone]) -> None:
        for d in done:
            if isinstance(d, LoadDone):
                self._load_done(d.op, d.ok)
                continue
            self._stores_done[d.op.op_id] = 1
            if not d.ok:
                self.stats.add("failed_store_ops", 1)
            elif d.copied:  # a replicated world's other ranks copy nothing
                self.stats.add("stored_blocks", len(d.op.blocks))
            if d.request_idle and d.op.req_id in self._delayed:
                self._delayed.discard(d.op.req_id)
                self._sending.add(d.op.req_id)

    def get_finished(self, *, idle_step: bool = False) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose stores (sending) or loads (recving) finished. ``idle_step``: the step
        computed nothing, every scheduled request waits for its KV; then a load in flight is
        waited for, at most :data:`IDLE_STEP_WAIT_S`, instead of returning at once and letting
        the engine spin through idle steps that hold the GIL the copy thread needs."""
        wait_s = IDLE_STEP_WAIT_S if idle_step and self.ops.loads_in_flight else 0.0
        self._completed(self.ops.drain(wait_s))
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return sending or None, recving or None

    def take_failed_recving(self) -> set[str]:
        """Requests reported received (get_finished) whose load failed: recomputed whole."""
        out, self._failed = self._failed, set()
        return out

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
        self.ops.shutdown()
