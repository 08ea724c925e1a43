"""DynamoConnector: kvbm as a vLLM ``KVConnectorBase_V1`` (0.32 CPU, 0.33 CUDA: :mod:`.versions`).

Load it with ``--kv-transfer-config '{"kv_connector":"DynamoConnector","kv_role":"kv_both",
"kv_connector_module_path":"kvbm.vllm_integration.connector"}'``. vLLM builds one instance per
worker (role WORKER) and one in the scheduler (role SCHEDULER); the roles' work lives in
:mod:`.worker_side` and :mod:`.scheduler_side`, this class only routes vLLM's calls.

Start-up follows vLLM's order: every worker registers its KV caches before the scheduler
exists, so a worker never waits: rank 0's ``register_kv_caches`` spawns the engine's leader
and each rank's init sync runs in the background. The scheduler's connector, the engine's last
start-up step, then waits until the leader and every rank are ready (and the index replica is
current), at most ``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``: the engine serves no request
before kvbm is ready, and at the deadline :class:`~kvbm.connector.bootstrap.KvbmNotReady`
fails the engine's start with one line naming what was missing. The instance that spawned the
leader stops it in ``shutdown`` (or at interpreter exit).

The connector supports vLLM's hybrid KV cache manager (``SupportsHMA``), so configuring kvbm
leaves it on: hybrid models get one kvbm block per (KV cache group, block), see
:func:`~kvbm.vllm_integration.connector.common.kv_groups` for which groups kvbm offloads.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any, Iterable

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbm.connector.bootstrap import KvbmNotReady, ensure_leader, stop_leader
from kvbm.leader.client import LeaderClient
from kvbm.leader.registry import Tier
from kvbm.vllm_integration.connector.common import (
    UnsupportedSetup,
    check_supported,
    model_kv_heads,
    settings_for,
    sync_host_loads,
    worker_rank,
)
from kvbm.vllm_integration.connector.metadata import (
    DynamoConnectorMetadata,
    KvbmConnectorStats,
)
from kvbm.vllm_integration.connector.scheduler_side import KvbmScheduler
from kvbm.vllm_integration.connector.versions import check_version
from kvbm.vllm_integration.connector.worker_side import KvbmWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.vllm")

# What vLLM's cache-hit metrics call each kvbm tier. vLLM has no object-store medium: G4 (blocks
# another instance may have put in an S3-compatible store) is reported as EXTERNAL_UNSPECIFIED,
# the source vLLM documents for a remote store. It is the outermost source, as G4 is past G3, so a
# request served from G3 and G4 reports the farther one; calling G4 DISK would credit the local
# disk with blocks that came over the network.
_HIT_SOURCE = {Tier.HOST: CacheHitSource.HOST, Tier.DISK: CacheHitSource.DISK,
               Tier.OBJECT: CacheHitSource.EXTERNAL_UNSPECIFIED}


class DynamoConnector(KVConnectorBase_V1, SupportsHMA):
    """kvbm's G2 (host) / G3 (disk) KV cache behind vLLM's KV connector API."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        check_version(vllm.__version__)
        self.settings = settings_for(vllm_config, kv_cache_config)  # ConfigError on bad DYN_KVBM_*
        self.scheduler: KvbmScheduler | None = None
        self.worker: KvbmWorker | None = None
        self._owns_leader = False
        self._finalizer: weakref.finalize | None = None
        try:
            groups = check_supported(vllm_config, kv_cache_config)
            if role == KVConnectorRole.SCHEDULER:
                self._take_leader()
                kvec = vllm_config.kv_events_config
                events = kvec is not None and bool(kvec.enable_kv_cache_events)
                self.scheduler = KvbmScheduler(self.settings, LeaderClient(self.settings.endpoint),
                                               events_enabled=events, groups=groups,
                                               sync_host_loads=sync_host_loads(self.settings.config, vllm_config))
                try:
                    self.scheduler.wait_until_ready()
                except KvbmNotReady:
                    self.shutdown()  # the engine does not start: leave no thread or leader behind
                    raise
            else:
                self.worker = KvbmWorker(self.settings, worker_rank(vllm_config, self.settings.world_size),
                                         hybrid=len(groups.order) > 1, kv_heads=model_kv_heads(vllm_config))
        except UnsupportedSetup as e:
            log.error("kvbm: %s; the engine runs without kvbm", e)

    def _take_leader(self) -> None:
        if ensure_leader(self.settings):
            self._owns_leader = True
            self._finalizer = weakref.finalize(self, stop_leader, self.settings.endpoint)

    @property
    def requires_kv_delivery(self) -> bool:
        # kvbm is a best-effort cache: a store dropped at preemption is a future miss only.
        return False

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self._finalizer is not None:
            self._finalizer()  # stops the leader we spawned (once)

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        if self.worker is None:
            return
        if self.worker.rank == 0:
            self._take_leader()
        self.worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks)

    def _meta(self) -> DynamoConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, DynamoConnectorMetadata)
        return meta

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, DynamoConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Asynchronous loads finish before their request's forward pass; synchronous ones (whole
        # blocks, every layer) before any layer, in start_load_kv.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        # Stores are submitted once per step in wait_for_save, after every layer is written.
        return

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        meta = self._connector_metadata  # bound by the model runner for the step's connector calls
        return self.worker.get_finished(idle_step=isinstance(meta, DynamoConnectorMetadata) and meta.idle)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        # A hybrid model's failed loads are failed requests (vLLM refuses block-level load
        # errors when there are several KV cache groups); they are also among finished_recving.
        sending, recving = self.get_finished(finished_req_ids)
        failed = self.worker.take_failed_recving() if self.worker is not None else set()
        return KVConnectorTransferResults(finished_sending=set(sending or ()), finished_recving=set(recving or ()),
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        return self.worker.take_worker_meta() if self.worker is not None else None

    # -- scheduler side ------------------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool: "BlockPool") -> None:
        sc = self._vllm_config.scheduler_config
        if self.scheduler is not None and getattr(sc, "scheduler_reserve_full_isl", False):
            self.scheduler.planner.free_blocks = gpu_block_pool.get_num_free_blocks
            self.scheduler.planner.max_model_len = self._vllm_config.model_config.max_model_len

    def on_new_request(self, request: "Request") -> None:
        if self.scheduler is not None:
            self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.scheduler is None:
            return 0, False
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int) -> dict[CacheHitSource, int]:
        if self.scheduler is None:
            return {}
        return {_HIT_SOURCE[t]: n for t, n in self.scheduler.hit_sources(request, num_external_tokens).items()}

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if self.scheduler is not None:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self.scheduler is None:
            return DynamoConnectorMetadata()
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self.scheduler is not None:
            self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is None:
            return False, None
        return self.scheduler.request_finished(request), None

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        # The planner keeps every group's block ids itself: the decision is per request.
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def has_pending_block_frees(self) -> bool:
        # Stores finish within milliseconds: waiting for their blocks beats preempting a request.
        return self.scheduler.has_pending_block_frees() if self.scheduler is not None else False

    def has_pending_push_work(self) -> bool:
        return self.scheduler.has_pending_work() if self.scheduler is not None else False

    def take_events(self) -> Iterable["KVCacheEvent"]:
        return self.scheduler.take_events() if self.scheduler is not None else ()

    def reset_cache(self) -> bool | None:
        return self.scheduler.reset_cache() if self.scheduler is not None else False

    # -- stats ---------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.scheduler or self.worker
        return side.take_stats() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvbmConnectorStats(data=dict(data or {}))
