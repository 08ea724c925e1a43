"""The scheduler-role half of DynamoConnector: vLLM's scheduler calls, translated for the planner.

All the planning (hashing, hold-back of the last block, match, load and store plans, ack
counting, delayed frees, preemption) is the engine-neutral :class:`kvbm.connector.planner.Planner`;
this class turns vLLM's ``Request``, ``KVCacheBlocks``, ``SchedulerOutput`` and
``KVConnectorOutput`` into planner calls, and the leader's block events into vLLM's KV events.
Under vLLM's hybrid KV cache manager every block list is per KV cache group; the planner gets
them in :class:`~kvbm.vllm_integration.connector.common.KVGroups` order.

Loads: G3/G4 hits are asynchronous (the request waits, its blocks are pinned and staged, the
worker reports it received). With the KV in host memory (vLLM's CPU backend) a hit wholly in G2
is synchronous: pinned at lookup, copied by the worker right before the forward pass that
computes the request, so its first token comes one step earlier.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Iterable

from kvbm.connector.ops import IDLE_STEP_WAIT_S
from kvbm.connector.index import follower_for
from kvbm.connector.planner import Planner, ScheduledRequest
from kvbm.hashing import salt_hash
from kvbm.leader.client import LeaderClient
from kvbm.leader.registry import Tier
from kvbm.connector.bootstrap import Instance, wait_until_ready
from kvbm.vllm_integration.connector.common import KVGroups
from kvbm.vllm_integration.connector.metadata import (
    DynamoConnectorMetadata,
    DynamoWorkerMetadata,
    KvbmConnectorStats,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.vllm")

SYNC_PIN_WAIT_S = 0.05
"""How long a synchronous load's pin may wait for staging: none for a G2 hit; a block that moved
to G3 since the lookup is a miss after this, the scheduler thread is not held for a disk read."""


def cacheable(request: "Request") -> bool:
    """kvbm identifies blocks by token ids only: multimodal and embedding inputs are skipped."""
    return not request.mm_features and request.prompt_embeds is None


class KvbmScheduler:
    """Scheduler-side state of one engine. Not thread-safe (vLLM calls it from one thread)."""

    def __init__(self, settings: Instance, client: LeaderClient, *, events_enabled: bool,
                 groups: KVGroups = KVGroups((0,), (None,)), sync_host_loads: bool = False) -> None:
        """``sync_host_loads``: a hit wholly in G2 is pinned at lookup and loaded in the step that
        computes the request (vLLM's synchronous load), not a step ahead: for engines whose KV
        is in host memory, where the load is a memcpy that no computation could overlap."""
        self.settings = settings
        self.groups = groups
        self.multi = len(groups.order) > 1
        # A hybrid model's failed loads are failed requests, which vLLM takes for async loads only.
        self.sync_host_loads = sync_host_loads and not self.multi
        self.block_size = settings.block_size
        self.client = client
        self.events_enabled = events_enabled
        self._backlog: list[dict[str, Any]] = []  # events taken at start-up, forwarded with the first step's
        # Lookups answer from a local replica of the leader's index (DYN_KVBM_INDEX_REPLICA).
        self.follower = follower_for(settings.config, settings.endpoint)
        replica = self.follower.replica if self.follower is not None else None
        self.planner = Planner(settings.block_size, settings.world_size, client, replica=replica,
                               windows=groups.windows)

    # -- lookups -------------------------------------------------------------------------
    def _track(self, request: "Request") -> bool:
        if self.planner.tracked(request.request_id):
            return True
        if not cacheable(request):
            return False
        lora = request.lora_request.lora_name if request.lora_request is not None else None
        # all_token_ids is a live view: it grows with the request's output tokens.
        self.planner.add(request.request_id, request.all_token_ids, salt_hash(request.cache_salt, lora))
        return True

    def on_new_request(self, request: "Request") -> None:
        self._track(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._track(request):
            return 0, False
        req_id = request.request_id
        n = self.planner.lookup(req_id, num_computed_tokens)
        if self.planner.not_yet(req_id):
            return None, False  # the object store is being asked: vLLM asks again next step
        if n and self.sync_host_loads and self.planner.match_in_host(req_id):
            # One leader round trip now instead of a step spent waiting for the load: what
            # is pinned is what the engine is told, and the copy precedes the forward pass.
            return self.planner.pin_match(req_id, SYNC_PIN_WAIT_S), False
        return n, n > 0  # G3/G4 hits (staged from disk or the store first) load asynchronously

    def hit_sources(self, request: "Request", num_external_tokens: int) -> dict[Tier, int]:
        return self.planner.hit_sources(request.request_id, num_external_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        # num_external_tokens == 0 also on the second call, after an async load finished.
        if not num_external_tokens:
            return
        if self.multi:
            first, *rest = self.groups.pick(blocks.get_block_ids())
            self.planner.load_after_alloc(request.request_id, first, num_external_tokens, rest)
        else:
            self.planner.load_after_alloc(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    # -- per step ------------------------------------------------------------------------
    def build_connector_meta(self, so: "SchedulerOutput") -> DynamoConnectorMetadata:
        tokens = so.num_scheduled_tokens
        if self.multi:
            scheduled = self._scheduled_groups(so)
        else:
            scheduled = [ScheduledRequest(nr.req_id, nr.num_computed_tokens, tokens[nr.req_id], nr.block_ids[0], True)
                         for nr in so.scheduled_new_reqs]
            cached = so.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                new_ids = cached.new_block_ids[i]
                scheduled.append(ScheduledRequest(req_id, cached.num_computed_tokens[i], tokens[req_id],
                                                  new_ids[0] if new_ids is not None else None,
                                                  req_id in cached.resumed_req_ids))
        # A step that computes nothing waits briefly for the pins of its loads (posted while
        # scheduling it), so the loads go to the workers in this step, not the next one.
        idle = so.total_num_scheduled_tokens == 0
        wait_s = IDLE_STEP_WAIT_S if idle and self.planner.loads_pending() else 0.0
        plan = self.planner.step(scheduled, list(so.preempted_req_ids or ()), wait_s=wait_s)
        return DynamoConnectorMetadata(plan.loads, plan.stores, plan.preempted, plan.delayed_free, idle=idle)

    def _scheduled_groups(self, so: "SchedulerOutput") -> list[ScheduledRequest]:
        """The step's requests with every KV cache group's new blocks (hybrid models)."""
        tokens = so.num_scheduled_tokens
        scheduled = []
        for nr in so.scheduled_new_reqs:
            first, *rest = self.groups.pick(nr.block_ids)
            scheduled.append(ScheduledRequest(nr.req_id, nr.num_computed_tokens, tokens[nr.req_id], first, True, rest))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            groups: list[list[int] | None] = list(self.groups.pick(new_ids)) if new_ids is not None else [None]
            scheduled.append(ScheduledRequest(req_id, cached.num_computed_tokens[i], tokens[req_id], groups[0],
                                              req_id in cached.resumed_req_ids,
                                              groups[1:] or [None] * (len(self.groups.order) - 1)))
        return scheduled

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        self.planner.blocks_freed(list(output.finished_sending or ()))
        meta = output.kv_connector_worker_meta
        if isinstance(meta, DynamoWorkerMetadata):
            self.planner.stores_done(meta.stores_done)

    def request_finished(self, request: "Request") -> bool:
        """True (keep the blocks) while a store reads from this request's engine blocks."""
        return self.planner.finished(request.request_id)

    # -- stats, events, reset ------------------------------------------------------------
    def take_stats(self) -> KvbmConnectorStats | None:
        counters = dataclasses.asdict(self.planner.take_counters())
        for key in ("remote_lookups", "index_waits", "pin_shortfall_blocks", "staging_failures"):
            counters.pop(key, None)  # not among the connector's reported stats
        data = {k: n for k, n in counters.items() if n}
        return KvbmConnectorStats(data=data) if data else None

    def take_events(self) -> Iterable["KVCacheEvent"]:
        """The leader's block events as vLLM KV events, stored blocks with their token ids (none
        for a salted or LoRA request's: see :mod:`kvbm.leader.events`), chained stores of one
        tier as one ``BlockStored``, as the leader publishes them on its own endpoint."""
        if not self.events_enabled:
            return ()
        maps, self._backlog = self._backlog + self.planner.take_events(), []
        if not maps:
            return ()
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        kinds = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}
        return [kinds[e.pop("type")](**e) for e in maps]

    def reset_cache(self) -> bool:
        return self.planner.reset_cache()

    def wait_until_ready(self) -> None:
        """Block until the leader has every rank and the index replica, if any, holds its index,
        at most DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS; :class:`KvbmNotReady` at the deadline."""
        then = self.follower.sync if self.follower is not None else None
        wait_until_ready(self.settings, self.client, what="vLLM engine", then=then)
        if self.events_enabled:
            # Before the first request: from this call on the leader keeps the token ids of
            # the blocks it stores, which the events then carry.
            self._backlog = self.planner.take_events()

    def has_pending_block_frees(self) -> bool:
        """Finished requests whose blocks come back once their stores finish (soon)."""
        return self.planner.has_pending_frees()

    def has_pending_work(self) -> bool:
        """Leader replies still to take (vLLM keeps stepping: has_pending_push_work)."""
        return self.planner.busy()

    def shutdown(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.planner.shutdown()
