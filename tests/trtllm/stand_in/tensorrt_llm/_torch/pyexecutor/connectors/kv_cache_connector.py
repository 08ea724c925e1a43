"""Mirrors tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py, NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361:
RequestData, SchedulerOutput and the two abstract connector roles (their methods, arguments and
return types). The runtime half (KvCacheConnectorManager) is played by tests/trtllm/trt_executor.py.
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

    def wait_for_initialization(self) -> None:
        return None
