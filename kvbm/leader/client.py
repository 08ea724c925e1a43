"""Scheduler-side client of the leader.

Engine-facing code must never crash or hang because the leader is slow, gone or not ready
yet: every call has a short timeout, and while the leader is unavailable the client answers
"no external hits" and allocates nothing (logging the cause once), re-probing at most once a
second. A dead leader is noticed within the call timeout (default 1 s).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderState, LeaderStats
from kvbm.ipc.transport import M, LeaderUnavailable, RemoteError, RpcClient

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
# A probe of a leader that is not answering must not stall the engine's scheduler: a short
# timeout, and the probe interval doubles (up to MAX_PROBE_INTERVAL_S) while it stays silent.
PROBE_TIMEOUT_S = 0.1
MAX_PROBE_INTERVAL_S = 4.0


@dataclass(frozen=True)
class TierBlocks:
    """Blocks of a lookup by the tier that holds them, in the order a load takes them: G2 (host)
    first, then G3 (disk), then G4 (the object store); G3 and G4 blocks are staged through G2."""

    host: int = 0
    disk: int = 0
    object: int = 0

    @property
    def total(self) -> int:
        return self.host + self.disk + self.object

    def first(self, n: int) -> TierBlocks:
        """The split of the first ``n`` blocks (a shorter load keeps the nearer tiers' blocks)."""
        host = min(self.host, max(n, 0))
        disk = min(self.disk, max(n, 0) - host)
        return TierBlocks(host, disk, min(self.object, max(n, 0) - host - disk))


@dataclass(frozen=True)
class LoadGrantInfo:
    op_id: int  # 0: nothing granted
    slots: list[int]  # host slot per granted block (a prefix of the requested hashes)
    ready: bool  # False while blocks are being staged from disk


@dataclass(frozen=True)
class IndexDelta:
    """Changes of the leader's index (see :meth:`LeaderClient.index_since`), as parallel arrays.

    ``reset``: drop the whole local view first; the entries are then a full snapshot (all
    STORED). ``kinds``: :class:`kvbm.ipc.messages.BlockEventKind` values; ``tiers``:
    :class:`kvbm.leader.registry.Tier` values; ``next_seq``: the sequence number to ask next.
    """

    reset: bool
    next_seq: int
    kinds: np.ndarray  # uint8
    tiers: np.ndarray  # uint8
    hashes: np.ndarray  # uint64


@dataclass(frozen=True)
class StoreGrantInfo:
    op_id: int  # 0: nothing to copy
    slots: list[int]  # per requested hash: host slot, or -1 (already held); may be shorter (pool full)


class LeaderClient:
    """Talks to one leader; degrades to 'no hits' while it is unavailable. Not thread-safe."""

    def __init__(self, endpoint: str, *, timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._rpc = RpcClient(endpoint)
        self._status: m.Status | None = None
        self._next_probe = 0.0
        self._probe_interval = PROBE_INTERVAL_S
        self._logged: str | None = None
        # The highest leader index position a reply reported (Match, GetStats, ResetCache): a
        # local index replica must reach it before answering a lookup, so no lookup sees an
        # index older than something this client already observed.
        self.index_seq = 0

    # -- availability --------------------------------------------------------------------
    @property
    def status(self) -> m.Status | None:
        return self._status

    def is_ready(self) -> bool:
        """True when the leader answered 'ready' (re-probed at most once per second otherwise)."""
        if self._status is not None and self._status.leader_state is LeaderState.READY:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_INTERVAL_S
        self.refresh()
        return self._status is not None and self._status.leader_state is LeaderState.READY

    def wait_ready(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Ask the leader every ``poll_s`` until it answers 'ready' (True) or ``timeout_s`` passes
        (False). For callers that may block, such as a harness starting an engine; the engine's
        own calls never wait for the leader."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.refresh(starting=True)
            if status is not None and status.leader_state is LeaderState.READY:
                return True
            if status is not None and status.leader_state is LeaderState.FAILED:
                return False
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)

    def refresh(self, *, starting: bool = False) -> m.Status | None:
        """Ask the leader for its status now (None: no answer). ``starting``: an engine's start-up
        wait asks, which reports what was missing at its deadline: a leader not up yet, or
        still waiting for ranks, is expected then and not logged."""
        try:
            self._status = self._rpc.call(m.GetStatus(), min(self.timeout_s, PROBE_TIMEOUT_S), m.Status)
        except (LeaderUnavailable, RemoteError) as e:
            if starting:
                self._status = None
            else:
                self._down(str(e))
            return None
        self._probe_interval = PROBE_INTERVAL_S
        if starting:
            return self._status
        if self._status.leader_state is not LeaderState.READY:
            self._note(f"leader at {self.endpoint} is {self._status.state}: {self._status.error or 'waiting for ranks'}")
        elif self._logged is not None:
            log.info("leader at %s is ready again", self.endpoint)
            self._logged = None
        return self._status

    def _down(self, why: str) -> None:
        self._status = None
        self._next_probe = time.monotonic() + self._probe_interval
        self._probe_interval = min(2 * self._probe_interval, MAX_PROBE_INTERVAL_S)
        self._note(f"kvbm leader unavailable ({why}); serving without external KV hits")

    def _note(self, text: str) -> None:
        if self._logged != text:
            log.warning("%s", text)
            self._logged = text

    def _call(self, msg: m.Message, expect: type[M], *, extra_s: float = 0.0, wake_fd: int | None = None) -> M | None:
        """The reply, or None if it failed (one request: the lean path of :meth:`_call_many`).
        ``extra_s``: how long the leader may hold the answer on purpose (a long-poll), on top of
        the timeout; ``wake_fd``: see :meth:`RpcClient.call` (Interrupted passes through)."""
        if not self.is_ready():
            return None
        try:
            return self._rpc.call(msg, self.timeout_s + extra_s, expect, wake_fd=wake_fd)
        except LeaderUnavailable as e:
            self._down(str(e))
        except RemoteError as e:
            self._rejected(msg, e)
        return None

    def _call_many(self, msgs: Sequence[m.Message], expect: type[M]) -> list[M | None]:
        """Replies in order (one round trip for all); None for each one that failed."""
        if not msgs or not self.is_ready():
            return [None] * len(msgs)
        try:
            replies = self._rpc.call_many(msgs, self.timeout_s, expect)
        except LeaderUnavailable as e:
            self._down(str(e))
            return [None] * len(msgs)
        out: list[M | None] = []
        for msg, reply in zip(msgs, replies):
            if isinstance(reply, RemoteError):
                self._rejected(msg, reply)
                out.append(None)
            else:
                out.append(reply)
        return out

    def _rejected(self, msg: m.Message, e: RemoteError) -> None:
        if e.code in ("degraded", "not_ready", "init_failed"):
            self._status = None
            self._next_probe = time.monotonic() + PROBE_INTERVAL_S
            self._note(f"kvbm leader cannot serve ({e.message}); serving without external KV hits")
        else:
            log.error("leader rejected %s: %s", msg.TAG, e)

    # -- requests ------------------------------------------------------------------------
    def match(self, hashes: Sequence[int] | np.ndarray) -> TierBlocks:
        """The blocks from the start of ``hashes`` held in G2, then to stage from G3, then from G4;
        none if unavailable."""
        reply = self.lookup(hashes)
        return TierBlocks(reply.host, reply.disk, reply.object)

    def lookup(self, hashes: Sequence[int] | np.ndarray, first_parent: int = 0) -> m.MatchReply:
        """The leader's MatchReply for ``hashes`` (per tier, and whether a store lookup is pending);
        an empty one if unavailable. ``first_parent``: the hash before ``hashes[0]`` (0: none)."""
        if len(hashes) == 0:
            return m.MatchReply()
        reply = self._call(m.Match(m.pack_hashes(hashes), first_parent), m.MatchReply)
        if reply is None:
            return m.MatchReply()
        self._saw_index(reply.index_seq)
        return reply

    def prepare_load(self, hashes: Sequence[int] | np.ndarray, tokens: bytes = b"") -> LoadGrantInfo:
        reply = self._call(m.PrepareLoad(m.pack_hashes(hashes), tokens), m.LoadGrant)
        if reply is None:
            return LoadGrantInfo(0, [], False)
        return LoadGrantInfo(reply.op_id, m.unpack_slots(reply.slots).tolist(), reply.ready)

    def poll_loads(self, op_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(ready, failed) among ``op_ids``; all failed if the leader is gone."""
        if not op_ids:
            return [], []
        reply = self._call(m.PollLoads(list(op_ids)), m.LoadPoll)
        if reply is None:
            return [], list(op_ids)
        return reply.ready, reply.failed

    def allocate_store(self, hashes: Sequence[int] | np.ndarray, first_parent: int = 0,
                       priority: int = 0) -> StoreGrantInfo:
        return self.allocate_stores([(hashes, first_parent)], priority)[0]

    def allocate_stores(self, chains: Sequence[tuple[Sequence[int] | np.ndarray, int]],
                        priority: int = 0) -> list[StoreGrantInfo]:
        """allocate_store for several (hashes, first_parent) chains in one round trip."""
        todo = [i for i, (hashes, _) in enumerate(chains) if len(hashes)]
        msgs = [m.AllocateStore(m.pack_hashes(chains[i][0]), chains[i][1], priority) for i in todo]
        out = [StoreGrantInfo(0, [])] * len(chains)
        for i, reply in zip(todo, self._call_many(msgs, m.StoreGrant)):
            if reply is not None:
                out[i] = StoreGrantInfo(reply.op_id, m.unpack_slots(reply.slots).tolist())
        return out

    def release(self, op_id: int, absent: Sequence[int] = ()) -> None:
        """Give up an op that never reached the ranks; with ``absent``, a store that never reached
        those ranks (see :class:`kvbm.ipc.messages.ReleaseOp`)."""
        if op_id:
            self._call(m.ReleaseOp(op_id, list(absent)), m.Ack)

    def stats(self) -> LeaderStats | None:
        """The leader's stats; None while it is unavailable."""
        try:
            reply = self._rpc.call(m.GetStats(), self.timeout_s, m.StatsReply)
        except (LeaderUnavailable, RemoteError):
            return None
        self._saw_index(reply.index_seq)
        return reply.stats

    def _saw_index(self, seq: int) -> None:
        self.index_seq = max(self.index_seq, seq)

    def wait_stats(self, ok: Callable[[LeaderStats], bool], what: str, timeout_s: float = 10.0) -> LeaderStats:
        """Ask for the leader's stats until ``ok(stats)``; returns them. TimeoutError naming
        ``what`` after ``timeout_s`` (an unavailable leader is asked again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if stats is not None and ok(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout_s:g} s: {stats}")
            time.sleep(0.01)

    def wait_idle(self, timeout_s: float = 10.0) -> LeaderStats:
        """Wait until the leader has applied every rank's ack and finished disk writes and object puts.

        Stores are asynchronous: a block is matchable only once every rank's ack has reached
        the leader. Returns the leader's stats; TimeoutError if it stays busy.
        """
        return self.wait_stats(lambda st: st.idle, "leader idle (no op, disk write or object put in flight)",
                               timeout_s)

    def index_since(self, seq: int, wait_ms: int = 0, wake_fd: int | None = None) -> IndexDelta | None:
        """Index changes from sequence number ``seq`` on (0: a snapshot); None if unavailable.

        One reply holds at most the leader's cap of changes: when ``next_seq`` moved, ask again.
        ``wait_ms`` > 0: a long-poll; with nothing past ``seq`` the leader answers once it has
        something, or with no changes after ``wait_ms``. Raises
        :class:`~kvbm.ipc.transport.Interrupted` when ``wake_fd`` becomes readable first.
        """
        reply = self._call(m.IndexSince(seq, wait_ms), m.IndexUpdates, extra_s=wait_ms / 1000, wake_fd=wake_fd)
        if reply is None:
            return None
        return IndexDelta(
            reset=reply.reset,
            next_seq=reply.next_seq,
            kinds=np.frombuffer(reply.kinds, dtype=np.uint8),
            tiers=np.frombuffer(reply.tiers, dtype=np.uint8),
            hashes=np.frombuffer(reply.hashes, dtype="<u8").astype(np.uint64, copy=False),
        )

    def take_events(self) -> m.EventsReply | None:
        return self._call(m.TakeEvents(), m.EventsReply)

    def reset_cache(self) -> bool:
        reply = self._call(m.ResetCache(), m.Ack)
        if reply is None:
            return False
        self._saw_index(reply.index_seq)
        return True

    def close(self) -> None:
        self._rpc.close()
