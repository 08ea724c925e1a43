"""The disk tier (G3) end to end: offload after registration, staging back, filter, checksums."""

from __future__ import annotations

import os

import pytest

from kvbm.leader.disk import disk_file_path
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import random_prompts

pytestmark = pytest.mark.slow  # leader and rank processes

MODEL = SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=48)


def _run_each(sim: SimEngine, prompts: list[list[int]]) -> None:
    """One request at a time, each store committed before the next (a sequential engine)."""
    for p in prompts:
        sim.run([p])
        sim.quiesce()


def _disk_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256",
           "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1"}
    env.update(extra)
    return env


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("o_direct", ["0", "1"])
def test_store_evict_to_disk_stage_and_load_byte_exact(make_config, tmp_path, world: int, o_direct: str) -> None:
    cfg = make_config(**_disk_env(tmp_path, DYN_KVBM_DISK_DISABLE_O_DIRECT=o_direct))
    with SimEngine(cfg, world_size=world, model=MODEL) as sim:
        prompts = random_prompts(4, 16 * 12, seed=world)  # 4 x 12 blocks: far more than the 16-block host pool
        _run_each(sim, prompts)
        sim.quiesce()
        sim.reset_engine_cache()
        _run_each(sim, prompts)
        st = sim.stats
        stats = sim.quiesce()
        assert st.tokens_from_disk > 0, st
        assert stats.disk_tier.counters.onboarded_blocks > 0 and stats.counters.blocks_loaded_from_disk > 0
        assert st.mismatches == 0 and st.staging_failures == 0
        assert stats.disk.free + stats.disk.registered == stats.disk.capacity
        assert stats.host.pinned == stats.host.writing == 0


def test_filter_writes_blocks_seen_twice_only(make_config, tmp_path) -> None:
    env = _disk_env(tmp_path)
    del env["DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"]
    env["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"] = "64"
    cfg = make_config(**env)
    with SimEngine(cfg, world_size=1, model=MODEL) as sim:
        once = random_prompts(1, 16 * 12, seed=10)
        sim.run(once)
        stats = sim.quiesce()
        assert stats.disk_tier.counters.offloaded_blocks == 0
        assert stats.disk_tier.counters.offload_skipped_filter == 12
        # Evict it from G2 and store it again: registered a second time -> written to disk.
        sim.client.reset_cache()
        sim.reset_engine_cache()
        sim.run(once)
        stats = sim.quiesce()
        assert stats.disk_tier.counters.offloaded_blocks == 12


def test_disabled_filter_writes_everything(make_config, tmp_path) -> None:
    cfg = make_config(**_disk_env(tmp_path, DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64"))
    with SimEngine(cfg, world_size=1, model=MODEL) as sim:
        sim.run(random_prompts(1, 16 * 12, seed=11))
        assert sim.quiesce().disk_tier.counters.offloaded_blocks == 12


def test_corrupted_disk_block_is_a_miss_never_loaded(make_config, tmp_path) -> None:
    cfg = make_config(**_disk_env(tmp_path))
    with SimEngine(cfg, world_size=2, model=MODEL) as sim:
        prompts = random_prompts(4, 16 * 12, seed=5)
        _run_each(sim, prompts)
        sim.quiesce()
        path = disk_file_path(str(tmp_path), sim.instance)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # flip bytes in every block on disk
            for off in range(0, size, 4096 * 4):
                f.seek(off)
                b = f.read(8)
                f.seek(off)
                f.write(bytes(x ^ 0xFF for x in b))
        sim.reset_engine_cache()
        _run_each(sim, prompts)
        stats = sim.quiesce()
        assert stats.disk_tier.counters.checksum_failures > 0, stats.disk_tier
        assert sim.stats.mismatches == 0  # nothing wrong was served
        assert sim.stats.staging_failures > 0  # the engine recomputed instead


def test_disk_full_turns_the_tier_off_and_serving_continues(make_config, tmp_path) -> None:
    cfg = make_config(**_disk_env(tmp_path))
    with SimEngine(cfg, world_size=1, model=MODEL) as sim:
        prompts = random_prompts(3, 16 * 12, seed=6)
        _run_each(sim, prompts)  # the first prompt now lives on disk only
        os.truncate(disk_file_path(str(tmp_path), sim.instance), 4096)  # reads now come up short
        sim.reset_engine_cache()
        _run_each(sim, prompts[:1])
        stats = sim.quiesce()
        assert stats.disk_tier.enabled == 0, str(stats)
        assert sim.stats.mismatches == 0
        sim.run(random_prompts(3, 16 * 12, seed=7))  # G2 keeps serving
        sim.reset_engine_cache()
        sim.run(random_prompts(1, 16 * 12, seed=7))
        assert sim.stats.mismatches == 0
        assert sim.quiesce().host.registered > 0


def test_disk_only_mode_uses_a_bounce_pool(make_config, tmp_path) -> None:
    env = _disk_env(tmp_path, DYN_KVBM_DISK_BOUNCE_BLOCKS="24")
    del env["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"]
    cfg = make_config(**env)
    with SimEngine(cfg, world_size=2, model=MODEL) as sim:
        prompts = random_prompts(4, 16 * 12, seed=8)
        _run_each(sim, prompts)
        stats = sim.quiesce()
        assert stats.host.capacity == 24
        assert stats.disk_tier.counters.offloaded_blocks > 0  # no filter in disk-only mode
        sim.reset_engine_cache()
        _run_each(sim, prompts)
        assert sim.stats.tokens_from_disk > 0
        assert sim.stats.mismatches == 0
