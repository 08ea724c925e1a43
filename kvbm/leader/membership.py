"""Which ranks belong to the leader's world, which are alive, and whether the leader is ready.

:class:`Membership` owns the init sync (every rank registers its layout, then attaches the host
pool; the first time all have, the leader is READY), the init deadline
(``DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS``), rank liveness (a rank silent past the liveness
timeout is dead: DEGRADED) and re-joins (a restarted rank registers and attaches again; the leader
is READY again once no rank is dead). It decides who gets answered; the leader core builds the
answers and settles the ops a dead rank leaves behind.
"""

from __future__ import annotations

import logging

from kvbm.ipc.messages import RegisterRank
from kvbm.ipc.stats import LeaderState
from kvbm.leader.replies import RequestRejected
from kvbm.leader.world import LayoutMismatch, RankInfo, World

log = logging.getLogger(__name__)

Recipient = tuple[bytes, int]
"""A peer's ZMQ identity and the request id an answer goes to."""


class Membership:
    """The world of ranks and the leader's readiness state; see the module docstring."""

    def __init__(self, *, init_timeout_s: float, liveness_timeout_s: float, now: float) -> None:
        self.world = World()
        self.state = LeaderState.WAITING
        self.error = ""
        self._init_timeout_s = init_timeout_s
        self._liveness_timeout_s = liveness_timeout_s
        self._started = now

    def fail(self, error: str) -> None:
        """The leader cannot serve (init failed); ``error`` says why to every later request."""
        self.state = LeaderState.FAILED
        self.error = error
        log.error("%s", error)

    def register(self, msg: RegisterRank, peer: bytes, request_id: int, now: float, *, running: bool) -> RankInfo:
        """Add (or re-add) a rank; LayoutMismatch when it cannot join (fatal during the init sync).

        ``running``: the cache exists, so only a rank of the world may join, as a restarted rank
        (alive once it has mapped the pool again).
        """
        try:
            if running and msg.rank not in self.world.ranks:
                raise LayoutMismatch(f"rank {msg.rank} is not part of this world")
            info = self.world.add(msg, peer, request_id, now)
        except LayoutMismatch as e:
            if not running:
                self.fail(f"init sync failed: {e}")
            raise
        info.alive = not running
        log.info("rank %d/%d registered (pid %d, %d B per block)", msg.rank, msg.world_size, msg.pid, msg.slice_bytes)
        if running and self.state is LeaderState.READY:
            # Its previous incarnation is gone: serve nothing new until it has mapped the pool.
            self.state = LeaderState.DEGRADED
        return info

    def attach(self, rank: int, peer: bytes, request_id: int, now: float, *, running: bool) -> list[Recipient]:
        """A rank mapped the pool (``running``: the cache exists): the ranks to tell the leader
        is ready now (none: not yet)."""
        info = self.world.ranks.get(rank)
        if info is None or info.identity != peer or not running:
            raise RequestRejected("not_registered", f"rank {rank} attached before registering")
        info.attached, info.attach_request, info.alive = True, request_id, True
        info.last_seen = now
        if self.state is LeaderState.WAITING and self.world.all_attached:
            self.state = LeaderState.READY
            log.info("leader ready: %d ranks (init took %.2f s)", self.world.world_size, now - self._started)
            return [(other.identity, other.attach_request) for other in self.world.ranks.values()]
        if self.state is LeaderState.DEGRADED and not self.world.dead_ranks():
            self.state = LeaderState.READY
            log.info("rank %d is back; leader ready again", rank)
            # Ranks that attached while another was still missing (a whole engine restarted:
            # every rank re-registers) wait for this answer too.
            waiting = [o for o in self.world.ranks.values() if o.awaiting_ready and o is not info]
            for other in waiting:
                other.awaiting_ready = False
            return [(peer, request_id), *((o.identity, o.attach_request) for o in waiting)]
        if self.state is LeaderState.READY:
            return [(peer, request_id)]
        # WAITING: the first READY answers every rank; DEGRADED: the one that ends it.
        info.awaiting_ready = self.state is LeaderState.DEGRADED
        return []

    def heartbeat(self, rank: int, peer: bytes, now: float) -> bool:
        """A rank is alive; False when this leader does not know it as alive."""
        info = self.world.ranks.get(rank)
        if info is None or info.identity != peer or not info.alive:
            return False
        info.last_seen = now
        return True

    def expire_init(self, now: float) -> list[Recipient]:
        """At the init deadline while still waiting: fail, and name the ranks to tell."""
        if self.state is not LeaderState.WAITING or now < self._started + self._init_timeout_s:
            return []
        self.fail(f"leader/worker init sync did not complete within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="
                  f"{self._init_timeout_s:g} s: {self.world.describe_missing()}")
        return [(i.identity, i.attach_request if i.attached else i.register_request) for i in self.world.ranks.values()]

    def check_liveness(self, now: float) -> bool:
        """Declare the ranks silent past the liveness timeout dead; True when one just died."""
        died = False
        for rank, info in self.world.ranks.items():
            if info.alive and now - info.last_seen > self._liveness_timeout_s:
                info.alive = info.attached = False
                self.state = LeaderState.DEGRADED
                log.error("rank %d (pid %d) stopped responding (no heartbeat for %.1f s); "
                          "its in-flight stores are aborted", rank, info.layout.pid, now - info.last_seen)
                died = True
        return died

    def live_ranks(self) -> set[int]:
        return {r for r, info in self.world.ranks.items() if info.alive}

    def first_layout(self) -> RegisterRank | None:
        """A registered rank's layout (they agree on block size and fingerprint), None before any."""
        first = next(iter(self.world.ranks.values()), None)
        return first.layout if first else None
