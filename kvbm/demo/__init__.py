"""``kvbm demo``: kvbm on the simulated engine (:mod:`.sim`) or on vLLM's CPU backend (:mod:`.vllm`).

:mod:`.dispatch` (the flags, the command's handler) imports both; both import :mod:`.report`
(what they print).
"""
