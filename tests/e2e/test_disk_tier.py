"""A host pool far smaller than the working set: blocks spill to the disk tier (G3) and come
back from it after ``reset_prefix_cache()``, with greedy tokens equal to an engine without kvbm."""

from __future__ import annotations

import os

import pytest
from conftest import BLOCK, MAX_TOKENS, MODEL, Baseline, expected_hit, kvbm_env, prompt_sets, settle

from kvbm.testing.cpu_engine import CpuEngine, EngineOptions

HOST_BLOCKS = 8


@pytest.mark.timeout(900)
def test_tiny_host_pool_spills_to_disk_and_loads_back(baseline: Baseline) -> None:
    prompts = prompt_sets()["distinct"]
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=str(HOST_BLOCKS),
                  DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="512",
                  DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1",
                  DYN_KVBM_DISK_DISABLE_O_DIRECT="1") as tmp:
        os.environ["DYN_KVBM_DISK_CACHE_DIR"] = tmp
        eng = CpuEngine(EngineOptions(model=MODEL, kvbm=True, max_model_len=2048))
        try:
            # One prompt at a time, so the host pool is never asked for more than it holds at once.
            for p, want in zip(prompts, baseline.tokens["distinct"]):
                assert eng.run([p], MAX_TOKENS)[0].tokens == want
                settle(eng)
            eng.reset_prefix_cache()
            warm = [eng.run([p], MAX_TOKENS)[0] for p in prompts]
        finally:
            eng.close()
    assert [c.tokens for c in warm] == baseline.tokens["distinct"]
    hits = [c.cached_tokens for c in warm]
    # Each prompt has more full blocks than the host pool holds: most came back from disk.
    assert sum(hits) > 2 * HOST_BLOCKS * BLOCK, hits
    assert all(0 < h <= expected_hit(len(p)) for h, p in zip(hits, prompts)), hits
