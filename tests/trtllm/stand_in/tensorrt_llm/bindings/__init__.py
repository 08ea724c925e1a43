"""Mirrors tensorrt_llm.bindings.LlmRequestState (C++ enum, cpp/include/tensorrt_llm/batch_manager/llmRequest.h),
NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361."""

import enum


class LlmRequestState(enum.Enum):
    UNKNOWN = 0
    ENCODER_INIT = 1
    CONTEXT_INIT = 2
    DISAGG_GENERATION_TRANS_IN_PROGRESS = 3
    GENERATION_IN_PROGRESS = 4
    GENERATION_TO_COMPLETE = 5
    GENERATION_COMPLETE = 6
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = 7
