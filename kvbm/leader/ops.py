"""Store and load operations in flight between the leader and the ranks: the one place ranks' acks are counted.

An op is created by a client request (AllocateStore / PrepareLoad) and completes when every
rank has reported its part (TransferDone) or is dead. Only then are its slots released:
a store commits (matchable) the slots every rank stored and aborts the rest (all of them if a
rank failed); a load unpins.
Releasing earlier would let another op reuse a slot a rank may still be copying.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class OpKind(enum.Enum):
    STORE = "store"
    LOAD = "load"


@dataclass
class Op:
    op_id: int
    kind: OpKind
    slots: list[int]  # host slots: written by a store, pinned by a load
    hashes: list[int]
    created: float
    acked: set[int] = field(default_factory=set)  # ranks that reported
    missing: set[int] = field(default_factory=set)  # store slots some rank reported it did not store
    failed: bool = False
    error: str = ""
    # Loads only: host slots still being staged from a lower tier, and blocks staged by tier
    # (a kvbm.leader.registry.Tier).
    staging: set[int] = field(default_factory=set)
    staged_from: Counter[int] = field(default_factory=Counter)
    dispatched: bool = False  # a rank reported at least once
    # Stores only: each block's token ids (u32 LE bytes) for the KV events, when the client sent them.
    tokens: list[bytes] = field(default_factory=list)
    released: bool = False  # the client gave it up before dispatching it

    @property
    def ready(self) -> bool:
        """A load can go to the ranks once nothing is staging; stores are always ready."""
        return not self.staging

    def ack(self, rank: int, ok: bool, error: str, stored: set[int] | None = None) -> None:
        """Rank ``rank`` reported; ``stored``: the only slots of this store it stored (None: all)."""
        self.acked.add(rank)
        if stored is not None:
            self.missing.update(s for s in self.slots if s not in stored)
        self.dispatched = True
        if not ok:
            self.failed = True
            self.error = self.error or f"rank {rank}: {error}"

    def done(self, live_ranks: set[int]) -> bool:
        """Every live rank has reported."""
        return live_ranks <= self.acked

    def rank_died(self, dead_ranks: list[int]) -> None:
        """Some rank died or restarted: its missing reports count as failed ones.

        A dead rank reports nothing more, not even when it comes back (a new incarnation knows
        nothing of this op). A load it never finished failed: the engine is told and recomputes.
        A store fails whatever the ranks reported so far: the slice of a rank that died (or
        restarted) may be missing or half-written, so the block must never become matchable.
        ``dead_ranks`` holds only ranks that take part in this op (a replicated world's readers
        take no part in its stores); none: nothing changes.
        """
        if not dead_ranks:
            return
        missing = [r for r in dead_ranks if r not in self.acked]
        if missing and self.kind is OpKind.LOAD:
            self.failed, self.error = True, self.error or f"rank(s) {missing} died during the load"
        self.acked.update(missing)
        if self.kind is OpKind.STORE:
            self.failed, self.error = True, self.error or "a rank died during the store"
