"""The scheduler-local index replica, fed in process with the leader's delta contract.

The replica must answer exactly what the leader's Match answers for the same registry
(checked against a real BlockRegistry), apply snapshots and changes in order, and fall back
(None) whenever it has no snapshot.
"""

from __future__ import annotations

import random
import select
import threading
import time

import numpy as np
import pytest

from kvbm.connector.index import IndexFollower, IndexReplica
from kvbm.ipc.messages import BlockEventKind
from kvbm.ipc.transport import Interrupted
from kvbm.leader.client import IndexDelta
from kvbm.leader.registry import BlockRegistry, Tier

S, R, C = BlockEventKind.STORED, BlockEventKind.REMOVED, BlockEventKind.CLEARED


def delta(entries: list[tuple[BlockEventKind, Tier, int]], *, reset: bool = False, next_seq: int = 1) -> IndexDelta:
    return IndexDelta(reset, next_seq, np.array([int(k) for k, _, _ in entries], np.uint8),
                      np.array([int(t) for _, t, _ in entries], np.uint8),
                      np.array([h for _, _, h in entries], np.uint64))


def test_no_snapshot_means_fallback() -> None:
    rep = IndexReplica()
    assert rep.match([1, 2, 3]) is None
    rep.apply(delta([(S, Tier.HOST, 1)], next_seq=5))  # changes without a snapshot are ignored
    assert rep.match([1]) is None and rep.seq == 0
    rep.apply(delta([(S, Tier.HOST, 1)], reset=True, next_seq=7))
    assert rep.match([1, 2]) == (1, 0) and rep.seq == 7
    rep.unsync()
    assert rep.match([1]) is None and rep.seq == 0


def test_tiers_removal_clear_and_reset() -> None:
    rep = IndexReplica()
    rep.apply(delta([(S, Tier.HOST, 10), (S, Tier.HOST, 11), (S, Tier.DISK, 11), (S, Tier.DISK, 12)], reset=True))
    assert rep.match([10, 11, 12, 13]) == (2, 1)
    rep.apply(delta([(R, Tier.HOST, 11)], next_seq=2))  # evicted from G2, still on disk
    assert rep.match([10, 11, 12]) == (1, 2)
    rep.apply(delta([(R, Tier.DISK, 11)], next_seq=3))
    assert rep.match([10, 11, 12]) == (1, 0) and len(rep) == 2
    rep.apply(delta([(C, Tier.DISK, 0)], next_seq=4))
    assert rep.match([10]) == (1, 0) and rep.match([12]) == (0, 0)
    rep.apply(delta([(S, Tier.DISK, 99)], reset=True, next_seq=9))  # a snapshot replaces everything
    assert rep.match([10]) == (0, 0) and rep.match([99]) == (0, 1) and rep.seq == 9


@pytest.mark.parametrize("bad, what", [((7, int(Tier.HOST)), "event kind 7"), ((0, 9), "tier 9")])
def test_bad_entries_are_refused_with_the_value(bad: tuple[int, int], what: str) -> None:
    rep = IndexReplica()
    d = IndexDelta(True, 1, np.array([bad[0]], np.uint8), np.array([bad[1]], np.uint8), np.array([1], np.uint64))
    with pytest.raises(ValueError, match=what):
        rep.apply(d)
    with pytest.raises(ValueError, match="lengths differ"):
        rep.apply(IndexDelta(True, 1, np.zeros(2, np.uint8), np.zeros(1, np.uint8), np.zeros(1, np.uint64)))
    assert rep.match([1]) is None  # nothing half-applied


def test_matches_the_leader_registry_on_random_histories() -> None:
    """The same stored / evicted blocks in a real registry and, as events, in the replica."""
    rng = random.Random(3)
    reg = BlockRegistry(host_capacity=24, disk_capacity=48)
    rep = IndexReplica()
    rep.apply(delta([], reset=True))
    seq = 1
    chains = [[rng.getrandbits(63) for _ in range(12)] for _ in range(8)]
    for _ in range(200):
        chain = rng.choice(chains)
        hashes = chain[: rng.randint(1, len(chain))]
        pool = rng.choice([reg.host, reg.disk])
        pool.commit([s for s in pool.allocate(hashes) if s is not None])  # may evict older blocks
        seq += 1
        rep.apply(delta([(e.kind, e.tier, e.seq_hash) for e in reg.drain_events()],
                        next_seq=seq))
        probe = rng.choice(chains)
        want = reg.match(probe)
        assert rep.match(probe) == (want.host, want.disk)


class _Feed:
    """An in-process leader stream: a snapshot at seq 0, then queued deltas; None = unavailable.
    A long-poll (``wait_ms`` > 0) waits for a delta, the wait's end or ``wake_fd``, like the leader."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.waits: list[int] = []
        self.interrupted = 0
        self.lock = threading.Lock()
        self.pending: list[IndexDelta] = []
        self.down = False

    def index_since(self, seq: int, wait_ms: int = 0, wake_fd: int | None = None) -> IndexDelta | None:
        deadline = time.monotonic() + wait_ms / 1000
        with self.lock:
            self.calls.append(seq)
            self.waits.append(wait_ms)
        while True:
            with self.lock:
                if self.down:
                    return None
                if seq == 0:
                    return delta([(S, Tier.HOST, 1)], reset=True, next_seq=1)
                if self.pending:
                    return self.pending.pop(0)
            if time.monotonic() >= deadline:
                return delta([], next_seq=seq)
            if wake_fd is not None and select.select([wake_fd], [], [], 0.002)[0]:
                with self.lock:
                    self.interrupted += 1
                raise Interrupted("woken")
            time.sleep(0.002)


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_follower_thread_keeps_the_replica_current_and_unsyncs_when_the_leader_goes() -> None:
    feed = _Feed()
    rep = IndexReplica()
    closed: list[object] = []
    follower = IndexFollower(rep, lambda: feed, close_source=closed.append).start()
    try:
        _until(lambda: rep.match([1]) == (1, 0))
        with feed.lock:
            feed.pending.append(delta([(S, Tier.DISK, 2)], next_seq=2))
        _until(lambda: rep.match([1, 2]) == (1, 1))
        with feed.lock:
            feed.down = True
        _until(lambda: rep.match([1]) is None)  # leader gone: lookups fall back
        with feed.lock:
            feed.down = False
        _until(lambda: rep.match([1, 2]) == (1, 0))  # a fresh snapshot after it came back
    finally:
        follower.stop()
    assert closed == [feed]
    assert feed.calls[0] == 0 and 1 in feed.calls and 2 in feed.calls


def test_follower_long_polls_and_a_sync_cuts_a_parked_poll_short() -> None:
    """Rounds after the snapshot are long-polls (no sleep between them, no round while nothing
    changes); a sync gives up the parked one and is answered by a round asked at once."""
    feed = _Feed()
    rep = IndexReplica()
    follower = IndexFollower(rep, lambda: feed, wait_s=30.0).start()
    try:
        _until(lambda: rep.match([1]) == (1, 0))
        _until(lambda: 30_000 in feed.waits)  # parked: the feed holds it for up to 30 s
        with feed.lock:
            feed.pending.append(delta([(S, Tier.DISK, 2)], next_seq=2))
        t0 = time.monotonic()
        _until(lambda: rep.match([1, 2]) == (1, 1))  # the parked poll is answered by the change
        assert time.monotonic() - t0 < 1.0
        _until(lambda: feed.waits[-1] == 30_000 and feed.calls[-1] == 2)  # parked again
        rounds = len(feed.calls)
        t0 = time.monotonic()
        assert follower.sync(5.0)
        assert time.monotonic() - t0 < 1.0 and feed.interrupted == 1
        assert feed.waits[rounds] == 0  # the round after the wake-up is answered at once
        time.sleep(0.1)
        assert len(feed.calls) <= rounds + 2  # idle: parked again, not polling
    finally:
        follower.stop()


def test_follower_polls_every_interval_without_long_polls() -> None:
    feed = _Feed()
    rep = IndexReplica()
    follower = IndexFollower(rep, lambda: feed, wait_s=0, interval_s=0.01).start()
    try:
        _until(lambda: len(feed.calls) > 5)
        assert set(feed.waits) == {0}
    finally:
        follower.stop()


@pytest.mark.parametrize("kwargs,error", [
    ({"wait_s": 0, "interval_s": 0}, "interval_s must be >= 0 seconds, and > 0 when wait_s is 0"),
    ({"interval_s": -1}, "interval_s must be >= 0 seconds"),
    ({"wait_s": -1}, r"wait_s must be in \[0, 60\] seconds, got -1"),
    ({"wait_s": 61}, r"wait_s must be in \[0, 60\] seconds, got 61"),
])
def test_follower_refuses_bad_timing(kwargs, error) -> None:
    with pytest.raises(ValueError, match=error):
        IndexFollower(IndexReplica(), _Feed, **kwargs)


def test_sync_gives_up_when_told_instead_of_waiting_out_its_timeout(tmp_path) -> None:
    """A follower of a leader that is gone (here: never there) would wait out ``sync``'s whole
    timeout; a caller that knows (its spawned leader exited) stops the wait at once."""
    from kvbm.connector.index import follow_leader

    follower = follow_leader(f"ipc://{tmp_path}/nobody.sock")
    try:
        t0 = time.monotonic()
        asked: list[float] = []
        assert not follower.sync(30.0, give_up=lambda: bool(asked.append(time.monotonic())) or len(asked) >= 2)
        assert len(asked) == 2 and time.monotonic() - t0 < 10.0  # two checks, not 30 s
    finally:
        follower.stop()
