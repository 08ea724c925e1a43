"""kvbm's TensorRT-LLM integration (imports TensorRT-LLM; ``import kvbm`` alone never does)."""
