"""GPU copy benchmark: the CuPy copy engine's strategies vs a plain pinned cudaMemcpy.

For 2 MiB blocks (32 layers x K/V x 16 tokens x 8 heads x 128 dim, fp16) and 256 KiB blocks
(the same with one KV head: TP 8 of the same model), vLLM's ``kv_first`` per-layer layout,
batches of 64 blocks, it times ``store`` (G1 -> G2) and ``load`` (G2 -> G1) for every copy
strategy, with engine blocks and host slots scattered (the usual case after some churn) and
as one run of consecutive blocks, from submission to completion (Python included). The
limit is one ``cudaMemcpyAsync`` of the same bytes between a device buffer and the same
pinned host pool, each direction, timed the same way in the same run.

``python -m kvbm.bench.gpu_copy [--quick] [--json FILE]`` prints the table last;
``--dry-run`` checks the plumbing without a GPU (shapes, copy plans, what ``auto`` picks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from kvbm.bench.common import BenchResult
from kvbm.worker.cuda_copy import (
    AUTO,
    BATCH,
    KERNEL,
    KERNEL_CHUNK_BYTES,
    MEMCPY2D,
    CudaCopyEngine,
    EngineKVDevice,
    HostSlice,
    TensorDesc,
    auto_strategy,
    cuda_available,
    dma_copies,
    split_segments,
)
from kvbm.worker.copy import Direction, block_runs

BATCH_BLOCKS = 64
D2H, H2D = Direction.STORE.label, Direction.LOAD.label  # keys of the limits (and of the JSON)


@dataclass(frozen=True)
class BlockConfig:
    """One benchmarked block size: vLLM kv_first tensors ``[2, blocks, 16, heads, 128]`` fp16."""

    label: str
    layers: int
    heads: int
    goal: float  # ratio to the pinned memcpy limit
    tokens: int = 16
    head_dim: int = 128

    @property
    def region_bytes(self) -> int:
        return self.tokens * self.heads * self.head_dim * 2

    @property
    def block_bytes(self) -> int:
        return self.layers * 2 * self.region_bytes

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (2, num_blocks, self.tokens, self.heads, self.head_dim)


CONFIGS = (BlockConfig("2 MiB", 32, 8, 0.9), BlockConfig("256 KiB", 32, 1, 0.7))
PATTERNS = ("scattered", "runs")


def batch_pairs(pattern: str, engine_blocks: int, host_blocks: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """64 (engine block, host slot) pairs: random and unordered, or one run of consecutive blocks."""
    if pattern == "runs":
        return list(range(3, 3 + BATCH_BLOCKS)), list(range(1, 1 + BATCH_BLOCKS))
    rng = np.random.default_rng(seed)
    eb = rng.choice(engine_blocks, BATCH_BLOCKS, replace=False).tolist()
    sl = rng.choice(host_blocks, BATCH_BLOCKS, replace=False).tolist()
    return eb, sl


@contextlib.contextmanager
def host_pool(num_blocks: int, block_bytes: int) -> Iterator[np.ndarray]:
    """A ``[num_blocks, block_bytes]`` host pool: a real kvbm shared-memory segment when /dev/shm
    has room (what ranks pin in production), else an anonymous mapping of the same shape."""
    from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError

    try:
        pool = HostPool.create(f"gpucheck-{os.getpid()}-{uuid.uuid4().hex[:6]}", PoolGeometry(num_blocks, block_bytes))
    except (ShmError, OSError):
        mm = mmap.mmap(-1, num_blocks * block_bytes)
        arr = np.frombuffer(mm, np.uint8).reshape(num_blocks, block_bytes)
        arr.fill(0)  # fault the pages in before they are pinned
        try:
            yield arr
        finally:
            del arr
            with contextlib.suppress(BufferError):
                mm.close()
        return
    try:
        yield pool.array
    finally:
        pool.close()


def _fake_plan(cfg: BlockConfig, pattern: str) -> dict[str, Any]:
    """What each strategy issues for one batch, from the copy plans alone (no GPU)."""
    nb, hb = 4 * BATCH_BLOCKS, 2 * BATCH_BLOCKS
    shape = cfg.shape(nb)
    nbytes = 2 * nb * cfg.region_bytes
    descs = [TensorDesc(0x10_0000_0000 + i * (nbytes + 4096), nbytes, shape, "float16", 0) for i in range(cfg.layers)]
    kv = EngineKVDevice.from_layer_descs(descs, nb)
    assert kv.layout.slice_bytes == cfg.block_bytes, (kv.layout, cfg)
    host = HostSlice(0x7F00_0000_0000, hb, cfg.block_bytes, 0)
    eb, sl = batch_pairs(pattern, nb, hb)
    runs = block_runs(eb, sl)
    segs = kv.segments()
    copies = dma_copies(segs, host, runs, Direction.STORE)
    total = BATCH_BLOCKS * cfg.block_bytes
    assert sum(c[4] * c[5] for c in copies) == total
    return {"block": cfg.label, "pattern": pattern, "runs": len(runs), "memcpy2d_calls": len(copies),
            "bytes_per_memcpy2d": total // len(copies), "batch_entries": len(segs) * BATCH_BLOCKS,
            "kernel_work_items": len(split_segments(segs, KERNEL_CHUNK_BYTES)) * BATCH_BLOCKS,
            "auto": auto_strategy(total, len(copies), row_bytes=min(seg.width for seg in segs))}


def dry_run() -> list[dict[str, Any]]:
    """Check the benchmark's plumbing without a GPU: shapes, plans and auto's choices."""
    return [_fake_plan(cfg, p) for cfg in CONFIGS for p in PATTERNS]


# -- the GPU run ------------------------------------------------------------------------------
def _time(fn: Callable[[], None], reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (which returns once its copies completed)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _expected_slots(cp: Any, tensors: list[Any], eb: list[int]) -> Any:
    """``[batch, layers, 2, region]`` bytes the host slots must hold after storing ``eb`` (gathered on the GPU)."""
    idx = cp.asarray(eb)
    per_layer = [t.view(cp.uint8).reshape(2, t.shape[1], -1)[:, idx] for t in tensors]  # [2, batch, region]
    return cp.stack(per_layer).transpose(2, 0, 1, 3)


def _bench_config(cp: Any, cfg: BlockConfig, strategies: list[str],
                  reps: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rt = cp.cuda.runtime
    nb, hb = 4 * BATCH_BLOCKS, 2 * BATCH_BLOCKS
    total = BATCH_BLOCKS * cfg.block_bytes
    rows: list[dict[str, Any]] = []
    tensors = [cp.random.randint(0, 1 << 16, cfg.shape(nb), dtype=cp.uint16).view(cp.float16)
               for _ in range(cfg.layers)]
    kv = EngineKVDevice.from_layers(tensors, num_blocks=nb)
    with host_pool(hb, cfg.block_bytes) as pool:
        engines = {}
        try:
            for s in strategies:
                try:
                    engines[s] = CudaCopyEngine(kv, pool, 0, strategy=s)
                except ValueError as e:
                    rows.append({"block": cfg.label, "strategy": s, "error": str(e)})
            if not engines:
                raise RuntimeError("no copy strategy could run")
            # The limit: one plain cudaMemcpyAsync of the same bytes, same pinned pool, each way.
            scratch = cp.empty(total, cp.uint8)
            stream = cp.cuda.Stream(non_blocking=True)
            host0 = int(pool.ctypes.data)

            def memcpy(kind: int, dst: int, src: int) -> Callable[[], None]:
                def go() -> None:
                    rt.memcpyAsync(dst, src, total, kind, stream.ptr)
                    stream.synchronize()
                return go

            d2h = total / _time(memcpy(rt.memcpyDeviceToHost, host0, scratch.data.ptr), reps) / 1e9
            h2d = total / _time(memcpy(rt.memcpyHostToDevice, scratch.data.ptr, host0), reps) / 1e9
            limits = {D2H: d2h, H2D: h2d}
            for pattern in PATTERNS:
                eb, sl = batch_pairs(pattern, nb, hb)
                expected = _expected_slots(cp, tensors, eb)
                for s, eng in engines.items():
                    try:
                        rows.append(_bench_strategy(cp, cfg, pattern, s, eng, pool, eb, sl, expected, limits, reps))
                    except Exception as e:  # one failing strategy must not hide the others' figures
                        rows.append({"block": cfg.label, "pattern": pattern, "strategy": s,
                                     "error": f"{type(e).__name__}: {e}"})
        finally:
            for eng in engines.values():
                eng.close()
    return rows, limits


def _bench_strategy(cp: Any, cfg: BlockConfig, pattern: str, s: str, eng: CudaCopyEngine, pool: np.ndarray,
                    eb: list[int], sl: list[int], expected: Any, limits: dict[str, float], reps: int) -> dict[str, Any]:
    total = BATCH_BLOCKS * cfg.block_bytes
    pool[sl] = 0
    eng.store(eb, sl)  # correctness of what is timed: the slots hold the blocks
    got = cp.asarray(pool[sl].reshape(BATCH_BLOCKS, cfg.layers, 2, -1))
    if not bool(cp.array_equal(got, expected)):
        raise AssertionError(f"stored bytes differ from the engine's blocks ({cfg.label}, {pattern})")
    # Loads write back into the blocks the slots came from: the same bytes, the check stays valid.
    store = total / _time(lambda: eng.store(eb, sl), reps) / 1e9
    load = total / _time(lambda: eng.load(sl, eb), reps) / 1e9
    return {"block": cfg.label, "pattern": pattern, "strategy": s, "chosen": eng.choose(block_runs(eb, sl)),
            "store": store, "load": load, "store_ratio": store / limits[D2H], "load_ratio": load / limits[H2D],
            "goal": cfg.goal}


def measure(quick: bool = False) -> tuple[str, list[dict[str, Any]], dict[str, dict[str, float]]]:
    """(device name, one row per block size x pattern x strategy, pinned memcpy limits per block size)."""
    if not cuda_available():
        raise RuntimeError("no CUDA GPU: CuPy is missing or sees no device (cupy.cuda.is_available() is False)")
    import cupy as cp

    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    # DMA strategies first: a faulting kernel would poison the CUDA context for what follows.
    strategies = [MEMCPY2D, BATCH, KERNEL, AUTO]
    rows: list[dict[str, Any]] = []
    limits: dict[str, dict[str, float]] = {}
    for cfg in CONFIGS:
        got, lim = _bench_config(cp, cfg, strategies, 5 if quick else 20)
        rows += got
        limits[cfg.label] = lim
    return name, rows, limits


def to_results(rows: list[dict[str, Any]], limits: dict[str, dict[str, float]]) -> list[BenchResult]:
    out = []
    for r in rows:
        if "error" in r:
            continue
        tag = f"{r['block']} blocks x{BATCH_BLOCKS}, {r['pattern']}, {r['strategy']}"
        lim = limits[r["block"]]
        goal = f">= {r['goal']}"
        out.append(BenchResult(f"GPU store G1->G2 ({tag})", r["store"], "GB/s", lim[D2H],
                               "GB/s pinned cudaMemcpy D2H", r["store_ratio"], goal))
        out.append(BenchResult(f"GPU load G2->G1 ({tag})", r["load"], "GB/s", lim[H2D], "GB/s pinned cudaMemcpy H2D",
                               r["load_ratio"], goal))
    return out


def run(quick: bool = False) -> list[BenchResult]:
    """Benchmark entry point for ``kvbm bench``; raises RuntimeError without a GPU."""
    _name, rows, limits = measure(quick)
    return to_results(rows, limits)


def print_table(name: str, rows: list[dict[str, Any]], limits: dict[str, dict[str, float]],
                file: Any = sys.stdout) -> None:
    print(f"\nGPU copy engine on {name}: batches of {BATCH_BLOCKS} blocks, vLLM kv_first layout, "
          "ratio = GB/s / pinned cudaMemcpy of the same bytes in this run", file=file)
    for label, lim in limits.items():
        print(f"  limit {label}: D2H {lim[D2H]:.1f} GB/s, H2D {lim[H2D]:.1f} GB/s", file=file)
    head = ("block", "pattern", "strategy", "store GB/s", "ratio", "load GB/s", "ratio", "goal")
    table = [head]
    for r in rows:
        if "error" in r:
            table.append((r["block"], "-", r["strategy"], "unavailable", "", "", "", r["error"][:60]))
            continue
        strat = r["strategy"] if r["strategy"] != AUTO else f"auto->{r['chosen']}"
        table.append((r["block"], r["pattern"], strat, f"{r['store']:.1f}", f"{r['store_ratio']:.2f}",
                      f"{r['load']:.1f}", f"{r['load_ratio']:.2f}", f">= {r['goal']}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.bench.gpu_copy", description="GPU copy benchmark")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--dry-run", action="store_true", help="check the plumbing without a GPU")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.dry_run:
        for plan in dry_run():
            print("  ".join(f"{k}={v}" for k, v in plan.items()))
        print("dry run: plans are consistent (no GPU used)")
        return 0
    try:
        name, rows, limits = measure(args.quick)
    except RuntimeError as e:
        print(f"gpu_copy: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "limits": limits, "rows": rows,
                       "results": [asdict(r) for r in to_results(rows, limits)]}, f, indent=1)
    print_table(name, rows, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
