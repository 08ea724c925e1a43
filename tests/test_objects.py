"""The G4 object store layer against a real S3-compatible server (moto's, in its own process).

Every transport (boto3; NIXL's OBJ plugin where a NIXL wheel is installed) moves blocks byte-exact;
a corrupt, foreign or missing object is a miss; a missing bucket and refused credentials are one
clear error line; a server killed mid-run turns gets into failures, never hangs.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from kvbm.leader.objects import (  # noqa: E402
    OBJECT_HEADER_BYTES,
    BlockObjects,
    GetStatus,
    NixlObjBackend,
    ObjectBackend,
    ObjectError,
    ObjectStoreSettings,
    S3Backend,
)
from kvbm.testing.s3server import S3Server  # noqa: E402
from kvbm.config import KvbmConfig, load_config  # noqa: E402
from kvbm.hashing import EMPTY_SALT_HASH  # noqa: E402
from kvbm.ipc.stats import LeaderStats  # noqa: E402
from kvbm.testing.sim.engine import SimEngine  # noqa: E402
from kvbm.testing.sim.rank import SimModel  # noqa: E402

pytestmark = pytest.mark.slow  # an S3 server process for the module; leader and rank processes

BLOCK = 64 * 1024
S3_BUCKET = "kvbm"  # the bucket of s3_module_server
HAVE_NIXL = any(importlib.util.find_spec(n) is not None for n in ("nixl", "nixl_cu12", "nixl_cu13"))
BACKENDS = ["s3", pytest.param("nixl", marks=pytest.mark.skipif(not HAVE_NIXL, reason="no NIXL wheel installed"))]


def _settings(srv: S3Server, **kw: object) -> ObjectStoreSettings:
    base: dict[str, object] = {"bucket": S3_BUCKET, "endpoint": srv.endpoint, "access_key": "test",
                               "secret_key": "test", "timeout_s": 2.0}
    base.update(kw)
    return ObjectStoreSettings(**base)  # type: ignore[arg-type]


def _backend(kind: str, settings: ObjectStoreSettings) -> ObjectBackend:
    return S3Backend(settings) if kind == "s3" else NixlObjBackend(settings)


def _block(seed: int) -> memoryview:
    return memoryview(bytearray(os.urandom(BLOCK) if seed < 0 else bytes((seed + i) % 251 for i in range(BLOCK))))


@pytest.mark.parametrize("kind", BACKENDS)
def test_blocks_round_trip_byte_exact_and_lookups_batch(s3_module_server: S3Server, kind: str) -> None:
    objs = BlockObjects(_backend(kind, _settings(s3_module_server)), layout=0x1234, block_bytes=BLOCK, prefix=f"{kind}/")
    try:
        blocks = {h: _block(-1) for h in (11, 12, 13)}
        for h, b in blocks.items():
            objs.put(h, b)
        assert objs.contains([11, 99, 12, 13]) == [True, False, True, True]
        for h, b in blocks.items():
            out = memoryview(bytearray(BLOCK))
            assert objs.get(h, out).status is GetStatus.OK
            assert out == b
        assert objs.get(99, memoryview(bytearray(BLOCK))).status is GetStatus.MISSING
    finally:
        objs.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_another_layout_never_sees_a_block(s3_module_server: S3Server, kind: str) -> None:
    a = BlockObjects(_backend(kind, _settings(s3_module_server)), layout=1, block_bytes=BLOCK, prefix=f"{kind}-l/")
    b = BlockObjects(_backend(kind, _settings(s3_module_server)), layout=2, block_bytes=BLOCK, prefix=f"{kind}-l/")
    try:
        a.put(5, _block(1))
        assert a.key(5) != b.key(5)
        assert b.contains([5]) == [False]
        assert b.get(5, memoryview(bytearray(BLOCK))).status is GetStatus.MISSING
    finally:
        a.close()
        b.close()


def test_corrupt_short_and_foreign_objects_are_misses(s3_module_server: S3Server) -> None:
    import boto3

    raw = boto3.client("s3", endpoint_url=s3_module_server.endpoint, region_name="us-east-1", aws_access_key_id="test",
                       aws_secret_access_key="test")
    objs = BlockObjects(S3Backend(_settings(s3_module_server)), layout=7, block_bytes=BLOCK, prefix="bad/")
    try:
        good = _block(3)
        objs.put(1, good)
        data = bytearray(raw.get_object(Bucket=S3_BUCKET, Key=objs.key(1))["Body"].read())
        flipped = bytearray(data)
        flipped[OBJECT_HEADER_BYTES + 100] ^= 0xFF
        raw.put_object(Bucket=S3_BUCKET, Key=objs.key(2), Body=bytes(data))  # block 1's object under 2's key
        raw.put_object(Bucket=S3_BUCKET, Key=objs.key(4), Body=bytes(data[:-1]))
        raw.put_object(Bucket=S3_BUCKET, Key=objs.key(5), Body=b"not a kvbm object" * 4000)
        for h in (2, 4, 5):
            out = memoryview(bytearray(BLOCK))
            res = objs.get(h, out)
            assert res.status is GetStatus.CORRUPT, (h, res)
            assert not any(out)  # never copied
        # Block 3: a valid header for hash 1 fails as "another block"; rewrite it for hash 3 first.
        hdr = objs.header(3, memoryview(good))
        raw.put_object(Bucket=S3_BUCKET, Key=objs.key(3), Body=hdr + bytes(flipped[OBJECT_HEADER_BYTES:]))
        res = objs.get(3, memoryview(bytearray(BLOCK)))
        assert res.status is GetStatus.CORRUPT and "checksum" in res.error
        out = memoryview(bytearray(BLOCK))
        assert objs.get(1, out).status is GetStatus.OK and out == good
    finally:
        objs.close()


def test_missing_bucket_is_one_clear_line(s3_module_server: S3Server) -> None:
    backend = S3Backend(_settings(s3_module_server, bucket="nope"))
    with pytest.raises(ObjectError, match=r"DYN_KVBM_OBJECT_BUCKET='nope' .*no such bucket") as e:
        backend.check()
    assert "\n" not in str(e.value)
    S3Backend(_settings(s3_module_server)).check()  # the existing bucket passes


def test_refused_credentials_are_one_clear_line() -> None:
    with S3Server(check_credentials=True) as srv:
        backend = S3Backend(ObjectStoreSettings(S3_BUCKET, srv.endpoint, access_key="wrong", secret_key="wrong"))
        with pytest.raises(ObjectError, match="credentials refused") as e:
            backend.check()
        assert "\n" not in str(e.value)


def test_unreachable_endpoint_fails_fast() -> None:
    srv = S3Server(S3_BUCKET)
    objs = BlockObjects(S3Backend(_settings(srv, timeout_s=1.0)), layout=9, block_bytes=BLOCK)
    try:
        objs.put(1, _block(4))
        srv.kill()  # the server dies mid-run
        t0 = time.monotonic()
        res = objs.get(1, memoryview(bytearray(BLOCK)))
        assert res.status is GetStatus.FAILED and res.error
        assert objs.contains([1, 2]) == [False, False]
        with pytest.raises(ObjectError):
            objs.put(2, _block(5))
        with pytest.raises(ObjectError, match="unreachable"):
            S3Backend(_settings(srv, timeout_s=1.0)).check()
        assert time.monotonic() - t0 < 30
    finally:
        objs.close()


# ------------------------------------------------------------------------------------------
# Across engine processes, with Dynamo's variables only: what one engine computed once, a new
# engine (new leader, new rank processes, empty host pool) finds in the store and loads.

PROMPT = [(7 * i) % 50_000 + 1 for i in range(6 * 16 + 5)]  # 6 full blocks of the sim's 16 tokens


def _sim_config(srv: S3Server, bucket: str, **extra: str) -> KvbmConfig:
    """Only the variables a user following Dynamo's G4 docs sets (write-through left to the default)."""
    run_dir = tempfile.mkdtemp(prefix="kvbm-g4-")  # short: it holds the ipc sockets
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64", "DYN_KVBM_OBJECT_ENABLED": "1",
           "DYN_KVBM_OBJECT_BUCKET": bucket, "DYN_KVBM_OBJECT_ENDPOINT": srv.endpoint,
           "DYN_KVBM_OBJECT_ACCESS_KEY": "test", "DYN_KVBM_OBJECT_SECRET_KEY": "test",
           "DYN_KVBM_RUN_DIR": run_dir, **extra}
    return load_config(env)


def _tier_on(sim: SimEngine) -> None:
    assert sim.client is not None
    sim.client.wait_stats(lambda st: st.object_tier is not None and bool(st.object_tier.enabled), "object tier on", 30)


def _compute_once(cfg: KvbmConfig) -> LeaderStats:
    """One engine serves PROMPT once (nothing to hit: it computes every block), then exits."""
    with SimEngine(cfg) as sim:
        _tier_on(sim)
        sim.run([PROMPT])
        assert sim.stats.tokens_computed == len(PROMPT)
        return sim.quiesce(30)  # every put done


def _hit_tokens_after_store_answered(sim: SimEngine) -> int:
    """Look PROMPT up as vLLM's connector does: while the leader is asking the store ("not yet"),
    ask again; the answer is what the leader found, in tokens."""
    planner = sim.planner
    planner.add("probe", PROMPT, EMPTY_SALT_HASH)
    deadline = time.monotonic() + 10
    hit = planner.lookup("probe", 0)
    while planner.not_yet("probe") and time.monotonic() < deadline:
        time.sleep(0.05)
        hit = planner.lookup("probe", 0)
    planner.finished("probe")
    return hit


def test_a_new_engine_process_loads_what_another_computed_once_with_dynamo_defaults(s3_module_server: S3Server) -> None:
    s3_module_server.create_bucket("kvbm-defaults")
    cfg = _sim_config(s3_module_server, "kvbm-defaults")
    assert cfg.sources.get("object_write_through") is None  # the default, as in Dynamo: on
    first = _compute_once(cfg)
    assert first.object_tier is not None and first.object_tier.counters.offloaded_blocks == 6, first
    with SimEngine(cfg) as second:  # new leader and rank processes: G2 empty, G4 index empty
        _tier_on(second)
        assert _hit_tokens_after_store_answered(second) == 6 * 16
        second.run([PROMPT])
        leader = second.quiesce(30)
        st = second.stats
    assert st.tokens_computed == len(PROMPT) - 6 * 16 and st.tokens_from_object == 6 * 16  # staged from G4
    assert st.mismatches == 0 and st.blocks_loaded == 6  # each rank checked every byte against the oracle
    assert leader.object_tier is not None, leader
    objects = leader.object_tier.counters
    assert leader.counters.blocks_loaded_from_object == 6 and objects.onboarded_blocks == 6, leader
    assert objects.read_failures == 0 and objects.checksum_failures == 0, leader


def test_without_write_through_a_prefix_computed_once_is_not_shared(s3_module_server: S3Server) -> None:
    """DYN_KVBM_OBJECT_WRITE_THROUGH=false (kvbm's old default): only blocks seen twice are put."""
    s3_module_server.create_bucket("kvbm-no-write-through")
    cfg = _sim_config(s3_module_server, "kvbm-no-write-through", DYN_KVBM_OBJECT_WRITE_THROUGH="false")
    first = _compute_once(cfg)
    assert first.object_tier is not None and first.object_tier.counters.offloaded_blocks == 0, first
    with SimEngine(cfg) as second:
        _tier_on(second)
        assert _hit_tokens_after_store_answered(second) == 0
        second.run([PROMPT])  # the first sight for this leader too: still not put
        leader = second.quiesce(30)
    assert leader.object_tier is not None, leader
    assert leader.object_tier.counters.offloaded_blocks == 0 and leader.counters.blocks_loaded_from_object == 0, leader


def test_an_object_cache_written_at_tp2_serves_tp1_and_tp4_in_the_heads_format(s3_module_server: S3Server) -> None:
    """DYN_KVBM_BLOCK_FORMAT=heads: an engine at TP=2 (2 of the model's 4 KV heads per rank) puts
    its blocks; engines at TP=1 and TP=4 of the same model find them under the same keys (the
    layout fingerprint names no TP size) and load them, every byte checked on every rank."""
    s3_module_server.create_bucket("kvbm-heads")
    cfg = _sim_config(s3_module_server, "kvbm-heads", DYN_KVBM_BLOCK_FORMAT="heads")
    model = SimModel(num_layers=2, head_dim=32, model_kv_heads=4)
    with SimEngine(cfg, world_size=2, model=model) as first:
        _tier_on(first)
        first.run([PROMPT])
        put = first.quiesce(30).object_tier
        assert put is not None and put.counters.offloaded_blocks == 6, put
    for world in (1, 4):
        with SimEngine(cfg, world_size=world, model=model) as sim:
            _tier_on(sim)
            assert _hit_tokens_after_store_answered(sim) == 6 * 16
            sim.run([PROMPT])
            sim.quiesce(30)
            st = sim.stats
        assert st.tokens_from_object == 6 * 16 and st.blocks_loaded == 6 and st.mismatches == 0, (world, st)
