"""Throughput of KvbmHiCacheStorage's zero-copy calls against a memcpy of the same bytes.

Run in the SGLang venv, from the repo root:
    PYTHONPATH=$PWD .venv-sglang/bin/python tests/sglang/bench_storage.py [LAYOUT]
One rank, 128 pages of 512 KiB (16 layers, 8 heads of 64, bf16, 16 tokens) per call, best of 4;
every loaded byte is checked. The limit is a NumPy memcpy of the same bytes in the same run.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

harness.LAYERS, harness.HEADS, harness.HEAD_DIM = 16, 8, 64
from harness import PAGE, RankSpec, _RankState, page_keys  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo  # noqa: E402

from kvbm.worker.layout import page_aligned_empty  # noqa: E402

PAGES, REPEATS = 128, 4


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    layout = sys.argv[1] if len(sys.argv) > 1 else "page_first"
    run = tempfile.mkdtemp(prefix="kvbm-b-")
    env = {"DYN_KVBM_RUN_DIR": f"{run}/run", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(PAGES * (REPEATS + 1)),
           "DYN_KVBM_LIVENESS_TIMEOUT_SECS": "30"}
    state = _RankState(RankSpec(0, 1, layout=layout, env=env, instance=f"bench-{os.getpid()}"))  # ready when built
    try:
        backend, nbytes = state.backend, PAGES * state.page_bytes
        src, dst = page_aligned_empty((nbytes,), np.uint8), page_aligned_empty((nbytes,), np.uint8)
        src[:] = 1
        dst[:] = 0
        set_s, get_s, copy_s = [], [], []
        for _ in range(REPEATS):
            keys = page_keys([random.randrange(1, 30000) for _ in range(PAGE * PAGES)])
            idx = state.host.alloc(PAGES * PAGE)
            for i, key in enumerate(keys):
                state._fill(int(idx[i * PAGE]), key)
            t = time.perf_counter()
            assert all(backend.batch_set_v1(keys, idx, HiCacheStorageExtraInfo(prefix_keys=[])))
            set_s.append(time.perf_counter() - t)
            state.host.free(idx)
            state.idle()
            idx = state.host.alloc(PAGES * PAGE)
            t = time.perf_counter()
            assert all(backend.batch_get_v1(keys, idx))
            get_s.append(time.perf_counter() - t)
            assert all(state._check(int(idx[i * PAGE]), keys[i]) for i in range(PAGES))
            state.host.free(idx)
            t = time.perf_counter()
            np.copyto(dst, src)
            copy_s.append(time.perf_counter() - t)
        gib = nbytes / 2**30
        s, g, c = min(set_s), min(get_s), min(copy_s)
        print(f"layout {layout}: {PAGES} pages x {state.page_bytes // 1024} KiB = {nbytes / 2**20:.0f} MiB a call, best of {REPEATS}")
        print(f"batch_set_v1 {s * 1e3:.1f} ms ({gib / s:.2f} GiB/s), batch_get_v1 {g * 1e3:.1f} ms ({gib / g:.2f} GiB/s), "
              f"memcpy {c * 1e3:.1f} ms ({gib / c:.2f} GiB/s)")
        print(f"ratio to memcpy: batch_set_v1 {c / s:.2f}, batch_get_v1 {c / g:.2f}")
    finally:
        state.close()
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
