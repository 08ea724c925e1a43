"""The leader's object I/O (:class:`kvbm.leader.storage.BlockObjectIO`) between a real shared-memory
host pool and a real S3 server (moto's, on 127.0.0.1): typed completions, a bounded put queue, a
start-up check that reports instead of blocking, misses for bad objects, and a shutdown that
drains the queued puts within its bound.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from kvbm.testing.s3server import S3Server  # noqa: E402
from kvbm.config import KvbmConfig  # noqa: E402
from kvbm.ipc.shm import HostPool, PoolGeometry  # noqa: E402
from kvbm.leader.objects import (  # noqa: E402
    BlockObjects,
    GetStatus,
    NixlObjBackend,
    ObjectBackend,
    ObjectStoreSettings,
    S3Backend,
    SplitBackend,
    nixl_installed,
)
from kvbm.leader.storage import (  # noqa: E402
    BlockObjectIO,
    ObjectCompletion,
    ObjectLookupDone,
    ObjectReadDone,
    ObjectReady,
    ObjectWriteDone,
    object_settings,
)

BLOCK = 64 * 1024
S3_BUCKET = "kvbm-io"  # the bucket of s3_module_server
TRANSPORTS = ["s3", pytest.param("nixl", marks=pytest.mark.skipif(not nixl_installed(), reason="no NIXL wheel installed"))]


@pytest.fixture
def pool() -> Iterator[HostPool]:
    p = HostPool.create(f"objio-{os.getpid()}-{time.monotonic_ns()}", PoolGeometry(64, BLOCK), prefault=False)
    yield p
    p.close()


class Tier:
    """A BlockObjectIO and the completions it reported, waited for as the leader's loop does."""

    def __init__(self, srv: S3Server, pool: HostPool, *, bucket: str = S3_BUCKET, secret: str = "test",
                 transport: str = "s3", **kw: object) -> None:
        settings = ObjectStoreSettings(bucket, srv.endpoint, access_key="test", secret_key=secret, timeout_s=2.0)
        s3 = S3Backend(settings)
        # As the leader builds it: NIXL OBJ moves the bytes, boto3 answers lookups and the check.
        backend: ObjectBackend = SplitBackend(NixlObjBackend(settings), s3) if transport == "nixl" else s3
        self.objects = BlockObjects(backend, layout=int.from_bytes(os.urandom(8), "little"), block_bytes=BLOCK)
        self.woken = threading.Semaphore(0)
        self.io = BlockObjectIO(self.objects, pool, self.woken.release, s3.check, **kw)  # type: ignore[arg-type]
        self.done: list[ObjectCompletion] = []

    def wait(self, kind: type, n: int, timeout_s: float = 20.0) -> list[ObjectCompletion]:
        deadline = time.monotonic() + timeout_s
        while sum(isinstance(d, kind) for d in self.done) < n:
            assert self.woken.acquire(timeout=max(0.0, deadline - time.monotonic())), self.done
            self.done += self.io.drain()
        got = [d for d in self.done if isinstance(d, kind)]
        self.done = [d for d in self.done if not isinstance(d, kind)]
        return got


def _fill(pool: HostPool, slot: int, seed: int) -> bytes:
    data = bytes((seed * 7 + i) % 251 for i in range(BLOCK))
    pool.block(slot)[:] = data
    return data


@pytest.mark.slow  # an S3 server process
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_lookup_get_round_trip(s3_module_server: S3Server, pool: HostPool, transport: str) -> None:
    t = Tier(s3_module_server, pool, transport=transport)
    try:
        assert t.wait(ObjectReady, 1) == [ObjectReady(True, "")]
        blocks = {h: _fill(pool, h, h) for h in range(1, 5)}
        for h in blocks:
            assert t.io.write(h, 100 + h)
        assert all(isinstance(d, ObjectWriteDone) and d.ok for d in t.wait(ObjectWriteDone, 4))
        t.io.lookup([101, 999, 103])
        (found,) = t.wait(ObjectLookupDone, 1)
        assert isinstance(found, ObjectLookupDone) and found.found == (True, False, True)
        for h in blocks:
            t.io.read(20 + h, 100 + h)
        reads = t.wait(ObjectReadDone, 4)
        assert all(isinstance(d, ObjectReadDone) and d.status is GetStatus.OK for d in reads)
        for h, data in blocks.items():
            assert bytes(pool.block(20 + h)) == data
        t.io.read(40, 12345)  # never put: a miss, the slot untouched
        pool.block(40)[:4] = b"keep"
        (miss,) = t.wait(ObjectReadDone, 1)
        assert isinstance(miss, ObjectReadDone) and miss.status is GetStatus.MISSING, miss
        assert bytes(pool.block(40)[:4]) == b"keep"
    finally:
        t.io.close()


@pytest.mark.slow  # an S3 server process
def test_full_put_queue_refuses_and_close_drains_the_queued_puts(s3_module_server: S3Server, pool: HostPool) -> None:
    t = Tier(s3_module_server, pool, writers=1, queue_cap=8)
    try:
        t.wait(ObjectReady, 1)
        for s in range(32):
            _fill(pool, s, s)
        accepted = [s for s in range(32) if t.io.write(s, 500 + s)]
        assert 8 <= len(accepted) < 32  # a full queue refuses at once (the core counts the drop)
    finally:
        t.io.close()  # a clean shutdown: the queued puts are finished, within the bound
    check = BlockObjects(S3Backend(ObjectStoreSettings(S3_BUCKET, s3_module_server.endpoint, access_key="test",
                                                       secret_key="test")), t.objects.layout, BLOCK)
    assert all(check.contains([500 + s for s in accepted]))
    check.close()


@pytest.mark.slow  # an S3 server process
@pytest.mark.parametrize("problem", ["missing_bucket", "unreachable"])
def test_unusable_store_is_reported_not_waited_for(s3_module_server: S3Server, pool: HostPool, problem: str) -> None:
    srv = s3_module_server
    if problem == "unreachable":
        srv = S3Server()
        srv.kill()
    t0 = time.monotonic()
    t = Tier(srv, pool, bucket="no-such-bucket" if problem == "missing_bucket" else S3_BUCKET)
    assert time.monotonic() - t0 < 1.0  # the check runs in the background
    try:
        (ready,) = t.wait(ObjectReady, 1)
        assert isinstance(ready, ObjectReady) and not ready.ok and "\n" not in ready.error
        assert ("no such bucket" if problem == "missing_bucket" else "unreachable") in ready.error, ready.error
    finally:
        t.io.close()


def test_settings_keys_fall_back_to_the_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    cfg = KvbmConfig(cpu_cache_num_blocks=8, object_enabled=True, object_bucket="kv-{worker_id}",
                     object_endpoint="http://127.0.0.1:9000")
    s = object_settings(cfg, "Engine1")
    assert (s.bucket, s.endpoint, s.access_key, s.secret_key) == ("kv-engine1", "http://127.0.0.1:9000",
                                                                  "from-env", "env-secret")
    s = object_settings(cfg.replace(object_access_key="AK", object_secret_key="SK"), "e")
    assert (s.access_key, s.secret_key) == ("AK", "SK")
