"""DynamoKVBMConnectorLeader: TensorRT-LLM's scheduler-side calls, translated for the planner.

All the planning is the engine-neutral :class:`kvbm.connector.planner.Planner`; this class
turns TensorRT-LLM's ``LlmRequest`` and ``SchedulerOutput`` into planner calls. Where
TensorRT-LLM differs from vLLM:

* it has no load-error path (a promised block that cannot be loaded would be used as is), so a
  lookup is firm: ``Planner.lookup_pinned`` pins (and stages from disk) before answering, and
  loads are synchronous (``(n, False)``): the load ops go out with this step's metadata and the
  workers finish them before the layers run;
* its workers report per request, never per store op, so the planner runs with
  ``store_acks=False`` and ``request_finished`` keeps the blocks of any request with stores sent;
* ``build_connector_meta`` waits (bounded) for the leader's replies to what the step posted,
  because an idle engine calls it no more: no reply may be left for a later step;
* it calls ``wait_for_initialization`` once, after every rank registered its KV pool and before
  the first request: kvbm blocks there until the leader and every rank are ready, so the first
  request is already served by kvbm (or the engine does not start, saying why).
"""

from __future__ import annotations

import atexit
import logging
from typing import Any, List

from kvbm.connector.bootstrap import Instance, ensure_leader, stop_leader, wait_until_ready
from kvbm.connector.index import IndexFollower, follower_for
from kvbm.connector.ops import StepPlan
from kvbm.connector.planner import Planner, ScheduledRequest
from kvbm.hashing import salt_hash
from kvbm.leader.client import LeaderClient
from kvbm.trtllm_integration.connector.interface import KvCacheConnectorScheduler, SchedulerOutput
from kvbm.trtllm_integration.connector.settings import UnsupportedSetup, settings_for

log = logging.getLogger("kvbm.trtllm")

# Longest wait on the scheduler thread for the leader's replies of one step (pins of a firm
# lookup, disk staging, store allocations); past it the step goes on without them.
REPLY_WAIT_S = 5.0


def _salt(request: Any) -> str | int | None:
    """The request's cache salt: ``cache_salt`` (newer TensorRT-LLM) or ``cache_salt_id``."""
    salt = getattr(request, "cache_salt", None)
    return salt if salt is not None else getattr(request, "cache_salt_id", None)


class DynamoKVBMConnectorLeader(KvCacheConnectorScheduler):
    """kvbm's scheduler-side connector (rank 0). Not thread-safe (one scheduler thread)."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.instance: Instance | None = None
        self.planner: Planner | None = None
        self.follower: IndexFollower | None = None
        self._owns_leader = False
        self._external: dict[int, int] = {}  # request id -> tokens it loads (this step's new requests)
        self._dropped: dict[int, bool] = {}  # requests kvbm stopped tracking -> keep their blocks at finish
        # Each tracked request's tokens, kept current from RequestData.new_tokens: the binding's
        # get_tokens(0) returns a copy, not a live view.
        self._tokens: dict[int, list[int]] = {}
        try:
            inst, _rank = settings_for(llm_args)
        except UnsupportedSetup as e:
            log.error("kvbm: %s; serving without kvbm", e)
            return
        self.instance = inst
        # A leader that cannot start is logged here and fails wait_for_initialization.
        self._owns_leader = ensure_leader(inst)
        self.follower = follower_for(inst.config, inst.endpoint)
        replica = self.follower.replica if self.follower is not None else None
        self.planner = Planner(inst.block_size, inst.world_size, LeaderClient(inst.endpoint), replica=replica,
                               store_acks=False)
        atexit.register(self.shutdown)

    def wait_for_initialization(self) -> None:
        """Block until the leader has every rank's pool and the index replica is current, at
        most ``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``. TensorRT-LLM calls this once on the
        scheduler's rank, after every rank's ``register_kv_caches`` and before serving.

        Raises :class:`kvbm.connector.bootstrap.KvbmNotReady` (one line: the variable, its value,
        what was missing) at the deadline, so the engine does not start with kvbm silently off.
        With kvbm off for an unsupported setup (already logged) it returns at once.
        """
        if self.instance is None or self.planner is None:
            return
        follower = self.follower
        wait_until_ready(self.instance, self.planner.client, what="TensorRT-LLM's KV cache connector",
                         then=follower.sync if follower is not None else None)

    # -- lookups -------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens kvbm holds past the engine's own hit, pinned already; loads are synchronous."""
        p = self.planner
        if p is None or request.is_generation_only_request or request.multimodal_positions:
            return 0, False  # decode of a disaggregated request / inputs not identified by tokens
        req_id = str(request.request_id)
        if not p.tracked(req_id):
            tokens = self._tokens[request.request_id] = list(request.get_tokens(0))
            p.add(req_id, tokens, salt_hash(_salt(request)))
        if num_computed_tokens % p.block_size:
            return 0, False  # partial reuse: kvbm loads whole blocks only
        n = p.lookup_pinned(req_id, num_computed_tokens, REPLY_WAIT_S)
        if n:
            self._external[request.request_id] = n
        return n, False

    def update_state_after_alloc(self, request: Any, block_ids: List[int]) -> None:
        n = self._external.get(request.request_id, 0)
        if self.planner is not None and n:
            self.planner.load_after_alloc(str(request.request_id), block_ids, n)

    def update_state_after_alloc_by_layer_group(self, request: Any, block_ids_by_layer_group: List[List[int]]) -> None:
        """One layer group: the flat form. Several (VSWA) only reach a scheduler that declined
        the model (kvbm off, already logged): nothing was offered, nothing to load."""
        if len(block_ids_by_layer_group) == 1:
            self.update_state_after_alloc(request, block_ids_by_layer_group[0])
        elif self.planner is not None:
            raise RuntimeError(f"kvbm serves one KV layer group; request {request.request_id} has "
                               f"{len(block_ids_by_layer_group)} (its workers refuse such a pool at start)")

    # -- per step ------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepPlan:
        """This step's plan (plain data, pickled to every rank by TensorRT-LLM)."""
        p = self.planner
        if p is None:
            return StepPlan()
        scheduled = []
        for rd in scheduler_output.new_requests + scheduler_output.cached_requests:
            if any(b < 0 for b in rd.new_block_ids) and rd.request_id not in self._dropped:
                # -1: a page outside an attention window. kvbm caches whole prefixes only: it
                # stops storing this request (its stores sent so far still count at finish).
                self._dropped[rd.request_id] = p.finished(str(rd.request_id))
        for rd in scheduler_output.new_requests:
            tokens = self._tokens.get(rd.request_id)
            if tokens is not None:
                tokens[:] = rd.new_tokens  # a request's first report carries all its tokens
            # TensorRT-LLM reports a request's first computed position without the tokens the
            # connector loads this step; kvbm counts them as computed (they are not stored again).
            computed = rd.computed_position + self._external.pop(rd.request_id, 0)
            scheduled.append(ScheduledRequest(str(rd.request_id), computed, rd.num_scheduled_tokens,
                                              list(rd.new_block_ids), True))
        for rd in scheduler_output.cached_requests:
            tokens = self._tokens.get(rd.request_id)
            if tokens is not None:
                tokens += rd.new_tokens
            scheduled.append(ScheduledRequest(str(rd.request_id), rd.computed_position, rd.num_scheduled_tokens,
                                              list(rd.new_block_ids)))
        self._external.clear()
        plan = p.step(scheduled)
        # An idle engine does not call this again: take every reply to what the step posted.
        plan.extend(p.settle(REPLY_WAIT_S))
        return plan

    def request_finished(self, request: Any, cache_block_ids: List[int]) -> bool:
        """True (TensorRT-LLM keeps the blocks) while a store may read this request's blocks;
        the workers report it from ``get_finished`` once their stores of it are done."""
        self._external.pop(request.request_id, None)
        self._tokens.pop(request.request_id, None)
        if request.request_id in self._dropped:
            return self._dropped.pop(request.request_id)
        return self.planner.finished(str(request.request_id)) if self.planner is not None else False

    def request_finished_by_layer_group(self, request: Any, cache_block_ids_by_layer_group: List[List[int]]) -> bool:
        """One layer group: the flat form. Several: kvbm stored nothing (it declined the model),
        so the engine may free the pages at once."""
        if len(cache_block_ids_by_layer_group) == 1:
            return self.request_finished(request, cache_block_ids_by_layer_group[0])
        return False

    def shutdown(self) -> None:
        """Stop following the leader, release what is pending, stop the leader this spawned."""
        if self.follower is not None:
            self.follower.stop()
            self.follower = None
        if self.planner is not None:
            self.planner.shutdown()
            self.planner = None
        if self._owns_leader and self.instance is not None:
            self._owns_leader = False
            stop_leader(self.instance.endpoint)
