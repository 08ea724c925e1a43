"""Benchmark: sequence-hash throughput next to raw xxh3_64 over the same bytes.

The physical limit is one ``xxh3_64`` call over the whole prompt's u32-LE
bytes. It is measured in the same run, so the ratio shows the cost of the
per-block and chaining overhead, which Dynamo's hash definition requires.

Run: ``python -m kvbm.bench.hashing [--quick]``
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import xxhash

from kvbm.bench.common import BenchResult
from kvbm.hashing import EMPTY_SALT_HASH, SequenceHasher, sequence_hashes

BLOCK_SIZE = 16
VOCAB = 151_936  # Qwen-sized vocabulary; token values only affect the bytes hashed


def _median_s(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in seconds, GC paused (as timeit does)."""
    fn()  # warm up
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


def _prompt(n_tokens: int) -> list[int]:
    tokens: list[int] = np.random.default_rng(n_tokens).integers(0, VOCAB, n_tokens).tolist()
    return tokens


def _raw_s(tokens: list[int], reps: int) -> float:
    """One xxh3_64 call over the prompt's bytes: the physical limit."""
    raw = np.asarray(tokens, dtype="<u4").tobytes()
    return _median_s(lambda: xxhash.xxh3_64_intdigest(raw, EMPTY_SALT_HASH), reps * 10)


def run(quick: bool = False) -> list[BenchResult]:
    """Hashing throughput (128K prompt), latency (32K prompt) and decode-step cost."""
    reps = 5 if quick else 31
    results: list[BenchResult] = []

    big = _prompt(128 * 1024)
    t_big = _median_s(lambda: sequence_hashes(big, BLOCK_SIZE), reps)
    t_big_raw = _raw_s(big, reps)
    value, limit = len(big) / t_big, len(big) / t_big_raw
    results.append(
        BenchResult(
            figure=f"hash 128K-token prompt (block {BLOCK_SIZE}, list input)",
            value=value,
            unit="tokens/s",
            limit=limit,
            limit_unit="tokens/s (raw xxh3_64, one call)",
            ratio=value / limit,
            goal="as close to raw xxh3_64 as per-block hashing allows",
        )
    )

    small = _prompt(32 * 1024)
    t_small_raw = _raw_s(small, reps)
    small_np = np.asarray(small, dtype=np.int64)
    for label, tokens in (("list", small), ("numpy int64", small_np)):
        t = _median_s(partial(sequence_hashes, tokens, BLOCK_SIZE), reps)
        results.append(
            BenchResult(
                figure=f"hash 32K-token prompt (block {BLOCK_SIZE}, {label} input)",
                value=t * 1e3,
                unit="ms",
                limit=t_small_raw * 1e3,
                limit_unit="ms (raw xxh3_64, one call)",
                ratio=t / t_small_raw,
                goal="< 1 ms",
            )
        )

    # Decode: one token per step per request; every BLOCK_SIZE-th step completes a block.
    steps = BLOCK_SIZE * 256
    step_tokens = [[t] for t in small[:steps]]

    def decode() -> None:
        hasher = SequenceHasher(BLOCK_SIZE)
        for tok in step_tokens:
            hasher.extend(tok)

    block_bytes = np.asarray(small[:BLOCK_SIZE], dtype="<u4").tobytes()
    t_step = _median_s(decode, max(3, reps // 3)) / steps
    t_block_raw = _median_s(
        lambda: [xxhash.xxh3_64_intdigest(block_bytes, EMPTY_SALT_HASH) for _ in range(steps)],
        max(3, reps // 3),
    ) / steps
    results.append(
        BenchResult(
            figure="SequenceHasher.extend, 1 token (decode step, amortised)",
            value=t_step * 1e6,
            unit="us",
            limit=t_block_raw * 1e6,
            limit_unit="us (one xxh3_64 call on a 16-token block)",
            ratio=t_step / t_block_raw,
            goal="negligible next to a decode step (~10 ms)",
        )
    )
    return results


def _print_table(results: list[BenchResult]) -> None:
    print(f"{'figure':<62} {'value':>14} {'unit':<9} {'limit':>14}  {'ratio':>9}  goal")
    for r in results:
        limit = f"{r.limit:,.4g}" if r.limit is not None else "-"
        ratio = f"{r.ratio:.4g}" if r.ratio is not None else "-"
        print(f"{r.figure:<62} {r.value:>14,.4g} {r.unit:<9} {limit:>14}  {ratio:>9}  {r.goal}")
        print(f"{'':<62} {'':>14} {'':<9} {r.limit_unit}")


if __name__ == "__main__":
    _print_table(run(quick="--quick" in sys.argv[1:]))
