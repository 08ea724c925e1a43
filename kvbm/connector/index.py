"""A scheduler-local read replica of the leader's block index (sequence hash -> tiers).

The leader streams its index as :class:`~kvbm.leader.client.IndexDelta` records with sequence numbers: the first
answer (``index_since(0)``) is a full snapshot, later ones are the changes since the number
the previous answer gave. :class:`IndexReplica` applies them and answers the same question as
the leader's ``Match`` (how many blocks from the start are in G2, then in G3) with a local dict
walk: no round trip on the engine's scheduler thread.

The replica may lag the leader. A hash it does not know yet is a miss (the block is computed
again); a hash the leader already evicted is claimed, and the pin that follows (PrepareLoad)
grants fewer blocks than asked, so the engine recomputes the rest through its load-error path.
Either way the KV loaded is never wrong: only the leader's pin decides what is copied.

:class:`IndexFollower` keeps a replica current from a background thread that long-polls the
leader (waiting in the source's ZMQ poll, which releases the GIL), never spinning.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.ipc.messages import MAX_INDEX_WAIT_MS, BlockEventKind
from kvbm.ipc.transport import Interrupted
from kvbm.leader.client import IndexDelta, LeaderClient
from kvbm.leader.index import MAX_REPLY_ENTRIES
from kvbm.leader.registry import Tier

log = logging.getLogger(__name__)

# The longest a follower round waits at the leader for the index to move (a long-poll). Each
# round takes the GIL from the engine's scheduler thread several times (encode, send, poll,
# receive, apply): an idle leader costs one round per this long, and a change reaches the
# replica one round trip after the leader made it.
LONG_POLL_S = 1.0
# The pause after each answer: a busy leader's index moves all the time, and without it every
# commit batch would be a round. With it a busy leader costs at most ~100 rounds a second (what
# the 10 ms polling before long-polls cost even when idle); a catch-up cuts the pause short.
ROUND_INTERVAL_S = 0.01


class IndexSource(Protocol):
    """Where deltas come from (the leader client); None while the leader is unavailable.

    With ``wait_ms`` > 0 a long-poll (see :meth:`LeaderClient.index_since`) that raises
    :class:`~kvbm.ipc.transport.Interrupted` when ``wake_fd`` becomes readable first."""

    def index_since(self, seq: int, wait_ms: int = 0, wake_fd: int | None = None) -> IndexDelta | None: ...


_HOST, _DISK = 1, 2  # tier bits of an entry
_BIT = {int(Tier.HOST): _HOST, int(Tier.DISK): _DISK}
_KINDS = {int(k) for k in BlockEventKind}


class IndexReplica:
    """hash -> tier bits, applied from deltas; lookups answer like the leader's Match.

    One writer (the follower thread) and one reader (the scheduler thread): every mutation is
    a single dict or set operation, atomic under the GIL, and a reset swaps one tuple holding
    both containers, so a lookup sees either the old or the new view, never a torn one.
    """

    def __init__(self) -> None:
        # (hash -> tier bits, hashes held only in G3): G3-only blocks are rare (most blocks are
        # in G2, or in both), so the G2 count of a run needs no second walk unless some exist.
        self._view: tuple[dict[int, int], set[int]] = ({}, set())
        self.seq = 0  # next sequence number to ask for
        self.synced = False  # a snapshot was applied: lookups are answered
        self._advanced = threading.Condition()  # notified when seq moves or the view is dropped
        # Asks the keeper of the replica (IndexFollower) for a round now; None: nobody keeps it.
        self.request_round: Callable[[], None] | None = None

    def apply(self, delta: IndexDelta) -> None:
        """Apply one delta (a snapshot when ``delta.reset``)."""
        if not (len(delta.kinds) == len(delta.tiers) == len(delta.hashes)):
            raise ValueError(f"index delta: kinds/tiers/hashes lengths differ "
                             f"({len(delta.kinds)}/{len(delta.tiers)}/{len(delta.hashes)})")
        entries = list(zip(delta.kinds.tolist(), delta.tiers.tolist(), delta.hashes.tolist()))
        for kind, tier, _ in entries:  # validate first: a bad delta changes nothing
            if tier not in _BIT:
                raise ValueError(f"index delta: tier {tier} is not one of {sorted(_BIT)}")
            if kind not in _KINDS:
                raise ValueError(f"index delta: event kind {kind} is not one of {sorted(_KINDS)}")
        if delta.reset:
            where: dict[int, int] = {}
            disk_only: set[int] = set()
        elif not self.synced:
            return  # changes without a snapshot to apply them to: wait for the snapshot
        else:
            where, disk_only = self._view
        for kind, tier, h in entries:
            bit = _BIT[tier]
            if kind == BlockEventKind.STORED:
                _set(where, disk_only, h, where.get(h, 0) | bit)
            elif kind == BlockEventKind.REMOVED:
                _set(where, disk_only, h, where.get(h, 0) & ~bit)
            else:  # CLEARED: every block of the tier
                for g in [g for g, bits in where.items() if bits & bit]:
                    _set(where, disk_only, g, where[g] & ~bit)
        if delta.reset:
            self._view = (where, disk_only)
            self.synced = True
        with self._advanced:
            self.seq = delta.next_seq  # after the view: a reader seeing seq sees its changes
            self._advanced.notify_all()

    def unsync(self) -> None:
        """Forget the view (the leader restarted or is gone): lookups fall back until a snapshot."""
        with self._advanced:
            self.synced = False
            self.seq = 0
            self._advanced.notify_all()

    def catch_up(self, seq: int, timeout_s: float) -> bool:
        """True once the replica holds the leader's index up to sequence number ``seq``: at once
        when it does already, else after asking for a round and waiting up to ``timeout_s``.
        False when it is not synced, nobody keeps it current, or the wait timed out."""
        if not self.synced:
            return False
        if self.seq >= seq:
            return True
        if self.request_round is None:
            return False
        with self._advanced:
            self.request_round()
            self._advanced.wait_for(lambda: not self.synced or self.seq >= seq, timeout_s)
            return self.synced and self.seq >= seq

    def match(self, hashes: Sequence[int]) -> tuple[int, int] | None:
        """(blocks in G2, blocks only in G3) of the longest run of known hashes from the
        start, as the leader's Match counts them; None while no snapshot was applied."""
        if not self.synced:
            return None
        where, disk_only = self._view
        # takewhile with a C predicate keeps the walk in C (the leader's registry does the same).
        run = list(itertools.takewhile(where.__contains__, hashes))
        disk = len(disk_only.intersection(run)) if disk_only and run else 0
        return len(run) - disk, disk

    def __len__(self) -> int:
        return len(self._view[0])


def _set(where: dict[int, int], disk_only: set[int], h: int, bits: int) -> None:
    if bits:
        where[h] = bits
    else:
        where.pop(h, None)
    if bits == _DISK:
        disk_only.add(h)
    else:
        disk_only.discard(h)


class IndexFollower:
    """Keeps an :class:`IndexReplica` current from a source, on its own daemon thread.

    ``make_source`` is called on that thread: the source (a leader client with its own
    socket) is then used by that thread only. Each round asks ``index_since(replica.seq)`` as a
    long-poll of up to ``wait_s``: the leader answers as soon as its index moves past that
    position (or with nothing after ``wait_s``), so a fresh store reaches the replica within a
    round trip and an idle leader costs one round per ``wait_s``. The thread waits in the
    source's socket poll, or ``interval_s`` after each answer on a pipe (both release the GIL):
    > 0 caps the rounds a busy leader causes, at that much added staleness. ``wait_s`` = 0
    polls every ``interval_s`` instead (each answer at once).

    A None answer (leader unavailable) unsyncs the replica, so lookups fall back to the
    leader's Match until a fresh snapshot arrives. :meth:`sync` and
    :meth:`IndexReplica.catch_up` wake the thread: a parked poll is given up and the next round
    is answered at once.
    """

    def __init__(self, replica: IndexReplica, make_source: Callable[[], IndexSource], *,
                 wait_s: float = LONG_POLL_S, interval_s: float = ROUND_INTERVAL_S,
                 close_source: Callable[[IndexSource], None] | None = None) -> None:
        if not 0 <= wait_s <= MAX_INDEX_WAIT_MS / 1000:
            raise ValueError(f"wait_s must be in [0, {MAX_INDEX_WAIT_MS / 1000:g}] seconds, got {wait_s}")
        if interval_s < 0 or (interval_s == 0 and round(wait_s * 1000) == 0):
            raise ValueError(f"interval_s must be >= 0 seconds, and > 0 when wait_s is 0 (polling), "
                             f"got interval_s={interval_s}, wait_s={wait_s}")
        self.replica = replica
        self._make_source = make_source
        self._close_source = close_source
        self._wait_ms = round(wait_s * 1000)
        self._interval_s = interval_s
        self._stop = threading.Event()
        # Readable: start the next round now, answered at once (a pipe, so the source's socket
        # poll wakes on it too).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._rounds = threading.Condition()
        self._started = 0  # rounds started
        self._caught_up = 0  # the last round that applied a complete (uncapped) answer
        self._thread = threading.Thread(target=self._run, name="kvbm-index", daemon=True)
        replica.request_round = self._wake

    def start(self) -> "IndexFollower":
        self._thread.start()
        return self

    def _wake(self) -> None:
        if self._wake_w < 0:
            return  # stopped
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the follower stopped)

    def _woken(self) -> bool:
        """Drain the wake-up pipe; True if a wake-up was pending."""
        try:
            return bool(os.read(self._wake_r, 4096))
        except BlockingIOError:
            return False

    def _run(self) -> None:
        source = self._make_source()
        try:
            woken = True  # the first round is answered at once
            while not self._stop.is_set():
                woken = self._woken() or woken
                with self._rounds:
                    self._started += 1
                    round_no = self._started
                try:
                    delta = self._ask(source, 0 if woken or not self.replica.synced else self._wait_ms)
                except Interrupted:  # a sync or catch-up: give up the parked poll, ask again at once
                    woken = True
                    continue
                woken = False
                if delta is None:
                    self.replica.unsync()
                    self._pause(max(self._interval_s, 0.1))
                    continue
                try:
                    self.replica.apply(delta)
                except ValueError as e:
                    log.error("kvbm index follower: %s; asking for a fresh snapshot", e)
                    self.replica.unsync()
                    continue
                if len(delta.hashes) < MAX_REPLY_ENTRIES:  # a capped answer has more behind it
                    with self._rounds:
                        self._caught_up = round_no
                        self._rounds.notify_all()
                    if self._interval_s:
                        self._pause(self._interval_s)
        finally:
            if self._close_source is not None:
                self._close_source(source)

    def _ask(self, source: IndexSource, wait_ms: int) -> IndexDelta | None:
        seq = self.replica.seq if self.replica.synced else 0
        try:
            if wait_ms:
                return source.index_since(seq, wait_ms, self._wake_r)
            return source.index_since(seq)
        except Interrupted:
            raise
        except Exception as e:  # a follower bug must not take the engine down: fall back
            log.error("kvbm index follower: %s: %s; lookups go to the leader", type(e).__name__, e)
            return None

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` or until woken (the wake-up stays pending for the next round)."""
        select.select([self._wake_r], [], [], seconds)

    def sync(self, timeout_s: float = 5.0, *, give_up: Callable[[], bool] | None = None,
             check_every_s: float = 0.2) -> bool:
        """Wait until a round that started after this call has caught up with the leader;
        False if that took longer than ``timeout_s`` (leader unavailable, say), or as soon as
        ``give_up()`` (asked every ``check_every_s``) says there is no point waiting."""
        deadline = time.monotonic() + timeout_s
        with self._rounds:
            target = self._started + 1
            self._wake()
            while True:
                remaining = deadline - time.monotonic()
                slice_s = remaining if give_up is None else min(remaining, check_every_s)
                if self._rounds.wait_for(lambda: self._caught_up >= target, max(slice_s, 0.0)):
                    return True
                if remaining <= slice_s or (give_up is not None and give_up()):
                    return False

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if not self._thread.is_alive() and self._wake_w >= 0:  # a thread still running keeps its pipe
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


def follow_leader(endpoint: str, *, wait_s: float = LONG_POLL_S, interval_s: float = ROUND_INTERVAL_S) -> IndexFollower:
    """A started follower keeping a new replica current from the leader at ``endpoint``
    (its own client and socket, on the follower's thread)."""

    def close(source: IndexSource) -> None:
        assert isinstance(source, LeaderClient)
        source.close()

    return IndexFollower(IndexReplica(), lambda: LeaderClient(endpoint), wait_s=wait_s, interval_s=interval_s,
                         close_source=close).start()


def follower_for(config: KvbmConfig, endpoint: str) -> IndexFollower | None:
    """The index follower an engine's planner should use: None (every lookup asks the leader)
    when ``DYN_KVBM_INDEX_REPLICA`` is off, or when the object tier is on: the replica mirrors
    G2 and G3 only, and blocks other instances put in the store are found by the leader's store
    lookups, which only a Match starts."""
    if not config.index_replica or config.object_enabled:
        return None
    return follow_leader(endpoint)
