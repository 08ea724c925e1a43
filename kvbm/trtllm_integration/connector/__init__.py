"""kvbm's TensorRT-LLM KV cache connector: ``connector_module: kvbm.trtllm_integration.connector``.

Importing this package imports TensorRT-LLM; ``import kvbm`` alone never does.
"""

from kvbm.trtllm_integration.connector.kvbm_connector_leader import DynamoKVBMConnectorLeader
from kvbm.trtllm_integration.connector.kvbm_connector_worker import DynamoKVBMConnectorWorker

__all__ = ["DynamoKVBMConnectorLeader", "DynamoKVBMConnectorWorker"]
