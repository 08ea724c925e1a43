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

from kvbm.connector.ops import LoadOp, StepPlan, StoreOp

__all__ = ["DynamoConnectorMetadata", "DynamoWorkerMetadata", "KvbmConnectorStats", "LoadOp", "StoreOp"]


@dataclass
class DynamoConnectorMetadata(StepPlan, KVConnectorMetadata):
    """One step's work for every worker (all ranks get the same): the planner's StepPlan, and
    ``idle``: the step schedules no token (its requests wait for their loads)."""

    idle: bool = False


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
