"""The GPU copy engine (kvbm.worker.cuda_copy).

CPU tests check the copy plans (segments, 2D copies, region lists, the kernel's work items)
by executing them with memmove over NumPy "device" tensors and comparing every byte with
the CPU engine. GPU tests (marked ``gpu``; skipped without CuPy and a device) run the real
engine for every strategy, layout, TP 1 and 2 (two engines writing disjoint slices of one
pinned pool) and torch or CuPy tensors, and compare every stored and loaded byte.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.ipc.block_format import HeadSplit, Placement
from kvbm.worker.copy import Direction, NumpyCopyEngine, block_runs
from kvbm.worker.cuda_copy import (
    AUTO,
    BATCH,
    KERNEL,
    MEMCPY2D,
    CudaCopyEngine,
    EngineKVDevice,
    HostSlice,
    TensorDesc,
    auto_strategy,
    cuda_available,
    describe,
    dma_copies,
    pinned_ranges,
    region_copies,
    split_segments,
)
from kvbm.worker.layout import EngineKV, LayoutError, host_slice_view, host_view, page_aligned_empty

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("kv_first", "block_first", "mla", "contiguous")
LAYERS, BLOCKS, HOST_BLOCKS, TOKENS, HEADS, DIM = 5, 24, 40, 16, 2, 64
# Scattered pairs with two runs (3..6 -> 7..10, 17..18 -> 2..3); loads go to other blocks.
STORE_BLOCKS = [3, 4, 5, 6, 10, 0, 17, 18, 23, 1]
SLOTS = [7, 8, 9, 10, 1, 30, 2, 3, 39, 0]
LOAD_BLOCKS = [20, 21, 22, 23, 2, 5, 7, 8, 9, 11]


def shape_of(layout: str, nb: int = BLOCKS, tokens: int = TOKENS, dim: int = DIM) -> tuple[int, ...]:
    return {
        "kv_first": (2, nb, tokens, HEADS, dim),
        "block_first": (nb, 2, tokens, HEADS, dim),
        "mla": (nb, tokens, dim),
        "contiguous": (nb, LAYERS, 2, tokens, HEADS, dim),
    }[layout]


def numpy_kv(arrays: list[np.ndarray], layout: str) -> EngineKV:
    """The CPU engine's view of the same bytes (the reference)."""
    if layout == "contiguous":
        return EngineKV.from_contiguous(arrays[0], LAYERS)
    return EngineKV.from_layers(arrays, num_blocks=BLOCKS)


def desc_of(a: np.ndarray) -> TensorDesc:
    return TensorDesc(int(a.ctypes.data), a.nbytes, tuple(a.shape), str(a.dtype), -1)


def device_kv_of_numpy(arrays: list[np.ndarray], layout: str) -> EngineKVDevice:
    if layout == "contiguous":
        return EngineKVDevice.from_contiguous_desc(desc_of(arrays[0]), LAYERS)
    return EngineKVDevice.from_layer_descs([desc_of(a) for a in arrays], BLOCKS)


def random_arrays(layout: str, rng: np.random.Generator) -> list[np.ndarray]:
    n = 1 if layout == "contiguous" else LAYERS
    return [rng.integers(0, 1 << 16, shape_of(layout), dtype=np.uint16).view(np.float16) for _ in range(n)]


# -- CPU: the copy plans ----------------------------------------------------------------------
def run_2d(copies: list[tuple[int, int, int, int, int, int]]) -> None:
    """What cudaMemcpy2DAsync does, row by row."""
    for dst, dpitch, src, spitch, width, height in copies:
        assert width <= dpitch and width <= spitch
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)


def run_regions(plan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    for d, s, n in zip(*plan):
        ctypes.memmove(int(d), int(s), int(n))


def execute(executor: str, kv: EngineKVDevice, host: HostSlice, eb: list[int], sl: list[int],
            direction: Direction, placement: Placement | int = 0) -> None:
    segs = kv.segments(placement)
    if executor == MEMCPY2D:
        run_2d(dma_copies(segs, host, block_runs(eb, sl), direction))
    elif executor == BATCH:
        run_regions(region_copies(segs, host, np.array(eb), np.array(sl), direction))
    else:  # the kernel's work items: segments cut into chunks (small here, to cut every segment)
        run_regions(region_copies(split_segments(segs, 1536), host, np.array(eb), np.array(sl), direction))


@pytest.mark.parametrize("executor", [MEMCPY2D, BATCH, KERNEL])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_plans_move_the_bytes_the_cpu_engine_moves(layout: str, tp: int, executor: str) -> None:
    rng = np.random.default_rng(7)
    ranks = [random_arrays(layout, rng) for _ in range(tp)]
    refs = [[a.copy() for a in arrays] for arrays in ranks]
    slice_bytes = numpy_kv(ranks[0], layout).layout.slice_bytes
    block_bytes = tp * slice_bytes + 4096  # room after the slices stays untouched
    pool = np.full((HOST_BLOCKS, block_bytes), 0xAB, np.uint8)
    ref_pool = pool.copy()
    for r in range(tp):
        kv = device_kv_of_numpy(ranks[r], layout)
        ref = numpy_kv(refs[r], layout)
        assert kv.layout == ref.layout
        host = HostSlice.of(pool, r * slice_bytes, kv.layout)
        execute(executor, kv, host, STORE_BLOCKS, SLOTS, Direction.STORE)
        NumpyCopyEngine(ref, host_slice_view(ref_pool, r * slice_bytes, ref.layout)).store(STORE_BLOCKS, SLOTS)
    assert np.array_equal(pool, ref_pool)
    for r in range(tp):
        for a, b in zip(ranks[r], refs[r]):
            a.fill(0)
            b.fill(0)
        kv = device_kv_of_numpy(ranks[r], layout)
        ref = numpy_kv(refs[r], layout)
        execute(executor, kv, HostSlice.of(pool, r * slice_bytes, kv.layout), LOAD_BLOCKS, SLOTS, Direction.LOAD)
        NumpyCopyEngine(ref, host_slice_view(ref_pool, r * slice_bytes, ref.layout)).load(SLOTS, LOAD_BLOCKS)
        for a, b in zip(ranks[r], refs[r]):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert any(a.any() for a in ranks[r])


@pytest.mark.parametrize("executor", [MEMCPY2D, BATCH, KERNEL])
@pytest.mark.parametrize("layout", ["kv_first", "block_first", "contiguous"])
def test_copy_plans_of_the_heads_format_move_the_bytes_the_cpu_engine_moves(layout: str, executor: str) -> None:
    """TP=2, each rank HEADS of the model's 2 x HEADS heads: every rank's pieces (one row of its
    heads per token and region) land where the CPU engine puts them, in one block of the model."""
    rng = np.random.default_rng(9)
    ranks = [random_arrays(layout, rng) for _ in range(2)]
    refs = [[a.copy() for a in arrays] for arrays in ranks]
    placements = [Placement.heads(HeadSplit(2 * HEADS, r * HEADS, HEADS, DIM * 2), TOKENS) for r in range(2)]
    block_bytes = 2 * numpy_kv(ranks[0], layout).layout.slice_bytes + 4096
    pool = np.full((HOST_BLOCKS, block_bytes), 0xAB, np.uint8)
    ref_pool = pool.copy()
    for r, placement in enumerate(placements):
        kv, ref = device_kv_of_numpy(ranks[r], layout), numpy_kv(refs[r], layout)
        assert all(seg.width == HEADS * DIM * 2 for seg in kv.segments(placement))  # a row per token
        execute(executor, kv, HostSlice.of(pool, placement, kv.layout), STORE_BLOCKS, SLOTS, Direction.STORE, placement)
        NumpyCopyEngine(ref, host_view(ref_pool, placement, ref.layout)).store(STORE_BLOCKS, SLOTS)
    assert np.array_equal(pool, ref_pool)
    for r, placement in enumerate(placements):
        for a, b in zip(ranks[r], refs[r]):
            a.fill(0)
            b.fill(0)
        kv, ref = device_kv_of_numpy(ranks[r], layout), numpy_kv(refs[r], layout)
        execute(executor, kv, HostSlice.of(pool, placement, kv.layout), LOAD_BLOCKS, SLOTS, Direction.LOAD, placement)
        NumpyCopyEngine(ref, host_view(ref_pool, placement, ref.layout)).load(SLOTS, LOAD_BLOCKS)
        for a, b in zip(ranks[r], refs[r]):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert any(a.any() for a in ranks[r])


def test_segments_merge_what_is_contiguous_on_both_sides() -> None:
    rng = np.random.default_rng(0)
    region = TOKENS * HEADS * DIM * 2
    got = {layout: device_kv_of_numpy(random_arrays(layout, rng), layout).segments() for layout in LAYOUTS}
    assert [s.width for s in got["kv_first"]] == [region] * (2 * LAYERS)  # K and V apart on the GPU
    assert [s.width for s in got["block_first"]] == [2 * region] * LAYERS  # K+V of a layer together
    assert [s.width for s in got["mla"]] == [TOKENS * DIM * 2] * LAYERS
    assert [s.width for s in got["contiguous"]] == [LAYERS * 2 * region]  # the whole slice
    for segs in got.values():
        assert [s.host_off for s in segs] == list(np.cumsum([0] + [s.width for s in segs[:-1]]))


def test_a_single_block_cache_keeps_k_and_v_apart() -> None:
    # kv_first with one block: V follows K directly, but a merged row would exceed the 2D pitch.
    a = np.zeros((2, 1, TOKENS, HEADS, DIM), np.float16)
    kv = EngineKVDevice.from_layer_descs([desc_of(a)], 1)
    assert [s.width for s in kv.segments()] == [kv.layout.region_bytes] * 2


def test_one_2d_copy_per_run_and_segment() -> None:
    arrays = random_arrays("kv_first", np.random.default_rng(1))
    kv = device_kv_of_numpy(arrays, "kv_first")
    pool = np.zeros((HOST_BLOCKS, kv.layout.slice_bytes), np.uint8)
    runs = block_runs(STORE_BLOCKS, SLOTS)
    copies = dma_copies(kv.segments(), HostSlice.of(pool, 0, kv.layout), runs, Direction.STORE)
    assert len(copies) == len(runs) * 2 * LAYERS == 6 * 2 * LAYERS
    assert max(c[5] for c in copies) == 4  # the run 3..6 -> 7..10 is one 4-row copy per segment


def reference_runs(a: list[int], b: list[int]) -> list[tuple[int, int, int]]:
    """The oracle: a plain loop over the pairs ordered by engine block."""
    out: list[tuple[int, int, int]] = []
    for x, y in sorted(zip(a, b), key=lambda p: p[0]):
        if out and (x, y) == (out[-1][0] + out[-1][2], out[-1][1] + out[-1][2]):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((x, y, 1))
    return out


def test_vectorised_runs_match_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    cases = [([], []), ([5], [9]), (STORE_BLOCKS, SLOTS), (list(range(10)), list(range(20, 30))),
             ([6, 5, 4, 3], [9, 8, 7, 6]), ([5, 5, 6], [1, 2, 3])]
    cases += [(rng.permutation(50)[:30].tolist(), rng.permutation(40)[:30].tolist()) for _ in range(20)]
    cases += [(sorted(rng.choice(128, 64, replace=False).tolist()), list(range(64))) for _ in range(5)]
    for a, b in cases:
        got = block_runs(a, b)
        assert list(got) == reference_runs(a, b)
        assert got.num_blocks == len(a)
        assert list(block_runs(np.array(a, np.int64), np.array(b, np.uint32))) == list(got)
    assert list(block_runs([6, 5, 4, 3], [9, 8, 7, 6])) == [(3, 6, 4)]  # any order: one run


@pytest.mark.parametrize("direction", list(Direction))
def test_bad_batches_are_refused_before_any_copy(direction: Direction) -> None:
    arrays = random_arrays("kv_first", np.random.default_rng(2))
    kv = numpy_kv(arrays, "kv_first")
    pool = np.zeros((HOST_BLOCKS, kv.layout.slice_bytes), np.uint8)
    eng = NumpyCopyEngine(kv, host_slice_view(pool, 0, kv.layout))
    copy = eng.store if direction is Direction.STORE else (lambda eb, sl: eng.load(sl, eb))
    with pytest.raises(IndexError, match=f"engine block {BLOCKS} is outside \\[0, {BLOCKS}\\)"):
        copy([BLOCKS], [0])
    with pytest.raises(IndexError, match="host slot -1 is outside"):
        copy([0], [-1])
    with pytest.raises(ValueError, match="2 engine blocks but 1 host slots"):
        copy([1, 2], [3])
    with pytest.raises(TypeError, match="engine_blocks must be a flat list of ints"):
        copy([1.5], [3])
    dup = ([1, 2], [3, 3]) if direction is Direction.STORE else ([1, 1], [3, 4])
    with pytest.raises(ValueError, match="same destination twice"):
        copy(*dup)
    assert not pool.any()  # nothing was copied by a refused batch
    copy([], [])
    assert (Direction.STORE.label, Direction.LOAD.label) == ("d2h", "h2d")
    assert Direction.LOAD == "load"  # the rank agent's Finished.kind still compares with plain strings


def test_page_aligned_host_tensors() -> None:
    for shape, dtype in (((2, 24, 16, 2, 64), np.float16), ((3,), np.uint8), ((5, 4097), np.float32)):
        a = page_aligned_empty(shape, dtype)
        assert a.ctypes.data % 4096 == 0 and a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        a.fill(1)  # the whole extent is writable


def test_auto_prefers_dma_for_large_copies() -> None:
    assert auto_strategy(64 << 21, 64) == MEMCPY2D  # 2 MiB blocks in one run
    assert auto_strategy(64 << 21, 4096) == KERNEL  # 32 KiB regions, scattered
    assert auto_strategy(64 << 21, 4096, kernel_ok=False) == MEMCPY2D
    assert auto_strategy(64 << 18, 64, row_bytes=4 << 10) == KERNEL  # 256 KiB blocks in one run: 4 KiB rows
    assert auto_strategy(64 << 21, 64, row_bytes=32 << 10) == MEMCPY2D


def test_layout_errors() -> None:
    with pytest.raises(LayoutError, match="CPU copy engine|CUDA array"):
        describe(np.zeros((2, 4, 16, 2, 8), np.float16))
    a = np.zeros((2, 4, 16, 2, 8), np.float16)
    b = np.zeros((2, 4, 16, 2, 8), np.float32)
    with pytest.raises(LayoutError, match="layer 1"):
        EngineKVDevice.from_layer_descs([desc_of(a), desc_of(b)])
    with pytest.raises(LayoutError, match="not \\[blocks"):
        EngineKVDevice.from_contiguous_desc(desc_of(a), 3)
    with pytest.raises(ValueError, match="does not fit"):
        kv = EngineKVDevice.from_layer_descs([desc_of(a)])
        HostSlice.of(np.zeros((4, kv.layout.slice_bytes), np.uint8), 16, kv.layout)


def test_unknown_strategy_is_refused_before_touching_cuda() -> None:
    a = np.zeros((2, 4, 16, 2, 8), np.float16)
    kv = EngineKVDevice.from_layer_descs([desc_of(a)])
    with pytest.raises(ValueError, match="unknown copy strategy"):
        CudaCopyEngine(kv, np.zeros((4, kv.layout.slice_bytes), np.uint8), 0, strategy="dma")


_NVRTC_COMPILE = """
import sys
from kvbm.worker.cuda_copy import _KERNEL_SOURCE
try:
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(_KERNEL_SOURCE.encode(), b"kvbm_copy.cu", 0, [], [])
except Exception as e:  # no cuda-bindings or no libnvrtc on this machine
    print(f"NVRTC is not usable here: {e}")
    sys.exit(3)
opts = [b"--gpu-architecture=sm_90"]
(result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
_, size = nvrtc.nvrtcGetProgramLogSize(prog)
log = b" " * size
nvrtc.nvrtcGetProgramLog(prog, log)
print(log.decode(errors="replace"))
sys.exit(0 if result == nvrtc.nvrtcResult.NVRTC_SUCCESS else 1)
"""


def test_kernel_source_compiles_for_hopper() -> None:
    # In a child process: NVRTC loaded into the test process broke a later `import torch`
    # there (torch's schema parser failed; seen on an H200 with torch 2.11 and CUDA 13).
    p = subprocess.run([sys.executable, "-c", _NVRTC_COMPILE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if p.returncode == 3:
        pytest.skip(p.stdout.strip())
    assert p.returncode == 0, p.stdout + p.stderr


def test_importing_the_gpu_modules_stays_light() -> None:
    code = ("import sys, kvbm.worker.cuda_copy, kvbm.bench.gpu_copy, kvbm.ipc.shm; "
            "bad = [m for m in ('cupy', 'torch', 'zmq', 'cuda') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_benchmark_dry_run_checks_its_plans() -> None:
    out = subprocess.run([sys.executable, "-m", "kvbm.bench.gpu_copy", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "block=2 MiB  pattern=scattered" in out and "auto=memcpy2d" in out
    assert out.rstrip().endswith("(no GPU used)")


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU failure")
def test_gpu_check_fails_loudly_without_a_gpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert "no CUDA GPU" in p.stderr


# -- GPU ------------------------------------------------------------------------------------
def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return torch


def gpu_tensors(source: str, layout: str, **kw: int) -> list[Any]:
    """Random-bit engine tensors on the GPU: CuPy fp16 or torch bf16."""
    n = 1 if layout == "contiguous" else LAYERS
    shape = shape_of(layout, **kw)
    if source == "cupy":
        import cupy as cp

        return [cp.random.randint(0, 1 << 16, shape, dtype=cp.uint16).view(cp.float16) for _ in range(n)]
    torch = _torch_cuda()
    return [torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, device="cuda").view(torch.bfloat16)
            for _ in range(n)]


def as_bytes(t: Any) -> Any:
    """A CuPy uint8 view of a CuPy array or torch CUDA tensor (zero-copy)."""
    import cupy as cp

    if hasattr(t, "data_ptr"):
        import torch

        return cp.from_dlpack(t.view(torch.uint8))
    return t.view(cp.uint8)


def device_kv(tensors: list[Any], layout: str, nb: int = BLOCKS) -> EngineKVDevice:
    if layout == "contiguous":
        return EngineKVDevice.from_contiguous(tensors[0], LAYERS)
    return EngineKVDevice.from_layers({f"layer.{i}": t for i, t in enumerate(tensors)}, num_blocks=nb)


def reference_kv(tensors: list[Any], layout: str) -> tuple[list[np.ndarray], EngineKV]:
    import cupy as cp

    arrays = [cp.asnumpy(as_bytes(t)) for t in tensors]
    if layout == "contiguous":
        return arrays, EngineKV.from_contiguous(arrays[0], LAYERS)
    return arrays, EngineKV.from_layers(arrays, num_blocks=BLOCKS)


def make_engine(kv: EngineKVDevice, pool: np.ndarray, offset: int, strategy: str, **kw: Any) -> CudaCopyEngine:
    try:
        return CudaCopyEngine(kv, pool, offset, strategy=strategy, **kw)
    except ValueError as e:
        if "unavailable" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize("source", ["cupy", "torch"])
@pytest.mark.parametrize("strategy", [MEMCPY2D, KERNEL, BATCH, AUTO])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_gpu_store_then_load_every_byte(layout: str, tp: int, strategy: str, source: str) -> None:
    import cupy as cp

    from kvbm.bench.gpu_copy import host_pool

    ranks = [gpu_tensors(source, layout) for _ in range(tp)]
    kvs = [device_kv(t, layout) for t in ranks]
    slice_bytes = kvs[0].layout.slice_bytes
    block_bytes = -(-(tp * slice_bytes + 4096) // 4096) * 4096
    with host_pool(HOST_BLOCKS, block_bytes) as pool:
        pool.fill(0xAB)
        ref_pool = pool.copy()
        engines: list[CudaCopyEngine] = []
        try:
            for r in range(tp):
                engines.append(make_engine(kvs[r], pool, r * slice_bytes, strategy))
            key = (int(pool.ctypes.data), pool.nbytes)
            assert pinned_ranges()[key] == tp  # TP ranks of one process share the registration
            refs = [reference_kv(t, layout) for t in ranks]
            # Rank 0 through the async API (polled), the others through the blocking one.
            pending = engines[0].store_async(STORE_BLOCKS, SLOTS)
            for eng in engines[1:]:
                eng.store(STORE_BLOCKS, SLOTS)
            while not pending.done():
                time.sleep(0.001)
            for r in range(tp):
                NumpyCopyEngine(refs[r][1], host_slice_view(ref_pool, r * slice_bytes, refs[r][1].layout)).store(
                    STORE_BLOCKS, SLOTS)
            assert np.array_equal(pool, ref_pool), "host pool differs from the CPU engine's after the stores"

            for r in range(tp):
                for t in ranks[r]:
                    as_bytes(t).fill(0)
                for a in refs[r][0]:
                    a.fill(0)
            cp.cuda.runtime.deviceSynchronize()
            for r, eng in enumerate(engines):
                eng.load(SLOTS, LOAD_BLOCKS)
                NumpyCopyEngine(refs[r][1], host_slice_view(ref_pool, r * slice_bytes, refs[r][1].layout)).load(
                    SLOTS, LOAD_BLOCKS)
                for t, a in zip(ranks[r], refs[r][0]):
                    assert bool(cp.array_equal(as_bytes(t), cp.asarray(a))), f"rank {r}: loaded bytes differ"
        finally:
            for eng in engines:
                eng.close()
        assert key not in pinned_ranges()


_SPIN = r"""
extern "C" __global__ void spin_fill(unsigned char* p, long long n, unsigned char v, long long cycles) {
    if (threadIdx.x == 0) { long long t0 = clock64(); while (clock64() - t0 < cycles) { } }
    __syncthreads();
    for (long long i = threadIdx.x; i < n; i += blockDim.x) p[i] = v;
}
"""


def spin_fill(t: Any, value: int, stream: Any, seconds: float = 0.2) -> None:
    """Queue on ``stream``: wait ``seconds`` on the GPU, then fill ``t``'s bytes with ``value``."""
    import cupy as cp

    kernel = cp.RawKernel(_SPIN, "spin_fill")
    rate = 2e9  # SM cycles per second, about; a slower clock only spins longer
    b = as_bytes(t)
    with stream:
        kernel((1,), (256,), (b, np.int64(b.size), np.uint8(value), np.int64(seconds * rate)))


@pytest.mark.parametrize("how", ["after_stream", "after_event", "engine_default_stream", "torch_event"])
@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_gpu_store_waits_for_the_engine_writes_without_blocking(how: str) -> None:
    import cupy as cp

    from kvbm.bench.gpu_copy import host_pool

    tensors = gpu_tensors("cupy", "kv_first")
    kv = device_kv(tensors, "kv_first")
    with host_pool(HOST_BLOCKS, kv.layout.slice_bytes) as pool:
        with make_engine(kv, pool, 0, AUTO) as eng:
            eng.store([4], [9])  # compile and load the kernel first: submission must not include it
            pool.fill(0)
            side = cp.cuda.Stream(non_blocking=True)
            cp.cuda.runtime.deviceSynchronize()
            if how == "after_stream":
                spin_fill(tensors[0], 0x5A, side)
                t0 = time.perf_counter()
                pending = eng.store_async([4], [9], after_stream=side)
            elif how == "after_event":
                spin_fill(tensors[0], 0x5A, side)
                ev = cp.cuda.Event(disable_timing=True)
                ev.record(side)
                t0 = time.perf_counter()
                pending = eng.store_async([4], [9], after_event=ev)
            elif how == "engine_default_stream":  # the engine writes on the legacy default stream
                spin_fill(tensors[0], 0x5A, cp.cuda.Stream.null)
                t0 = time.perf_counter()
                pending = eng.store_async([4], [9])
            else:
                torch = _torch_cuda()
                ts = torch.cuda.Stream()
                spin_fill(tensors[0], 0x5A, cp.cuda.ExternalStream(ts.cuda_stream))
                tev = torch.cuda.Event()
                tev.record(ts)
                t0 = time.perf_counter()
                pending = eng.store_async([4], [9], after_event=tev)
            submitted = time.perf_counter() - t0
            assert not pending.done(), "the store finished before the engine's write it must wait for"
            assert submitted < 0.1, f"submitting took {submitted:.3f} s: it blocked on the engine's stream"
            pending.wait()
            assert pending.done()
            region = kv.layout.region_bytes
            assert (pool[9, :region] == 0x5A).all(), "the store read layer 0 before the engine wrote it"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_gpu_load_orders_a_consumer_stream_with_wait_on() -> None:
    import cupy as cp

    from kvbm.bench.gpu_copy import host_pool

    tensors = gpu_tensors("cupy", "block_first")
    kv = device_kv(tensors, "block_first")
    with host_pool(HOST_BLOCKS, kv.layout.slice_bytes) as pool:
        with make_engine(kv, pool, 0, AUTO) as eng:
            pool[:] = np.arange(pool.size, dtype=np.uint64).astype(np.uint8).reshape(pool.shape)
            cp.cuda.runtime.deviceSynchronize()  # the random fill must not land after the load
            pending = eng.load_async([5, 6], [0, 1])
            consumer = cp.cuda.Stream(non_blocking=True)
            pending.wait_on(consumer)
            with consumer:
                got = [as_bytes(t)[:2].copy() for t in tensors]  # queued behind the load
            consumer.synchronize()
            want = pool[5:7].reshape(2, LAYERS, 2, -1)
            for layer, g in enumerate(got):
                assert np.array_equal(cp.asnumpy(g).reshape(2, 2, -1), want[:, layer])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_gpu_odd_sizes_fall_back_to_dma_and_bad_batches_are_refused() -> None:
    from kvbm.bench.gpu_copy import host_pool

    tensors = gpu_tensors("cupy", "mla", tokens=3, dim=5)  # 30-byte regions: no 16-byte words
    kv = device_kv(tensors, "mla")
    with host_pool(HOST_BLOCKS, 4096) as pool:
        with pytest.raises(ValueError, match="'kernel' is unavailable"):
            CudaCopyEngine(kv, pool, 0, strategy=KERNEL)
        with CudaCopyEngine(kv, pool, 0) as eng:
            assert eng.available()[KERNEL]
            pool.fill(0xAB)
            ref_pool = pool.copy()
            eng.store(STORE_BLOCKS, SLOTS)
            _arrays, ref = reference_kv(tensors, "mla")
            NumpyCopyEngine(ref, host_slice_view(ref_pool, 0, ref.layout)).store(STORE_BLOCKS, SLOTS)
            assert np.array_equal(pool, ref_pool)
            with pytest.raises(IndexError, match="engine block 24"):
                eng.store([24], [0])
            with pytest.raises(IndexError, match="host slot -1"):
                eng.load([-1], [0])
            with pytest.raises(ValueError, match="same destination twice"):
                eng.store([1, 2], [3, 3])
            with pytest.raises(ValueError, match="2 engine blocks but 1"):
                eng.store([1, 2], [3])
        with pytest.raises(RuntimeError, match="closed"):
            eng.store([1], [1])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_gpu_describe_is_zero_copy_and_refuses_strided_tensors() -> None:
    import cupy as cp

    a = cp.zeros((2, 8, 16, 2, 64), cp.float16)
    d = describe(a)
    assert (d.ptr, d.nbytes, d.shape, d.dtype, d.device) == (a.data.ptr, a.nbytes, a.shape, "float16", 0)
    with pytest.raises(LayoutError, match="not contiguous"):
        describe(a[:, ::2])
    torch = _torch_cuda()
    t = torch.zeros((2, 8, 16, 2, 64), dtype=torch.bfloat16, device="cuda")
    d = describe(t)
    assert (d.ptr, d.dtype, d.device) == (t.data_ptr(), "bfloat16", 0)
    with pytest.raises(LayoutError, match="not contiguous"):
        describe(t.transpose(0, 1))
