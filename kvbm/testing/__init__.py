"""What kvbm's tests, benchmarks and demo run kvbm against, kept out of the engine integrations.

* :mod:`kvbm.testing.sim`: the simulated engine (scheduler, rank processes, the exact KV oracle)
  and the soak run;
* :mod:`kvbm.testing.cpu_env`, :mod:`kvbm.testing.cpu_engine`, :mod:`kvbm.testing.tiny_model`:
  vLLM's CPU backend in its own venv, an engine harness on it, and the seeded random-weight models
  it serves;
* :mod:`kvbm.testing.vllm_harness`: vLLM 0.33's scheduler in-process with simulated workers;
* :mod:`kvbm.testing.s3server`: an S3 server on 127.0.0.1 (moto) for the object tier;
* :mod:`kvbm.testing.indexer`: Dynamo's KV router index (``python -m dynamo.indexer``) as a process;
* :mod:`kvbm.testing.fuzz`: malformed frames with known reactions, against a live leader;
* :mod:`kvbm.testing.support`: helpers the test suites share (prompts, idle waits, leak checks).

Nothing in the engine integrations or below imports this package (``tests/test_layering.py``).
"""
