"""KvbmHiCacheStorage through SGLang's real factory, config and host pools, in the cache
controller's call pattern; every loaded byte checked against the (key, rank) oracle."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import PAGE, Rank, RankSpec, World, page_keys  # noqa: E402

from kvbm.ipc.shm import sweep_stale_segments  # noqa: E402
from kvbm.testing.support import random_prompts  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts rank processes and a leader


@pytest.fixture
def run_dir():
    path = tempfile.mkdtemp(prefix="kvbm-sgl-")  # short: a Unix socket path has at most 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(run_dir) -> dict[str, str]:
    return {"DYN_KVBM_RUN_DIR": f"{run_dir}/run", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64",
            "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "60", "DYN_KVBM_LIVENESS_TIMEOUT_SECS": "30",
            "DYN_KVBM_LOG_LEVEL": "WARNING"}


def _instance(tag: str) -> str:
    return f"sgl-{os.getpid()}-{tag}"


@pytest.mark.parametrize("layout,v1", [("page_first", True), ("layer_first", True), ("page_first", False)])
def test_one_rank_stores_and_loads_byte_exact(env, layout: str, v1: bool) -> None:
    keys = page_keys(random_prompts(1, 20 * PAGE, seed=1, vocab=32_000)[0])
    with World(1, layout=layout, v1=v1, env=env, instance=_instance(f"one-{layout}-{v1}")) as w:
        assert w.all("exists", keys) == [0]
        assert w.all("load", keys) == [(0, 0)]  # a miss, nothing loaded
        assert w.all("store", keys[:12]) == [[True] * 12]
        w.ranks[0].call("idle")  # stores commit once the leader applied the rank's report
        assert w.all("exists", keys) == [12]
        assert w.all("load", keys) == [(12, 0)]  # the stored prefix, every byte right
        assert w.all("store", keys[:12]) == [[True] * 12]  # already held


def test_tp2_ranks_store_their_slices_and_a_page_needs_both(env) -> None:
    keys = page_keys(random_prompts(1, 150 * PAGE, seed=2, vocab=32_000)[0])  # two batches of SGLang's 128 pages
    with World(2, env=env, instance=_instance("tp2")) as w:
        assert w.all("store", keys[:40]) == [[True] * 40] * 2
        w.ranks[0].call("idle")
        assert w.all("exists", keys) == [40, 40]
        assert w.all("load", keys) == [(40, 0), (40, 0)]  # each rank its own slice, byte exact
        # Only rank 0 stores the next pages (rank 1's backup never comes): rank 0's own store
        # succeeds at once, without waiting for rank 1, and the pages never become matchable
        # (the coordinator releases the op for rank 1 after its join wait).
        started = time.monotonic()
        assert w.ranks[0].call("store", keys[40:44]) == [True] * 4
        assert time.monotonic() - started < 4.0  # well under the 5 s join wait: no stall
        assert w.all("exists", keys) == [40, 40]
        stats = w.ranks[0].call("idle")
        assert stats.counters.stores_aborted >= 1 and w.all("exists", keys) == [40, 40]
        # More pages than kvbm's pool of 64 holds: each rank reports its own outcome (they may
        # differ once the pool is full); a page is found only if every rank reported it stored,
        # and what is matchable afterwards loads byte exact on both.
        stored = w.all("store", keys)
        assert all(any(r) for r in stored)
        w.ranks[0].call("idle")
        hits = w.all("exists", keys)
        assert hits[0] == hits[1] and hits[0] <= 64
        assert all(all(r[: hits[0]]) for r in stored)
        loaded = w.all("load", keys)
        assert loaded[0][1] == 0 and loaded[1][1] == 0 and loaded[0][0] == loaded[1][0] == hits[0]


def test_a_diverging_rank_loses_only_the_pages_it_lacks(env) -> None:
    keys = page_keys(random_prompts(1, 10 * PAGE, seed=9, vocab=32_000)[0])
    with World(2, env=env, instance=_instance("diverge")) as w:
        # Rank 1's backup of this batch stops after 6 pages; rank 0 stores all 10.
        w.ranks[0].send("store", keys)
        w.ranks[1].send("store", keys[:6])
        assert w.ranks[0]._take(60) == [True] * 10 and w.ranks[1]._take(60) == [True] * 6
        # No harness wait: each rank's store returned once the leader applied its report.
        assert w.all("exists", keys) == [6, 6]
        assert w.all("load", keys) == [(6, 0), (6, 0)]  # each rank its own slice, byte exact
        stats = w.ranks[0].call("idle")
        assert stats.counters.blocks_stored == 6 and stats.host is not None and stats.host.writing == 0
        # The 4 pages rank 1 lacked are stored again, by both ranks this time.
        assert w.all("store", keys) == [[True] * 10] * 2
        assert w.all("exists", keys) == [10, 10]


def test_a_rank_that_never_arrives_fails_start_up_with_kvbm_not_ready(env) -> None:
    rank0 = Rank(RankSpec(rank=0, tp=2, env={**env, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "8"},
                          instance=_instance("alone")))
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            rank0.started(60)
        assert time.monotonic() - started < 30
        line = str(err.value).strip().splitlines()[-1]
        assert line.startswith("kvbm.connector.bootstrap.KvbmNotReady: ") and "SGLang TP rank 0 of 2" in line
        assert "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=8 s" in line and "rank(s) [1]" in line, line
    finally:
        rank0.close()


def test_a_page_whose_copy_failed_on_one_rank_never_becomes_matchable(env) -> None:
    keys = page_keys(random_prompts(1, 6 * PAGE, seed=8, vocab=32_000)[0])
    with World(2, env=env, instance=_instance("fail")) as w:
        w.ranks[1].call("break_copies")
        assert w.all("store", keys) == [[True] * 6, [False] * 6]  # rank 0 copied, rank 1 failed
        stats = w.ranks[0].call("idle")
        assert stats.counters.stores_aborted >= 1 and w.all("exists", keys) == [0, 0]
        assert w.all("load", keys) == [(0, 0), (0, 0)]


def test_salted_keys_never_hit_unsalted_pages(env) -> None:
    tokens = random_prompts(1, 8 * PAGE, seed=3, vocab=32_000)[0]
    with World(1, env=env, instance=_instance("salt")) as w:
        assert w.all("store", page_keys(tokens)) == [[True] * 8]
        w.ranks[0].call("idle")
        assert w.all("exists", page_keys(tokens, salt="tenant-b")) == [0]
        assert w.all("exists", page_keys(tokens)) == [8]


def test_leader_death_is_misses_and_no_crash(env) -> None:
    keys = page_keys(random_prompts(1, 10 * PAGE, seed=4, vocab=32_000)[0])
    with World(2, env=env, instance=_instance("death")) as w:
        assert w.all("store", keys[:6]) == [[True] * 6] * 2
        w.ranks[0].call("idle")
        w.ranks[0].call("kill_leader")
        assert w.all("exists", keys, timeout_s=60) == [0, 0]
        assert w.all("load", keys, timeout_s=60) == [(0, 0), (0, 0)]
        assert w.all("store", keys, timeout_s=60) == [[False] * 10] * 2
    sweep_stale_segments()  # the killed leader's pool, swept as the next leader's start does


def test_mla_stores_one_copy_written_by_rank0_and_every_rank_reads_it(env) -> None:
    keys = page_keys(random_prompts(1, 12 * PAGE, seed=5, vocab=32_000)[0])
    with World(2, mla=True, env=env, instance=_instance("mla")) as w:
        # SGLang backs up MLA pages on rank 0 only (is_storage_writer).
        assert w.ranks[0].call("store", keys[:8]) == [True] * 8
        stats = w.ranks[0].call("idle")
        assert stats.counters.blocks_stored == 8
        assert w.all("exists", keys) == [8, 8]
        assert w.all("load", keys) == [(8, 0), (8, 0)]


def test_second_instance_reads_the_first_ones_pages_through_the_persistent_disk(env, tmp_path, run_dir) -> None:
    disk = {"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256", "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path),
            "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1", "DYN_KVBM_DISK_CACHE_PERSIST": "1"}
    keys = page_keys(random_prompts(1, 30 * PAGE, seed=6, vocab=32_000)[0])
    with World(2, env={**env, **disk}, instance=_instance("first")) as first:
        assert first.all("store", keys) == [[True] * 30] * 2
        assert first.ranks[0].call("idle").disk_tier.counters.offloaded_blocks == 30
    with World(2, env={**env, **disk, "DYN_KVBM_RUN_DIR": f"{run_dir}/run2"}, instance=_instance("second")) as second:
        assert second.all("exists", keys) == [30, 30]
        assert second.all("load", keys) == [(30, 0), (30, 0)]  # staged from disk, every byte right


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sglang_hicache_controller_tp2_over_gloo_first_request_stored_second_hits(env) -> None:
    """SGLang's own HiCacheController on two TP ranks with a real torch.distributed gloo world:
    the ranks agree on the kvbm instance over SGLang's TP group; right after start-up the first
    request's pages are stored (each rank its slice) and the second request hits and loads them."""
    tokens = random_prompts(1, 20 * PAGE, seed=10, vocab=32_000)[0]
    with World(2, controller=True, env=env, instance=None, model=_instance("gloo"), dist_port=_free_port()) as w:
        assert w.all("ctrl_store", tokens[: 12 * PAGE]) == [12 * PAGE] * 2
        assert w.all("ctrl_prefetch", tokens) == [(12 * PAGE, 12 * PAGE, 0)] * 2
        (name0, endpoint0), (name1, endpoint1) = w.all("instance")
        assert name0 == name1 and endpoint0 == endpoint1
        assert name0.startswith(f"sglang-{_instance('gloo')}")  # the model's name, then what rank 0 picked


def test_sglang_hicache_controller_drives_the_backend(env) -> None:
    """SGLang's own HiCacheController (TP=1): its backup thread stores through batch_set_v1, its
    prefetch threads query batch_exists and load through batch_get_v1."""
    tokens = random_prompts(1, 20 * PAGE, seed=7, vocab=32_000)[0]
    with World(1, controller=True, env=env, instance=_instance("ctrl")) as w:
        assert w.all("ctrl_prefetch", tokens) == [(0, 0, 0)]
        assert w.all("ctrl_store", tokens[: 12 * PAGE]) == [12 * PAGE]
        w.ranks[0].call("idle")
        assert w.all("ctrl_prefetch", tokens) == [(12 * PAGE, 12 * PAGE, 0)]
