"""The adapters' shared bootstrap: model content identity, fingerprints, the start-up wait."""

from __future__ import annotations

import os
import time

import pytest

from kvbm.connector.bootstrap import (
    Instance,
    KvbmNotReady,
    layout_fingerprint,
    leader_endpoint,
    model_identity,
    wait_until_ready,
)
from kvbm.ipc.stats import LeaderState
from kvbm.leader.client import LeaderClient
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel


def test_model_identity_changes_when_the_model_is_resaved_at_the_same_path(tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"rope_theta": 10000}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "README.md").write_text("not part of the identity")
    first = model_identity(str(model))
    assert first.startswith(f"{model}@") and first == model_identity(str(model))
    (model / "README.md").write_text("edited: still the same model")
    assert model_identity(str(model)) == first
    (model / "config.json").write_text('{"rope_theta": 500000}')  # a changed RoPE setting
    assert model_identity(str(model)) != first
    second = model_identity(str(model))
    st = os.stat(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-saved
    assert model_identity(str(model)) != second


def test_a_hub_id_or_missing_model_is_its_name() -> None:
    assert model_identity("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert model_identity(None) == "?"


def test_fingerprint_names_every_part(tmp_path) -> None:
    fp = layout_fingerprint("vllm", "Qwen/Qwen3-8B", "bfloat16", 16, 2, "mla")
    assert fp == "vllm;Qwen/Qwen3-8B;bfloat16;bs=16;tp=2;mla"
    assert layout_fingerprint("vllm", "m", "bfloat16", 16, 1) != layout_fingerprint("vllm", "m", "bfloat16", 16, 2)


def test_explicit_endpoint_wins(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16")
    assert leader_endpoint(cfg, "vllm-x").startswith(f"ipc://{cfg.run_dir}/")
    explicit = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_ENDPOINT="tcp://127.0.0.1:5999")
    assert leader_endpoint(explicit, "vllm-x") == "tcp://127.0.0.1:5999"


def _instance(sim: SimEngine) -> Instance:
    return Instance(sim.config, sim.instance, sim.endpoint, sim.model.block_size, sim.world_size, "fp")


def test_wait_names_the_missing_rank_at_the_init_timeout(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="6")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=32))
    client = LeaderClient(sim.endpoint)
    try:
        sim.start(ranks=[0])  # rank 1 never comes
        t0 = time.monotonic()
        with pytest.raises(KvbmNotReady) as err:
            wait_until_ready(_instance(sim), client, what="the test engine")
        assert time.monotonic() - t0 < 12
        text = str(err.value)
        assert "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=6 s" in text
        assert "rank(s) [1] did not register" in text and "\n" not in text
    finally:
        client.close()
        sim.stop()


def test_wait_returns_once_every_rank_is_ready(make_config, caplog) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="20")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=32))
    client = LeaderClient(sim.endpoint)  # before the leader exists, as an engine's scheduler may
    try:
        with caplog.at_level("INFO"):
            sim.start()
            wait_until_ready(_instance(sim), client, what="the test engine")  # no sim.wait_ready first
        status = client.status
        assert status is not None and status.leader_state is LeaderState.READY and status.world_size == 2
        # A leader still starting is what a start-up wait is for: no "unavailable" warning on the way.
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    finally:
        client.close()
        sim.stop()


def test_a_leader_that_never_answers_is_named(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="1")
    inst = Instance(cfg, "nobody", leader_endpoint(cfg, "nobody"), 16, 1, "fp")
    client = LeaderClient(inst.endpoint)
    try:
        with pytest.raises(KvbmNotReady, match="never answered"):
            wait_until_ready(inst, client, what="the test engine")
    finally:
        client.close()
