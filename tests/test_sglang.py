"""kvbm as SGLang's HiCache storage backend (``tests/sglang``), run in the SGLang venv that
``scripts/setup_sglang_cpu.sh`` builds (sglang 0.5.23 on CPU torch; it cannot share this venv).

Skipped, with the reason, when that venv is absent; CI builds it and sets KVBM_REQUIRE_SGLANG=1,
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRE_ENV = "KVBM_REQUIRE_SGLANG"
VENV_ENV = "KVBM_SGLANG_VENV"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # SGLang engines in their own venv
@pytest.mark.timeout(1200)
def test_sglang_suite_in_the_sglang_venv(venv_suite) -> None:
    venv = Path(os.environ.get(VENV_ENV) or ROOT / ".venv-sglang")
    python = venv / "bin" / "python"
    venv_suite(python if python.exists() else None, "tests/sglang", require_env=REQUIRE_ENV, timeout_s=1150,
               missing=f"no SGLang venv at {venv} (build it with scripts/setup_sglang_cpu.sh, or set {VENV_ENV})",
               extra_args=["-W", "ignore"])


class _Config:
    """The fields of SGLang's HiCacheStorageConfig the backend reads (SGLang is not in this venv)."""

    def __init__(self, **kw: object) -> None:
        self.tp_rank, self.tp_size, self.pp_size, self.attn_cp_size, self.dcp_size = 0, 2, 1, 1, 1
        self.is_mla_model, self.model_name, self.extra_config, self.dp_rank = False, "org/model", {}, 0
        self.should_split_heads = False
        self.__dict__.update(kw)


def test_settings_name_the_instance_and_refuse_what_kvbm_cannot_serve(tmp_path) -> None:
    from kvbm.sglang_integration.settings import UnsupportedSetup, agree_on_name, rank_config, settings_for

    env = {"DYN_KVBM_RUN_DIR": str(tmp_path), "DYN_KVBM_CPU_CACHE_GB": "1"}
    rc = rank_config(_Config(tp_rank=1), env)
    # TP > 1 with nothing naming the instance: the name is what rank 0 broadcast over the TP group.
    sent: list[str] = []
    name = agree_on_name(rc, lambda mine: sent.append(mine) or "sglang-org_model-42-abcd")
    assert name == "sglang-org_model-42-abcd" and sent == [""]  # rank 1 proposes nothing
    rank0 = agree_on_name(rank_config(_Config(tp_rank=0), env), lambda mine: mine)
    assert rank0.startswith(f"sglang-org_model-{os.getpid()}-")  # rank 0's own pick, unique per start
    assert rank0 != agree_on_name(rank_config(_Config(tp_rank=0), env), lambda mine: mine)
    with pytest.raises(UnsupportedSetup, match="no torch.distributed TP group.*'instance'.*DYN_KVBM_LEADER_ENDPOINT"):
        agree_on_name(rc, None)
    # The extra config's name, or one derived from DYN_KVBM_LEADER_ENDPOINT, needs no group.
    assert agree_on_name(rank_config(_Config(extra_config={"instance": "a"}, dp_rank=3), env), None) == "a-dp3"
    ep_env = {**env, "DYN_KVBM_LEADER_ENDPOINT": "tcp://127.0.0.1:5999"}
    by_ep = agree_on_name(rank_config(_Config(tp_rank=1), ep_env), None)
    assert by_ep == agree_on_name(rank_config(_Config(tp_rank=0), ep_env), None)
    s = settings_for(rc, name, "fp", 16)
    assert s.instance.name == name and s.instance.fingerprint == "fp" and s.instance.block_size == 16
    assert s.kvbm_world == 2 and s.is_kvbm_rank
    assert s.endpoint == f"ipc://{tmp_path}/{name}.sock"
    assert s.coordinator == f"ipc://{tmp_path}/{name}-ranks.sock"
    assert settings_for(rank_config(_Config(tp_rank=1), ep_env), by_ep, "fp", 16).endpoint == "tcp://127.0.0.1:5999"
    mla = settings_for(rank_config(_Config(tp_rank=1, is_mla_model=True), env), name, "fp", 16)
    assert mla.kvbm_world == 1 and mla.instance.world_size == 1 and not mla.is_kvbm_rank  # rank 0 writes
    with pytest.raises(UnsupportedSetup, match="supports pp_size=1 only, got pp_size=2"):
        rank_config(_Config(pp_size=2), env)
    with pytest.raises(UnsupportedSetup, match="extra config 'instance'=''"):
        rank_config(_Config(extra_config={"instance": ""}), env)
    long = settings_for(rc, "x" * 200, "fp", 16)
    assert len(long.coordinator) < 110  # a Unix socket path has at most 107 bytes


def test_page_keys_map_to_hashes_namespaced_by_the_layout() -> None:
    from kvbm.sglang_integration.settings import page_hashes

    keys = ["ab" * 32, "cd" * 32]
    a = page_hashes("layout-a", keys)
    assert a.dtype == "uint64" and len(set(a.tolist())) == 2 and (a != 0).all()
    assert (page_hashes("layout-a", keys) == a).all()  # deterministic
    assert not set(page_hashes("layout-b", keys).tolist()) & set(a.tolist())  # other layouts never mix


def test_importing_the_integration_stays_light() -> None:
    code = ("import sys, kvbm.sglang_integration, kvbm.sglang_integration.settings, "
            "kvbm.sglang_integration.pages, kvbm.sglang_integration.coordinator; "
            "print(any(m in sys.modules for m in ('torch', 'sglang')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
