"""G4 object tier benchmark: G2 -> G4 and G4 -> G2 through kvbm's tier vs raw puts/gets, same bytes, same server.

Starts moto's S3 server on 127.0.0.1 (``moto[server]``) unless ``--endpoint`` names one, fills a
shared-memory host pool (G2) with random blocks and moves them with the leader's object tier
(:class:`kvbm.leader.storage.BlockObjectIO`: its put queue and writer threads, checksummed
layout-namespaced objects, checked gets back into pool slots, every byte compared afterwards).
The limit, measured in the same run next to it, is the bare transport moving the same bytes to
the same server with the same number of threads: boto3 ``put_object`` / ``get_object``, or, with
``--transport nixl`` (a NIXL wheel installed), NIXL OBJ transfers, the tier then moving its bytes
through NIXL OBJ too (``DYN_KVBM_OBJECT_TRANSPORT=nixl``).

Run: ``kvbm bench objects`` (a suite of ``kvbm bench``) or ``python -m kvbm.bench.objects``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvbm.bench.common import BenchResult
from kvbm.ipc.shm import HostPool, PoolGeometry
from kvbm.leader.objects import (
    BlockObjects,
    GetStatus,
    NixlObjBackend,
    ObjectBackend,
    ObjectStoreSettings,
    S3Backend,
    SplitBackend,
)
from kvbm.leader.storage import (
    OBJECT_READERS,
    OBJECT_WRITERS,
    BlockObjectIO,
    ObjectReadDone,
    ObjectReady,
    ObjectWriteDone,
)

GOAL = ">= 0.8 of raw"


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _wait_all(io: BlockObjectIO, woken: threading.Semaphore, kind: type, n: int, timeout_s: float) -> list[object]:
    """The ``n`` completions of type ``kind``, waiting on the tier's wake-ups (as the leader's loop
    does, not polling), or TimeoutError."""
    got: list[object] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        if not woken.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{len(got)} of {n} object transfers done after {timeout_s:g} s")
        got += [d for d in io.drain() if isinstance(d, kind)]
    return got


def measure(backend: ObjectBackend, raw: ObjectBackend, blocks: int, block_bytes: int, reps: int = 3,
            timeout_s: float = 600.0) -> dict[str, float]:
    """Median seconds over ``reps`` of the tier's G2 -> G4 puts and G4 -> G2 gets of ``blocks`` pool
    blocks, and of raw puts/gets of the same bytes with as many threads. Raises if a byte came back
    wrong."""
    pool = HostPool.create(f"bench-obj-{os.getpid()}", PoolGeometry(2 * blocks, block_bytes), prefault=True)
    io = None
    try:
        rng = np.random.default_rng()
        src = [pool.block(i) for i in range(blocks)]
        for v in src:
            np.frombuffer(v, np.uint64)[:] = rng.bit_generator.random_raw(block_bytes // 8)
        objs = BlockObjects(backend, layout=int.from_bytes(os.urandom(8), "little"), block_bytes=block_bytes,
                            prefix="bench/")
        woken = threading.Semaphore(0)
        io = BlockObjectIO(objs, pool, woken.release, lambda: None, queue_cap=blocks)
        _wait_all(io, woken, ObjectReady, 1, timeout_s)
        copies = [bytes(v) for v in src]

        def raw_put() -> None:
            with ThreadPoolExecutor(OBJECT_WRITERS) as ex:
                list(ex.map(lambda i: raw.put(f"bench-raw/{i}", [copies[i]]), range(blocks)))

        def raw_get() -> None:
            with ThreadPoolExecutor(OBJECT_READERS) as ex:
                got = list(ex.map(lambda i: raw.get(f"bench-raw/{i}", block_bytes), range(blocks)))
            if any(g != c for g, c in zip(got, copies)):
                raise RuntimeError("a raw object came back different")

        def tier_put() -> None:
            for i in range(blocks):
                if not io.write(i, i + 1):
                    raise RuntimeError("the put queue refused a block")
            done = _wait_all(io, woken, ObjectWriteDone, blocks, timeout_s)
            if not all(isinstance(d, ObjectWriteDone) and d.ok for d in done):
                raise RuntimeError("a put through the tier failed")

        def tier_get() -> None:
            for i in range(blocks):
                io.read(blocks + i, i + 1)
            done = _wait_all(io, woken, ObjectReadDone, blocks, timeout_s)
            if not all(isinstance(d, ObjectReadDone) and d.status is GetStatus.OK for d in done):
                raise RuntimeError("a get through the tier failed")

        def check_tier_get() -> None:  # not timed: the raw side compares while timed, but bytes == bytes is a memcmp
            if any(bytes(pool.block(blocks + i)) != copies[i] for i in range(blocks)):
                raise RuntimeError("a block came back different through the tier")
            for i in range(blocks):
                pool.block(blocks + i)[:8] = b"\0" * 8  # the next repetition must write them again

        raw_put()  # warm: connections, the server's first-object paths
        samples: dict[str, list[float]] = {k: [] for k in ("raw_write", "tier_write", "raw_read", "tier_read")}
        for rep in range(reps):  # alternating which goes first: the server's speed drifts
            for op, pair in (("write", (raw_put, tier_put)), ("read", (raw_get, tier_get))):
                order = list(zip(("raw", "tier"), pair))
                for who, fn in order[::-1] if rep % 2 else order:
                    samples[f"{who}_{op}"].append(_timed(fn))
            check_tier_get()
        return {k: statistics.median(v) for k, v in samples.items()}
    finally:
        if io is not None:
            io.close()
        pool.close()


def run(quick: bool = False, *, endpoint: str | None = None, bucket: str = "kvbm-bench", transport: str = "s3",
        blocks: int | None = None, block_bytes: int | None = None) -> list[BenchResult]:
    """The suite: G2 -> G4 and G4 -> G2 GB/s (GB = 1e9 bytes) and their ratio to the raw transport."""
    n = blocks or (16 if quick else 64)
    size = block_bytes or ((256 << 10) if quick else (2 << 20))
    server = None
    if endpoint is None:
        from kvbm.testing.s3server import S3Server

        server = S3Server(bucket)
        endpoint = server.endpoint
    try:
        settings = ObjectStoreSettings(bucket, endpoint, access_key="test", secret_key="test", timeout_s=60.0)
        # The tier as the leader builds it for DYN_KVBM_OBJECT_TRANSPORT, and the bare transport.
        tier: ObjectBackend = S3Backend(settings)
        raw: ObjectBackend = S3Backend(settings)
        if transport == "nixl":
            tier, raw = SplitBackend(NixlObjBackend(settings), tier), NixlObjBackend(settings)
        r = measure(tier, raw, n, size, reps=1 if quick else 3)
    finally:
        if server is not None:
            server.kill()
    total = n * size
    where = f"{n} x {size >> 10} KiB, {'moto on 127.0.0.1' if server is not None else endpoint}, median of 3"
    where = where if not quick else where.rsplit(",", 1)[0]
    limit = "boto3" if transport == "s3" else "NIXL OBJ"
    out = []
    for op, what in (("write", "G2->G4 put"), ("read", "G4->G2 get")):
        value, lim = total / r[f"tier_{op}"] / 1e9, total / r[f"raw_{op}"] / 1e9
        out.append(BenchResult(f"object tier {what} ({where})", value, "GB/s", lim, f"GB/s raw {limit} {op}",
                               value / lim, GOAL))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.bench.objects", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", help="S3 endpoint URL (default: start moto's server on 127.0.0.1)")
    p.add_argument("--bucket", default="kvbm-bench")
    p.add_argument("--transport", choices=["s3", "nixl"], default="s3",
                   help="the tier's transport (DYN_KVBM_OBJECT_TRANSPORT) and the raw one it is compared with")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block-bytes", type=int, default=2 << 20)
    a = p.parse_args(argv)
    for res in run(endpoint=a.endpoint, bucket=a.bucket, transport=a.transport, blocks=a.blocks,
                   block_bytes=a.block_bytes):
        print(f"{res.figure}: {res.value:.3f} {res.unit}, raw {res.limit:.3f} {res.unit}, ratio {res.ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
