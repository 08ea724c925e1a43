"""G4 object store benchmark: kvbm's block objects vs raw puts/gets of the same bytes, same server.

Starts moto's S3 server on 127.0.0.1 (``moto[server]``) unless ``--endpoint`` names one, writes
``--blocks`` host-sized blocks through :class:`kvbm.leader.objects.BlockObjects` (header, checksum,
layout-namespaced key) and reads them back checked, then moves the same bytes with the bare
transport (boto3 ``put_object``/``get_object``, or one NIXL OBJ transfer per object), and prints
both rates and their ratio (the bare transport is the limit here: same bytes, same server, same run).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from kvbm.leader.objects import BlockObjects, GetStatus, NixlObjBackend, ObjectBackend, ObjectStoreSettings, S3Backend


def _rate(nbytes: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e9


def run(settings: ObjectStoreSettings, backend: ObjectBackend, blocks: int, block_bytes: int) -> dict[str, float]:
    """GB/s of kvbm writes/reads and of raw writes/reads of the same bytes (GB = 1e9 bytes)."""
    pool = np.random.default_rng(0).integers(0, 255, blocks * block_bytes, dtype=np.uint8)
    views = [memoryview(pool[i * block_bytes:(i + 1) * block_bytes].data) for i in range(blocks)]
    out = memoryview(bytearray(block_bytes))
    objs = BlockObjects(backend, layout=int.from_bytes(os.urandom(8), "little"), block_bytes=block_bytes,
                        prefix="bench/")
    total = blocks * block_bytes

    def kvbm_write() -> None:
        for i, v in enumerate(views):
            objs.put(i, v)

    def kvbm_read() -> None:
        for i in range(blocks):
            if objs.get(i, out).status is not GetStatus.OK:
                raise RuntimeError(f"block {i} did not read back")

    def raw_write() -> None:
        for i, v in enumerate(views):
            backend.put(f"bench-raw/{i}", [v])

    def raw_read() -> None:
        for i in range(blocks):
            if backend.get(f"bench-raw/{i}", block_bytes) is None:
                raise RuntimeError(f"raw object {i} missing")

    raw_write()  # warm: connections and the server's first-object paths
    res = {"raw_write": _rate(total, raw_write), "kvbm_write": _rate(total, kvbm_write),
           "raw_read": _rate(total, raw_read), "kvbm_read": _rate(total, kvbm_read)}
    objs.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.bench.objects", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", help="S3 endpoint URL (default: start moto's server on 127.0.0.1)")
    p.add_argument("--bucket", default="kvbm-bench")
    p.add_argument("--transport", choices=["s3", "nixl"], default="s3")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block-bytes", type=int, default=2 << 20)
    a = p.parse_args(argv)
    server = None
    endpoint = a.endpoint
    if endpoint is None:
        from kvbm.bench.s3server import S3Server

        server = S3Server()
        server.create_bucket(a.bucket)
        endpoint = server.endpoint
    try:
        settings = ObjectStoreSettings(a.bucket, endpoint, access_key="test", secret_key="test", timeout_s=60.0)
        backend: ObjectBackend = S3Backend(settings) if a.transport == "s3" else NixlObjBackend(settings)
        r = run(settings, backend, a.blocks, a.block_bytes)
    finally:
        if server is not None:
            server.kill()
    print(f"G4 object store, {a.transport}, {a.blocks} blocks of {a.block_bytes} B, server {endpoint}")
    for op in ("write", "read"):
        print(f"  {op:5s}  kvbm {r['kvbm_' + op]:.3f} GB/s  raw {r['raw_' + op]:.3f} GB/s  "
              f"ratio {r['kvbm_' + op] / r['raw_' + op]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
