"""The TP-independent heads format: head ranges, placements, the world's choice of format, and
the CPU copy engine writing a TP=t rank's heads where a TP=1 rank writes them (every byte)."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.ipc import messages as m
from kvbm.ipc.block_format import HeadSplit, Placement, choose_heads, kv_head_range
from kvbm.leader.ops import OpKind
from kvbm.leader.world import LayoutMismatch, World
from kvbm.worker.copy import NumpyCopyEngine
from kvbm.worker.layout import EngineKV, host_view

LAYERS, BLOCKS, TOKENS, HEADS, DIM = 3, 8, 16, 8, 32  # fp16: 64 B per head and token
HEAD_BYTES = DIM * 2


def test_kv_head_range_splits_and_replicates_like_megatron() -> None:
    assert [kv_head_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [kv_head_range(8, 8, r) for r in range(8)] == [(r, 1) for r in range(8)]
    assert [kv_head_range(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 1)] * 4  # replicas
    for total, tp in ((6, 4), (3, 2), (4, 6)):
        with pytest.raises(ValueError):
            kv_head_range(total, tp, 0)


def test_placements_of_both_orders() -> None:
    nhd = Placement.heads(HeadSplit(8, 4, 2, 64), tokens=16)
    assert nhd == Placement(offset=256, region_stride=16 * 8 * 64, rows=16, row_bytes=128, pitch=512)
    hnd = Placement.heads(HeadSplit(8, 4, 2, 64, head_major=True), tokens=16)
    assert hnd == Placement(offset=4 * 16 * 64, region_stride=16 * 8 * 64, rows=1, row_bytes=2 * 16 * 64,
                            pitch=2 * 16 * 64)
    assert nhd.region_bytes == hnd.region_bytes == 16 * 2 * 64
    assert Placement.sliced(100, 40).end(3) == 100 + 3 * 40
    with pytest.raises(ValueError):
        HeadSplit(8, 6, 4, 64)  # past the model's heads


def test_the_block_format_setting_chooses_the_heads_a_rank_registers() -> None:
    split_nhd, split_hnd, whole = HeadSplit(8, 4, 4, 64), HeadSplit(8, 4, 4, 64, head_major=True), HeadSplit(8, 0, 8, 64)
    assert [choose_heads(s, 16, "heads") for s in (split_nhd, split_hnd, None)] == [split_nhd, split_hnd, None]
    assert [choose_heads(s, 16, "slices") for s in (split_nhd, split_hnd, whole)] == [None] * 3
    # auto: the heads format where a rank's heads are one piece of each region (no extra copies)
    assert [choose_heads(s, 16, "auto") for s in (split_nhd, split_hnd, whole)] == [None, split_hnd, whole]


def _register(rank: int, world: int, split: HeadSplit | None, *, slice_bytes: int | None = None,
              **extra: object) -> m.RegisterRank:
    heads = {} if split is None else dict(kv_heads=split.total, first_head=split.first, num_heads=split.count,
                                          head_bytes=split.head_bytes, head_major=split.head_major)
    region = TOKENS * split.count * split.head_bytes if split is not None else TOKENS * HEADS // world * HEAD_BYTES
    size = slice_bytes if slice_bytes is not None else LAYERS * 2 * region
    fields = dict(rank=rank, world_size=world, num_layers=LAYERS, slice_bytes=size, dtype="float16",
                  engine_layout=f"2x{size // (2 * LAYERS)}", block_size=TOKENS, fingerprint="m", pid=1)
    fields.update(heads)
    fields.update(extra)
    return m.RegisterRank(**fields)  # type: ignore[arg-type]


def _world(tp: int, total: int = HEADS, splits: dict[int, HeadSplit | None] | None = None) -> World:
    w = World()
    for r in range(tp):
        if splits is not None and r in splits:
            split = splits[r]
        else:
            first, count = kv_head_range(total, tp, r)
            split = HeadSplit(total, first, count, HEAD_BYTES)
        w.add(_register(r, tp, split), b"r%d" % r, r, 0.0)
    return w


def test_the_heads_format_names_no_tp_size_and_has_the_same_block_at_every_tp() -> None:
    worlds = {tp: _world(tp) for tp in (1, 2, 4, 8)}
    whole = LAYERS * 2 * TOKENS * HEADS * HEAD_BYTES
    assert {w.block_bytes for w in worlds.values()} == {whole}
    assert len({w.layout_fingerprint for w in worlds.values()}) == 1
    fp = worlds[2].layout_fingerprint
    assert f"slices=heads:{HEADS}x{HEAD_BYTES}:NHD;regions={2 * LAYERS}" in fp and "layout=" not in fp
    assert all(w.slice_offset(r) == 0 for w in worlds.values() for r in w.ranks)
    assert worlds[4].op_ranks(OpKind.STORE) == {0, 1, 2, 3}
    # Another head geometry of the same bytes, or another order, is another format: a miss.
    other = _world(2, total=4, splits={r: HeadSplit(4, 2 * r, 2, 2 * HEAD_BYTES) for r in range(2)})
    assert other.block_bytes == whole and other.layout_fingerprint != fp
    hnd = _world(2, splits={r: HeadSplit(HEADS, 4 * r, 4, HEAD_BYTES, head_major=True) for r in range(2)})
    assert ":HND;" in hnd.layout_fingerprint and hnd.layout_fingerprint != fp


def test_replicated_heads_are_written_by_the_first_rank_of_each() -> None:
    w = _world(8, total=2)
    assert w.heads is not None and w.block_bytes == LAYERS * 2 * TOKENS * 2 * HEAD_BYTES
    assert w.op_ranks(OpKind.STORE) == {0, 4} and w.op_ranks(OpKind.LOAD) == set(range(8))
    assert w.writes_stores(4) and not w.writes_stores(5)


@pytest.mark.parametrize("splits", [
    {0: None, 1: None},  # ranks that name no heads
    {0: HeadSplit(HEADS, 0, 4, HEAD_BYTES), 1: HeadSplit(HEADS, 2, 4, HEAD_BYTES)},  # overlapping ranges
    {0: HeadSplit(HEADS, 0, 4, HEAD_BYTES), 1: HeadSplit(HEADS, 0, 4, HEAD_BYTES)},  # heads 4..7 held by no rank
])
def test_ranks_that_do_not_tile_the_heads_keep_rank_slices(splits: dict[int, HeadSplit | None]) -> None:
    """A heads-format block would have bytes no rank wrote: the world falls back to rank slices."""
    w = _world(2, splits=splits)
    assert w.heads is None
    assert "slices=" in w.layout_fingerprint and "heads:" not in w.layout_fingerprint
    assert w.slice_offset(1) == w.ranks[0].layout.slice_bytes


def test_inconsistent_heads_are_a_layout_mismatch() -> None:
    w = World()
    w.add(_register(0, 2, HeadSplit(HEADS, 0, 4, HEAD_BYTES)), b"r0", 0, 0.0)
    with pytest.raises(LayoutMismatch, match="kv_heads"):
        w.check_compatible(_register(1, 2, HeadSplit(16, 4, 4, HEAD_BYTES)))
    with pytest.raises(LayoutMismatch, match="names no KV heads but rank 0 does.*DYN_KVBM_BLOCK_FORMAT"):
        w.check_compatible(_register(1, 2, None))
    with pytest.raises(LayoutMismatch, match="is not 3 layers"):
        w.check_compatible(_register(1, 2, HeadSplit(HEADS, 4, 4, HEAD_BYTES), slice_bytes=1000))
    with pytest.raises(LayoutMismatch, match="not a range"):
        w.check_compatible(_register(1, 2, HeadSplit(HEADS, 4, 4, HEAD_BYTES), first_head=6))


def _engine_tensors(heads: slice, head_major: bool, seed: int = 0) -> list[np.ndarray]:
    """Every layer's KV of the whole model (the same at every TP size), cut to ``heads``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        full = rng.integers(0, 1 << 15, (2, BLOCKS, TOKENS, HEADS, DIM)).astype(np.float16)
        if head_major:
            full = full.transpose(0, 1, 3, 2, 4)
        out.append(np.ascontiguousarray(full[:, :, heads] if head_major else full[:, :, :, heads]))
    return out


@pytest.mark.parametrize("head_major", [False, True])
def test_every_tp_size_writes_the_same_block_and_reads_its_heads_back(head_major: bool) -> None:
    engine_blocks, slots = [1, 2, 5, 6], [3, 0, 1, 2]
    pools = {}
    for tp in (1, 2, 4, 8, 16):  # 16: two ranks per head (replicas write the same bytes)
        pool = np.zeros((5, LAYERS * 2 * TOKENS * HEADS * HEAD_BYTES), np.uint8)
        for r in range(tp):
            first, count = kv_head_range(HEADS, tp, r)
            kv = EngineKV.from_layers(_engine_tensors(slice(first, first + count), head_major), num_blocks=BLOCKS)
            split = HeadSplit(HEADS, first, count, HEAD_BYTES, head_major)
            NumpyCopyEngine(kv, host_view(pool, Placement.heads(split, TOKENS), kv.layout)).store(engine_blocks, slots)
        pools[tp] = pool
    for tp in (2, 4, 8, 16):
        assert np.array_equal(pools[tp], pools[1]), f"TP={tp} wrote other bytes than TP=1"
    assert not pools[1][4].any()  # a slot no store named stays untouched
    # At TP=1 a block is the engine's own bytes: layer by layer, K then V.
    whole = _engine_tensors(slice(0, HEADS), head_major)
    want = np.stack([t[:, 1].reshape(2, -1).view(np.uint8) for t in whole])
    assert np.array_equal(pools[1][3].reshape(LAYERS, 2, -1), want)
    for tp in (2, 4):  # and a TP=1 block loads into every rank of another TP size
        for r in range(tp):
            first, count = kv_head_range(HEADS, tp, r)
            tensors = [np.zeros_like(t) for t in _engine_tensors(slice(first, first + count), head_major)]
            kv = EngineKV.from_layers(tensors, num_blocks=BLOCKS)
            split = HeadSplit(HEADS, first, count, HEAD_BYTES, head_major)
            NumpyCopyEngine(kv, host_view(pools[1], Placement.heads(split, TOKENS), kv.layout)).load(slots, [7, 0, 3, 4])
            expect = _engine_tensors(slice(first, first + count), head_major)
            for got, ref in zip(tensors, expect):
                assert np.array_equal(got[:, [7, 0, 3, 4]], ref[:, engine_blocks])
                assert not got[:, [1, 2, 5, 6]].any()


def test_a_placement_that_does_not_fit_is_refused() -> None:
    kv = EngineKV.from_layers(_engine_tensors(slice(0, 4), False), num_blocks=BLOCKS)
    split = HeadSplit(HEADS, 4, 4, HEAD_BYTES)
    with pytest.raises(ValueError, match="does not fit"):
        host_view(np.zeros((2, 4096), np.uint8), Placement.heads(split, TOKENS), kv.layout)
    with pytest.raises(ValueError, match="does not hold regions"):
        host_view(np.zeros((2, 1 << 20), np.uint8), Placement.heads(split, TOKENS // 2), kv.layout)
