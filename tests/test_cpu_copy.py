"""The CPU copy engine (kvbm.worker.copy.NumpyCopyEngine) against a per-block oracle.

Every layout (vLLM kv_first, block_first, MLA, TensorRT-LLM contiguous), both TP slices of a
shared pool, and batches of every shape the engine groups differently: runs on both sides,
a source run into scattered destinations, scattered sources into a destination run, fully
scattered pairs in any order. Every byte of the pool and of the engine tensors is compared,
so a copy that lands in the wrong place, or touches a byte it should not, fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.worker.copy import NumpyCopyEngine, SourceRun, source_runs
from kvbm.worker.layout import EngineKV, host_slice_view

LAYOUTS = ("kv_first", "block_first", "mla", "contiguous")
LAYERS, BLOCKS, HOST_BLOCKS, TOKENS, HEADS, DIM, TP = 3, 20, 24, 4, 2, 8, 2


def make_kv(layout: str, rng: np.random.Generator) -> EngineKV:
    """Random engine tensors of ``layout`` (float16 bytes of any value, NaNs included)."""
    shape = {
        "kv_first": (2, BLOCKS, TOKENS, HEADS, DIM),
        "block_first": (BLOCKS, 2, TOKENS, HEADS, DIM),
        "mla": (BLOCKS, TOKENS, DIM),
        "contiguous": (BLOCKS, LAYERS, 2, TOKENS, HEADS, DIM),
    }[layout]

    def rand() -> np.ndarray:
        return rng.integers(0, 1 << 16, shape, dtype=np.uint16).view(np.float16)

    if layout == "contiguous":
        return EngineKV.from_contiguous(rand(), LAYERS)
    return EngineKV.from_layers([rand() for _ in range(LAYERS)], num_blocks=BLOCKS)


def block_bytes(kv: EngineKV, block: int) -> np.ndarray:
    """The oracle's view of one engine block: ``(layers, outer, region)`` bytes, copied."""
    return np.stack([view[block] for view in kv.layers])


def batches(rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """(engine blocks, host slots) pairs covering every grouping the engine makes."""
    scattered = [(rng.permutation(BLOCKS)[:n].tolist(), rng.permutation(HOST_BLOCKS)[:n].tolist())
                 for n in (1, 2, 7, BLOCKS)]
    return [
        ([], []),
        (list(range(4, 12)), list(range(10, 18))),  # one run on both sides
        (list(range(3, 9)), [20, 2, 9, 0, 14, 5]),  # engine run, scattered slots
        ([17, 2, 9, 0, 14, 5], list(range(1, 7))),  # scattered engine blocks, slot run
        ([9, 8, 7, 6], [3, 2, 1, 0]),  # a run given backwards
        ([5, 6, 7, 1, 2], [0, 1, 9, 22, 23]),  # mixed runs
        *scattered,
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_then_load_moves_exactly_the_named_bytes(layout: str) -> None:
    rng = np.random.default_rng(LAYOUTS.index(layout))
    kvs = [make_kv(layout, rng) for _ in range(TP)]
    slice_bytes = kvs[0].layout.slice_bytes
    pool = rng.integers(0, 256, (HOST_BLOCKS, TP * slice_bytes), dtype=np.uint8)
    hosts = [host_slice_view(pool, r * slice_bytes, kv.layout) for r, kv in enumerate(kvs)]
    engines = [NumpyCopyEngine(kv, host) for kv, host in zip(kvs, hosts)]
    for blocks, slots in batches(rng):
        for r, (kv, host, engine) in enumerate(zip(kvs, hosts, engines)):
            want_pool = pool.copy()
            for b, s in zip(blocks, slots):
                want_pool[s, r * slice_bytes : (r + 1) * slice_bytes] = block_bytes(kv, b).reshape(-1)
            engine.store(blocks, slots)
            assert np.array_equal(pool, want_pool), f"store {blocks} -> {slots}, rank {r}"

            # Load the same slots into other blocks (a permutation keeps destinations distinct).
            targets = rng.permutation(BLOCKS)[: len(slots)].tolist()
            want = [block_bytes(kv, b) for b in range(BLOCKS)]
            for s, b in zip(slots, targets):
                want[b] = host[s].copy()
            engine.load(slots, np.array(targets, np.int32))
            got = [block_bytes(kv, b) for b in range(BLOCKS)]
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), f"load {slots} -> {targets}, rank {r}"
            assert np.array_equal(pool, want_pool), "a load wrote to the pool"


def reference_source_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, list[int]]]:
    """The oracle: a plain loop over the pairs ordered by source."""
    out: list[tuple[int, int, list[int]]] = []
    for s, d in sorted(zip(src, dst), key=lambda p: p[0]):
        if out and s == out[-1][1]:
            out[-1] = (out[-1][0], s + 1, out[-1][2] + [d])
        else:
            out.append((s, s + 1, [d]))
    return out


def dest_list(run: SourceRun) -> list[int]:
    if isinstance(run.dest, slice):
        return list(range(run.dest.start, run.dest.stop))
    return run.dest.tolist()


def test_source_runs_match_a_plain_loop() -> None:
    rng = np.random.default_rng(7)
    cases = batches(rng) + [(rng.permutation(64)[:40].tolist(), rng.permutation(64)[:40].tolist())
                            for _ in range(20)]
    for src, dst in cases:
        runs = source_runs(np.array(src, np.int64), np.array(dst, np.int64))
        assert [(r.start, r.stop, dest_list(r)) for r in runs] == reference_source_runs(src, dst)
        for r in runs:  # consecutive destinations are a slice: a plain strided copy
            d = dest_list(r)
            assert isinstance(r.dest, slice) == (d == list(range(d[0], d[0] + len(d))))
    # A fresh range of slots loads into scattered blocks as one run: one assignment per layer.
    (run,) = source_runs(np.arange(8, 16), np.array([9, 2, 30, 4, 5, 6, 0, 1]))
    assert (run.start, run.stop, dest_list(run)) == (8, 16, [9, 2, 30, 4, 5, 6, 0, 1])
