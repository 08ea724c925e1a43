"""Hooks that watch the leader (metrics, KV-event publishers), called on its loop thread."""

from __future__ import annotations

from typing import Protocol

from kvbm.leader.registry import BlockEvent


class LeaderObserver(Protocol):
    """What an observer of the leader is told."""

    def on_match(self, queried: int, host: int, disk: int, block_size: int, obj: int = 0) -> None:
        """One lookup: blocks asked about, found in G2, found in G3 after that, then in G4."""

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        """A finished transfer; ``direction`` is a :class:`kvbm.leader.tiers.TransferDirection` value."""

    def on_events(self, events: list[BlockEvent]) -> None:
        """Block registrations and removals (every tier), in order."""


class Observers(list[LeaderObserver]):
    """The leader's observers; each call is passed to every one of them, in order."""

    def on_match(self, queried: int, host: int, disk: int, block_size: int, obj: int = 0) -> None:
        for obs in self:
            obs.on_match(queried, host, disk, block_size, obj=obj)

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        for obs in self:
            obs.on_transfer(direction, blocks, nbytes, seconds)

    def on_events(self, events: list[BlockEvent]) -> None:
        for obs in self:
            obs.on_events(events)
