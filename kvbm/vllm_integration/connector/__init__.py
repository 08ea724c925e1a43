"""kvbm's vLLM connector: ``kv_connector_module_path = "kvbm.vllm_integration.connector"``.

Importing this package imports vLLM; ``import kvbm`` alone never does.
"""

from kvbm.vllm_integration.connector.dynamo_connector import DynamoConnector
from kvbm.vllm_integration.connector.metadata import DynamoConnectorMetadata

__all__ = ["DynamoConnector", "DynamoConnectorMetadata"]
