"""The persistent disk cache (DYN_KVBM_DISK_CACHE_PERSIST) through real leader and rank processes.

A leader of a new instance re-indexes the file an earlier leader of the same layout filled and
serves its blocks (every byte checked by the simulated engine's oracle); corrupt blocks are
misses; a file held by a live leader is neither shared nor overwritten.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from kvbm.leader.disk import (
    BLOCK_HEADER_BYTES,
    BlockKey,
    DiskStore,
    layout_file_path,
    parse_headers,
    sweep_stale_disk_files,
)
from kvbm.testing.sim.engine import SimEngine
from kvbm.ipc.stats import LeaderStats
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import random_prompts

pytestmark = pytest.mark.slow  # leader and rank processes

MODEL = SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=48)
BLOCKS_PER_PROMPT = 12


def _env(tmp_path, **extra: str) -> dict[str, str]:
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256",
           "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path), "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
           "DYN_KVBM_DISK_CACHE_PERSIST": "1",
           # Not a liveness test: a loaded 2-core machine must not make a rank look dead.
           "DYN_KVBM_LIVENESS_TIMEOUT_SECS": "30"}
    env.update(extra)
    return env


def _fill(sim: SimEngine, prompts: list[list[int]]) -> LeaderStats:
    for p in prompts:
        sim.run([p])
        sim.quiesce()
    return sim.quiesce()


def _cache_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".kvcache"))


@pytest.mark.parametrize("world", [1, 2])
def test_a_restarted_leader_serves_the_earlier_blocks_byte_exact(make_config, tmp_path, world: int) -> None:
    cfg = make_config(**_env(tmp_path))
    prompts = random_prompts(3, 16 * BLOCKS_PER_PROMPT, seed=20 + world)
    with SimEngine(cfg, world_size=world, model=MODEL) as first:
        stored = _fill(first, prompts).disk_tier.counters.offloaded_blocks
    # All 36 blocks, unless a loaded machine made a store time out (it is then recomputed, not kept).
    assert 0 < stored <= 3 * BLOCKS_PER_PROMPT
    assert len(_cache_files(tmp_path)) == 1  # kept, named by the layout
    assert not [n for n in os.listdir(tmp_path) if n.endswith("-disk.bin")]
    with SimEngine(cfg, world_size=world, model=MODEL) as second:  # a new instance, same layout
        assert second.client is not None
        assert second.quiesce().disk.registered == stored  # re-indexed at start
        for p in prompts:
            second.run([p])
        st = second.stats
        stats = second.quiesce()
        assert st.mismatches == 0 and st.staging_failures == 0
        # Every hit came from the re-indexed file (at most all but each prompt's last block; fewer
        # only where a loaded machine made the planner give up waiting and recompute).
        assert 0 < st.tokens_from_disk <= min(stored, 3 * (BLOCKS_PER_PROMPT - 1)) * 16, st
        assert st.tokens_from_host == 0 and stats.disk_tier.counters.onboarded_blocks * 16 >= st.tokens_from_disk
        assert stats.disk_tier.counters.checksum_failures == 0


def test_another_layout_does_not_see_the_file(make_config, tmp_path) -> None:
    cfg = make_config(**_env(tmp_path))
    with SimEngine(cfg, world_size=1, model=MODEL) as first:
        _fill(first, random_prompts(1, 16 * BLOCKS_PER_PROMPT, seed=30))
    other = SimModel(num_layers=3, kv_heads=2, head_dim=32, num_gpu_blocks=48)
    with SimEngine(cfg, world_size=1, model=other) as second:
        assert second.quiesce().disk.registered == 0
    assert len(_cache_files(tmp_path)) == 2  # one file per layout


def test_corrupted_blocks_of_a_persistent_cache_are_misses(make_config, tmp_path) -> None:
    cfg = make_config(**_env(tmp_path))
    prompts = random_prompts(2, 16 * BLOCKS_PER_PROMPT, seed=40)
    with SimEngine(cfg, world_size=2, model=MODEL) as first:
        _fill(first, prompts)
    [name] = _cache_files(tmp_path)
    path = os.path.join(tmp_path, name)
    with open(path, "rb") as f:
        raw = f.read(256 * BLOCK_HEADER_BYTES)
    layout = int(name.removeprefix("kvbm-layout-").removesuffix(".kvcache"), 16)
    blocks = parse_headers(raw, layout)
    base = -(-256 * BLOCK_HEADER_BYTES // 4096) * 4096
    block_bytes = (os.path.getsize(path) - base) // 256
    with open(path, "r+b") as f:  # flip bytes in every other stored block; tear one header
        for b in blocks[::2]:
            f.seek(base + b.slot * block_bytes + 100)
            f.write(b"\xff" * 8)
        f.seek(blocks[1].slot * BLOCK_HEADER_BYTES + 20)
        f.write(b"\x00\x01")
    with SimEngine(cfg, world_size=2, model=MODEL) as second:
        assert second.quiesce().disk.registered == len(blocks) - 1  # the torn header is ignored
        for p in prompts:
            second.run([p])
        stats = second.quiesce()
        assert stats.disk_tier.counters.checksum_failures > 0
        assert second.stats.mismatches == 0  # nothing wrong was served
        assert second.stats.staging_failures > 0  # the engine recomputed instead


def test_two_live_leaders_do_not_share_the_file(make_config, tmp_path) -> None:
    cfg = make_config(**_env(tmp_path))
    prompts = random_prompts(2, 16 * BLOCKS_PER_PROMPT, seed=50)
    with SimEngine(cfg, world_size=1, model=MODEL) as first:
        filled = _fill(first, prompts).disk_tier.counters.offloaded_blocks
        [name] = _cache_files(tmp_path)
        before = os.stat(os.path.join(tmp_path, name))
        with SimEngine(cfg, world_size=1, model=MODEL) as second:
            stats = second.quiesce()
            assert stats.disk.registered == 0  # a private file, not the live leader's
            assert len([n for n in os.listdir(tmp_path) if n.endswith("-disk.bin")]) == 1
            _fill(second, random_prompts(2, 16 * BLOCKS_PER_PROMPT, seed=51))
            for p in prompts:  # the first leader's blocks are not in the second's cache
                second.run([p])
            assert second.stats.tokens_from_disk == 0 and second.stats.mismatches == 0
        after = os.stat(os.path.join(tmp_path, name))
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
        stats = first.quiesce()
        assert stats.disk_tier.enabled == 1 and stats.disk.registered == filled > 0
        first.reset_engine_cache()
        for p in prompts:  # the first leader still serves its own blocks
            first.run([p])
        stats = first.quiesce()
        assert first.stats.mismatches == 0 and first.stats.tokens_from_disk > 0, (first.stats, stats)
    assert not [n for n in os.listdir(tmp_path) if n.endswith("-disk.bin")]  # the private file went


def test_layout_store_headers_round_trip_and_resize(tmp_path) -> None:
    data = memoryview(bytearray(os.urandom(4096)))
    with DiskStore(str(tmp_path), "x", 8, 4096, o_direct=False, layout=7) as store:
        assert store.restored == []
        r = store.write(3, data, BlockKey(0xABC, None)).result()
        store.write(5, data, BlockKey(0xDEF, 0xABC)).result()
    assert sweep_stale_disk_files(str(tmp_path)) == []  # the sweep of dead leaders' files keeps it
    with DiskStore(str(tmp_path), "y", 8, 4096, o_direct=False, layout=7) as store:
        assert [(b.slot, b.key, b.checksum) for b in store.restored] == [
            (3, BlockKey(0xABC, None), r.checksum), (5, BlockKey(0xDEF, 0xABC), r.checksum)]
        out = memoryview(bytearray(4096))
        assert store.read(3, out, r.checksum).result().ok and out == data
    with DiskStore(str(tmp_path), "z", 16, 4096, o_direct=False, layout=7) as store:
        assert store.restored == []  # another size: emptied, not misread
    assert os.path.getsize(layout_file_path(str(tmp_path), 7)) == 4096 + 16 * 4096


def test_an_mla_cache_written_at_tp2_serves_tp1_byte_exact(make_config, tmp_path) -> None:
    """MLA blocks are one replicated slice, the same bytes at every TP size, and the layout
    fingerprint names no TP size: a TP=1 engine serves a TP=2 engine's persistent cache."""
    cfg = make_config(**_env(tmp_path))
    mla = SimModel(num_layers=2, head_dim=64, num_gpu_blocks=48, layout="block_first", mla=True)
    prompts = random_prompts(2, 16 * BLOCKS_PER_PROMPT, seed=40)
    with SimEngine(cfg, world_size=2, model=mla) as first:
        stored = _fill(first, prompts).disk_tier.counters.offloaded_blocks
    assert 0 < stored <= 2 * BLOCKS_PER_PROMPT and len(_cache_files(tmp_path)) == 1
    with SimEngine(cfg, world_size=1, model=mla) as second:
        assert second.quiesce().disk.registered == stored  # the TP=2 file, re-indexed
        for p in prompts:
            second.run([p])
        st = second.stats
        assert st.mismatches == 0 and st.staging_failures == 0
        assert 0 < st.tokens_from_disk <= min(stored, 2 * (BLOCKS_PER_PROMPT - 1)) * 16, st
    assert len(_cache_files(tmp_path)) == 1


def test_a_sliced_cache_written_at_tp2_is_a_miss_at_tp1(make_config, tmp_path) -> None:
    """One slice per rank ties the blocks to the TP size: another TP size never reads them."""
    cfg = make_config(**_env(tmp_path))
    with SimEngine(cfg, world_size=2, model=MODEL) as first:
        _fill(first, random_prompts(1, 16 * BLOCKS_PER_PROMPT, seed=41))
    with SimEngine(cfg, world_size=1, model=MODEL) as second:
        assert second.quiesce().disk.registered == 0
    assert len(_cache_files(tmp_path)) == 2


HEADS_MODEL = SimModel(num_layers=2, head_dim=32, num_gpu_blocks=48, model_kv_heads=4)


def _serve(cfg, world: int, model: SimModel, prompts: list[list[int]], stored: int) -> None:
    """A new instance at TP=``world`` re-indexes the cache and serves ``prompts`` from it, every
    loaded byte checked by each rank's oracle."""
    with SimEngine(cfg, world_size=world, model=model) as sim:
        assert sim.quiesce().disk.registered == stored  # the file, re-indexed
        for p in prompts:
            sim.run([p])
        st = sim.stats
        assert st.mismatches == 0 and st.staging_failures == 0, st
        assert 0 < st.tokens_from_disk <= min(stored, len(prompts) * (BLOCKS_PER_PROMPT - 1)) * 16, st


@pytest.mark.parametrize("writer, readers, heads", [(2, (1, 4), 4), (4, (1,), 2)])
def test_a_heads_cache_written_at_one_tp_serves_every_other_byte_exact(make_config, tmp_path, writer: int,
                                                                        readers: tuple[int, ...], heads: int) -> None:
    """MHA/GQA heads split over the ranks, in the heads format: a block is every head of the model
    in the model's order, the same bytes at every TP size (each head's oracle bytes are the same
    whichever rank holds it), so a persistent cache written at TP=``writer`` serves TP=1 and TP=4
    engines of the same model byte-exact. With 2 heads at TP=4 each head is on two ranks, and
    only the first of them writes it."""
    cfg = make_config(**_env(tmp_path, DYN_KVBM_BLOCK_FORMAT="heads"))
    model = dataclasses.replace(HEADS_MODEL, model_kv_heads=heads)
    prompts = random_prompts(2, 16 * BLOCKS_PER_PROMPT, seed=42)
    with SimEngine(cfg, world_size=writer, model=model) as first:
        stored = _fill(first, prompts).disk_tier.counters.offloaded_blocks
        assert first.stats.mismatches == 0
    assert 0 < stored <= 2 * BLOCKS_PER_PROMPT
    [name] = _cache_files(tmp_path)
    for world in readers:
        _serve(cfg, world, model, prompts, stored)
    assert _cache_files(tmp_path) == [name]  # every TP size used the one file


def test_another_head_geometry_or_the_slices_format_is_a_miss(make_config, tmp_path) -> None:
    """Blocks of the same size are never served to another head geometry (4 heads of 64 B vs
    2 of 128 B) nor to the same model in the slices format (at TP=1 even the same bytes): the
    fingerprint names the format."""
    heads = _env(tmp_path, DYN_KVBM_BLOCK_FORMAT="heads")
    with SimEngine(make_config(**heads), world_size=2, model=HEADS_MODEL) as first:
        _fill(first, random_prompts(1, 16 * BLOCKS_PER_PROMPT, seed=43))
    wider = dataclasses.replace(HEADS_MODEL, model_kv_heads=2, head_dim=64)
    for cfg, model in ((make_config(**heads), wider),
                       (make_config(**_env(tmp_path, DYN_KVBM_BLOCK_FORMAT="slices")), HEADS_MODEL)):
        with SimEngine(cfg, world_size=1, model=model) as second:
            assert second.quiesce().disk.registered == 0
    assert len(_cache_files(tmp_path)) == 3


def test_by_default_token_major_heads_split_over_ranks_keep_rank_slices(make_config, tmp_path) -> None:
    """DYN_KVBM_BLOCK_FORMAT=auto (the default): at TP=2 a token-major rank's heads would be one
    row per token, so the blocks are rank slices, and a TP=1 engine (whose heads are one piece:
    the heads format) does not see them."""
    cfg = make_config(**_env(tmp_path))
    assert cfg.block_format == "auto"
    with SimEngine(cfg, world_size=2, model=HEADS_MODEL) as first:
        stored = _fill(first, random_prompts(1, 16 * BLOCKS_PER_PROMPT, seed=44)).disk_tier.counters.offloaded_blocks
    assert stored > 0
    with SimEngine(cfg, world_size=1, model=HEADS_MODEL) as second:
        assert second.quiesce().disk.registered == 0
    assert len(_cache_files(tmp_path)) == 2
