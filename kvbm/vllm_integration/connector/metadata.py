"""What the scheduler-side connector tells the workers each step, and what they report back.

Everything here is plain data (ints, strings, lists, dicts) so vLLM can pickle it to the
worker processes and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class LoadOp:
    """Host slots -> engine blocks for one request waiting for its external KV.

    ``op_id`` 0 means nothing to copy: the worker only reports the request as received.
    ``failed_blocks`` are engine blocks the scheduler promised to vLLM but kvbm cannot fill
    (fewer slots granted, failed disk staging, leader gone); the worker reports them through
    ``get_block_ids_with_load_errors`` so vLLM recomputes them.
    """

    req_id: str
    op_id: int
    slots: list[int]
    blocks: list[int]
    failed_blocks: list[int] = field(default_factory=list)


@dataclass
class StoreOp:
    """Engine blocks -> host slots, copied after this step's forward pass wrote them."""

    req_id: str
    op_id: int
    blocks: list[int]
    slots: list[int]


@dataclass
class DynamoConnectorMetadata(KVConnectorMetadata):
    """One step's work for every worker (all ranks get the same)."""

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    # Requests preempted this step: their engine blocks may be overwritten by this step's
    # forward pass, so stores still reading them must finish first (handle_preemptions).
    preempted: list[str] = field(default_factory=list)
    # Finished requests whose blocks vLLM keeps (request_finished returned True) until the
    # workers report them in finished_sending, once their stores are done.
    delayed_free: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.preempted or self.delayed_free)


@dataclass
class DynamoWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: store ops this worker finished (op id -> number of ranks)."""

    stores_done: dict[int, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, DynamoWorkerMetadata)
        merged = dict(self.stores_done)
        for op_id, n in other.stores_done.items():
            merged[op_id] = merged.get(op_id, 0) + n
        return DynamoWorkerMetadata(merged)


@dataclass
class KvbmConnectorStats(KVConnectorStats):
    """kvbm's counters since the last report; every value is a count that sums across ranks.

    Scheduler side: ``lookup_tokens`` (asked past the engine's own hit), ``hit_host_tokens``,
    ``hit_disk_tokens``, ``onboard_host_blocks``, ``onboard_disk_blocks`` (load ops sent),
    ``offload_blocks`` (host slots allocated for stores), ``load_error_blocks`` (promised blocks
    that will be recomputed). Worker side (per rank): ``stored_blocks``, ``loaded_blocks``,
    ``failed_store_ops``, ``failed_load_ops``.
    """

    data: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, n: int) -> None:
        if n:
            self.data[key] = self.data.get(key, 0) + n

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = dict(self.data)
        for key, n in other.data.items():
            merged[key] = merged.get(key, 0) + n
        return KvbmConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())
