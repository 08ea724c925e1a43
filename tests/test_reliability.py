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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvbm.leader.disk as disk_mod
from kvbm.testing.fuzz import (
    ALL_TYPES,
    field_spec,
    fuzz_leader,
    leader_stats,
    rss_kib,
    send_oversize,
)
from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.hashing import sequence_hashes
from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderState, LeaderStats
from kvbm.ipc.shm import (
    HostPool,
    PoolGeometry,
    ShmError,
    segment_name,
    sweep_stale_segments,
)
from kvbm.ipc.transport import RpcClient, check_bind_endpoint, ensure_private_dir
from kvbm.leader.client import LeaderClient, TierBlocks
from kvbm.leader.disk import DiskStore, disk_file_path
from kvbm.leader.server import LeaderServer
from kvbm.testing.sim.engine import SimEngine, SimError, chat_workload
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import random_prompts

pytestmark = pytest.mark.slow  # leader and rank processes

BS = 16  # tokens per block (SimModel default)


# ------------------------------------------------------------------------------------------
# helpers


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


def _assert_accounting(stats: LeaderStats) -> None:
    """Free + registered = capacity (nothing being written), nothing pinned, no op in flight."""
    assert stats.host.free + stats.host.registered == stats.host.capacity, stats
    assert stats.host.writing == stats.host.pinned == stats.ops_in_flight == 0, stats
    if stats.disk is not None:
        assert stats.disk.free + stats.disk.registered == stats.disk.capacity, stats


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


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


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
        batch = random_prompts(4, 4 * BS, seed=11)
        req, ops, hashes = _store_step(sim, batch)
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGSTOP)  # rank 1 never gets to copy this batch
        _send_step(sim, 1, req)
        r0 = sim._send_all({0: req}, 30)[0]
        assert r0["store_failures"] == [] and r0["stored_blocks"] == len(hashes)
        mid = sim.client.stats()
        assert mid.ops_in_flight == len(ops) and mid.host.writing == len(hashes)
        assert _raw_match(sim.endpoint, hashes) == (0, 0)  # half-acked stores are not matchable
        t_kill = _kill(victim)
        _wait_status(sim.client, lambda s: s.dead_ranks == [1] and s.leader_state is LeaderState.DEGRADED, 3, "rank 1 dead")
        assert time.monotonic() - t_kill < 2.0, "the leader took 2 s or more to report the dead rank"
        after = sim.client.wait_idle()
        assert after.counters.stores_aborted - before.counters.stores_aborted == len(ops)
        assert after.counters.stores_committed == before.counters.stores_committed
        _assert_accounting(after)
        assert _engine_blocks_all_free(sim)
        assert sim.client.match(hashes) == TierBlocks()  # degraded: the engine computes everything

        # The rank restarts with the same layout and rejoins the existing pool.
        _restart_rank(sim, 1, victim)
        sim.wait_ready(15)
        _wait_status(sim.client, lambda s: s.leader_state is LeaderState.READY and not s.dead_ranks, 5, "ready again")
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
        stored = random_prompts(8, 6 * BS, seed=21)
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
        req, store_ops, new_hashes = _store_step(sim, random_prompts(4, 6 * BS, seed=22))
        for op in loads:
            sim.g1.release(op[2], [])
        req["loads"] = loads
        load_ops = [op[0] for op in loads]
        assert sim.client.stats().host.pinned > 0
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGSTOP)
        _send_step(sim, 1, req)
        r0 = sim._send_all({0: req}, 30)[0]
        assert r0["mismatches"] == 0 and r0["load_failures"] == []  # rank 0: every byte right
        assert r0["loaded_blocks"] == sum(len(op[2]) for op in loads)
        _kill(victim)
        _restart_rank(sim, 1, victim)
        sim.wait_ready(15)
        _wait_status(sim.client, lambda s: s.leader_state is LeaderState.READY and not s.dead_ranks, 5, "ready again")
        after = sim.client.wait_idle(5)  # nothing of the dead incarnation is left in flight
        _assert_accounting(after)
        assert after.counters.loads_failed - before.counters.loads_failed == len(load_ops)
        assert after.counters.loads_completed == before.counters.loads_completed
        assert after.counters.stores_aborted - before.counters.stores_aborted == len(store_ops)
        assert after.counters.stores_committed == before.counters.stores_committed
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
        _wait_status(sim.client, lambda s: s.leader_state is LeaderState.READY and not s.dead_ranks, 8, "rank 1 back")
        sim.reset_engine_cache()
        sim.run(prompts)
        assert sim.stats.mismatches == 0
        assert sim.stats.tokens_from_host > 0
        after = sim.quiesce()
        _assert_accounting(after)
        assert after.host.registered >= before.host.registered


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
        prompts = random_prompts(3, 8 * BS, seed=31)  # 24 blocks: the first prompt ends up on disk only
        if op == "write":
            fail.set()
        _run_each(sim, prompts)
        if op == "read":
            assert sim.client.stats().disk.registered > 0
            fail.set()
        sim.reset_engine_cache()
        _run_each(sim, prompts)  # reads of the first prompt fail: recomputed
        stats = sim.client.wait_idle()
        assert stats.disk_tier.enabled == 0 and stats.disk_tier.counters.io_errors >= 1, stats
        assert stats.disk.registered == 0 and _raw_match(sim.endpoint, sequence_hashes(prompts[0], BS))[1] == 0
        assert os.strerror(code) in server.core.stats().disk_tier.reason
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
                       capture_output=True, text=True, check=False)
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
            needle = "DYN_KVBM_CPU_CACHE_GB=100000.0 asks for 100.0 TB of host pool; /dev/shm has"
        else:
            disk = stack.enter_context(_tiny_tmpfs(tmp_path / "tiny", "1m"))
            env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "256",
                   "DYN_KVBM_DISK_CACHE_DIR": str(disk), "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1"}
            needle = "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=256 asks for"  # checked before fallocate
        cfg = make_config(**env)
        sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=16))
        try:
            sim.start()
            with pytest.raises(SimError) as err:
                sim.wait_ready(10)
            text = str(err.value)
            assert needle in text, text
            # One line, once, naming both ranks (they got the same refusal from the leader).
            assert text.count(needle) == 1 and "\n" not in text and text.startswith("rank 0,1/2: "), text
            assert "did not complete within" not in text
            assert sim.client is not None
            status = sim.client.refresh()
            assert status is not None and status.leader_state is LeaderState.FAILED and needle in status.error
            # Nothing is left behind: no segment, no block file.
            assert not os.path.exists(f"/dev/shm/{segment_name(sim.instance)}")
            if what == "disk":
                assert os.listdir(disk) == []
        finally:
            sim.stop()


# ------------------------------------------------------------------------------------------
# bad input


def test_fuzz_leader_socket(make_config) -> None:
    """A few thousand malformed frames against a live leader (the CI subset of the kvbm.bench.fuzz benchmark)."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64")
    with SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, num_gpu_blocks=48)) as sim:
        assert sim.client is not None and sim.leader is not None and sim.leader.popen is not None
        pid = sim.leader.popen.pid
        prompts = _chats(3)
        sim.run(prompts)
        sim.quiesce()
        rep = fuzz_leader(sim.endpoint, 3000, seed=7, leader_pid=pid, batch=200, huge_every=600)
        assert rep.leader_alive and rep.state_changes == [], rep.state_changes
        assert rep.mismatched_batches == 0
        assert (rep.errors, rep.replies) == (rep.expected_errors, rep.expected_replies)
        assert rep.expected_errors > 2000 and len(rep.kinds) >= 20, rep.kinds
        assert rep.rss_after_kib - rep.rss_before_kib < 64 * 1024, rep  # bounded (huge cases included)
        # A frame over the protocol limit is dropped by ZMQ before it is buffered.
        hwm = rss_kib(pid, "VmHWM")
        send_oversize(sim.endpoint, 256 << 20)
        stats = leader_stats(sim.endpoint)
        assert stats.state is LeaderState.READY
        assert rss_kib(pid, "VmHWM") - hwm < 64 * 1024
        assert sim.leader.popen.poll() is None
        sim.reset_engine_cache()
        sim.run(prompts)  # still serving what it held before, byte-exact
        assert sim.stats.mismatches == 0 and sim.stats.tokens_from_host > 0
        _assert_accounting(sim.quiesce())


_RANK0 = m.RegisterRank(0, 1, 2, 8192, "float16", "2x4096", 16, "fp", 1)
_HELD = [0x1000 + i for i in range(8)]  # committed in every fresh leader below
_IDENTITIES = [b"fuzz", b"r0", b"client"]


def _fresh_leader(run_dir: str, n: int) -> LeaderServer:
    """An in-process leader, ready (rank 0 registered and attached from identity r0), 8 blocks held."""
    cfg = load_config({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16", "DYN_KVBM_RUN_DIR": run_dir})
    srv = LeaderServer(cfg, f"sim-{os.getpid()}-hyp{n}", f"ipc://{run_dir}/hyp{n}.sock")
    srv.handle(b"r0", [m.encode(_RANK0, 1)])
    srv.handle(b"r0", [m.encode(m.PoolAttached(0), 2)])
    srv.handle(b"client", [m.encode(m.AllocateStore(m.pack_hashes(_HELD), 0, 0), 3)])
    (op_id,) = list(srv.core.ops)
    srv.handle(b"r0", [m.encode(m.TransferDone(0, op_id, True, ""), 4)])
    assert srv.core.stats().host.registered == len(_HELD) and not srv.core.ops
    return srv


def _snapshot(srv: LeaderServer) -> tuple[Any, ...]:
    """Everything a message could change, except plain counters."""
    core = srv.core
    reg = core.registry
    assert reg is not None
    host = reg.host
    world = tuple(sorted((r, i.identity, i.alive, i.attached) for r, i in core.world.ranks.items()))
    ops = tuple(sorted((o.op_id, o.kind.value, tuple(o.slots), tuple(sorted(o.acked)), o.failed, o.released)
                       for o in core.ops.values()))
    return (core.state, core.error, world, ops, host.num_registered, host.num_free, host.num_pinned,
            host.num_writing, tuple(host.lookup(h) for h in _HELD), len(core.events), core.index.next_seq,
            core.stop_requested)


def _field(typ: Any, meta: dict[str, int]) -> st.SearchStrategy[Any]:
    """Mostly well-typed values for a message field, sometimes anything."""
    junk = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
                     st.integers(-(2**63), 2**64 - 1))
    lo, hi = meta.get("min", -(2**63)), meta.get("max", 2**64 - 1)
    good: st.SearchStrategy[Any]
    if typ is bool:
        good = st.booleans()
    elif typ is int:
        edges = [v for v in (lo - 1, hi + 1) if -(2**63) <= v <= 2**64 - 1]  # msgpack's range
        good = st.one_of(st.integers(lo, hi), st.integers(lo, min(hi, lo + 20)), st.sampled_from(edges or [lo]))
    elif typ is str:
        good = st.text(max_size=12)
    elif typ is bytes:
        hashes = st.lists(st.one_of(st.sampled_from(_HELD), st.integers(0, 2**64 - 1)), max_size=10)
        good = st.one_of(hashes.map(m.pack_hashes), st.binary(max_size=20))
    elif typ == list[int]:
        good = st.lists(st.integers(lo, min(hi, lo + 20)), max_size=6)
    else:
        good = st.dictionaries(st.text(max_size=4), st.one_of(st.integers(0, 9), st.floats()), max_size=3)
    return st.one_of(good, good, good, junk)


@st.composite
def _frames(draw: st.DrawFn) -> list[bytes]:
    shape = draw(st.sampled_from(["message"] * 6 + ["raw", "bytes", "parts"]))
    if shape == "bytes":
        return [draw(st.binary(max_size=80))]
    if shape == "parts":
        return draw(st.lists(st.binary(max_size=20), min_size=2, max_size=3))
    cls = draw(st.sampled_from(ALL_TYPES))
    body = [draw(_field(t, meta)) for _n, t, meta in field_spec(cls)]
    version: Any = m.PROTOCOL_VERSION
    tag: Any = cls.TAG
    rid: Any = draw(st.integers(0, 2**64 - 1))
    if shape == "raw":  # damage the envelope
        version = draw(st.one_of(st.just(1), st.integers(-3, 3), st.text(max_size=2), st.none()))
        tag = draw(st.one_of(st.just(cls.TAG), st.text(max_size=8)))
        rid = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.none(), st.floats()))
        body = draw(st.one_of(st.just(body), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3), st.none()))
    frame = msgpack.packb([version, tag, rid, body], use_bin_type=True)
    if shape == "raw" and draw(st.booleans()):
        frame = frame[: draw(st.integers(0, len(frame)))]
    return [frame]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example([(b"fuzz", [b"\x94\x01\xaeallocate_store\x00\x93\xc4\x00\x00\x00"])])  # an empty store killed the leader
@given(st.lists(st.tuples(st.sampled_from(_IDENTITIES), _frames()), min_size=1, max_size=12))
def test_leader_never_raises_and_rejections_change_nothing(seq: list[tuple[bytes, list[bytes]]]) -> None:
    """Hypothesis: sequences of (mostly) malformed messages from a rank's, a client's and a stranger's socket.

    ``handle`` never raises, the registry's invariants hold after every message, and a message
    the leader rejects changes nothing (accepted ones may: they are legitimate requests).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        srv = _fresh_leader(run_dir, 0)
        try:
            for identity, frames in seq:
                before, rejected = _snapshot(srv), srv.core.counters.rejected_messages
                srv.handle(identity, frames)
                assert srv.core.registry is not None
                srv.core.registry.check_invariants()
                if srv.core.counters.rejected_messages > rejected:
                    assert _snapshot(srv) == before, (identity, frames)
        finally:
            srv.close()


def test_kill_leader_serving_continues_then_next_leader_sweeps_and_serves(make_config) -> None:
    """kill -9 the leader: noticed < 2 s, serving goes on without external hits (byte-exact);
    the next leader's start-up sweep removes the dead one's segment; the ranks rejoin it."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64")
    with SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=48)) as sim:
        assert sim.client is not None and sim.leader is not None and sim.leader.popen is not None
        prompts = _chats(3)
        sim.run(prompts)
        sim.quiesce()
        segment = f"/dev/shm/{segment_name(sim.instance)}"
        inode = os.stat(segment).st_ino
        dead = sim.leader
        t_kill = _kill(dead.popen)
        assert sim.client.match(sequence_hashes(prompts[0], BS)) == TierBlocks()
        assert time.monotonic() - t_kill < 2.0
        ext_before = sim.stats.tokens_from_host + sim.stats.tokens_from_disk
        sim.reset_engine_cache()
        t0 = time.monotonic()
        sim.run(prompts)  # every request computed by the engine itself
        assert time.monotonic() - t0 < 5.0
        assert sim.stats.tokens_from_host + sim.stats.tokens_from_disk == ext_before
        assert sim.stats.mismatches == 0 and sim.stats.load_failures == 0
        # A kill -9 leaves the segment; the next leader's start-up sweep removes it (any leader's:
        # when tests run in parallel, another instance's leader may have swept it already).
        assert _inode(segment) in (inode, None)
        dead.stop()  # (its log file)
        sim.client.close()
        sim.start_leader()
        assert _inode(segment) != inode
        _wait_status(sim.client, lambda s: s.leader_state is LeaderState.READY, 15, "the ranks re-registered")
        assert _inode(segment) not in (inode, None)  # the new leader's own segment
        sim.reset_engine_cache()
        sim.run(prompts)
        sim.reset_engine_cache()
        sim.run(prompts)
        assert sim.stats.tokens_from_host > ext_before and sim.stats.mismatches == 0
        _assert_accounting(sim.quiesce())


# ------------------------------------------------------------------------------------------
# load


def test_soak_short(tmp_path: Path) -> None:
    """The CI version of ``python -m kvbm.testing.sim.soak``: TP=2, 64 concurrent requests, G2<->G3 churn."""
    from kvbm.testing.sim.soak import SoakOptions, run_soak

    opts = SoakOptions(steps=40, concurrency=64, world_size=2, host_blocks=256, disk_blocks=1024,
                       sample_every=5, warmup_fraction=0.5, take_events=True, run_dir=str(tmp_path / "run"),
                       disk_dir=str(tmp_path / "disk"))
    rep = run_soak(opts)
    summary = "\n".join(rep.summary())
    assert rep.failures == [] and rep.steps == 40, summary
    assert rep.sim.mismatches == 0, summary
    assert rep.accounting_errors == [], summary
    assert rep.sim.tokens_from_host > 0 and rep.sim.tokens_from_disk > 0, summary
    ls = rep.leader_stats
    assert ls.counters.host_evictions > 0 and ls.counters.disk_evictions > 0 and ls.disk_tier.counters.onboarded_blocks > 0, summary
    assert ls.disk_tier.counters.checksum_failures == ls.disk_tier.counters.io_errors == 0, summary
    assert rep.flat, summary


# ------------------------------------------------------------------------------------------
# security


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_two_instances_at_once_never_collide_and_everything_is_private(make_config, tmp_path: Path) -> None:
    """Two simulated engines at once, same run dir and disk dir: separate sockets, segments and
    block files (names carry the instance), all private; each is byte-exact and hits only its own."""
    (tmp_path / "disk").mkdir()
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="128",
                      DYN_KVBM_DISK_CACHE_DIR=str(tmp_path / "disk"), DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    prompts = random_prompts(3, 8 * BS, seed=41)  # the same prompts in both
    files: dict[int, dict[str, str]] = {}
    results: dict[int, Any] = {}
    both_up = threading.Barrier(2, timeout=60)

    def engine(i: int) -> None:
        try:
            with SimEngine(cfg, world_size=1, model=SimModel(num_layers=2, num_gpu_blocks=40), seed=i) as sim:
                files[i] = {"socket": sim.endpoint[len("ipc://"):], "segment": f"/dev/shm/{segment_name(sim.instance)}",
                            "disk": disk_file_path(str(tmp_path / "disk"), sim.instance), "instance": sim.instance}
                both_up.wait()
                _run_each(sim, prompts)
                sim.reset_engine_cache()
                _run_each(sim, prompts)
                both_up.wait()  # both still running while the files are checked
                results[i] = (sim.stats, sim.quiesce())
                both_up.wait()
        except BaseException as e:  # noqa: BLE001  (reported on the main thread)
            results[i] = e
            both_up.abort()

    threads = [threading.Thread(target=engine, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in (0, 1):
        assert not isinstance(results.get(i), BaseException), results.get(i)
        stats, leader = results[i]
        # The oracles differ (seed): a block of the other instance would be a mismatch.
        assert stats.mismatches == 0
        assert stats.tokens_from_host + stats.tokens_from_disk == 3 * 7 * BS  # its own first pass
        _assert_accounting(leader)
    run_dir = cfg.run_dir
    assert _mode(run_dir) == 0o700 and os.stat(run_dir).st_uid == os.getuid()
    for kind in ("socket", "segment", "disk"):
        assert files[0][kind] != files[1][kind]
    for i in (0, 1):
        assert files[i]["instance"] in files[i]["segment"] and files[i]["instance"] in files[i]["disk"]
        assert os.path.dirname(files[i]["socket"]) == run_dir


def test_files_are_created_private(make_config, tmp_path: Path) -> None:
    """Run dir 0700 (an existing looser one is tightened), socket inside it, segment and block file 0600."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "run").mkdir(mode=0o755)
    os.chmod(tmp_path / "run", 0o755)
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="32",
                      DYN_KVBM_DISK_CACHE_DIR=str(tmp_path / "disk"))
    with SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, num_gpu_blocks=16)) as sim:
        assert _mode(cfg.run_dir) == 0o700
        sock = sim.endpoint[len("ipc://"):]
        assert sim.endpoint.startswith("ipc://") and os.path.dirname(sock) == cfg.run_dir
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        for path in (f"/dev/shm/{segment_name(sim.instance)}", disk_file_path(str(tmp_path / "disk"), sim.instance)):
            st_ = os.stat(path)
            assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == os.getuid(), path
    if os.geteuid() == 0:  # a run dir owned by someone else is refused
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, -1)
        with pytest.raises(PermissionError, match="not a directory owned by"):
            ensure_private_dir(str(other))


def test_non_loopback_bind_needs_the_explicit_setting(tmp_path: Path, caplog) -> None:
    """A leader refuses a non-loopback tcp address (flag or variable) unless DYN_KVBM_ALLOW_NON_LOOPBACK
    is set; allowed, it says so in the log. (Config parsing itself: tests/test_config.py.)"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    base.update({"DYN_KVBM_RUN_DIR": str(tmp_path / "run"), "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8"})
    leader = [sys.executable, "-m", "kvbm.leader", "--instance", f"sim-{os.getpid()}-tcp"]
    for extra_args, extra_env in (
        (["--endpoint", "tcp://0.0.0.0:39123"], {}),
        ([], {"DYN_KVBM_LEADER_ENDPOINT": "tcp://10.1.2.3:39123"}),
        ([], {"DYN_KVBM_LEADER_ZMQ_HOST": "0.0.0.0"}),
    ):
        r = subprocess.run(leader + extra_args, env={**base, **extra_env}, capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 2, r
        assert "DYN_KVBM_ALLOW_NON_LOOPBACK" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(PermissionError, match="DYN_KVBM_ALLOW_NON_LOOPBACK"):
        check_bind_endpoint("tcp://192.168.1.1:5555", allow_non_loopback=False)
    check_bind_endpoint("tcp://127.0.0.1:5555", allow_non_loopback=False)
    with caplog.at_level("WARNING", logger="kvbm.ipc.transport"):
        check_bind_endpoint("tcp://0.0.0.0:5555", allow_non_loopback=True)
    assert "non-loopback" in caplog.text
    with pytest.raises(ConfigError, match="DYN_KVBM_ALLOW_NON_LOOPBACK"):
        load_config({"DYN_KVBM_LEADER_ENDPOINT": "tcp://0.0.0.0:5555", "DYN_KVBM_CPU_CACHE_GB": "1"})


def test_segment_of_unexpected_size_mode_owner_or_header_is_never_attached() -> None:
    geom = PoolGeometry(4, 8192)
    name = f"sim-{os.getpid()}-attach"
    pool = HostPool.create(name, geom)
    path = f"/dev/shm/{pool.name}"
    try:
        assert _mode(path) == 0o600
        with pytest.raises(ShmError, match="bytes, expected"):
            HostPool.attach(pool.name, PoolGeometry(5, 8192))
        with pytest.raises(ShmError, match="unexpected header"):  # same size, other geometry
            HostPool.attach(pool.name, PoolGeometry(8, 4096))
        os.chmod(path, 0o644)
        with pytest.raises(ShmError, match="mode"):
            HostPool.attach(pool.name, geom)
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            os.chown(path, 65534, -1)
            with pytest.raises(ShmError, match="owned by uid 65534"):
                HostPool.attach(pool.name, geom)
            os.chown(path, 0, -1)
        HostPool.attach(pool.name, geom).close()  # the real thing still attaches
        link = f"/dev/shm/{segment_name(name + '-link')}"
        os.symlink(path, link)
        try:
            with pytest.raises(ShmError, match="cannot open"):
                HostPool.attach(os.path.basename(link), geom)
        finally:
            os.unlink(link)
    finally:
        pool.close()
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_sweep_never_removes_another_users_segment() -> None:
    """A stale-looking segment (dead owner pid) of another user is not ours to remove."""
    import mmap

    pool = HostPool.create(f"sim-{os.getpid()}-foreign", PoolGeometry(1, 4096))
    path = f"/dev/shm/{pool.name}"
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        mm[12:16] = (2**22 + 12345).to_bytes(4, "little")  # owner pid: one that cannot exist
    pool.owner = False
    pool.close()
    try:
        os.chown(path, 65534, -1)
        assert pool.name not in sweep_stale_segments() and os.path.exists(path)
        os.chown(path, os.getuid(), -1)
        assert pool.name in sweep_stale_segments()  # ours, owner dead: removed
    finally:
        if os.path.exists(path):
            os.unlink(path)
