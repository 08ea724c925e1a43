"""The tensor-parallel world as the leader sees it: init sync and rank liveness."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvbm.ipc.messages import RegisterRank
from kvbm.ipc.shm import align_up
from kvbm.leader.ops import OpKind

BLOCK_FORMAT_VERSION = 1
"""Bumped whenever the bytes of a host block (the ranks' slices side by side) change meaning."""

WRITER_RANK = 0
"""In a replicated world (MLA) the one rank that copies the bytes of store ops."""


class InitStep(enum.Enum):
    """How far a rank got in the init sync."""

    REGISTER = "register its layout"
    ATTACH = "attach the host pool"
    DONE = "done"


class LayoutMismatch(ValueError):
    """Ranks of one world reported layouts that cannot share a cache."""


@dataclass
class RankInfo:
    layout: RegisterRank
    identity: bytes  # ZMQ routing id of the rank's socket
    register_request: int
    attached: bool = False
    attach_request: int = 0
    awaiting_ready: bool = False  # attached to a running pool; answered once every rank is back
    alive: bool = True
    last_seen: float = 0.0


@dataclass
class World:
    """Ranks that registered so far; sizes the pool once everyone is there."""

    world_size: int | None = None
    ranks: dict[int, RankInfo] = field(default_factory=dict)

    def check_compatible(self, msg: RegisterRank) -> None:
        """Raise LayoutMismatch naming the field if ``msg`` cannot join the ranks already known."""
        if self.world_size is not None and msg.world_size != self.world_size:
            raise LayoutMismatch(
                f"rank {msg.rank} reports world size {msg.world_size}, but ranks already registered report {self.world_size}"
            )
        if msg.rank >= msg.world_size:
            raise LayoutMismatch(f"rank {msg.rank} is outside a world of size {msg.world_size}")
        for other in self.ranks.values():
            ref = other.layout
            if ref.rank == msg.rank:
                if (ref.slice_bytes, ref.num_layers, ref.replicated) != (msg.slice_bytes, msg.num_layers, msg.replicated):
                    raise LayoutMismatch(f"rank {msg.rank} re-registered with a different layout")
                continue
            # A replicated world stores one slice for every rank: the slices must be the same.
            names = ("num_layers", "dtype", "block_size", "fingerprint", "engine_layout", "replicated")
            for name in names + (("slice_bytes",) if msg.replicated else ()):
                if getattr(ref, name) != getattr(msg, name):
                    raise LayoutMismatch(
                        f"rank {msg.rank} reports {name}={getattr(msg, name)!r} but rank {ref.rank} "
                        f"reports {getattr(ref, name)!r}; all ranks must agree"
                    )
            break

    def add(self, msg: RegisterRank, identity: bytes, request_id: int, now: float) -> RankInfo:
        self.check_compatible(msg)
        self.world_size = msg.world_size
        info = RankInfo(msg, identity, request_id, last_seen=now)
        self.ranks[msg.rank] = info
        return info

    @property
    def complete(self) -> bool:
        return self.world_size is not None and len(self.ranks) == self.world_size

    @property
    def all_attached(self) -> bool:
        return self.complete and all(r.attached for r in self.ranks.values())

    @property
    def replicated(self) -> bool:
        """Every rank holds the same KV (MLA): a block is one slice that every rank loads."""
        return any(info.layout.replicated for info in self.ranks.values())

    @property
    def slice_sizes(self) -> list[int]:
        """The slices a host block holds: one per rank, or one for all of them when replicated."""
        sizes = [self.ranks[r].layout.slice_bytes for r in sorted(self.ranks)]
        return sizes[:1] if self.replicated else sizes

    @property
    def block_bytes(self) -> int:
        """Host block size: the slices side by side, rounded up to 4096 for O_DIRECT."""
        return align_up(sum(self.slice_sizes))

    def op_ranks(self, kind: OpKind) -> set[int]:
        """The ranks that take part in an op of ``kind``: the op completes once each live one reported.

        A replicated world's store is copied (and reported) by :data:`WRITER_RANK` alone: its
        slice is every rank's bytes, so committing on its report alone keeps the rule "matchable
        only when the whole block was written". A load goes to every rank (each copies the one
        slice into its own engine cache); in an ordinary world every rank takes part in both.
        """
        if kind is OpKind.STORE and self.replicated:
            return {WRITER_RANK}
        return set(self.ranks)

    def writes_stores(self, rank: int) -> bool:
        """Whether ``rank`` copies the bytes of store ops."""
        return rank in self.op_ranks(OpKind.STORE)

    @property
    def layout_fingerprint(self) -> str:
        """Everything that must agree for two worlds to share cached blocks (names persistent caches).

        The ranks' identity (model, when the engine knows it), dtype, tokens per block, layers,
        every rank's slice size (so the TP size), the engine's KV layout and kvbm's block format.
        A replicated world names its one slice as ``once:<bytes>``, not a TP size: its block is
        the whole KV of every rank, so a cache written at one TP size serves any other, and never
        a world that stores one slice per rank.
        """
        first = self.ranks[min(self.ranks)].layout
        slices = (f"once:{self.slice_sizes[0]}" if self.replicated
                  else ",".join(str(b) for b in self.slice_sizes))
        return (f"kvbm-block-v{BLOCK_FORMAT_VERSION};{first.fingerprint};dtype={first.dtype};bs={first.block_size};"
                f"layers={first.num_layers};slices={slices};layout={first.engine_layout}")

    def slice_offset(self, rank: int) -> int:
        """Where ``rank``'s slice starts in a host block (0 for every rank of a replicated world)."""
        if self.replicated:
            return 0
        return sum(self.ranks[r].layout.slice_bytes for r in sorted(self.ranks) if r < rank)

    def missing(self) -> dict[int, InitStep]:
        """Ranks that have not finished init, with the step each did not reach."""
        size = self.world_size or 1
        out: dict[int, InitStep] = {}
        for r in range(size):
            info = self.ranks.get(r)
            if info is None:
                out[r] = InitStep.REGISTER
            elif not info.attached:
                out[r] = InitStep.ATTACH
        return out

    def describe_missing(self) -> str:
        missing = self.missing()
        if self.world_size is None:
            return "no rank registered (world size unknown: no worker connected)"
        parts = []
        for step in (InitStep.REGISTER, InitStep.ATTACH):
            ranks = sorted(r for r, s in missing.items() if s is step)
            if ranks:
                parts.append(f"rank(s) {ranks} did not {step.value}")
        return "; ".join(parts) or "none"

    def dead_ranks(self) -> list[int]:
        return sorted(r for r, info in self.ranks.items() if not info.alive)
