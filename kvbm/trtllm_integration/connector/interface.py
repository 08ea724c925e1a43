"""TensorRT-LLM's connector interface, from wherever this TensorRT-LLM version keeps it.

Followed: NVIDIA/TensorRT-LLM ``tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py``
@ 5a06f334f04fb515ff79f73b7f0f7726ad757361; older releases keep the same classes in
``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py``.
"""

from __future__ import annotations

try:
    from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import (
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        SchedulerOutput,
    )
except ImportError:  # releases before the connectors/ package
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (  # type: ignore[no-redef]
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        SchedulerOutput,
    )

__all__ = ["KvCacheConnectorScheduler", "KvCacheConnectorWorker", "SchedulerOutput"]
