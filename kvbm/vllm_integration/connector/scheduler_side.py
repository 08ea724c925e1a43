"""The scheduler-role half of DynamoConnector: lookups, load plans and store plans.

Per request it keeps kvbm's own sequence hashes (incremental, salted with the cache salt and
LoRA name), the request's engine block ids as the scheduler output reports them, and how many
of its full blocks have already been offered to the leader for storing. Each step:

* ``get_num_new_matched_tokens`` asks the leader how many blocks past the engine's own hit it
  holds (no side effect), holding back the last block when the whole sequence matched;
* ``update_state_after_alloc`` pins / stages those blocks (``prepare_load``) and records a load
  op into the engine blocks vLLM just allocated;
* ``build_connector_meta`` emits the load ops whose staging finished, store ops for every block
  that this step's forward pass completes, and the preempted / delayed-free request ids.

Loads are always asynchronous (the request waits in WAITING_FOR_REMOTE_KVS). While the leader
is not ready, or gone, the answer is "no external hits" and nothing is stored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from kvbm.hashing import SequenceHasher, salt_hash
from kvbm.leader.client import LeaderClient
from kvbm.leader.registry import Tier
from kvbm.vllm_integration.connector.common import Settings
from kvbm.vllm_integration.connector.metadata import (
    DynamoConnectorMetadata,
    DynamoWorkerMetadata,
    KvbmConnectorStats,
    LoadOp,
    StoreOp,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.vllm")

# A load whose disk staging has not finished after this long is given up (recomputed).
STAGING_TIMEOUT_S = 30.0


@dataclass
class _Match:
    start: int  # first block past the engine's own hit
    host: int
    disk: int


@dataclass
class _PendingLoad:
    op: LoadOp
    since: float
    host: int
    disk: int


@dataclass
class _Req:
    request: "Request"
    hasher: SequenceHasher
    hashes: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    stored: int = -1  # full blocks already offered for storing; -1 until first scheduled
    match: _Match | None = None
    load_op: int = 0  # a prepared load not yet sent to the workers
    inflight: set[int] = field(default_factory=set)  # store ops not yet done on every rank


def cacheable(request: "Request") -> bool:
    """kvbm identifies blocks by token ids only: multimodal and embedding inputs are skipped."""
    return not request.mm_features and request.prompt_embeds is None


class KvbmScheduler:
    """Scheduler-side state of one engine. Not thread-safe (vLLM calls it from one thread)."""

    def __init__(self, settings: Settings, client: LeaderClient, *, events_enabled: bool) -> None:
        self.settings = settings
        self.block_size = settings.block_size
        self.client = client
        self.events_enabled = events_enabled
        self.stats = KvbmConnectorStats()
        self._reqs: dict[str, _Req] = {}
        self._ready_loads: list[LoadOp] = []  # to emit in the next metadata
        self._pending: dict[int, _PendingLoad] = {}  # op id -> load waiting for disk staging
        self._store_owner: dict[int, str] = {}  # store op id -> request id
        self._store_acks: dict[int, int] = {}  # store op id -> ranks that reported it done
        self._delayed: list[str] = []  # delayed frees to announce to the workers
        self._awaiting_free: set[str] = set()  # delayed frees not yet reported done
        self._checked_leader = False
        # Free engine blocks (set by bind_gpu_block_pool when vLLM only admits requests whose whole
        # sequence fits): lets lookups for requests that cannot be admitted be skipped.
        self.free_blocks: Callable[[], int] | None = None
        self.max_model_len = 1 << 62
        self._disabled = False

    # -- helpers -------------------------------------------------------------------------
    def _ready(self) -> bool:
        if self._disabled or not self.client.is_ready():
            return False
        if not self._checked_leader:
            self._checked_leader = True
            st = self.client.status
            if st is not None and st.block_size and st.block_size != self.block_size:
                log.error("kvbm: the leader's block size %d differs from the engine's %d; kvbm disabled",
                          st.block_size, self.block_size)
                self._disabled = True
                return False
        return True

    def _state(self, request: "Request") -> _Req | None:
        st = self._reqs.get(request.request_id)
        if st is None and cacheable(request):
            lora = request.lora_request.lora_name if request.lora_request is not None else None
            st = _Req(request, SequenceHasher(self.block_size, salt_hash(request.cache_salt, lora)))
            self._reqs[request.request_id] = st
        return st

    def _hashes(self, st: _Req, n_blocks: int) -> list[int]:
        """The request's hashes, extended to at least ``n_blocks`` full blocks if known."""
        have = len(st.hashes)
        if have < n_blocks:
            bs = self.block_size
            st.hashes += st.hasher.extend(st.request.all_token_ids[have * bs : n_blocks * bs])
        return st.hashes

    # -- lookups -------------------------------------------------------------------------
    def on_new_request(self, request: "Request") -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if st is None or not self._ready():
            return 0, False
        bs = self.block_size
        num_tokens = request.num_tokens
        if self.free_blocks is not None and self._cannot_fit(num_tokens, num_computed_tokens):
            return 0, False  # vLLM cannot admit it this step anyway: spare the leader round trip
        hashes = self._hashes(st, num_tokens // bs)
        start = num_computed_tokens // bs
        if start >= len(hashes):
            return 0, False
        host, disk = self.client.match(hashes[start:])
        self.stats.add("lookup_tokens", num_tokens - start * bs)
        if host + disk and (start + host + disk) * bs >= num_tokens:
            # The whole sequence matched: hold back one block so vLLM computes a token.
            if disk:
                disk -= 1
            else:
                host -= 1
        if host + disk == 0:
            st.match = None
            return 0, False
        st.match = _Match(start, host, disk)
        return (host + disk) * bs, True

    def _cannot_fit(self, num_tokens: int, num_computed_tokens: int) -> bool:
        """True when the engine pool cannot hold the whole sequence (vLLM admits a request only
        if it can, ``scheduler_reserve_full_isl``), so the lookup would be wasted. A lower bound
        of the blocks vLLM asks for: the sequence minus every block the local hit may cover."""
        assert self.free_blocks is not None
        bs = self.block_size
        need = -(-min(num_tokens, self.max_model_len) // bs) - (num_computed_tokens // bs + 1)
        return need > self.free_blocks()

    def hit_sources(self, request: "Request", num_external_tokens: int) -> dict[Tier, int]:
        """Tokens of the last match per tier (host first: loads take G2 blocks first)."""
        st = self._reqs.get(request.request_id)
        if st is None or st.match is None or num_external_tokens == 0:
            return {}
        host_tokens = min(st.match.host * self.block_size, num_external_tokens)
        out = {Tier.HOST: host_tokens, Tier.DISK: num_external_tokens - host_tokens}
        return {t: n for t, n in out.items() if n}

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return  # also the second call, after an async load finished
        st = self._reqs.get(request.request_id)
        bs = self.block_size
        m = st.match if st is not None else None
        start = m.start if m is not None else 0
        # Every engine block vLLM now treats as loaded; a partial last block (vLLM trimmed the
        # hit) cannot be filled by whole-block loads, so it is reported failed and recomputed.
        engine = blocks.get_block_ids()[0][start : start + -(-num_external_tokens // bs)]
        n = num_external_tokens // bs
        if st is None or m is None or n > m.host + m.disk:
            log.error("kvbm: vLLM allocated %d external tokens for request %s that kvbm did not offer; "
                      "they will be recomputed", num_external_tokens, request.request_id)
            self._emit_load(LoadOp(request.request_id, 0, [], [], engine), 0, 0)
            return
        grant = self.client.prepare_load(st.hashes[m.start : m.start + n])
        k = len(grant.slots)
        op = LoadOp(request.request_id, grant.op_id, grant.slots, engine[:k], engine[k:])
        self.stats.add("hit_host_tokens", min(m.host, n) * bs)
        self.stats.add("hit_disk_tokens", (n - min(m.host, n)) * bs)
        host = min(m.host, k)
        if grant.op_id and not grant.ready:
            st.load_op = grant.op_id
            self._pending[grant.op_id] = _PendingLoad(op, time.monotonic(), host, k - host)
            return
        if not grant.op_id:
            op.failed_blocks = engine
        self._emit_load(op, host, k - host)

    def _emit_load(self, op: LoadOp, host: int, disk: int) -> None:
        if op.op_id:
            self.stats.add("onboard_host_blocks", host)
            self.stats.add("onboard_disk_blocks", disk)
        self.stats.add("load_error_blocks", len(op.failed_blocks))
        self._ready_loads.append(op)

    def _poll_pending(self) -> None:
        if not self._pending:
            return
        ready, failed = self.client.poll_loads(list(self._pending))
        now = time.monotonic()
        for op_id in list(self._pending):
            p = self._pending[op_id]
            if op_id in failed or (op_id not in ready and now - p.since > STAGING_TIMEOUT_S):
                if op_id not in failed:
                    log.warning("kvbm: disk staging of load op %d took over %.0f s; recomputing", op_id, STAGING_TIMEOUT_S)
                    self.client.release(op_id)
                p.op.failed_blocks = p.op.blocks + p.op.failed_blocks
                p.op.op_id, p.op.slots, p.op.blocks = 0, [], []
            elif op_id not in ready:
                continue
            del self._pending[op_id]
            st = self._reqs.get(p.op.req_id)
            if st is not None:
                st.load_op = 0
            self._emit_load(p.op, p.host, p.disk)

    # -- per step ------------------------------------------------------------------------
    def build_connector_meta(self, so: "SchedulerOutput") -> DynamoConnectorMetadata:
        self._poll_pending()
        meta = DynamoConnectorMetadata(loads=self._ready_loads, delayed_free=self._delayed)
        self._ready_loads, self._delayed = [], []
        for req_id in so.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            meta.preempted.append(req_id)
            if st is not None:
                # Its blocks went back to the pool; the workers finish the stores still
                # reading them before this step's forward pass (handle_preemptions).
                st.block_ids, st.stored, st.inflight = [], -1, set()
        tokens = so.num_scheduled_tokens
        plans: list[tuple[_Req, int, int]] = []
        for nr in so.scheduled_new_reqs:
            st = self._reqs.get(nr.req_id)
            if st is not None:
                st.block_ids = list(nr.block_ids[0])
                st.stored = nr.num_computed_tokens // self.block_size
                self._plan_stores(st, nr.num_computed_tokens + tokens[nr.req_id], plans)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
                st.stored = cached.num_computed_tokens[i] // self.block_size
            elif new_ids is not None:
                st.block_ids += new_ids[0]
            self._plan_stores(st, cached.num_computed_tokens[i] + tokens[req_id], plans)
        if plans:
            self._allocate_stores(plans, meta)
        return meta

    def _plan_stores(self, st: _Req, computed_after: int, plans: list[tuple[_Req, int, int]]) -> None:
        """Plan storing the full blocks this step completes (only those whose tokens are known)."""
        bs = self.block_size
        n_full = min(computed_after, st.request.num_tokens, len(st.block_ids) * bs) // bs
        first = st.stored
        if n_full <= first or first < 0:
            return
        st.stored = n_full
        self._hashes(st, n_full)
        plans.append((st, first, n_full))

    def _allocate_stores(self, plans: list[tuple[_Req, int, int]], meta: DynamoConnectorMetadata) -> None:
        """One leader round trip for every request's new blocks, then a store op per request."""
        chains = [(st.hashes[first:n], st.hashes[first - 1] if first else 0) for st, first, n in plans]
        for (st, first, _n), grant in zip(plans, self.client.allocate_stores(chains)):
            if not grant.op_id:
                continue
            pairs = [(st.block_ids[first + i], s) for i, s in enumerate(grant.slots) if s >= 0]
            req_id = st.request.request_id
            meta.stores.append(StoreOp(req_id, grant.op_id, [b for b, _ in pairs], [s for _, s in pairs]))
            st.inflight.add(grant.op_id)
            self._store_owner[grant.op_id] = req_id
            self.stats.add("offload_blocks", len(pairs))

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        self._awaiting_free.difference_update(output.finished_sending or ())
        meta = output.kv_connector_worker_meta
        if not isinstance(meta, DynamoWorkerMetadata):
            return
        world = self.settings.world_size
        for op_id, n in meta.stores_done.items():
            acks = self._store_acks.get(op_id, 0) + n
            if acks < world:
                self._store_acks[op_id] = acks
                continue
            self._store_acks.pop(op_id, None)
            st = self._reqs.get(self._store_owner.pop(op_id, ""))
            if st is not None:
                st.inflight.discard(op_id)

    def request_finished(self, request: "Request") -> bool:
        """True (keep the blocks) while a store reads from this request's engine blocks."""
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False
        if st.load_op:
            # Aborted while its blocks were being staged from disk: give the op up and let
            # the workers report the request as received, so vLLM frees its blocks.
            self._pending.pop(st.load_op, None)
            self.client.release(st.load_op)
            self._ready_loads.append(LoadOp(request.request_id, 0, [], [], []))
        if st.inflight:
            self._delayed.append(request.request_id)
            self._awaiting_free.add(request.request_id)
            return True
        return False

    # -- stats, events, reset ------------------------------------------------------------
    def take_stats(self) -> KvbmConnectorStats | None:
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, KvbmConnectorStats()
        return out

    def take_events(self) -> Iterable["KVCacheEvent"]:
        if not self.events_enabled:
            return ()
        reply = self.client.take_events()
        if reply is None or not reply.kinds:
            return ()
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        from kvbm.ipc.messages import unpack_hashes

        hashes = unpack_hashes(reply.hashes)
        parents = unpack_hashes(reply.parents)
        events: list[KVCacheEvent] = []
        for kind, tier, h, parent in zip(reply.kinds, reply.tiers, hashes, parents):
            medium = Tier(tier).medium
            if kind == 0:
                events.append(BlockStored(block_hashes=[h], parent_block_hash=parent or None, token_ids=[],
                                          block_size=self.block_size, lora_id=None, medium=medium, lora_name=None))
            elif kind == 1:
                events.append(BlockRemoved(block_hashes=[h], medium=medium))
            else:
                events.append(AllBlocksCleared())
        return events

    def reset_cache(self) -> bool:
        return self.client.reset_cache()

    def has_pending_block_frees(self) -> bool:
        """Finished requests whose blocks come back once their stores finish (soon)."""
        return bool(self._awaiting_free)

    def shutdown(self) -> None:
        for op_id in list(self._pending):
            self.client.release(op_id)
        self._pending.clear()
        self.client.close()
