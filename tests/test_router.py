"""Dynamo's KV router, fed only by kvbm's events: its standalone indexer process (``python -m
dynamo.indexer`` of ai-dynamo-runtime) subscribed to a real leader's event socket during a
simulated engine run answers ``POST /query`` with the instance that holds a prompt's prefix, in
kvbm's tiers, and forgets it after eviction and after a cache reset."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvbm.config import load_config
from kvbm.testing.indexer import Indexer
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import free_port

pytest.importorskip("dynamo.indexer", reason="Dynamo's indexer: pip install ai-dynamo-runtime==1.6.1 (the test extra)")

pytestmark = pytest.mark.slow  # an indexer, a leader and rank processes

BLOCK_SIZE = 16
INSTANCE = "1"


def _matched(idx: Indexer, tokens: list[int]) -> int:
    """Tokens of ``tokens``' prefix the indexer places on our instance (0: none)."""
    return idx.matched(tokens).get(INSTANCE, 0)


def _until(pred: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    """Events reach the indexer asynchronously: poll its answer."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_indexer_places_a_stored_prompt_on_the_instance_and_drops_it_after_eviction_and_reset(
        tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    prompt = [rng.randrange(1, 50_000) for _ in range(5 * BLOCK_SIZE + 3)]  # 5 full blocks
    full = len(prompt) // BLOCK_SIZE * BLOCK_SIZE
    others = [[rng.randrange(1, 50_000) for _ in range(8 * BLOCK_SIZE)] for _ in range(4)]
    events_port = free_port()
    config = load_config({
        "DYN_KVBM_RUN_DIR": str(tmp_path / "run"),
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "24",
        "DYN_KVBM_KV_EVENTS_ENDPOINT": f"tcp://127.0.0.1:{events_port}",
    })
    model = SimModel(num_layers=2, kv_heads=1, head_dim=32, num_gpu_blocks=40, block_size=BLOCK_SIZE)
    with SimEngine(config, world_size=2, model=model) as sim:
        # Started once the leader's event socket is bound (Dynamo 1.6.1's indexer started before
        # it received nothing here) and before the first request: the stream has no replay.
        idx = Indexer({INSTANCE: f"tcp://127.0.0.1:{events_port}"}, BLOCK_SIZE, tmp_path / "indexer.log")
        try:
            time.sleep(1.0)  # its subscription reaches the leader's PUB socket
            _routes(sim, idx, prompt, full, others)
        finally:
            idx.close()


def test_indexer_follows_blocks_from_g2_to_the_disk_tier(tmp_path: Path) -> None:
    import random

    rng = random.Random(8)
    prompt = [rng.randrange(1, 50_000) for _ in range(6 * BLOCK_SIZE)]
    others = [[rng.randrange(1, 50_000) for _ in range(8 * BLOCK_SIZE)] for _ in range(3)]
    events_port = free_port()
    config = load_config({
        "DYN_KVBM_RUN_DIR": str(tmp_path / "run"),
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "24",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "200",
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
        "DYN_KVBM_KV_EVENTS_ENDPOINT": f"tcp://127.0.0.1:{events_port}",
    })
    model = SimModel(num_layers=2, kv_heads=1, head_dim=32, num_gpu_blocks=40, block_size=BLOCK_SIZE)
    with SimEngine(config, world_size=2, model=model) as sim:
        idx = Indexer({INSTANCE: f"tcp://127.0.0.1:{events_port}"}, BLOCK_SIZE, tmp_path / "indexer.log")
        try:
            time.sleep(1.0)
            sim.run([prompt])
            sim.quiesce()
            assert _until(lambda: _matched(idx, prompt) == len(prompt)), idx.query(prompt)
            sim.run(others)  # pushes the prompt out of G2; G3 keeps it
            sim.quiesce()
            assert sim.client is not None
            held = sim.client.match(_hashes(prompt))
            assert held.host == 0 and held.disk == len(prompt) // BLOCK_SIZE
            # Medium STORAGE is Dynamo's disk tier: the router still places the prompt here.
            assert _until(lambda: idx.query(prompt)["instances"].get(INSTANCE, {}).get("cpu") == 0), idx.query(prompt)
            answer = idx.query(prompt)["instances"][INSTANCE]
            assert answer["longest_matched"] == answer["disk"] == len(prompt), answer
        finally:
            idx.close()


def _routes(sim: SimEngine, idx: Indexer, prompt: list[int], full: int, others: list[list[int]]) -> None:
    sim.run([prompt])
    sim.quiesce()
    assert _until(lambda: _matched(idx, prompt) == full), idx.query(prompt)
    answer = idx.query(prompt)["instances"][INSTANCE]
    assert answer["cpu"] == full  # medium CPU: Dynamo's host_pinned tier
    # A different continuation shares only the stored prefix.
    assert _matched(idx, prompt[: 2 * BLOCK_SIZE] + [1] * 3 * BLOCK_SIZE) == 2 * BLOCK_SIZE
    assert _matched(idx, [1] * full) == 0

    # 32 other blocks through a 24-block G2 (no lower tier): the prompt's blocks are evicted.
    sim.run(others)
    stats = sim.quiesce()
    assert stats.counters.host_evictions > 0 and sim.stats.mismatches == 0
    assert sim.client is not None
    assert sim.client.match(_hashes(prompt)).host == 0  # the leader no longer holds its first block
    assert _until(lambda: _matched(idx, prompt) == 0), idx.query(prompt)
    # For every other prompt the router places exactly the prefix the leader holds in G2.
    held = [sim.client.match(_hashes(o)).host * BLOCK_SIZE for o in others]
    assert any(held)
    assert _until(lambda: [_matched(idx, o) for o in others] == held), (held, [idx.query(o) for o in others])

    # A cache reset (AllBlocksCleared) empties the instance.
    assert sim.client.reset_cache()
    assert _until(lambda: not any(_matched(idx, o) for o in others)), [idx.query(o) for o in others]


def _hashes(tokens: list[int]) -> list[int]:
    from kvbm.hashing import sequence_hashes

    return sequence_hashes(tokens, BLOCK_SIZE)
