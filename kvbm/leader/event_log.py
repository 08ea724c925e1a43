"""The leader's block events once a verb has run: the TakeEvents backlog, eviction counts, tokens.

The registry reports every registration and removal of a block (:class:`BlockEvent`, every
tier). :class:`BlockEventLog` keeps them for clients that drain them (``TakeEvents``: the engine's
own KV-event publisher), counts the evictions, and keeps the token ids of the blocks some tier
holds, because KV-event consumers (Dynamo's router) key a block by its tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderCounters
from kvbm.leader.registry import BlockEvent, Tier, TierPool

MAX_EVENT_BACKLOG = 100_000
"""Events kept for TakeEvents; past it the oldest go (a client that never drains loses them)."""


class BlockEventLog:
    """Block events not yet taken, and token ids (u32 LE bytes) by block hash."""

    def __init__(self, *, keep_tokens: bool, backlog: int = MAX_EVENT_BACKLOG) -> None:
        self.backlog: deque[BlockEvent] = deque(maxlen=backlog)
        # None while nobody consumes events (no publisher, no TakeEvents yet): no tokens kept.
        self.block_tokens: dict[int, bytes] | None = {} if keep_tokens else None

    def __len__(self) -> int:
        return len(self.backlog)

    @property
    def keeps_tokens(self) -> bool:
        return self.block_tokens is not None

    def add_tokens(self, blocks: Iterable[tuple[int, bytes]]) -> None:
        """Remember the token ids of committed blocks (``(hash, tokens)`` pairs)."""
        if self.block_tokens is not None:
            self.block_tokens.update(blocks)

    def per_block(self, what: str, tokens: bytes, n: int, block_size: int) -> list[bytes]:
        """A request's ``tokens`` (u32 LE) for ``n`` blocks as one bytes per block; [] for none,
        or while no tokens are kept. Another length is a malformed request (ProtocolError)."""
        if not tokens:
            return []
        step = 4 * block_size
        if len(tokens) != step * n:
            raise m.ProtocolError(f"{what}: {len(tokens)} token bytes for {n} blocks of {block_size} tokens")
        if self.block_tokens is None:
            return []
        return [tokens[i : i + step] for i in range(0, len(tokens), step)]

    def keep_tokens(self, seq_hash: int, tokens: bytes) -> None:
        """Remember a block's token ids unless known (a block staged from G3/G4 for a load)."""
        if self.block_tokens is not None:
            self.block_tokens.setdefault(seq_hash, tokens)

    def record(self, evs: list[BlockEvent], counters: LeaderCounters) -> None:
        """Count the evictions among ``evs`` and keep them for :meth:`take`."""
        for e in evs:
            if e.kind is m.BlockEventKind.REMOVED:
                if e.tier is Tier.HOST:
                    counters.host_evictions += 1
                elif e.tier is Tier.DISK:
                    counters.disk_evictions += 1
                else:
                    counters.object_evictions += 1
        self.backlog.extend(evs)

    def forget_tokens(self, evs: list[BlockEvent], pools: Sequence[TierPool]) -> None:
        """Drop the tokens of blocks no tier holds any more (call after the publishers saw ``evs``)."""
        tokens = self.block_tokens
        if not tokens:
            return
        if any(e.kind is m.BlockEventKind.CLEARED for e in evs):
            gone: Iterable[int] = list(tokens)
        else:
            gone = {e.seq_hash for e in evs if e.kind is m.BlockEventKind.REMOVED}
        for h in gone:
            if not any(p.holds(h) for p in pools):
                tokens.pop(h, None)

    def token_ids(self, seq_hash: int) -> bytes:
        """A held block's token ids, or empty when the leader was not told them."""
        return self.block_tokens.get(seq_hash, b"") if self.block_tokens is not None else b""

    def take(self) -> m.EventsReply:
        """Every event not taken yet, oldest first, as the wire reply: each stored block with the
        token ids held for it now (none once no tier holds it: a router need not learn of a
        block already gone). The first call makes the log keep the tokens of blocks stored
        from then on (a consumer exists now)."""
        if self.block_tokens is None:
            self.block_tokens = {}
        evs = list(self.backlog)
        self.backlog.clear()
        tokens = [self.block_tokens.get(e.seq_hash, b"") if e.kind is m.BlockEventKind.STORED else b"" for e in evs]
        return m.EventsReply(
            kinds=bytes(e.kind for e in evs),
            tiers=bytes(int(e.tier) for e in evs),
            hashes=m.pack_hashes([e.seq_hash for e in evs]),
            parents=m.pack_hashes([e.parent_hash or 0 for e in evs]),
            tokened=bytes(bool(t) for t in tokens) if any(tokens) else b"",
            tokens=b"".join(tokens),
        )
