"""The leader's index change log: what a client needs to keep a local copy of "what is matchable".

Every change of the set of matchable hashes of a tier gets a sequence number: a hash becoming
matchable (STORED), leaving a tier (REMOVED), or a whole tier dropped (CLEARED, followed by
STORED entries for the blocks a clear keeps: pinned ones). A bounded ring holds the latest
changes; a client that asks from a sequence number the ring no longer holds, from 0, or from
one this leader never issued (it talked to an earlier leader) gets a reset: a full snapshot.

Sequence numbers start at the leader's start time in nanoseconds, so a restarted leader's
numbers lie above every number its predecessor handed out (unless that one made more than one
change per nanosecond): a client still holding an old number is always told to reset.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice

from kvbm.ipc import messages as m
from kvbm.ipc.messages import BlockEventKind
from kvbm.leader.registry import BlockEvent, Tier

RING_ENTRIES = 1 << 16
MAX_REPLY_ENTRIES = 1 << 16

# Plain ints for the per-event loop: int() of an enum member is slow there.
_KIND_VALUE = {kind: int(kind) for kind in BlockEventKind}
_TIER_VALUE = {tier: int(tier) for tier in Tier}
_STORED, _CLEARED = int(BlockEventKind.STORED), int(BlockEventKind.CLEARED)


# One change: (BlockEventKind value, Tier value, hash; 0 for CLEARED). A plain tuple of ints
# because one is made per registry event on the leader's loop.
IndexEntry = tuple[int, int, int]


class IndexLog:
    """Mirror of the matchable hashes per tier plus a ring of their latest changes."""

    def __init__(self, *, ring_entries: int = RING_ENTRIES, max_reply: int = MAX_REPLY_ENTRIES,
                 first_seq: int | None = None) -> None:
        """``first_seq``: the first sequence number (default: now in ns; must be >= 1)."""
        if ring_entries < 1 or max_reply < 1:
            raise ValueError(f"ring_entries and max_reply must be >= 1, got {ring_entries} and {max_reply}")
        start = time.time_ns() if first_seq is None else first_seq
        if start < 1:
            raise ValueError(f"first_seq must be >= 1 (0 asks for a snapshot), got {start}")
        self._ring: deque[IndexEntry] = deque(maxlen=ring_entries)
        self._max_reply = max_reply
        self.next_seq = start  # sequence number of the next change
        self._matchable: dict[Tier, set[int]] = {Tier.HOST: set(), Tier.DISK: set()}

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest change the ring still holds (== next_seq when empty)."""
        return self.next_seq - len(self._ring)

    def matchable(self, tier: Tier) -> frozenset[int]:
        """Hashes matchable in ``tier`` as far as the recorded events tell."""
        return frozenset(self._matchable[tier])

    def record(self, events: Iterable[BlockEvent], still_held: Callable[[Tier, int], bool]) -> None:
        """Apply registry events in order; ``still_held(tier, h)`` tells which blocks a clear kept."""
        ring = self._ring  # the deque drops the oldest entries when full
        added = 0
        for e in events:
            held = self._matchable[e.tier]
            kind = _KIND_VALUE[e.kind]
            tier = _TIER_VALUE[e.tier]
            if kind == _CLEARED:
                kept = sorted(h for h in held if still_held(e.tier, h))
                held.clear()
                held.update(kept)
                ring.append((kind, tier, 0))
                ring.extend((_STORED, tier, h) for h in kept)
                added += 1 + len(kept)
                continue
            if kind == _STORED:
                held.add(e.seq_hash)
            else:
                held.discard(e.seq_hash)
            ring.append((kind, tier, e.seq_hash))
            added += 1
        self.next_seq += added

    def since(self, seq: int) -> m.IndexUpdates:
        """Changes from ``seq`` on (at most ``max_reply``), or a reset snapshot when ``seq`` is unusable."""
        if seq == 0 or seq < self.first_seq or seq > self.next_seq:
            return self.snapshot()
        start = seq - self.first_seq
        stop = min(len(self._ring), start + self._max_reply)
        entries = list(islice(self._ring, start, stop))
        return _reply(False, seq + len(entries), entries)

    def snapshot(self) -> m.IndexUpdates:
        """Every matchable hash as STORED, host tier first; the client resumes at next_seq.

        Not capped: a snapshot split over replies would be taken at different times.
        """
        tiers = (Tier.HOST, Tier.DISK)
        counts = [len(self._matchable[t]) for t in tiers]
        return m.IndexUpdates(
            reset=True,
            next_seq=self.next_seq,
            kinds=bytes([BlockEventKind.STORED]) * sum(counts),
            tiers=b"".join(bytes([t]) * n for t, n in zip(tiers, counts)),
            hashes=b"".join(m.pack_hashes(sorted(self._matchable[t])) for t in tiers),
        )


def _reply(reset: bool, next_seq: int, entries: list[IndexEntry]) -> m.IndexUpdates:
    return m.IndexUpdates(reset=reset, next_seq=next_seq, kinds=bytes([e[0] for e in entries]),
                          tiers=bytes([e[1] for e in entries]), hashes=m.pack_hashes([e[2] for e in entries]))
