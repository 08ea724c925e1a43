"""The G4 object tier through the real vLLM 0.33 scheduler, against a real S3 server (moto's, on
127.0.0.1, started here): every loaded block is checked byte for byte by the oracle.

Two engine instances (separate leaders and host pools, same model layout) share through the
store: the second one's first lookup answers "not yet" (``None``) while its leader asks the store,
the next one loads what the first instance put. A corrupt object is a miss (recomputed), a server
killed mid-run makes puts and gets fail (the tier turns off) while the engine keeps serving, and a
missing bucket or refused credentials turn the tier off at start with one logged line.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable

import pytest

pytest.importorskip("vllm")
pytest.importorskip("moto")
pytest.importorskip("boto3")

from kvbm.testing.s3server import S3Server  # noqa: E402
from kvbm.testing.vllm_harness import Engine  # noqa: E402
from kvbm.ipc.stats import LeaderStats  # noqa: E402
from kvbm.leader.objects import nixl_installed  # noqa: E402
from kvbm.testing.support import random_prompts  # noqa: E402

from test_connector import VOCAB, finish_clean  # noqa: E402  (tests/vllm is on sys.path)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # every test: vLLM's engine, a leader process, an S3 server

S3_BUCKET = "kvbm-g4"  # the bucket of s3_server
TRANSPORTS = ["s3", pytest.param("nixl", marks=pytest.mark.skipif(not nixl_installed(), reason="no NIXL wheel installed"))]


def _object_env(kvbm_env: Callable[..., str], srv: S3Server, **extra: str) -> str:
    env = {"DYN_KVBM_OBJECT_ENABLED": "1", "DYN_KVBM_OBJECT_BUCKET": S3_BUCKET,
           "DYN_KVBM_OBJECT_ENDPOINT": srv.endpoint, "DYN_KVBM_OBJECT_ACCESS_KEY": "test",
           "DYN_KVBM_OBJECT_SECRET_KEY": "test"}  # write-through: Dynamo's default
    env.update(extra)
    return kvbm_env(**env)


def _wait(eng: Engine, cond: Callable[[LeaderStats], bool], what: str, timeout_s: float = 30.0) -> LeaderStats:
    return eng.kvbm.client.wait_stats(cond, what, timeout_s)


def _tier_on(eng: Engine) -> None:
    _wait(eng, lambda st: st.object_tier is not None and st.object_tier.enabled, "object tier on")


def _store(eng: Engine, req_id: str, tokens: list[int], blocks: int) -> None:
    """Run one request and wait until its ``blocks`` full blocks are in the store."""
    eng.add(req_id, tokens, max_tokens=1)
    eng.run()
    eng.quiesce()
    _wait(eng, lambda st: st.object_tier is not None and st.object_tier.counters.offloaded_blocks >= blocks
          and st.object_tier.busy == 0,
          "object puts")


def _leader_log(run_dir: str) -> str:
    text = ""
    for path in glob.glob(os.path.join(run_dir, "run", "*.log")):
        with open(path) as f:
            text += f.read()
    return text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_second_instance_loads_what_the_first_stored(make_engine, kvbm_env, s3_server: S3Server, transport: str) -> None:
    _object_env(kvbm_env, s3_server, DYN_KVBM_OBJECT_TRANSPORT=transport)
    first = make_engine()
    _tier_on(first)
    p = random_prompts(1, 100, seed=21, vocab=VOCAB)[0]  # 6 full blocks + 4 tokens
    _store(first, "a", p, 6)

    second = make_engine()  # another instance: its own leader, host pool and (empty) index
    _tier_on(second)
    second.add("b", p, max_tokens=3)
    second.step()  # lookup: nothing local, the leader asks the store; vLLM is told "not yet"
    req = second.sched.requests["b"]
    assert req.status.name == "WAITING" and req.num_computed_tokens == 0
    second.step_until(lambda: req.status.name == "WAITING_FOR_REMOTE_KVS")
    assert req.num_computed_tokens == 96  # the 6 blocks the first instance put
    second.step_until(lambda: req.status.name == "RUNNING")
    st = finish_clean(second)
    assert second.stats.checked_blocks >= 6  # every loaded block checked against the oracle
    assert second.stats.external_hit_tokens == 96
    assert st.counters.blocks_loaded_from_object == 6 and st.object_tier.counters.onboarded_blocks == 6
    assert st.object_tier.counters.lookup_found >= 6 and st.object_tier.counters.read_failures == 0
    # Now in the second instance's host pool: a third request loads from G2, no store round trip.
    second.sched.reset_prefix_cache()
    second.add("c", p, max_tokens=1)
    finish_clean(second)
    assert second.stats.external_hit_tokens == 96 + 96


def test_corrupt_object_is_a_miss(make_engine, kvbm_env, s3_server: S3Server) -> None:
    import boto3

    _object_env(kvbm_env, s3_server)
    first = make_engine()
    _tier_on(first)
    p = random_prompts(1, 100, seed=22, vocab=VOCAB)[0]
    _store(first, "a", p, 6)
    raw = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", aws_access_key_id="test",
                       aws_secret_access_key="test")
    keys = sorted(o["Key"] for o in raw.list_objects_v2(Bucket=S3_BUCKET)["Contents"])
    assert len(keys) == 6
    body = bytearray(raw.get_object(Bucket=S3_BUCKET, Key=keys[0])["Body"].read())
    body[-1] ^= 0xFF  # one flipped payload byte: the checksum fails
    for key in keys:
        raw.put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(body))

    second = make_engine()
    _tier_on(second)
    second.add("b", p, max_tokens=2)
    st = finish_clean(second)  # the oracle finds no wrong byte: the corrupt blocks were recomputed
    assert st.object_tier.counters.checksum_failures >= 1 and st.counters.blocks_loaded_from_object == 0, st
    assert second.stats.sched_kv_stats.get("load_error_blocks", 0) > 0


def test_server_killed_mid_run_engine_keeps_serving(make_engine, kvbm_env, s3_server: S3Server) -> None:
    _object_env(kvbm_env, s3_server)
    eng = make_engine(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    _tier_on(eng)
    state = {"steps": 0}

    def kill_at_step_40(e: Engine) -> None:
        state["steps"] += 1
        if state["steps"] == 40:
            s3_server.kill()

    t0 = time.monotonic()
    eng.run_chats(conversations=8, turns=3, max_tokens=8, seed=3, on_step=kill_at_step_40)
    assert state["steps"] > 40
    st = finish_clean(eng)
    assert time.monotonic() - t0 < 120
    st = eng.quiesce()  # every put settled
    assert st.object_tier.counters.write_failures > 0 or st.object_tier.enabled == 0.0, st
    # The rest of kvbm serves on: a repeat of a prompt hits in G2.
    p = random_prompts(1, 64, seed=23, vocab=VOCAB)[0]
    eng.store_and_forget("x", p)
    hits = eng.stats.external_hit_tokens
    eng.add("y", p, max_tokens=1)
    finish_clean(eng)
    assert eng.stats.external_hit_tokens == hits + 48


@pytest.mark.parametrize("problem", ["missing_bucket", "wrong_credentials", "unreachable"])
def test_store_unusable_at_start_turns_the_tier_off(make_engine, kvbm_env, problem: str) -> None:
    with S3Server(check_credentials=problem == "wrong_credentials") as srv:
        extra = {"DYN_KVBM_OBJECT_BUCKET": "no-such-bucket"} if problem == "missing_bucket" else {}
        if problem == "wrong_credentials":
            extra["DYN_KVBM_OBJECT_SECRET_KEY"] = "wrong"
        if problem == "unreachable":
            srv.kill()
        run_dir = _object_env(kvbm_env, srv, **extra)
        eng = make_engine()
        _wait(eng, lambda st: st.object_tier is not None and _leader_log(run_dir).count("object tier (G4) off") == 1,
              "the tier turned off")
        expected = {"missing_bucket": "no such bucket", "wrong_credentials": "credentials refused",
                    "unreachable": "unreachable"}[problem]
        line = next(x for x in _leader_log(run_dir).splitlines() if "object tier (G4) off" in x)
        assert expected in line and "DYN_KVBM_OBJECT_" in line, line
        # kvbm serves on from G2.
        p = random_prompts(1, 64, seed=24, vocab=VOCAB)[0]
        eng.store_and_forget("a", p)
        eng.add("b", p, max_tokens=1)
        st = finish_clean(eng)
        assert eng.stats.external_hit_tokens == 48 and st.object_tier.enabled == 0.0
