"""G1 <-> G2 copies: the copy plan both copy engines share, and the CPU (NumPy) copy engine.

Naming, the same in kvbm/worker, kvbm/bench, the connectors' worker side and the metrics:

* a **store** (Dynamo's *offload*) copies engine blocks (G1, "device") into host-pool slots
  (G2): direction ``d2h``;
* a **load** (Dynamo's *onboard*) copies host-pool slots into engine blocks: direction ``h2d``.

Arguments always name the source first: ``store(engine_blocks, slots)``,
``load(slots, engine_blocks)``. (The one exception is inherited: Dynamo's metric
``kvbm_offload_blocks_h2d`` counts host -> *disk* offloads; kvbm's own labels call that
``h2disk``.)

The copy plan (:func:`plan_batch`) checks a batch once and splits its (engine block, host slot)
pairs into runs where both sides advance by one, vectorised with NumPy (no per-block Python
work). A run of ``n`` blocks is one 2D copy per segment on the GPU (:mod:`kvbm.worker.cuda_copy`),
whatever ``n``. The CPU engine needs only its *source* to advance by one
(:func:`source_runs`): a run of source blocks lands on any destinations in one indexed
assignment per layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from kvbm.worker.layout import EngineKV

IndexList = Sequence[int] | np.ndarray


class Direction(str, enum.Enum):
    """Which way a G1 <-> G2 copy goes (compares equal to its value, ``"store"`` or ``"load"``)."""

    STORE = "store"  # G1 -> G2, d2h
    LOAD = "load"  # G2 -> G1, h2d

    @property
    def label(self) -> str:
        """The short label of metrics and benchmarks: ``d2h`` for stores, ``h2d`` for loads."""
        return "d2h" if self is Direction.STORE else "h2d"


class CopyEngine(Protocol):
    def store(self, engine_blocks: IndexList, slots: IndexList) -> None:
        """G1 -> G2 (d2h): copy engine blocks into host slots (this rank's slice only)."""

    def load(self, slots: IndexList, engine_blocks: IndexList) -> None:
        """G2 -> G1 (h2d): copy host slots into engine blocks."""


@dataclass(frozen=True)
class BlockRuns:
    """(engine block, host slot) pairs as runs in which both sides advance by one.

    Iterating yields ``(first engine block, first host slot, length)`` tuples of ints.
    """

    engine: np.ndarray  # int64: first engine block of each run
    host: np.ndarray  # int64: first host slot of each run
    length: np.ndarray  # int64: blocks in each run

    def __len__(self) -> int:
        return len(self.length)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.engine.tolist(), self.host.tolist(), self.length.tolist())

    @property
    def num_blocks(self) -> int:
        return int(self.length.sum())


def index_array(values: IndexList, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array (zero-copy for one); ``name`` labels the error."""
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a flat list of ints, got {arr.dtype} of shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def block_runs(engine_blocks: IndexList, slots: IndexList) -> BlockRuns:
    """Split paired lists into runs, after ordering the pairs by engine block.

    Copies of a batch may run in any order (its destinations are distinct), so sorting first
    finds every run a batch has, whatever order its pairs came in.
    """
    eb, sl = index_array(engine_blocks, "engine_blocks"), index_array(slots, "slots")
    n = len(eb)
    if n != len(sl):
        raise ValueError(f"{n} engine blocks but {len(sl)} host slots")
    if n < 2:
        return BlockRuns(eb, sl, np.ones(n, np.int64))
    step = eb[1:] - eb[:-1]
    if step.min() < 0:
        order = np.argsort(eb, kind="stable")
        eb, sl = eb[order], sl[order]
        step = eb[1:] - eb[:-1]
    starts = np.flatnonzero((step != 1) | (sl[1:] - sl[:-1] != 1)) + 1
    starts = np.concatenate((np.zeros(1, np.int64), starts))
    return BlockRuns(eb[starts], sl[starts], np.diff(starts, append=n))


def check_batch(eb: np.ndarray, sl: np.ndarray, num_engine_blocks: int, num_slots: int,
                direction: Direction) -> None:
    """Refuse a batch with unequal lengths, an index out of range or a destination named twice."""
    if len(eb) != len(sl):
        raise ValueError(f"{len(eb)} engine blocks but {len(sl)} host slots")
    if len(eb) == 0:
        return
    for arr, limit, what in ((eb, num_engine_blocks, "engine block"), (sl, num_slots, "host slot")):
        if arr.min() < 0 or arr.max() >= limit:
            raise IndexError(f"{what} {int(arr[(arr < 0) | (arr >= limit)][0])} is outside [0, {limit})")
    dst = np.sort(sl if direction is Direction.STORE else eb)
    if len(dst) > 1 and (dst[1:] == dst[:-1]).any():
        raise ValueError(f"a {direction.value} batch names the same destination twice "
                         f"({'host slot' if direction is Direction.STORE else 'engine block'}); "
                         "its copies run in no particular order")


def plan_batch(engine_blocks: IndexList, slots: IndexList, num_engine_blocks: int, num_slots: int,
               direction: Direction) -> BlockRuns:
    """Check a batch (:func:`check_batch`) and split it into runs (:func:`block_runs`)."""
    eb, sl = index_array(engine_blocks, "engine_blocks"), index_array(slots, "slots")
    check_batch(eb, sl, num_engine_blocks, num_slots, direction)
    return block_runs(eb, sl)


class SourceRun(NamedTuple):
    """Source blocks ``start .. stop-1`` copied to ``dest``: a slice when the destinations are
    consecutive too, else their indices in source order."""

    start: int
    stop: int
    dest: slice | np.ndarray


def source_runs(src: np.ndarray, dst: np.ndarray) -> list[SourceRun]:
    """Group checked (source, destination) index pairs into runs of consecutive sources.

    A NumPy assignment ``to[dest] = frm[start:stop]`` copies straight from the source view into
    indexed destinations, without a temporary; an indexed *source* (``frm[idx]``) would first
    gather into a freshly allocated temporary (measured at ~0.5 of memcpy, its pages faulted
    in on every call). So only the source must advance by one: a load from a fresh range of
    slots is one assignment per layer whatever engine blocks it fills.
    """
    n = len(src)
    if n == 0:
        return []
    if n > 1 and (src[1:] < src[:-1]).any():
        order = np.argsort(src, kind="stable")
        src, dst = src[order], dst[order]
    bounds = np.flatnonzero(src[1:] - src[:-1] != 1) + 1
    starts = np.concatenate(([0], bounds))
    stops = np.concatenate((bounds, [n]))
    # A run whose destinations also advance by one is a slice: a plain strided copy, cheaper
    # per call than an indexed one (and every run of a fully scattered batch is one block).
    # gaps[i]: destination steps other than +1 among the first i pairs' steps.
    gaps = np.concatenate(([0], np.cumsum(dst[1:] - dst[:-1] != 1)))
    sliced = (gaps[stops - 1] == gaps[starts]).tolist()
    first_src, first_dst = src[starts].tolist(), dst[starts].tolist()
    return [
        SourceRun(s0, s0 + b - a, slice(d0, d0 + b - a) if is_slice else dst[a:b])
        for a, b, s0, d0, is_slice in zip(starts.tolist(), stops.tolist(), first_src, first_dst, sliced)
    ]


def _split_regions(view: np.ndarray, rows: tuple[int, ...]) -> np.ndarray:
    """``view`` with its last (contiguous region) axis cut into ``rows``; never a copy."""
    out = view.view()
    out.shape = view.shape[:-1] + rows  # assigning .shape raises where reshape would copy
    return out


class NumpyCopyEngine:
    """CPU copies between NumPy/torch-CPU KV tensors and the shared host pool.

    Per run of consecutive source blocks (:func:`source_runs`), one assignment per layer between
    views (the contiguous layout: one for all layers), the destinations sliced or indexed: an
    in-place strided copy, never through a temporary.
    """

    def __init__(self, kv: EngineKV, host: np.ndarray) -> None:
        self.kv = kv
        self.host = host  # (host_blocks, layers, outer, region), or (..., rows, row_bytes): host_view
        # The engine's regions cut into the host's rows (a reshape of contiguous bytes: a view).
        rows = host.shape[3:]
        # (engine view, host view) pairs indexed by block first; one assignment each per run.
        if kv.whole is not None:
            self._views = [(_split_regions(kv.whole, rows), host)]
        else:
            self._views = [(_split_regions(view, rows), host[:, layer]) for layer, view in enumerate(kv.layers)]

    def store(self, engine_blocks: IndexList, slots: IndexList) -> None:
        """G1 -> G2 (d2h)."""
        eb, sl = self._checked(engine_blocks, slots, Direction.STORE)
        for b0, b1, dest in source_runs(eb, sl):
            for engine, host in self._views:
                host[dest] = engine[b0:b1]

    def load(self, slots: IndexList, engine_blocks: IndexList) -> None:
        """G2 -> G1 (h2d)."""
        eb, sl = self._checked(engine_blocks, slots, Direction.LOAD)
        for s0, s1, dest in source_runs(sl, eb):
            for engine, host in self._views:
                engine[dest] = host[s0:s1]

    def _checked(self, engine_blocks: IndexList, slots: IndexList,
                 direction: Direction) -> tuple[np.ndarray, np.ndarray]:
        eb, sl = index_array(engine_blocks, "engine_blocks"), index_array(slots, "slots")
        check_batch(eb, sl, self.kv.layout.num_blocks, self.host.shape[0], direction)
        return eb, sl
