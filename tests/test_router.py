"""Dynamo's KV router, fed only by kvbm's events: its standalone indexer process (``python -m
dynamo.indexer`` of ai-dynamo-runtime) subscribed to a real leader's event socket during a
simulated engine run answers ``POST /query`` with the instance that holds a prompt's prefix, in
kvbm's tiers, and forgets it after eviction and after a cache reset."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvbm.config import load_config
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel

pytest.importorskip("dynamo.indexer", reason="Dynamo's indexer: pip install ai-dynamo-runtime==1.6.1 (the test extra)")

pytestmark = pytest.mark.slow  # an indexer, a leader and rank processes

BLOCK_SIZE = 16
INSTANCE = "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Indexer:
    """Dynamo's standalone indexer process watching one worker's event endpoint."""

    def __init__(self, events_port: int, log: Path) -> None:
        self.port = _free_port()
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.indexer", "--block-size", str(BLOCK_SIZE), "--port", str(self.port),
             "--threads", "1", "--workers", f"{INSTANCE}=tcp://127.0.0.1:{events_port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"indexer did not come up; log: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def matched(self, tokens: list[int]) -> int:
        """Tokens of ``tokens``' prefix the indexer places on our instance (0: none)."""
        return int(self.query(tokens).get("instances", {}).get(INSTANCE, {}).get("longest_matched", 0))

    def query(self, tokens: list[int]) -> dict[str, Any]:
        """The indexer's answer for a prompt: ``{"scores", "frequencies", "instances"}``."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/query",
                                     data=json.dumps({"token_ids": tokens, "model_name": "default"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return dict(json.loads(r.read()))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


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
    events_port = _free_port()
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
        idx = Indexer(events_port, tmp_path / "indexer.log")
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
    events_port = _free_port()
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
        idx = Indexer(events_port, tmp_path / "indexer.log")
        try:
            time.sleep(1.0)
            sim.run([prompt])
            sim.quiesce()
            assert _until(lambda: idx.matched(prompt) == len(prompt)), idx.query(prompt)
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
    assert _until(lambda: idx.matched(prompt) == full), idx.query(prompt)
    answer = idx.query(prompt)["instances"][INSTANCE]
    assert answer["cpu"] == full  # medium CPU: Dynamo's host_pinned tier
    # A different continuation shares only the stored prefix.
    assert idx.matched(prompt[: 2 * BLOCK_SIZE] + [1] * 3 * BLOCK_SIZE) == 2 * BLOCK_SIZE
    assert idx.matched([1] * full) == 0

    # 32 other blocks through a 24-block G2 (no lower tier): the prompt's blocks are evicted.
    sim.run(others)
    stats = sim.quiesce()
    assert stats.counters.host_evictions > 0 and sim.stats.mismatches == 0
    assert sim.client is not None
    assert sim.client.match(_hashes(prompt)).host == 0  # the leader no longer holds its first block
    assert _until(lambda: idx.matched(prompt) == 0), idx.query(prompt)
    # For every other prompt the router places exactly the prefix the leader holds in G2.
    held = [sim.client.match(_hashes(o)).host * BLOCK_SIZE for o in others]
    assert any(held)
    assert _until(lambda: [idx.matched(o) for o in others] == held), (held, [idx.query(o) for o in others])

    # A cache reset (AllBlocksCleared) empties the instance.
    assert sim.client.reset_cache()
    assert _until(lambda: not any(idx.matched(o) for o in others)), [idx.query(o) for o in others]


def _hashes(tokens: list[int]) -> list[int]:
    from kvbm.hashing import sequence_hashes

    return sequence_hashes(tokens, BLOCK_SIZE)
