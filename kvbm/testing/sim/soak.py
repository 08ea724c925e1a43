"""Soak: a simulated TP engine under heavy eviction for thousands of steps, with the KV oracle.

Each step serves ``concurrency`` requests at once (one engine step: their loads, computes and
stores go to the ranks together); the engine's own prefix cache is dropped before each step
(unless ``--engine-cache``), so every reuse goes through kvbm. Requests draw from random shared prefixes (system prompts
picked with a skewed popularity), continue earlier conversations (deep prefix reuse), or repeat
one exactly. The host pool (G2) is far smaller than one step's working set and the disk (G3)
smaller than the whole, so blocks are evicted from G2 to G3 and staged back all the time.

Checked: every loaded byte on every rank (oracle mismatches must be 0); at the end, pool
accounting of both tiers (free + registered = capacity, nothing pinned or being written, no op
in flight); the memory (RSS) of the leader and the ranks, sampled over the run, must be flat
after warm-up.

``python -m kvbm.testing.sim.soak --steps 2000`` (see ``--help``); exit status 0 when everything held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from kvbm.config import load_config
from kvbm.ipc.stats import DiskCounters, LeaderState, LeaderStats, encode_stats
from kvbm.testing.sim.engine import SimEngine, SimStats
from kvbm.testing.sim.rank import SimModel

BLOCK = 16  # tokens per block


def _mem_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process in KiB; (0, 0) if it is gone.

    RssAnon is the private heap: the shared host pool (RssShmem, pre-faulted at start) and
    file-backed pages are excluded, so growth there is the process's own.
    """
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


@dataclass
class SoakOptions:
    """Shape of a soak run (defaults: the documented long run, minus ``steps``)."""

    steps: int = 2000
    concurrency: int = 64
    world_size: int = 2
    host_blocks: int = 512
    disk_blocks: int = 4096
    num_prefixes: int = 48
    max_blocks: int = 16  # longest prompt, in blocks
    conversations: int = 512  # live conversations that may continue
    seed: int = 0
    sample_every: int = 25  # RSS sample period, in steps
    warmup_fraction: float = 0.2  # RSS growth is measured from here to the end
    flat_limit_kib: int = 4096  # allowed RssAnon growth per process after warm-up
    offload_filter: bool = False  # True: only blocks seen twice go to disk (fewer disk writes)
    engine_cache: bool = False  # True: keep the engine's own prefix cache across steps
    take_events: bool = False  # True: drain the leader's KV-event backlog every step (a consumer)
    run_dir: str | None = None  # default: a fresh temporary directory
    disk_dir: str | None = None


@dataclass
class MemSample:
    step: int
    leader: tuple[int, int]  # (VmRSS, RssAnon) KiB
    ranks: list[tuple[int, int]]


@dataclass
class SoakReport:
    options: SoakOptions
    steps: int = 0
    seconds: float = 0.0
    sim: SimStats = field(default_factory=SimStats)
    leader_stats: LeaderStats = field(default_factory=lambda: LeaderStats(LeaderState.WAITING))
    accounting_errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # e.g. a process died
    memory: list[MemSample] = field(default_factory=list)
    growth_kib: dict[str, int] = field(default_factory=dict)  # RssAnon end - at warm-up, per process

    @property
    def flat(self) -> bool:
        return all(g <= self.options.flat_limit_kib for g in self.growth_kib.values())

    @property
    def ok(self) -> bool:
        return (self.sim.mismatches == 0 and not self.accounting_errors and not self.failures and self.flat
                and self.steps > 0)

    def summary(self) -> list[str]:
        """The figures, one per line."""
        s, c = self.sim, self.leader_stats.counters
        dc = self.leader_stats.disk_tier.counters if self.leader_stats.disk_tier is not None else DiskCounters()
        lines = [
            (f"steps {self.steps} x {self.options.concurrency} requests, TP={self.options.world_size}, "
             f"{self.seconds:.0f} s ({self.steps / self.seconds if self.seconds else 0:.1f} steps/s)"),
            (f"oracle mismatches {s.mismatches} (must be 0); load failures {s.load_failures}, "
             f"staging failures {s.staging_failures}, store failures {s.store_failures}"),
            (f"prompt tokens {s.prompt_tokens}: engine-local {s.tokens_local}, from G2 {s.tokens_from_host}, "
             f"from G3 {s.tokens_from_disk}, computed {s.tokens_computed}"),
            (f"G2 evictions {c.host_evictions}, G3 evictions {c.disk_evictions}, offloaded G2->G3 "
             f"{dc.offloaded_blocks}, staged G3->G2 {dc.onboarded_blocks}, checksum failures "
             f"{dc.checksum_failures}, disk I/O errors {dc.io_errors}"),
            "pool accounting: " + ("exact (free + registered = capacity, nothing pinned/writing, no op in flight)"
                                   if not self.accounting_errors else "; ".join(self.accounting_errors)),
        ]
        if self.memory:
            first, last = self.memory[0], self.memory[-1]
            names = ["leader"] + [f"rank{i}" for i in range(len(last.ranks))]
            for i, name in enumerate(names):
                a = first.leader if i == 0 else first.ranks[i - 1]
                b = last.leader if i == 0 else last.ranks[i - 1]
                lines.append(f"{name} RSS {a[0] / 1024:.1f} -> {b[0] / 1024:.1f} MiB (anon {a[1] / 1024:.1f} -> "
                             f"{b[1] / 1024:.1f}); anon growth after warm-up {self.growth_kib.get(name, 0)} KiB")
        lines += self.failures
        lines.append("verdict: " + ("ok" if self.ok else "FAILED"))
        return lines


class SoakWorkload:
    """Requests over random shared prefixes, growing conversations and exact repeats."""

    def __init__(self, opts: SoakOptions) -> None:
        self.rng = random.Random(opts.seed)
        self.max_blocks = opts.max_blocks
        self.prefixes = [self._tokens(self.rng.randint(2, max(2, opts.max_blocks // 2)) * BLOCK)
                         for _ in range(opts.num_prefixes)]
        self.popularity = [1.0 / (i + 1) for i in range(opts.num_prefixes)]  # a few very hot system prompts
        self.conversations: list[list[int]] = []
        self.capacity = opts.conversations

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1, 50_000) for _ in range(n)]

    def _new(self) -> list[int]:
        prefix = self.rng.choices(self.prefixes, self.popularity)[0]
        room = self.max_blocks * BLOCK - len(prefix)
        return prefix + self._tokens(self.rng.randint(0, max(0, min(room, 3 * BLOCK))))

    def request(self) -> list[int]:
        r = self.rng.random()
        if self.conversations and r < 0.1:
            return list(self.rng.choice(self.conversations))  # exact repeat: everything matches
        if self.conversations and r < 0.6:
            i = self.rng.randrange(len(self.conversations))
            conv = self.conversations[i] + self._tokens(self.rng.randint(1, 2 * BLOCK))
            if len(conv) > self.max_blocks * BLOCK:
                conv = self._new()  # too long: the conversation ends, a new one takes its place
            self.conversations[i] = conv
            return list(conv)
        conv = self._new()
        if len(self.conversations) < self.capacity:
            self.conversations.append(conv)
        else:
            self.conversations[self.rng.randrange(self.capacity)] = conv
        return list(conv)

    def step(self, n: int) -> list[list[int]]:
        return [self.request() for _ in range(n)]


def _log_tail(path: str | None, lines: int = 30) -> str:
    if not path:
        return "(no log)"
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError as e:
        return f"(log unreadable: {e})"


def _accounting(stats: LeaderStats) -> list[str]:
    errors = []
    for tier, pool in (("host", stats.host), ("disk", stats.disk)):
        if pool is None:
            continue
        if pool.free + pool.registered != pool.capacity:
            errors.append(f"{tier}: free {pool.free} + registered {pool.registered} != capacity {pool.capacity}")
        for what, n in (("pinned", pool.pinned), ("writing", pool.writing)):
            if n:
                errors.append(f"{tier}: {n} blocks still {what}")
    if stats.ops_in_flight:
        errors.append(f"ops_in_flight = {stats.ops_in_flight}")
    if stats.disk_tier is not None and stats.disk_tier.busy:
        errors.append(f"disk writes in flight = {stats.disk_tier.busy}")
    return errors


def run_soak(opts: SoakOptions, progress: Callable[[int, SoakReport], None] | None = None) -> SoakReport:
    """Run the soak; ``progress(step, report)`` is called after every RSS sample."""
    rep = SoakReport(opts)
    tmp = tempfile.mkdtemp(prefix="kvbm-soak-")
    try:
        run_dir = opts.run_dir or os.path.join(tmp, "run")
        disk_dir = opts.disk_dir or os.path.join(tmp, "disk")
        os.makedirs(disk_dir, exist_ok=True)
        env = {"DYN_KVBM_RUN_DIR": run_dir, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(opts.host_blocks),
               "DYN_KVBM_LOG_LEVEL": "WARNING", "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "60"}
        if opts.disk_blocks:
            env.update({"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(opts.disk_blocks),
                        "DYN_KVBM_DISK_CACHE_DIR": disk_dir,
                        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "0" if opts.offload_filter else "1"})
        cfg = load_config(env)
        # One step must fit the engine's own block pool: every request at its longest.
        model = SimModel(num_layers=2, kv_heads=1, head_dim=32, block_size=BLOCK,
                         num_gpu_blocks=opts.concurrency * (opts.max_blocks + 1) + 16)
        work = SoakWorkload(opts)
        warm_step = int(opts.steps * opts.warmup_fraction)
        warm: MemSample | None = None
        with SimEngine(cfg, world_size=opts.world_size, model=model, seed=opts.seed) as sim:
            assert sim.leader is not None and sim.leader.popen is not None and sim.client is not None
            pids = (sim.leader.popen.pid, [p.pid for p in sim.ranks])
            t0 = time.perf_counter()
            for step in range(1, opts.steps + 1):
                if not opts.engine_cache:
                    sim.reset_engine_cache()  # every reuse goes through kvbm
                sim.run(work.step(opts.concurrency))
                if opts.take_events:
                    sim.client.take_events()
                rep.steps = step
                if sim.leader.popen.poll() is not None:
                    rep.failures.append(f"the leader died (exit code {sim.leader.popen.returncode}) before step "
                                        f"{step}: {_log_tail(sim.leader.log_path)}")
                    break
                if step % opts.sample_every == 0 or step == opts.steps:
                    sample = MemSample(step, _mem_kib(pids[0]), [_mem_kib(p) for p in pids[1]])
                    rep.memory.append(sample)
                    if warm is None and step >= warm_step:
                        warm = sample
                    rep.seconds = time.perf_counter() - t0
                    rep.sim = sim.stats
                    if progress is not None:
                        progress(step, rep)
            rep.seconds = time.perf_counter() - t0
            rep.sim = sim.stats
            if rep.failures:
                return rep
            rep.leader_stats = sim.quiesce(30)
            rep.accounting_errors = _accounting(rep.leader_stats)
            last = rep.memory[-1] if rep.memory else None
            if warm is not None and last is not None:
                rep.growth_kib["leader"] = last.leader[1] - warm.leader[1]
                for i, (w, e) in enumerate(zip(warm.ranks, last.ranks)):
                    rep.growth_kib[f"rank{i}"] = e[1] - w[1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rep


def main(argv: list[str] | None = None) -> int:
    d = SoakOptions()
    p = argparse.ArgumentParser(prog="python -m kvbm.testing.sim.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests per engine step")
    p.add_argument("--world", type=int, default=d.world_size, help="TP size (rank processes)")
    p.add_argument("--host-blocks", type=int, default=d.host_blocks, help="G2 pool size in blocks")
    p.add_argument("--disk-blocks", type=int, default=d.disk_blocks, help="G3 size in blocks (0: no disk tier)")
    p.add_argument("--prefixes", type=int, default=d.num_prefixes, help="shared prefixes (system prompts)")
    p.add_argument("--max-blocks", type=int, default=d.max_blocks, help="longest prompt, in blocks")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="RSS sample period in steps")
    p.add_argument("--offload-filter", action="store_true", help="keep the disk offload filter on")
    p.add_argument("--take-events", action="store_true",
                   help="drain the leader's KV-event backlog every step, as a KV-event consumer would")
    p.add_argument("--engine-cache", action="store_true",
                   help="keep the engine's own prefix cache across steps (default: dropped every step)")
    p.add_argument("--disk-dir", default=None, help="directory of the G3 block file (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the report (with every RSS sample) here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    opts = SoakOptions(steps=a.steps, concurrency=a.concurrency, world_size=a.world, host_blocks=a.host_blocks,
                       disk_blocks=a.disk_blocks, num_prefixes=a.prefixes, max_blocks=a.max_blocks, seed=a.seed,
                       sample_every=a.sample_every, offload_filter=a.offload_filter,
                       engine_cache=a.engine_cache, take_events=a.take_events, disk_dir=a.disk_dir)

    def progress(step: int, rep: SoakReport) -> None:
        s = rep.memory[-1]
        ranks = " ".join(f"{r[0] / 1024:.1f}" for r in s.ranks)
        print(f"step {step:6d}  {step / rep.seconds:5.1f} steps/s  mismatches {rep.sim.mismatches}  "
              f"G2 hits {rep.sim.tokens_from_host}  G3 hits {rep.sim.tokens_from_disk}  "
              f"RSS MiB leader {s.leader[0] / 1024:.1f} ranks {ranks}", flush=True)

    rep = run_soak(opts, None if a.quiet else progress)
    print("\n".join(rep.summary()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"options": asdict(opts), "steps": rep.steps, "seconds": rep.seconds, "sim": asdict(rep.sim),
                       "leader_stats": encode_stats(rep.leader_stats)[1], "accounting_errors": rep.accounting_errors,
                       "growth_kib": rep.growth_kib, "memory": [asdict(s) for s in rep.memory], "ok": rep.ok},
                      f, indent=1)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
