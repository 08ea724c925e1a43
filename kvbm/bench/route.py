"""Two engine instances behind Dynamo's KV router vs round-robin routing, on the same trace.

Each policy runs on fresh processes: two simulated engine instances (each its own leader and
rank process, real ZeroMQ and shared-memory host pool, every loaded byte checked against the KV
oracle), both with the G4 object tier on one bucket of an S3 server on 127.0.0.1 (moto's), each
publishing its leader's KV events to one ``python -m dynamo.indexer`` process (Dynamo's KV
router index, ai-dynamo-runtime 1.6.1). A client replays multi-turn conversations (each request
the whole conversation so far, system prompts shared between conversations):

* ``router``: asks the indexer (``POST /query``) where the request's prefix lives and sends it to
  the instance holding the longest prefix in its own G1/G2 (the indexer's ``cpu`` count; G4 is
  shared, so an instance's objects are no reason to go there), then the longest overall; a tie
  goes to the instance that served fewer requests;
* ``round-robin``: request ``k`` to instance ``k mod 2``.

Requests run one at a time, each settled before the next (every ack, put and event applied), so
the figures depend on the routing only. Reported per policy: the prefix reuse (prompt tokens not
recomputed: the engine's own G1 hits plus kvbm's G2 and G4 loads) next to the trace's ideal (each
prompt's longest block prefix some earlier prompt had), the prefill tokens computed, and the mean
request time (lookups, the wait for the object store's answer as vLLM waits a step, loads, the
simulated compute and the stores; the compute is the simulator's fill, far cheaper than a model's
forward pass, so this time understates what reuse saves).

Run: ``kvbm bench route`` (a suite of ``kvbm bench``) or ``python -m kvbm.bench.route``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvbm.bench.common import BenchResult
from kvbm.config import KvbmConfig
from kvbm.hashing import sequence_hashes
from kvbm.testing.indexer import Indexer
from kvbm.testing.s3server import S3Server
from kvbm.testing.sim.engine import SimEngine, chat_workload
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import free_port

BLOCK_SIZE = 16
INSTANCES = ("1", "2")  # the indexer's worker ids; instance i is sims[i]
POLICIES = ("router", "round-robin")
EVENTS_SETTLE_S = 1.0  # the indexer's subscriptions reach the leaders' PUB sockets


@dataclass(frozen=True)
class Trace:
    """The workload: ``conversations`` chats of ``turns`` turns over ``system_prompts`` shared
    system prompts, and the engines' pools (blocks per instance) and tiers."""

    conversations: int = 16
    turns: int = 6
    system_tokens: int = 256
    turn_tokens: int = 96
    system_prompts: int = 4
    host_blocks: int = 200
    gpu_blocks: int = 64
    seed: int = 0
    object_store: bool = True  # the shared G4 bucket (False: each instance only its own G1/G2)

    def prompts(self) -> list[list[int]]:
        return list(chat_workload(self.conversations, self.turns, system_tokens=self.system_tokens,
                                  turn_tokens=self.turn_tokens, num_system_prompts=self.system_prompts,
                                  seed=self.seed))

    def model(self) -> SimModel:
        longest = -(-(self.system_tokens + self.turns * self.turn_tokens) // BLOCK_SIZE)
        return SimModel(num_layers=4, kv_heads=2, head_dim=64, block_size=BLOCK_SIZE,
                        num_gpu_blocks=max(self.gpu_blocks, longest))


QUICK = Trace(conversations=6, turns=4, host_blocks=96, gpu_blocks=0)


def ideal_reuse(prompts: Sequence[Sequence[int]]) -> int:
    """Prompt tokens an ideal cache serves: each prompt's longest block prefix an earlier one had."""
    seen: set[int] = set()
    reused = 0
    for p in prompts:
        hashes = sequence_hashes(list(p), BLOCK_SIZE)
        n = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        reused += n * BLOCK_SIZE
        seen.update(hashes)
    return reused


@dataclass
class PolicyRun:
    """What one routing policy achieved on the trace (all instances together)."""

    policy: str
    prompt_tokens: int = 0
    tokens_g1: int = 0  # the engines' own prefix caches
    tokens_g2: int = 0  # loaded from kvbm's host pools
    tokens_g4: int = 0  # loaded from the shared object store
    tokens_computed: int = 0
    seconds: list[float] = field(default_factory=list)  # per request
    requests_per_instance: list[int] = field(default_factory=lambda: [0] * len(INSTANCES))
    checked_bytes: int = 0  # loaded bytes the ranks compared with the oracle
    mismatches: int = 0  # must be 0
    load_failures: int = 0

    @property
    def reused(self) -> int:
        """Prompt tokens not recomputed."""
        return self.prompt_tokens - self.tokens_computed

    @property
    def reuse(self) -> float:
        """:attr:`reused` as a fraction of the prompt tokens."""
        return self.reused / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def local_reuse(self) -> float:
        """Percent of prompt tokens served by the serving instance itself (its G1 and G2)."""
        return 100 * (self.tokens_g1 + self.tokens_g2) / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mean_ms(self) -> float:
        """Mean time of a request (its lookups, loads, simulated compute and stores), in ms."""
        return 1000 * sum(self.seconds) / len(self.seconds) if self.seconds else 0.0


Chooser = Callable[[int, list[int], PolicyRun], int]


def round_robin(k: int, prompt: list[int], run: PolicyRun) -> int:
    """Request ``k`` to instance ``k mod 2``, whatever it holds."""
    return k % len(INSTANCES)


def router_for(indexer: Indexer) -> Chooser:
    """The KV-aware choice: the instance with the longest prefix in its own tiers, then overall."""

    def choose(k: int, prompt: list[int], run: PolicyRun) -> int:
        answer = indexer.query(prompt).get("instances", {})

        def score(i: int) -> tuple[int, int, int]:
            a = answer.get(INSTANCES[i], {})
            return int(a.get("cpu", 0)), int(a.get("longest_matched", 0)), -run.requests_per_instance[i]

        return max(range(len(INSTANCES)), key=score)

    return choose


def _await_indexed(indexer: Indexer, sim: SimEngine, wid: str, prompt: list[int], timeout_s: float = 5.0) -> None:
    """Wait until the indexer places on ``wid`` as much of ``prompt`` in G2 as its leader holds
    (the events of the request just served have arrived): each routing decision then sees every
    earlier request, as it would with a human's think time between turns."""
    assert sim.client is not None
    held = sim.client.match(sequence_hashes(prompt, BLOCK_SIZE)).host * BLOCK_SIZE
    deadline = time.monotonic() + timeout_s
    while int(indexer.query(prompt).get("instances", {}).get(wid, {}).get("cpu", 0)) < held:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the indexer did not place {held} tokens on instance {wid} within {timeout_s:g} s")
        time.sleep(0.005)


def _config(trace: Trace, run_dir: str, s3: S3Server | None, bucket: str, events_port: int) -> KvbmConfig:
    cfg = KvbmConfig(run_dir=run_dir, cpu_cache_num_blocks=trace.host_blocks, init_timeout_s=60.0,
                     kv_events_endpoint=f"tcp://127.0.0.1:{events_port}")
    if s3 is None:
        return cfg
    return cfg.replace(object_enabled=True, object_endpoint=s3.endpoint, object_bucket=bucket,
                       object_access_key="test", object_secret_key="test")


def run_policy(policy: str, trace: Trace, prompts: list[list[int]], s3: S3Server | None, work: Path) -> PolicyRun:
    """Replay ``prompts`` on two fresh instances (a fresh bucket of ``s3``, if given) with ``policy``."""
    bucket = f"kvbm-route-{policy}"
    if s3 is not None:
        s3.create_bucket(bucket)
    ports = [free_port() for _ in INSTANCES]
    run = PolicyRun(policy)
    with contextlib.ExitStack() as stack:
        sims = []
        for i, port in enumerate(ports):
            cfg = _config(trace, str(work / "run"), s3, bucket, port)
            sims.append(stack.enter_context(SimEngine(cfg, world_size=1, model=trace.model(),
                                                      instance=f"route-{policy}-{i}", await_object_lookups=True)))
        for sim in sims if s3 is not None else ():
            assert sim.client is not None
            sim.client.wait_stats(lambda st: st.object_tier is not None and bool(st.object_tier.enabled),
                                  "object tier on", 30)
        indexer = stack.enter_context(Indexer({wid: f"tcp://127.0.0.1:{p}" for wid, p in zip(INSTANCES, ports)},
                                              BLOCK_SIZE, work / f"indexer-{policy}.log"))
        time.sleep(EVENTS_SETTLE_S)
        choose = router_for(indexer) if policy == "router" else round_robin
        for k, prompt in enumerate(prompts):
            target = choose(k, prompt, run)
            sim = sims[target]
            t0 = time.perf_counter()
            sim.run([prompt])
            run.seconds.append(time.perf_counter() - t0)
            sim.quiesce(30)  # every ack, put and event applied before the next request
            run.requests_per_instance[target] += 1
            _await_indexed(indexer, sim, INSTANCES[target], prompt)
        for sim in sims:
            st = sim.stats
            run.prompt_tokens += st.prompt_tokens
            run.tokens_g1 += st.tokens_local
            run.tokens_g2 += st.tokens_from_host
            run.tokens_g4 += st.tokens_from_object
            run.tokens_computed += st.tokens_computed
            run.checked_bytes += st.bytes_loaded
            run.mismatches += st.mismatches
            run.load_failures += st.load_failures + st.staging_failures
    return run


def compare(trace: Trace) -> tuple[dict[str, PolicyRun], int]:
    """Both policies on ``trace``: their runs and the trace's ideal reused tokens."""
    prompts = trace.prompts()
    with tempfile.TemporaryDirectory(prefix="kvbm-route-") as tmp, contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Server()) if trace.object_store else None
        runs = {p: run_policy(p, trace, prompts, s3, Path(tmp)) for p in POLICIES}
    return runs, ideal_reuse(prompts)


def report(runs: dict[str, PolicyRun], ideal: int) -> str:
    """The per-policy breakdown, one line each."""
    lines = []
    for r in runs.values():
        lines.append(f"  {r.policy:<11} reuse {r.reuse:6.1%} (G1 {r.tokens_g1} + G2 {r.tokens_g2} + G4 {r.tokens_g4} "
                     f"of {r.prompt_tokens} tokens; ideal {ideal / r.prompt_tokens:.1%})  computed {r.tokens_computed}"
                     f"  mean request {r.mean_ms:.1f} ms  requests per instance {r.requests_per_instance}"
                     f"  checked {r.checked_bytes / 1e6:.1f} MB, mismatches {r.mismatches}")
    return "\n".join(lines)


def results(runs: dict[str, PolicyRun], ideal: int, trace: Trace) -> list[BenchResult]:
    """The figures: each policy's reuse against the trace's ideal, and the router next to
    round-robin (its figure in the limit column) for local hits, prefill and request time."""
    router, rr = runs["router"], runs["round-robin"]
    ok = all(r.mismatches == 0 and r.load_failures == 0 for r in runs.values())
    where = (f"2 instances, {trace.conversations} chats x {trace.turns} turns, G2 {trace.host_blocks} blocks each, "
             + ("shared G4" if trace.object_store else "no G4"))
    ideal_pct = 100 * ideal / router.prompt_tokens
    out = [BenchResult(f"route: prefix reuse, {r.policy} ({where})", 100 * r.reuse, "%", ideal_pct,
                       "% ideal (earlier prompts' prefixes)", 100 * r.reuse / ideal_pct, "router >= round-robin", ok)
           for r in (router, rr)]
    for figure, value, limit, unit, goal in (
            ("route: reuse from the instance's own G1+G2, router", router.local_reuse, rr.local_reuse, "%", "> 1"),
            ("route: prefill tokens computed, router", router.tokens_computed, rr.tokens_computed, "tokens", "<= 1"),
            ("route: mean request time (sim compute), router", router.mean_ms, rr.mean_ms, "ms", "< 1")):
        out.append(BenchResult(figure, value, unit, limit, f"{unit} round-robin", value / limit if limit else None,
                               goal, ok))
    return out


def run(quick: bool = False, trace: Trace | None = None) -> list[BenchResult]:
    """The suite (``kvbm bench route``)."""
    t = trace or (QUICK if quick else Trace())
    runs, ideal = compare(t)
    print(report(runs, ideal), file=sys.stderr)
    return results(runs, ideal, t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.bench.route", description=__doc__.split("\n\n")[0])
    d = Trace()
    p.add_argument("--conversations", type=int, default=d.conversations)
    p.add_argument("--turns", type=int, default=d.turns)
    p.add_argument("--host-blocks", type=int, default=d.host_blocks, help="each instance's G2 pool")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-object-store", action="store_true", help="no shared G4 bucket: each instance its own tiers")
    a = p.parse_args(argv)
    trace = Trace(conversations=a.conversations, turns=a.turns, host_blocks=a.host_blocks, seed=a.seed,
                  object_store=not a.no_object_store)
    figures = run(trace=trace)
    for r in figures:
        print(f"{r.figure}: {r.value:.3g} {r.unit}" + (f" (limit {r.limit:.3g} {r.limit_unit})" if r.limit else ""))
    return 0 if all(r.ok for r in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
