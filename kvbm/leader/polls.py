"""Parked index long-polls: IndexSince requests the leader answers later, not at once.

A client that asks for the index changes past the leader's current position with ``wait_ms`` > 0
is parked here (its peer identity, request id, position and deadline) instead of answered with
nothing. The leader's loop answers it as soon as the index moves past that position, or with no
changes once the deadline passed, so a follower that went away leaves nothing behind for longer
than its wait. One poll per peer: a new IndexSince from a peer replaces the one it had parked (the
client gave up on it). The table is bounded: past :data:`MAX_PARKED` a poll is answered at once.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PARKED = 1024


@dataclass(frozen=True)
class ParkedPoll:
    """One IndexSince waiting for the index to move past ``seq`` until ``deadline`` (loop time)."""

    peer: bytes
    request_id: int
    seq: int
    deadline: float


class ParkedPolls:
    """The parked polls by peer; :meth:`due` takes out the ones to answer now."""

    def __init__(self, *, limit: int = MAX_PARKED) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._by_peer: dict[bytes, ParkedPoll] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def forget(self, peer: bytes) -> None:
        """Drop ``peer``'s parked poll, if any (it sent a new request)."""
        self._by_peer.pop(peer, None)

    def park(self, poll: ParkedPoll) -> bool:
        """Park ``poll`` (replacing its peer's earlier one); False when the table is full."""
        self._by_peer.pop(poll.peer, None)
        if len(self._by_peer) >= self._limit:
            return False
        self._by_peer[poll.peer] = poll
        return True

    def due(self, next_seq: int, now: float) -> list[ParkedPoll]:
        """Take out the polls the index moved past (``next_seq`` is no longer theirs) or whose
        deadline passed."""
        if not self._by_peer:
            return []
        out = [p for p in self._by_peer.values() if p.seq != next_seq or now >= p.deadline]
        for p in out:
            del self._by_peer[p.peer]
        return out

    def take_all(self) -> list[ParkedPoll]:
        """Take out every parked poll (the leader is shutting down)."""
        out = list(self._by_peer.values())
        self._by_peer.clear()
        return out
