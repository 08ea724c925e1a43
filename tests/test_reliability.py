"""Reliability and security: fault injection with real processes, fuzzing, a short soak.

Every scenario checks the principles: nothing wrong is ever served (the rank processes check
every loaded byte against the KV oracle), nothing leaks (pool accounting exact after settling:
nothing pinned or being written, no op in flight), and bad input changes nothing.
docs/reliability.md lists each test with what it injects and what it checks.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvbm.leader.disk as disk_mod
from kvbm.bench.fuzz import ERROR, CaseGenerator, fuzz_leader, leader_stats, rss_kib, send_oversize
from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.hashing import sequence_hashes
from kvbm.ipc import messages as m
from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError, segment_name
from kvbm.ipc.transport import RpcClient, check_bind_endpoint, ensure_private_dir
from kvbm.leader.client import LeaderClient
from kvbm.leader.disk import DiskStore, disk_file_path
from kvbm.leader.server import LeaderServer
from kvbm.sim.engine import SimEngine, SimError, chat_workload
from kvbm.sim.rank import SimModel

BS = 16  # tokens per block (SimModel default)


# ------------------------------------------------------------------------------------------
# helpers


def _prompts(n: int, blocks: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``blocks`` full blocks, no shared prefix."""
    rng = random.Random(seed)
    return [[rng.randrange(1, 50_000) for _ in range(blocks * BS)] for _ in range(n)]


def _chats(n: int, seed: int = 0) -> list[list[int]]:
    return list(chat_workload(n, 3, system_tokens=64, turn_tokens=40, seed=seed))


def _wait_status(client: LeaderClient, pred: Callable[[m.Status], bool], limit_s: float, what: str) -> float:
    """Poll the leader's status until ``pred`` holds; returns the seconds it took."""
    t0 = time.monotonic()
    st = None
    while True:
        st = client.refresh()
        if st is not None and pred(st):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < limit_s, f"{what} not seen within {limit_s} s: {st}"
        time.sleep(0.02)


def _settled(client: LeaderClient, limit_s: float = 10.0) -> dict[str, float]:
    """Leader stats once no op is in flight and no disk write is pending."""
    t0 = time.monotonic()
    while True:
        stats = client.stats()
        if stats and stats["ops_in_flight"] == 0 and stats.get("disk_busy", 0) == 0:
            return stats
        assert time.monotonic() - t0 < limit_s, f"ops still in flight after {limit_s} s: {stats}"
        time.sleep(0.02)


def _assert_accounting(stats: dict[str, float]) -> None:
    """Free + registered = capacity (nothing being written), nothing pinned, no op in flight."""
    assert stats["host_free"] + stats["host_registered"] == stats["host_capacity"], stats
    assert stats["host_writing"] == stats["host_pinned"] == stats["ops_in_flight"] == 0, stats
    if "disk_capacity" in stats:
        assert stats["disk_free"] + stats["disk_registered"] == stats["disk_capacity"], stats


def _raw_match(endpoint: str, hashes: list[int]) -> tuple[int, int]:
    """A lookup that fails loudly (the LeaderClient answers (0, 0) when the leader cannot serve)."""
    rpc = RpcClient(endpoint)
    try:
        r = rpc.call(m.Match(m.pack_hashes(hashes)), 2.0, m.MatchReply)
        return r.host, r.disk
    finally:
        rpc.close()


def _store_step(sim: SimEngine, prompts: list[list[int]]) -> tuple[dict[str, Any], list[int], list[int]]:
    """A step request computing and storing ``prompts`` (new full-block prompts).

    Returns (request, store op ids, hashes). The engine blocks go back to the engine's free
    list (without caching them): the test decides what happens to the step.
    """
    assert sim.client is not None
    compute: list[list[int]] = []
    stores: list[list[Any]] = []
    ops: list[int] = []
    all_hashes: list[int] = []
    for tokens in prompts:
        hs = sequence_hashes(tokens, BS)
        blocks = sim.g1.allocate(len(hs))
        assert blocks is not None
        compute += [[b, h] for b, h in zip(blocks, hs)]
        grant = sim.client.allocate_store(hs)
        assert grant.op_id and len(grant.slots) == len(hs), grant
        stores.append([grant.op_id, blocks, grant.slots])
        ops.append(grant.op_id)
        all_hashes += hs
    for _op, blocks, _slots in stores:
        sim.g1.release(blocks, [])
    return {"cmd": "step", "compute": compute, "stores": stores}, ops, all_hashes


def _send_step(sim: SimEngine, rank: int, req: dict[str, Any]) -> None:
    sim._ctl.send_multipart([sim._rank_ids[rank], msgpack.packb(req)])


def _restart_rank(sim: SimEngine, rank: int, old: subprocess.Popen[bytes]) -> None:
    """Start a new process for ``rank`` (same layout); it rejoins the running world."""
    sim.ranks.remove(old)
    del sim._rank_ids[rank]
    while sim._ctl.poll(0):  # late replies of the dead incarnation
        sim._ctl.recv_multipart()
    sim.start_ranks([rank])


def _kill(p: subprocess.Popen[bytes]) -> float:
    os.kill(p.pid, signal.SIGKILL)
    t = time.monotonic()
    p.wait()
    return t


def _engine_blocks_all_free(sim: SimEngine) -> bool:
    g1 = sim.g1
    return not g1.refs and len(g1.free) + len(g1.lru) == sim.model.num_gpu_blocks


# ------------------------------------------------------------------------------------------
# process faults


def test_kill_rank_during_stores(make_config) -> None:
    """kill -9 a rank while a batch of stores is in flight: aborted, noticed < 2 s, no leak, exact after."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="128")
    model = SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=96)
    with SimEngine(cfg, world_size=2, model=model) as sim:
        assert sim.client is not None
        warm = _chats(3)
        sim.run(warm)
        before = sim.quiesce()
        batch = _prompts(4, 4, seed=11)
        req, ops, hashes = _store_step(sim, batch)
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGSTOP)  # rank 1 never gets to copy this batch
        _send_step(sim, 1, req)
        r0 = sim._send_all({0: req}, 30)[0]
        assert r0["store_failures"] == [] and r0["stored_blocks"] == len(hashes)
        mid = sim.client.stats()
        assert mid["ops_in_flight"] == len(ops) and mid["host_writing"] == len(hashes)
        assert _raw_match(sim.endpoint, hashes) == (0, 0)  # half-acked stores are not matchable
        t_kill = _kill(victim)
        _wait_status(sim.client, lambda s: s.dead_ranks == [1] and s.state == "degraded", 3, "rank 1 dead")
        assert time.monotonic() - t_kill < 2.0, "the leader took 2 s or more to report the dead rank"
        after = _settled(sim.client)
        assert after["stores_aborted"] - before["stores_aborted"] == len(ops)
        assert after["stores_committed"] == before["stores_committed"]
        _assert_accounting(after)
        assert _engine_blocks_all_free(sim)
        assert sim.client.match(hashes) == (0, 0)  # degraded: the engine computes everything

        # The rank restarts with the same layout and rejoins the existing pool.
        _restart_rank(sim, 1, victim)
        sim.wait_ready(15)
        _wait_status(sim.client, lambda s: s.state == "ready" and not s.dead_ranks, 5, "ready again")
        assert _raw_match(sim.endpoint, hashes) == (0, 0)  # the aborted batch never became matchable
        sim.reset_engine_cache()
        sim.run(warm + batch)  # warm: loads of slices the dead incarnation stored
        sim.reset_engine_cache()
        sim.run(warm + batch)
        assert sim.stats.mismatches == 0
        assert sim.stats.tokens_from_host > 0
        assert sim.stats.load_failures == sim.stats.store_failures == 0
        _assert_accounting(sim.quiesce())


def test_kill_rank_during_loads_and_stores_then_restart_at_once(make_config) -> None:
    """kill -9 a rank mid-step (loads + stores) and restart it before the leader notices.

    The surviving rank's loads are byte-exact (never partial); the loads are reported failed
    (the engine recomputes); the re-registration settles the dead incarnation's ops at once
    (stores aborted, pins released) instead of leaving them in flight.
    """
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256")
    model = SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=160)
    with SimEngine(cfg, world_size=2, model=model) as sim:
        assert sim.client is not None
        stored = _prompts(8, 6, seed=21)
        sim.run(stored)
        before = sim.quiesce()
        sim.reset_engine_cache()
        # Loads of everything stored (planned as the engine's scheduler does), plus new stores.
        loads: list[list[Any]] = []
        for tokens in stored:
            hs = sequence_hashes(tokens, BS)[:-1]
            grant = sim.client.prepare_load(hs)
            assert grant.ready and len(grant.slots) == len(hs)
            blocks = sim.g1.allocate(len(hs))
            assert blocks is not None
            loads.append([grant.op_id, grant.slots, blocks, hs])
        req, store_ops, new_hashes = _store_step(sim, _prompts(4, 6, seed=22))
        for op in loads:
            sim.g1.release(op[2], [])
        req["loads"] = loads
        load_ops = [op[0] for op in loads]
        assert sim.client.stats()["host_pinned"] > 0
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGSTOP)
        _send_step(sim, 1, req)
        r0 = sim._send_all({0: req}, 30)[0]
        assert r0["mismatches"] == 0 and r0["load_failures"] == []  # rank 0: every byte right
        assert r0["loaded_blocks"] == sum(len(op[2]) for op in loads)
        _kill(victim)
        _restart_rank(sim, 1, victim)
        sim.wait_ready(15)
        _wait_status(sim.client, lambda s: s.state == "ready" and not s.dead_ranks, 5, "ready again")
        after = _settled(sim.client, 5)  # nothing of the dead incarnation is left in flight
        _assert_accounting(after)
        assert after["loads_failed"] - before["loads_failed"] == len(load_ops)
        assert after["loads_completed"] == before["loads_completed"]
        assert after["stores_aborted"] - before["stores_aborted"] == len(store_ops)
        assert after["stores_committed"] == before["stores_committed"]
        assert _raw_match(sim.endpoint, new_hashes) == (0, 0)
        ready, failed = sim.client.poll_loads(load_ops)
        assert ready == [] and sorted(failed) == sorted(load_ops)  # the engine recomputes
        assert _engine_blocks_all_free(sim)
        sim.run(stored)  # everything is still there, byte-exact on both ranks
        assert sim.stats.mismatches == 0
        assert sim.stats.tokens_from_host > 0
        _assert_accounting(sim.quiesce())


def test_rank_paused_past_the_liveness_timeout_comes_back(make_config) -> None:
    """A rank stalled (SIGSTOP) longer than the liveness timeout is declared dead, then rejoins.

    While it is dead nothing new is served (no slot can be reused under its late copies); when
    it resumes, it registers again and the leader is ready again, byte-exact.
    """
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64")
    with SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=48)) as sim:
        assert sim.client is not None
        prompts = _chats(3)
        sim.run(prompts)
        before = sim.quiesce()
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            _wait_status(sim.client, lambda s: s.dead_ranks == [1], 3, "rank 1 dead")
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        _wait_status(sim.client, lambda s: s.state == "ready" and not s.dead_ranks, 8, "rank 1 back")
        sim.reset_engine_cache()
        sim.run(prompts)
        assert sim.stats.mismatches == 0
        assert sim.stats.tokens_from_host > 0
        after = sim.quiesce()
        _assert_accounting(after)
        assert after["host_registered"] >= before["host_registered"]


# ------------------------------------------------------------------------------------------
# disk faults (corrupted bytes and a truncated file: tests/test_disk_tier.py)


@contextmanager
def _inproc_leader(cfg: KvbmConfig, sim: SimEngine) -> Iterator[LeaderServer]:
    """A leader for ``sim``'s instance on a thread of this process (its disk store can take a fault seam)."""
    server = LeaderServer(cfg, sim.instance, sim.endpoint)
    t = threading.Thread(target=server.serve_forever, name="leader", daemon=True)
    t.start()
    sim.client = LeaderClient(sim.endpoint)
    try:
        yield server
    finally:
        sim.stop()
        server.stop()
        t.join(10)
        server.close()


def _run_each(sim: SimEngine, prompts: list[list[int]]) -> None:
    for p in prompts:
        sim.run([p])
        sim.quiesce()


@pytest.mark.parametrize("op, code", [("write", errno.ENOSPC), ("read", errno.EIO)])
def test_disk_io_error_turns_the_tier_off_never_wrong_kv(make_config, tmp_path: Path, monkeypatch,
                                                         op: str, code: int) -> None:
    """ENOSPC on block writes / EIO on block reads (at the DiskStore I/O seam, real ranks)."""
    fail = threading.Event()

    def fault(what: str, slot: int) -> None:
        if what == op and fail.is_set():
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_mod, "DiskStore", functools.partial(DiskStore, io_fault=fault))
    (tmp_path / "disk").mkdir()
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="128",
                      DYN_KVBM_DISK_CACHE_DIR=str(tmp_path / "disk"), DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=48))
    with _inproc_leader(cfg, sim) as server:
        assert sim.client is not None
        sim.start_ranks()
        sim.wait_ready(15)
        prompts = _prompts(3, 8, seed=31)  # 24 blocks: the first prompt ends up on disk only
        if op == "write":
            fail.set()
        _run_each(sim, prompts)
        if op == "read":
            assert sim.client.stats()["disk_registered"] > 0
            fail.set()
        sim.reset_engine_cache()
        _run_each(sim, prompts)  # reads of the first prompt fail: recomputed
        stats = _settled(sim.client)
        assert stats["disk_enabled"] == 0 and stats["disk_io_errors"] >= 1, stats
        assert stats["disk_registered"] == 0 and _raw_match(sim.endpoint, sequence_hashes(prompts[0], BS))[1] == 0
        assert server.disk is not None and os.strerror(code) in server.disk.disabled_reason
        if op == "read":
            assert sim.stats.staging_failures > 0
        assert sim.stats.mismatches == 0
        _assert_accounting(stats)
        # G2 keeps serving.
        sim.reset_engine_cache()
        sim.run(prompts[-1:])
        assert sim.stats.tokens_from_host > 0 and sim.stats.mismatches == 0
        _assert_accounting(sim.quiesce())


# ------------------------------------------------------------------------------------------
# start-up failures


@contextmanager
def _tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("what", ["shm", "disk"])
def test_cache_that_does_not_fit_is_one_clear_error_at_start(make_config, tmp_path: Path, what: str) -> None:
    """/dev/shm too small for the pool, or a disk cache bigger than its (real, tiny tmpfs) directory."""
    with ExitStack() as stack:
        if what == "shm":
            env = {"DYN_KVBM_CPU_CACHE_GB": "100000"}
            needle = "/dev/shm has"
        else:
            disk = stack.enter_context(_tiny_tmpfs(tmp_path / "tiny", "1m"))
            env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256",
                   "DYN_KVBM_DISK_CACHE_DIR": str(disk), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1"}
            needle = "not enough space for the disk cache"
        cfg = make_config(**env)
        sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=16))
        try:
            sim.start()
            with pytest.raises(SimError) as err:
                sim.wait_ready(10)
            text = str(err.value)
            assert needle in text, text
            assert text.count(needle) == 2  # once per rank, one line each
            assert sim.client is not None
            status = sim.client.refresh()
            assert status is not None and status.state == "failed" and needle in status.error
            # Nothing is left behind: no segment, no block file.
            assert not os.path.exists(f"/dev/shm/{segment_name(sim.instance)}")
            if what == "disk":
                assert os.listdir(disk) == []
        finally:
            sim.stop()
