"""The engine-neutral worker side every engine adapter uses: one rank's loads and stores.

The copies run on the rank agent's thread (:mod:`kvbm.worker.agent`); this class attaches the
engine's KV tensors to a rank agent (NumPy copies for host memory, CuPy for GPU memory), submits
the :class:`~kvbm.connector.ops.StepPlan` ops, keeps them while in flight (stores also per
request: a request's engine blocks must not be freed or overwritten while a store reads them)
and turns the agent's completions into typed records. Adapters (vLLM's worker side,
TensorRT-LLM's worker) translate these into what their engine asks for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection

from kvbm.config import KvbmConfig
from kvbm.connector.ops import LOAD_WAIT_S, LoadOp, StoreOp
from kvbm.ipc.block_format import choose_heads
from kvbm.worker.agent import RankAgent, RankIdentity, numpy_engine
from kvbm.worker.layout import EngineKV, LayoutError

log = logging.getLogger("kvbm.connector")

WAIT_SLICE_S = 0.05  # the longest one blocking take of completions in WorkerOps.wait


@dataclass(frozen=True)
class LoadDone:
    op: LoadOp
    ok: bool


@dataclass(frozen=True)
class StoreDone:
    """``request_idle``: no other store of ``op.req_id`` is in flight on this rank any more;
    ``copied`` False: done without a copy (another rank writes a replicated world's blocks)."""

    op: StoreOp
    ok: bool
    request_idle: bool
    copied: bool = True


class WorkerOps:
    """One rank's connector state shared by every engine. Not thread-safe: the engine's
    model-runner (executor) thread owns it."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.agent: RankAgent | None = None
        self.error: str | None = None  # why kvbm is off on this rank
        self._loads: dict[int, LoadOp] = {}  # op id -> load in flight
        self._stores: dict[int, StoreOp] = {}  # op id -> store in flight
        self._req_stores: dict[str, set[int]] = {}  # request -> its stores in flight

    def attach(self, sample: Any, build: Callable[[Any], Any], *, endpoint: str, identity: RankIdentity,
               config: KvbmConfig, what: str) -> None:
        """Describe this rank's KV tensors and start the init sync in the background.

        ``build(cls)`` returns the view of the engine's tensors through ``cls``'s constructor
        (``from_layers`` / ``from_contiguous``): :class:`~kvbm.worker.layout.EngineKV` when
        ``sample`` (one of the tensors) is in host memory, ``EngineKVDevice`` when it is a GPU
        tensor. A layout kvbm cannot use turns kvbm off on this rank (``error``, logged, naming
        ``what`` the tensors are); the engine serves on without it.
        """
        factory: Any  # a CopyEngineFactory over EngineKV or EngineKVDevice
        try:
            if getattr(sample, "is_cuda", False):
                from kvbm.worker.cuda_copy import EngineKVDevice, cuda_engine

                kv, factory = build(EngineKVDevice), cuda_engine
            else:
                kv, factory = build(EngineKV), numpy_engine
        except (LayoutError, ImportError, RuntimeError) as e:
            self.error = f"kvbm cannot use {what}: {type(e).__name__}: {e}"
            log.error("rank %d: %s; serving without kvbm", self.rank, self.error)
            return
        # DYN_KVBM_BLOCK_FORMAT decides whether the rank's heads shape the block (every rank of
        # a world decides alike: they hold equal shares of the heads).
        identity = replace(identity, heads=choose_heads(identity.heads, identity.block_size, config.block_format))
        self.agent = RankAgent(endpoint, identity, kv, init_timeout_s=config.init_timeout_s,
                               heartbeat_interval_s=config.heartbeat_interval_s,
                               liveness_timeout_s=config.liveness_timeout_s, engine_factory=factory)
        self.agent.start()

    # -- submitting ----------------------------------------------------------------------
    def submit_load(self, op: LoadOp) -> bool:
        """Start copying a load; False (nothing started) for an empty op or with kvbm off."""
        if not op.op_id or self.agent is None:
            return False
        self._loads[op.op_id] = op
        self.agent.submit_load(op.op_id, op.slots, op.blocks)
        return True

    def submit_store(self, op: StoreOp) -> bool:
        """Start copying a store (after the forward pass wrote its blocks); False with kvbm off."""
        if self.agent is None:
            return False
        self._stores[op.op_id] = op
        self._req_stores.setdefault(op.req_id, set()).add(op.op_id)
        self.agent.submit_store(op.op_id, op.blocks, op.slots)
        return True

    # -- completions ---------------------------------------------------------------------
    def drain(self, wait_s: float = 0.0) -> list[LoadDone | StoreDone]:
        """Ops finished since the last call, in completion order; ``wait_s``: wait up to that long
        for a first one when none has finished yet."""
        if self.agent is None:
            return []
        out: list[LoadDone | StoreDone] = []
        for f in self.agent.take_finished(wait_s):
            if f.kind == "load":
                load = self._loads.pop(f.op_id, None)
                if load is not None:
                    out.append(LoadDone(load, f.ok))
                continue
            store = self._stores.pop(f.op_id, None)
            if store is None:
                continue
            ops = self._req_stores[store.req_id]
            ops.discard(f.op_id)
            if not ops:
                del self._req_stores[store.req_id]
            out.append(StoreDone(store, f.ok, not ops, f.copied))
        return out

    def storing(self, req_id: str) -> bool:
        """A store of this request is still in flight on this rank."""
        return req_id in self._req_stores

    @property
    def loads_in_flight(self) -> int:
        return len(self._loads)

    @property
    def stores_in_flight(self) -> int:
        return len(self._stores)

    def forget_loads(self) -> list[LoadOp]:
        """Stop waiting for the loads in flight (given up); returns them."""
        out = list(self._loads.values())
        self._loads.clear()
        return out

    def forget_stores(self) -> list[StoreOp]:
        """Stop waiting for the stores in flight (given up); returns them."""
        out = list(self._stores.values())
        self._stores.clear()
        self._req_stores.clear()
        return out

    def wait(self, done: Callable[[], bool], on_drained: Callable[[list[LoadDone | StoreDone]], None], *,
             timeout_s: float | None, warn_every_s: float, what: str) -> bool:
        """Drain completions (handed to ``on_drained``) until ``done()``; False at ``timeout_s``.
        Logs every ``warn_every_s`` while waiting for ``what``. Blocks on the agent's queue of
        completions (woken by the next one, the GIL free for the copy thread), never a sleep."""
        t0 = time.monotonic()
        next_warn = t0 + warn_every_s
        while not done():
            now = time.monotonic()
            if timeout_s is not None and now - t0 > timeout_s:
                return False
            if now > next_warn:
                log.warning("rank %d: still waiting for %s after %.0f s", self.rank, what, now - t0)
                next_warn += warn_every_s
            on_drained(self.drain(WAIT_SLICE_S))
        return True

    def wait_loads(self, on_drained: Callable[[list[LoadDone | StoreDone]], None]) -> list[LoadOp]:
        """Block until no load is in flight (a forward pass reads their blocks next), at most
        :data:`~kvbm.connector.ops.LOAD_WAIT_S`; returns the loads given up then (logged)."""
        if self.wait(lambda: not self.loads_in_flight, on_drained, timeout_s=LOAD_WAIT_S,
                     warn_every_s=LOAD_WAIT_S, what="loads"):
            return []
        given_up = self.forget_loads()
        log.error("rank %d: %d loads still running after %.0f s; their blocks count as failed",
                  self.rank, len(given_up), LOAD_WAIT_S)
        return given_up

    def wait_stores_of(self, req_ids: Collection[str], on_drained: Callable[[list[LoadDone | StoreDone]], None]) -> None:
        """Block until no store of ``req_ids`` is in flight (their blocks are about to be reused)."""
        self.wait(lambda: not any(self.storing(r) for r in req_ids), on_drained, timeout_s=None,
                  warn_every_s=10.0, what="stores of preempted requests")

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
