"""The engine-neutral connector core: the scheduler-side planner every engine adapter drives
(vLLM's connector, the simulated engine), its local replica of the leader's index, and the
plain copy ops it hands to the workers. Imports neither vLLM nor torch."""
