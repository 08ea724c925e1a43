"""Mirrors tensorrt_llm.bindings.internal.batch_manager.LlmRequest (nanobind of C++ LlmRequest) and
KvCacheConnectorManager, NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361: only the attributes a connector reads."""

from __future__ import annotations

from typing import List, Optional

from tensorrt_llm.bindings import LlmRequestState


class LlmRequest:
    def __init__(self, request_id: int, input_tokens: List[int], *, cache_salt_id: Optional[int] = None,
                 multimodal_positions: Optional[List[int]] = None, is_generation_only_request: bool = False) -> None:
        self.request_id = request_id
        self.py_request_id = request_id
        self._tokens = list(input_tokens)
        self.prompt_len = len(input_tokens)
        self.cache_salt_id = cache_salt_id
        self.multimodal_positions = multimodal_positions
        self.is_generation_only_request = is_generation_only_request
        self.state = LlmRequestState.CONTEXT_INIT
        self.context_current_position = 0
        self.py_num_connector_matched_tokens = 0
        self.kv_cache_retention_config = None

    def get_tokens(self, beam: int) -> List[int]:
        """One beam's tokens: the binding converts the C++ vector, so each call returns a copy."""
        assert beam == 0
        return list(self._tokens)

    def add_new_token(self, token: int, beam: int) -> None:
        self._tokens.append(token)

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position

    def set_prepopulated_prompt_len(self, n: int) -> None:
        self.context_current_position = n


class KvCacheConnectorManager:
    """The C++ base of the Python KvCacheConnectorManager (a trampoline)."""
