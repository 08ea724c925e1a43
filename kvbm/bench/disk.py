"""G2<->G3 throughput through DiskStore vs raw O_DIRECT pwrite/pread of the same sizes.

A batch of blocks goes from an anonymous page-aligned mapping (the host pool stand-in) to a
DiskStore (max_concurrent=4) and back, checksums included. The limit is the better of raw
O_DIRECT I/O with 1 and with 4 threads, measured in the same run and directory; each figure
is a median over interleaved repetitions. Run: ``python -m kvbm.bench.disk [--quick]``.
"""

from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
import time
from statistics import median

import numpy as np

from kvbm.bench.common import BenchResult
from kvbm.leader.disk import DiskStore, raw_direct_io_throughput

CONCURRENCY = 4
REPS = 5


def _raw_rates(directory: str, block: int, n: int) -> tuple[float, float]:
    """The limit: best of raw O_DIRECT with 1 thread and with CONCURRENCY threads (GB/s)."""
    rates = [raw_direct_io_throughput(directory, block, n, threads=t) for t in (1, CONCURRENCY)]
    return max(w for w, _ in rates), max(r for _, r in rates)


def _store_rates(store: DiskStore, src: memoryview, dst: memoryview) -> tuple[float, float]:
    """Write every block from src, then read+verify every block into dst; GB/s each."""
    block, n = store.block_bytes, store.num_blocks
    t0 = time.perf_counter()
    writes = [f.result() for f in store.write_many([(i, src[i * block:(i + 1) * block]) for i in range(n)])]
    w = n * block / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    futures = [store.read(i, dst[i * block:(i + 1) * block], writes[i].checksum) for i in range(n)]
    reads = [f.result() for f in futures]
    r = n * block / (time.perf_counter() - t0) / 1e9
    failed = [x.error for x in writes if not x.ok] + [x.error for x in reads if not x.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} disk ops failed, first: {failed[0]}")
    return w, r


def run(quick: bool = False) -> list[BenchResult]:
    """Measure write (G2->G3) and read (G3->G2) GB/s and their ratio to raw O_DIRECT.

    The shared virtual disk's speed drifts by several times within seconds, so each
    repetition measures the limit next to the store (alternating which goes first) and the
    figures are medians over repetitions, the ratio being the median of per-repetition ratios.
    """
    block, n = (256 << 10, 32) if quick else (2 << 20, 256)
    total = block * n
    directory = tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir="/tmp")
    src_map, dst_map = mmap.mmap(-1, total), mmap.mmap(-1, total)
    # Distinct random contents, pages faulted in before timing; dst differs from src so the
    # final comparison proves the reads landed.
    rng = np.random.default_rng()
    for m in (src_map, dst_map):
        np.frombuffer(m, dtype=np.uint64)[:] = rng.bit_generator.random_raw(total // 8)
    src, dst = memoryview(src_map), memoryview(dst_map)
    samples: list[tuple[float, float, float, float]] = []  # raw write, raw read, store write, store read
    try:
        with DiskStore(directory, f"bench-{os.getpid()}", n, block, max_concurrent=CONCURRENCY) as store:
            _store_rates(store, src, dst)  # first pass converts the fallocated extents
            for rep in range(REPS):
                if rep % 2:
                    sw, sr = _store_rates(store, src, dst)
                    rw, rr = _raw_rates(directory, block, n)
                else:
                    rw, rr = _raw_rates(directory, block, n)
                    sw, sr = _store_rates(store, src, dst)
                samples.append((rw, rr, sw, sr))
        if dst_map[:] != src_map[:]:
            raise RuntimeError("data read back differs from what was written")
    finally:
        src.release()
        dst.release()
        src_map.close()
        dst_map.close()
        shutil.rmtree(directory, ignore_errors=True)
    size = f"{n} x {block >> 10} KiB"
    goal = ">= 0.8 of raw O_DIRECT"
    raw_w, raw_r, w, r = (median(s[k] for s in samples) for k in range(4))
    return [
        BenchResult(f"G2->G3 write, {size}, {CONCURRENCY} threads", w, "GB/s", raw_w,
                    "GB/s raw O_DIRECT pwrite", median(s[2] / s[0] for s in samples), goal),
        BenchResult(f"G3->G2 read+verify, {size}, {CONCURRENCY} threads", r, "GB/s", raw_r,
                    "GB/s raw O_DIRECT pread", median(s[3] / s[1] for s in samples), goal),
    ]


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv[1:])
    print(f"{'figure':<46} {'value':>11} {'limit':>6} {'ratio':>6}  goal")
    for r in rows:
        print(f"{r.figure:<46} {r.value:>6.2f} {r.unit:<4} {r.limit or 0:>6.2f} {r.ratio or 0:>6.2f}  {r.goal}"
              f" (limit: {r.limit_unit})")
