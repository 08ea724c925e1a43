"""The bytes of a host block: where each rank's part of the KV lies.

A host block holds, per layer and K/V (``outer``), one *region* of the block's KV. Two formats:

* **rank slices** (the fallback): rank ``r``'s whole slice ``[layers, outer, region]`` sits at a
  fixed offset, after the slices of ranks ``0..r-1``. The bytes depend on the TP size, so the
  layout fingerprint names it (every rank's slice size). MLA's replicated block (every rank
  holds the same latent KV) is one slice at offset 0 that every rank loads.
* **heads** (the TP-independent format, MHA/GQA models whose KV heads are split over the TP
  ranks): the block is ``[layers, outer, region]`` with each region the model's *whole* region,
  all KV heads in the model's head order, laid out as the engine lays out one rank's region
  (token-major ``[tokens, heads, head]`` or head-major ``[heads, tokens, head]``). Rank ``r`` of
  any TP size reads and writes the bytes of its own heads; a block is the same bytes at TP=1, 2
  or 4, so a disk or object cache written at one TP size serves every other.

A :class:`Placement` tells a copy engine where a rank's bytes of each region lie: ``rows``
pieces of ``row_bytes`` (contiguous in the engine's region, one after the other) at ``pitch``
apart in the host block. Token-major heads are one row per token (the rank's heads of that
token); head-major heads and rank slices are one row per region.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSplit:
    """A rank's KV as a range of the model's KV heads (one region of one block, per layer and K/V)."""

    total: int  # the model's KV heads
    first: int  # the first head this rank holds
    count: int  # heads this rank holds
    head_bytes: int  # bytes of one head of one token
    head_major: bool = False  # a region is [heads, tokens, head] (HND), else [tokens, heads, head] (NHD)

    def __post_init__(self) -> None:
        if min(self.total, self.count, self.head_bytes) < 1 or self.first < 0 or self.first + self.count > self.total:
            raise ValueError(f"heads [{self.first}, {self.first + self.count}) of {self.total} "
                             f"({self.head_bytes} B each) is not a range of the model's heads")

    @property
    def order(self) -> str:
        """``HND`` or ``NHD``: the order of a region's bytes (it names the block format)."""
        return "HND" if self.head_major else "NHD"

    def region_bytes(self, tokens: int) -> int:
        """Bytes of this rank's part of one region."""
        return tokens * self.count * self.head_bytes

    def model_region_bytes(self, tokens: int) -> int:
        """Bytes of one whole region (every head): a host block's region in the heads format."""
        return tokens * self.total * self.head_bytes


def kv_head_range(total: int, tp_size: int, rank: int) -> tuple[int, int]:
    """``(first, count)`` of the KV heads TP rank ``rank`` holds (Megatron's split, as vLLM,
    TensorRT-LLM and SGLang do it): ``total / tp_size`` consecutive heads each, or, with fewer
    heads than ranks, one head each, replicated over ``tp_size / total`` consecutive ranks."""
    if total < 1 or tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} of TP {tp_size} with {total} KV heads")
    if tp_size >= total:
        if tp_size % total:
            raise ValueError(f"{total} KV heads do not replicate evenly over TP {tp_size}")
        return rank // (tp_size // total), 1
    if total % tp_size:
        raise ValueError(f"{total} KV heads do not split evenly over TP {tp_size}")
    count = total // tp_size
    return rank * count, count


@dataclass(frozen=True)
class Placement:
    """Where a rank's bytes of every region lie in a host block.

    Region ``(layer, o)``'s ``i``-th row (``row_bytes``, the engine region's bytes
    ``[i * row_bytes, (i + 1) * row_bytes)``) starts at
    ``offset + (layer * outer + o) * region_stride + i * pitch`` from the block's start.
    """

    offset: int
    region_stride: int
    rows: int
    row_bytes: int
    pitch: int

    @classmethod
    def sliced(cls, slice_offset: int, region_bytes: int) -> "Placement":
        """The rank-slices format: the slice ``[layers, outer, region]`` at ``slice_offset``."""
        return cls(slice_offset, region_bytes, 1, region_bytes, region_bytes)

    @classmethod
    def heads(cls, split: HeadSplit, tokens: int) -> "Placement":
        """The heads format: this rank's heads inside every whole-model region."""
        if split.head_major or split.count == split.total:
            # [heads, tokens, head], or every head: the rank's part of a region is one piece.
            row = split.region_bytes(tokens)
            return cls(split.first * tokens * split.head_bytes, split.model_region_bytes(tokens), 1, row, row)
        return cls(split.first * split.head_bytes, split.model_region_bytes(tokens), tokens,
                   split.count * split.head_bytes, split.total * split.head_bytes)

    @property
    def region_bytes(self) -> int:
        """Bytes of the rank's part of one region (its engine region)."""
        return self.rows * self.row_bytes

    def end(self, regions: int) -> int:
        """One past the last byte of a block this placement touches, with ``regions`` regions."""
        return self.offset + (regions - 1) * self.region_stride + (self.rows - 1) * self.pitch + self.row_bytes


def choose_heads(split: HeadSplit | None, tokens: int, block_format: str) -> HeadSplit | None:
    """The heads a rank registers under ``DYN_KVBM_BLOCK_FORMAT`` (None: its bytes are a slice).

    ``heads``: always (the TP-independent format); ``slices``: never; ``auto``: where the rank's
    heads are one piece of every region (every head, or head-major regions), so the heads
    format costs no extra copies; token-major regions split over ranks would take one row per
    token, measured at about half the CPU copy rate of a slice (docs/benchmarks.md).
    """
    if split is None or block_format == "slices":
        return None
    if block_format == "heads" or Placement.heads(split, tokens).rows == 1:
        return split
    return None
