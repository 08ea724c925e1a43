"""LeaderClient.index_since against a real leader and real ranks: the stream mirrors what matches,
and long-polls park until a commit (or their wait ends), several at once, none left behind."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from kvbm.connector.index import follow_leader
from kvbm.ipc.messages import MAX_INDEX_WAIT_MS, BlockEventKind, ErrorReply, IndexSince, decode, encode
from kvbm.leader.client import IndexDelta, LeaderClient, TierBlocks
from kvbm.leader.registry import Tier
from kvbm.testing.sim.engine import SimEngine, chat_workload
from kvbm.testing.sim.rank import SimModel

pytestmark = pytest.mark.slow  # leader and rank processes


def test_index_stream_mirrors_the_leaders_matchable_set(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    with SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, kv_heads=1, head_dim=32)) as sim:
        client = sim.client
        assert client is not None
        first = client.index_since(0)
        assert first is not None and first.reset and first.hashes.size == 0
        view: set[int] = set()
        seq = first.next_seq
        for prompt in chat_workload(4, 2, system_tokens=64, turn_tokens=40, seed=3):
            sim.run([prompt])
            stats = sim.quiesce()
        assert stats.counters.host_evictions > 0, str(stats)  # removals are part of the stream
        while True:
            d = client.index_since(seq)
            assert d is not None and not d.reset
            assert d.kinds.dtype == np.uint8 and d.tiers.dtype == np.uint8 and d.hashes.dtype == np.uint64
            for kind, tier, h in zip(d.kinds, d.tiers, d.hashes.tolist()):
                assert Tier(tier) is Tier.HOST
                if kind == BlockEventKind.STORED:
                    view.add(h)
                elif kind == BlockEventKind.REMOVED:
                    view.discard(h)
                else:
                    view.clear()
            if d.next_seq == seq:
                break
            seq = d.next_seq
        assert len(view) == stats.host.registered
        snap = client.index_since(0)
        assert snap is not None and snap.reset and set(snap.hashes.tolist()) == view and snap.next_seq == seq
        assert client.match(sorted(view)[:1]) == TierBlocks(host=1)


def test_index_since_without_a_leader_is_none(tmp_path) -> None:
    client = LeaderClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.05)
    try:
        assert client.index_since(0) is None
    finally:
        client.close()


# ------------------------------------------------------------------------------------------
# long-polls against a real leader socket

_MODEL = SimModel(num_layers=1, kv_heads=1, head_dim=32)


def _parked(client: LeaderClient) -> int:
    return int(client.stats().index_polls_parked)


def test_a_parked_long_poll_is_answered_right_after_a_commit(make_config) -> None:
    """Several clients park long-polls of 30 s; a commit answers all of them within a round trip
    (the follower then sees a store about as soon as the leader's stats do)."""
    with SimEngine(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64", DYN_KVBM_INDEX_REPLICA="0"),
                   world_size=2, model=_MODEL) as sim:
        client = sim.client
        assert client is not None
        prompts = list(chat_workload(1, 6, system_tokens=64, turn_tokens=40, seed=5))
        sim.run([prompts[0]])
        sim.quiesce()
        pollers = [LeaderClient(sim.endpoint, timeout_s=5.0) for _ in range(3)]
        follower = follow_leader(sim.endpoint, wait_s=30.0)
        try:
            assert follower.sync(10.0)
            snap = pollers[0].index_since(0)
            assert snap is not None
            answers: list[tuple[float, IndexDelta | None]] = []
            threads = [threading.Thread(target=lambda c=c: answers.append(
                (time.monotonic(), c.index_since(snap.next_seq, 30_000)))) for c in pollers]
            for t in threads:
                t.start()
            _until(lambda: _parked(client) == 4, "3 polls and the follower's parked")
            lags: list[float] = []
            for prompt in prompts[1:]:
                seq = follower.replica.seq
                sim.run([prompt])
                while client.stats() and client.index_seq <= seq:  # the leader's position, as soon as it moved
                    pass
                seen = time.monotonic()
                target = client.index_seq  # no catch_up: that would wake the follower, not wait for the push
                _until(lambda: follower.replica.seq >= target, "the follower to catch up", 25.0)
                lags.append(time.monotonic() - seen)
            for t in threads:
                t.join(5.0)
            assert len(answers) == 3
            assert all(d is not None and len(d.hashes) > 0 and not d.reset for _, d in answers)
        finally:
            follower.stop()
            for c in pollers:
                c.close()
        lags.sort()
        print(f"follower lag behind the leader's stats after a commit: median {lags[len(lags) // 2] * 1e3:.1f} ms, "
              f"max {lags[-1] * 1e3:.1f} ms (long-poll of 30 s)")
        assert lags[len(lags) // 2] < 0.05, lags  # a push, not the end of a 30 s wait


@pytest.fixture
def idle_leader(make_config) -> Iterator[tuple[SimEngine, LeaderClient]]:
    """A one-rank engine whose planner keeps no replica (index polls come only from the test),
    and its leader client."""
    with SimEngine(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_INDEX_REPLICA="0"),
                   world_size=1, model=_MODEL) as sim:
        assert sim.client is not None
        yield sim, sim.client


def test_a_long_poll_on_an_idle_leader_ends_empty_after_its_wait(idle_leader: tuple[SimEngine, LeaderClient]) -> None:
    sim, client = idle_leader
    snap = client.index_since(0)
    assert snap is not None
    t0 = time.monotonic()
    d = client.index_since(snap.next_seq, 300)
    took = time.monotonic() - t0
    assert d is not None and not d.reset and d.next_seq == snap.next_seq and d.hashes.size == 0
    assert 0.25 <= took < 3.0, took
    assert _parked(client) == 0


def test_a_follower_killed_while_parked_leaves_nothing_behind(idle_leader: tuple[SimEngine, LeaderClient]) -> None:
    sim, client = idle_leader
    code = ("import sys; from kvbm.leader.client import LeaderClient; c = LeaderClient(sys.argv[1], timeout_s=5); "
            "d = c.index_since(0); print('parked', flush=True); c.index_since(d.next_seq, 500)")
    proc = subprocess.Popen([sys.executable, "-c", code, sim.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "parked"
        _until(lambda: _parked(client) == 1, "the poll to park")
        proc.kill()
        proc.wait(5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)
    _until(lambda: _parked(client) == 0, "the parked poll to expire", 5.0)
    assert client.index_since(0) is not None  # the leader serves on


def test_a_bad_wait_is_rejected_and_parks_nothing(idle_leader: tuple[SimEngine, LeaderClient]) -> None:
    sim, client = idle_leader
    snap = client.index_since(0)
    assert snap is not None
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)  # raw frames: a bad one is answered with request id 0
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sim.endpoint)
    try:
        for bad in (MAX_INDEX_WAIT_MS + 1, -1, 2.5, "1"):
            sock.send(encode(IndexSince(snap.next_seq, bad)))  # type: ignore[arg-type]
            assert sock.poll(5000), "no answer"
            _, reply = decode(sock.recv())
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request", reply
            assert "index_since.wait_ms" in reply.message, reply.message
    finally:
        sock.close(0)
    assert _parked(client) == 0


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
