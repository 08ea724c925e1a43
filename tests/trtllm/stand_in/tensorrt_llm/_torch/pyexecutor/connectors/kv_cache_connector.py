"""Mirrors tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py, NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361:
RequestData, SchedulerOutput and the two abstract connector roles (their methods, arguments and
return types). The runtime half (KvCacheConnectorManager) is played by tests/trtllm/trt_executor.py.
The layer-group forms (VSWA: one page index space per layer group, ``BAD_PAGE_INDEX`` where a
block has no page in a group) follow @ 035ab91c.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from tensorrt_llm.bindings.internal.batch_manager import LlmRequest
from tensorrt_llm.llmapi.llm_args import TorchLlmArgs


@dataclass
class RequestData:
    """One scheduled request, as the connector's scheduler side sees it each step."""

    request_id: int
    new_tokens: List[int]  # tokens appended since the request was last reported
    new_block_ids: List[int]  # blocks allocated since the request was last reported
    computed_position: int  # tokens whose KV is valid before this step
    num_scheduled_tokens: int  # tokens this step computes
    priorities: Optional[List[int]] = None
    cache_salt_id: Optional[int] = None  # must be mixed into a connector's block identity
    # One list per layer group; new_block_ids is empty when the cache has several groups.
    new_block_ids_by_layer_group: List[List[int]] = field(default_factory=list)


BAD_PAGE_INDEX = -1  # a block with no page in a layer group (outside that group's window)


@dataclass
class SchedulerOutput:
    new_requests: List[RequestData] = field(default_factory=list)  # first report of a request
    cached_requests: List[RequestData] = field(default_factory=list)


class KvCacheConnectorWorker(ABC):
    def __init__(self, llm_args: TorchLlmArgs):
        self._llm_args = llm_args
        self._metadata: Any = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Optional[Callable[..., Any]]:
        """Optional: a callable run at the end of the forward pass, on its stream."""
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: Any) -> None: ...

    def register_kv_cache_layout(self, layout: Any) -> None:
        """KVCacheManagerV2's pools, per layer group; the default accepts a single-pool cache only
        (the engine hands it to ``register_kv_caches``)."""
        if len(layout.groups) != 1:
            raise NotImplementedError("this connector registers one KV pool; override register_kv_cache_layout")

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]: ...


class KvCacheConnectorScheduler(ABC):
    def __init__(self, llm_args: TorchLlmArgs):
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: LlmRequest, num_computed_tokens: int) -> Tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: LlmRequest, cache_block_ids: List[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: LlmRequest, block_ids: List[int]) -> None: ...

    def update_state_after_alloc_by_layer_group(self, request: LlmRequest,
                                                block_ids_by_layer_group: List[List[int]]) -> None:
        """The default folds a single group back to the flat form."""
        if len(block_ids_by_layer_group) != 1:
            raise NotImplementedError("override update_state_after_alloc_by_layer_group for several layer groups")
        self.update_state_after_alloc(request, block_ids_by_layer_group[0])

    def request_finished_by_layer_group(self, request: LlmRequest,
                                        cache_block_ids_by_layer_group: List[List[int]]) -> bool:
        """The default folds a single group back to the flat form."""
        if len(cache_block_ids_by_layer_group) != 1:
            raise NotImplementedError("override request_finished_by_layer_group for several layer groups")
        return self.request_finished(request, cache_block_ids_by_layer_group[0])

    def wait_for_initialization(self) -> None:
        return None


def check_layer_groups(scheduler: KvCacheConnectorScheduler, worker: KvCacheConnectorWorker,
                       num_layer_groups: int) -> None:
    """The bring-up check: a connector with only the flat forms is rejected for a multi-group model."""
    if num_layer_groups <= 1:
        return
    base_s, base_w = KvCacheConnectorScheduler, KvCacheConnectorWorker
    missing = [name for obj, base, name in (
        (scheduler, base_s, "update_state_after_alloc_by_layer_group"),
        (scheduler, base_s, "request_finished_by_layer_group"),
        (worker, base_w, "register_kv_cache_layout"),
    ) if getattr(type(obj), name) is getattr(base, name)]
    if missing:
        raise ValueError(f"the KV connector does not support {num_layer_groups} layer groups "
                         f"(it does not implement {', '.join(missing)})")
