"""The engine-neutral connector core every engine adapter uses (vLLM's connector, TensorRT-LLM's,
the simulated engine): the scheduler-side planner, its local replica of the leader's index, the
plain copy ops it hands to the workers, and the worker side that runs them on each rank.
Imports neither vLLM nor torch."""
