"""The tensor-parallel world as the leader sees it: init sync and rank liveness."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvbm.ipc.block_format import HeadSplit
from kvbm.ipc.messages import RegisterRank
from kvbm.ipc.shm import align_up
from kvbm.leader.ops import OpKind

BLOCK_FORMAT_VERSION = 1
"""Bumped whenever the bytes of a host block (kvbm.ipc.block_format) change meaning."""

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
        heads = _heads_of(msg)
        for other in self.ranks.values():
            ref = other.layout
            if ref.rank == msg.rank:
                if (ref.slice_bytes, ref.num_layers, ref.replicated, ref.heads) != (
                        msg.slice_bytes, msg.num_layers, msg.replicated, heads):
                    raise LayoutMismatch(f"rank {msg.rank} re-registered with a different layout")
                continue
            if (ref.heads is None) != (heads is None):
                raise LayoutMismatch(
                    f"rank {msg.rank} {'names no' if heads is None else 'names its'} KV heads but rank {ref.rank} "
                    f"{'does' if ref.heads is not None else 'does not'}: every rank must use the same block format "
                    "(DYN_KVBM_BLOCK_FORMAT and the engine's KV layout)")
            # A replicated world stores one slice for every rank: the slices must be the same.
            # Ranks that name their heads must name the same model heads (their own may differ).
            names = ("num_layers", "dtype", "block_size", "fingerprint", "engine_layout", "replicated",
                     "kv_heads", "head_bytes", "head_major")
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
    def heads(self) -> dict[int, HeadSplit] | None:
        """Each rank's heads when the world uses the heads format, else None (rank slices).

        The heads format needs the ranks to name their heads (all do or none: check_compatible)
        and their ranges to tile the model's heads (equal ranges are replicas; any other overlap
        or a gap falls back to rank slices: a block must never hold bytes that no rank wrote).
        """
        if self.replicated or not self.ranks:
            return None
        splits: dict[int, HeadSplit] = {}
        for r, info in self.ranks.items():
            split = info.layout.heads
            if split is None:
                return None
            splits[r] = split
        covered = 0
        for first, count in sorted({(s.first, s.count) for s in splits.values()}):
            if first != covered:
                return None
            covered = first + count
        return splits if covered == splits[min(splits)].total else None

    @property
    def slice_sizes(self) -> list[int]:
        """The slices a host block holds: one per rank, or one for all of them when replicated."""
        sizes = [self.ranks[r].layout.slice_bytes for r in sorted(self.ranks)]
        return sizes[:1] if self.replicated else sizes

    @property
    def block_bytes(self) -> int:
        """Host block size, rounded up to 4096 for O_DIRECT: the slices side by side, or in the
        heads format every region of the whole model."""
        heads = self.heads
        if heads is None:
            return align_up(sum(self.slice_sizes))
        return align_up(self._regions * next(iter(heads.values())).model_region_bytes(self._block_size))

    @property
    def _block_size(self) -> int:
        return self.ranks[min(self.ranks)].layout.block_size

    @property
    def _regions(self) -> int:
        """Regions (layers x K/V) of a block of a world in the heads format."""
        first = self.ranks[min(self.ranks)].layout
        split = first.heads
        assert split is not None
        return first.slice_bytes // split.region_bytes(first.block_size)

    def op_ranks(self, kind: OpKind) -> set[int]:
        """The ranks that take part in an op of ``kind``: the op completes once each live one reported.

        A replicated world's store is copied (and reported) by :data:`WRITER_RANK` alone: its
        slice is every rank's bytes, so committing on its report alone keeps the rule "matchable
        only when the whole block was written". A load goes to every rank (each copies the one
        slice into its own engine cache); in an ordinary world every rank takes part in both.
        """
        if kind is OpKind.STORE and self.replicated:
            return {WRITER_RANK}
        heads = self.heads
        if kind is OpKind.STORE and heads is not None:
            # Ranks holding the same heads (fewer KV heads than ranks) hold the same bytes: the
            # first of them writes them, as a replicated world's writer does.
            return {min(r for r in heads if heads[r] == split) for split in heads.values()}
        return set(self.ranks)

    def writes_stores(self, rank: int) -> bool:
        """Whether ``rank`` copies the bytes of store ops."""
        return rank in self.op_ranks(OpKind.STORE)

    @property
    def layout_fingerprint(self) -> str:
        """Everything that must agree for two worlds to share cached blocks (names persistent caches).

        The ranks' identity (model, when the engine knows it), dtype, tokens per block, layers,
        how a block holds the ranks' bytes and kvbm's block format. Rank slices name every rank's
        slice size (so the TP size) and the engine's KV layout. A replicated world names its one
        slice as ``once:<bytes>``, and a world in the heads format the model's heads, their bytes
        and order (``heads:<kv heads>x<head bytes>:<NHD|HND>``), neither a TP size: their block
        is the same bytes at every TP size, so a cache written at one TP size serves any other,
        and never a world that stores one slice per rank.
        """
        first = self.ranks[min(self.ranks)].layout
        heads = self.heads
        if heads is not None:
            split = next(iter(heads.values()))
            slices = f"heads:{split.total}x{split.head_bytes}:{split.order};regions={self._regions}"
            layout = ""
        else:
            slices = (f"once:{self.slice_sizes[0]}" if self.replicated
                      else ",".join(str(b) for b in self.slice_sizes))
            layout = f";layout={first.engine_layout}"
        return (f"kvbm-block-v{BLOCK_FORMAT_VERSION};{first.fingerprint};dtype={first.dtype};bs={first.block_size};"
                f"layers={first.num_layers};slices={slices}{layout}")

    def slice_offset(self, rank: int) -> int:
        """Where ``rank``'s slice starts in a host block (0 for every rank of a replicated world
        and of one in the heads format, whose ranks' bytes lie at their heads' placement)."""
        if self.replicated or self.heads is not None:
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


def _heads_of(msg: RegisterRank) -> HeadSplit | None:
    """The heads ``msg`` names, checked against its slice (LayoutMismatch if they cannot be it)."""
    try:
        split = msg.heads
    except ValueError as e:
        raise LayoutMismatch(f"rank {msg.rank}: {e}") from None
    if split is not None and (msg.slice_bytes % split.region_bytes(msg.block_size)
                              or msg.slice_bytes // split.region_bytes(msg.block_size) % msg.num_layers):
        raise LayoutMismatch(f"rank {msg.rank}: a slice of {msg.slice_bytes} B is not {msg.num_layers} layers of "
                             f"regions of {split.count} heads x {msg.block_size} tokens x {split.head_bytes} B")
    return split
