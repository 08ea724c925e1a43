"""``kvbm demo``: a leader, TP ranks and a multi-turn chat workload on the simulated engine.

Everything is real except the model: processes, the shared-memory host pool, ZeroMQ, the disk
tier (a temporary directory), the object tier when configured (``DYN_KVBM_OBJECT_*``, or
``--object-store local``: an S3 server on 127.0.0.1); every loaded byte is checked against the KV
oracle.
"""

from __future__ import annotations

import argparse
import itertools
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.ipc.shm import sweep_stale_segments
from kvbm.ipc.stats import DiskCounters, LeaderStats, ObjectTierStats
from kvbm.leader.spawn import LeaderStartError
from kvbm.sim.engine import LeaderDied, RankDied, SimEngine, SimError, SimStats, chat_workload
from kvbm.sim.rank import SimModel

if TYPE_CHECKING:
    from kvbm.bench.s3server import S3Server

CHUNK = 8  # prompts between two progress updates
BLOCK_SIZE = 16
SYSTEM_TOKENS = 256  # shared system prompt that opens each conversation
TURN_TOKENS = 96  # tokens each turn adds
MAX_RANKS = 64  # one process each
LOCAL_BUCKET = "kvbm-demo"  # --object-store local
RANK_INTERRUPTED = 130  # a rank's exit code when Ctrl-C stopped it (kvbm.sim.rank)
# After a child's death, how long a Ctrl-C may still arrive here and make it an interruption. The
# group's SIGINT is pending in this process once a child has exited of it; this only covers its
# delivery to the main thread.
INTERRUPT_GRACE_S = 0.5


def _int_in_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]; the error names the value and the range."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {accepted}")
        return value

    return parse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser("demo", help="run a simulated engine with kvbm (no GPU needed)",
                              description=__doc__)
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim",
                   help="sim (default): the simulated engine; vllm: a real vLLM engine on CPU (kvbm.demo_vllm)")
    p.add_argument("--model", choices=("tiny", "small"), default="tiny",
                   help="--engine vllm: the seeded random-weight test model, default tiny")
    p.add_argument("--ranks", type=_int_in_range(1, MAX_RANKS), default=2,
                   help=f"tensor-parallel ranks (processes), 1 to {MAX_RANKS}, default 2")
    p.add_argument("--conversations", type=_int_in_range(1), default=None,
                   help="chats, their turns interleaved, default 48 (vllm: 4)")
    p.add_argument("--turns", type=_int_in_range(1), default=None, help="turns per chat, default 6 (vllm: 4)")
    p.add_argument("--gpu-blocks", type=_int_in_range(1), default=96,
                   help="engine (G1) blocks per rank, default 96; must hold the longest conversation")
    p.add_argument("--cpu-blocks", type=_int_in_range(0), default=None,
                   help="host pool (G2) blocks; default 400 unless DYN_KVBM_CPU_CACHE_* is set; 0 = off")
    p.add_argument("--disk-blocks", type=_int_in_range(0), default=None,
                   help="disk tier (G3) blocks; default 3000 unless DYN_KVBM_DISK_CACHE_* is set; 0 = off")
    p.add_argument("--object-store", choices=("env", "local"), default="env",
                   help="object tier (G4): env (default) as DYN_KVBM_OBJECT_* configure it; local: start an S3 "
                        "server on 127.0.0.1 (moto, pip install 'moto[server]') and put every block there")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the chat workload and of the KV oracle, default 0; the same seed gives "
                        "the same figures on every run (all but the times and rates)")
    p.set_defaults(handler=run)


def _check_args(args: argparse.Namespace) -> None:
    """Checks across flags (each flag's own range is checked by argparse)."""
    longest = -(-(SYSTEM_TOKENS + args.turns * TURN_TOKENS) // BLOCK_SIZE)
    if args.gpu_blocks < longest:
        raise ConfigError(f"--gpu-blocks {args.gpu_blocks}: the engine pool must hold the longest conversation, "
                          f"{longest} blocks at --turns {args.turns}; use {longest} or more (or fewer turns)")
    if args.cpu_blocks == 0 and args.disk_blocks == 0:
        raise ConfigError("--cpu-blocks 0 --disk-blocks 0: kvbm needs a cache tier; give one of them a value > 0")


def _config(args: argparse.Namespace, tmp: str, s3_endpoint: str | None = None) -> KvbmConfig:
    cfg = load_config(require_tier=False)
    env: dict[str, object] = {}
    if s3_endpoint is not None:
        env.update(object_enabled=True, object_endpoint=s3_endpoint, object_bucket=LOCAL_BUCKET,
                   object_access_key="test", object_secret_key="test", object_write_through=True)
    if args.cpu_blocks is not None or not cfg.has_cpu_tier:
        env["cpu_cache_num_blocks"] = (args.cpu_blocks if args.cpu_blocks is not None else 400) or None
        env["cpu_cache_gb"] = None
    if args.disk_blocks is not None or not cfg.has_disk_tier:
        disk = args.disk_blocks if args.disk_blocks is not None else 3000
        env["disk_cache_num_blocks"] = disk or None
        env["disk_cache_gb"] = None
        env["disk_cache_dir"] = tmp
    env["run_dir"] = f"{tmp}/run"
    return cfg.replace(**env)


def _tier(blocks: int, gb: float | None, gb_variable: str) -> str:
    """'400 blocks', '1525 blocks (DYN_KVBM_CPU_CACHE_GB=0.4)' or 'off'."""
    if not blocks:
        return "off"
    return f"{blocks} blocks" + (f" ({gb_variable}={gb:g})" if gb else "")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def _rate_mb(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f} MB/s" if seconds > 0 else "-"


def progress_line(st: SimStats, total: int, started: float) -> str:
    moved = st.bytes_loaded + st.bytes_stored
    return (f"\r[{st.requests:4d}/{total}] hit rate {st.hit_rate:6.1%}  "
            f"G2 {st.tokens_from_host:7d} tok  G3 {st.tokens_from_disk:6d} tok  "
            f"moved {_gb(moved)}  mismatches {st.mismatches}  {time.monotonic() - started:5.1f} s")


def object_tier_line(cfg: KvbmConfig, instance: str = "{worker_id}") -> str:
    """The demo's G4 header line: bucket, endpoint and how blocks get there."""
    how = "every block" if cfg.object_write_through else "blocks seen twice"
    bucket = cfg.object_bucket.replace("{worker_id}", instance)
    return f"object store (G4): bucket {bucket} at {cfg.object_endpoint or 'AWS S3 ' + cfg.object_region}, {how}"


def summary(st: SimStats, leader: LeaderStats, seconds: float, ranks: int) -> str:
    c = leader.counters
    disk = leader.disk_tier.counters if leader.disk_tier is not None else DiskCounters()
    rows = [
        ("requests", f"{st.requests}"),
        ("prompt tokens", f"{st.prompt_tokens}"),
        ("tokens from engine prefix cache (G1)", f"{st.tokens_local}"),
        ("tokens served from host pool (G2)", f"{st.tokens_from_host}"),
        ("tokens served from disk (G3)", f"{st.tokens_from_disk}"),
        ("tokens recomputed", f"{st.tokens_computed}"),
        ("external hit rate", f"{st.hit_rate:.1%}"),
        ("blocks offloaded G1->G2", f"{c.blocks_stored}"),
        ("blocks offloaded G2->G3", f"{disk.offloaded_blocks}"),
        ("blocks onboarded G2->G1", f"{st.blocks_loaded}"),
        ("blocks staged G3->G2", f"{disk.onboarded_blocks}"),
        ("host evictions / disk evictions", f"{c.host_evictions} / {c.disk_evictions}"),
        ("G1->G2 store copies", f"{_gb(st.bytes_stored)} at {_rate(st.bytes_stored, st.store_seconds)}"),
        ("G2->G1 load copies", f"{_gb(st.bytes_loaded)} at {_rate(st.bytes_loaded, st.load_seconds)}"),
        ("G2->G3 disk writes", f"{_gb(disk.bytes_written)} at {_rate(disk.bytes_written, disk.write_seconds)} per thread"),
        ("G3->G2 disk reads", f"{_gb(disk.bytes_read)} at {_rate(disk.bytes_read, disk.read_seconds)} per thread"),
        ("checksum failures (dropped, never served)", f"{disk.checksum_failures}"),
        *(_object_rows(leader.object_tier, st.tokens_from_object) if leader.object_tier is not None else []),
        ("bytes verified against the oracle", f"{_gb(st.bytes_loaded)} in {st.blocks_loaded} blocks x {ranks} ranks"),
        ("oracle mismatches (must be 0)", f"{st.mismatches}"),
        ("wall time", f"{seconds:.1f} s"),
    ]
    if leader.block_bytes:
        rows.insert(0, ("block size in the host pool", f"{leader.block_bytes} B"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _object_rows(tier: ObjectTierStats, tokens: int) -> list[tuple[str, str]]:
    """Summary rows of the object tier (G4)."""
    oc = tier.counters
    return [
        ("object tier (G4)", "on" if tier.enabled else "off (the leader's log says why)"),
        ("tokens served from the object store (G4)", f"{tokens}"),
        ("blocks put G2->G4 / staged G4->G2", f"{oc.offloaded_blocks} / {oc.onboarded_blocks}"),
        ("G2->G4 puts", f"{_gb(oc.bytes_written)} at {_rate_mb(oc.bytes_written, oc.write_seconds)} per thread"),
        ("G4->G2 gets", f"{_gb(oc.bytes_read)} at {_rate_mb(oc.bytes_read, oc.read_seconds)} per thread"),
        ("G4 put / get failures", f"{oc.write_failures} / {oc.read_failures}"),
    ]


class Interrupts:
    """Tells an interrupted demo from a failed one.

    Ctrl-C in a terminal sends SIGINT to the whole process group: the leader (which then exits
    with code 0) and the ranks (exit code 130) as well as this process. On a busy machine a child
    may exit, and this process see it die, before its own KeyboardInterrupt is raised. A death
    seen around a SIGINT is therefore the interruption, not an error: when a SIGINT reached this
    process (its C-level handler writes to a wakeup pipe at once, whichever thread it lands on and
    however late Python runs the handler), when the dead rank says it was interrupted, or when a
    SIGINT arrives within :data:`INTERRUPT_GRACE_S` of seeing the death.

    Use as a context manager around the run, in the main thread: it installs the SIGINT handler
    (KeyboardInterrupt, as Python's) and the wakeup pipe, and restores what was there.
    """

    def __init__(self, grace_s: float = INTERRUPT_GRACE_S) -> None:
        self.grace_s = grace_s
        self.seen = False
        self.raising = True  # False while stopping: a second Ctrl-C must not cut the clean-up short
        self._previous: Callable[[int, FrameType | None], object] | int | None = None
        self._previous_fd = -1
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Interrupts:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._previous_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        if self.raising:
            raise KeyboardInterrupt

    def arrived(self, timeout_s: float) -> bool:
        """Whether a SIGINT reached this process, waiting up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.seen:
                remaining = deadline - time.monotonic()
                if select.select([self._wake_r], [], [], max(0.0, remaining))[0]:
                    self.seen = signal.SIGINT in os.read(self._wake_r, 512)
                elif remaining <= 0:
                    break
        except KeyboardInterrupt:  # the handler ran meanwhile
            pass
        return self.seen

    def explain(self, sim: SimEngine) -> bool:
        """True when the error ``sim`` just raised is the interruption: a SIGINT came, or a child
        died and a rank says it was interrupted, or a SIGINT comes within the grace."""
        if self.arrived(0) or any(p.poll() == RANK_INTERRUPTED for p in sim.ranks):
            return True
        if sim.dead_rank() is None and sim.dead_leader() is None:
            return False  # no child died: an error of its own
        return self.arrived(self.grace_s)


def _interrupted() -> int:
    print("\ninterrupted: leader and ranks stopped, shared memory released", file=sys.stderr)
    return 130


def _local_s3() -> S3Server:
    from kvbm.bench.s3server import S3Server

    try:
        srv = S3Server()
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--object-store local: cannot start moto's S3 server ({e}); pip install 'moto[server]'")
    srv.create_bucket(LOCAL_BUCKET)
    return srv


def run(args: argparse.Namespace) -> int:
    if args.engine == "vllm" and args.object_store == "local":
        print("kvbm demo: error: --object-store local runs with --engine sim only (the vLLM CPU venv has no "
              "boto3); for --engine vllm set DYN_KVBM_OBJECT_* and pip install boto3 in that venv", file=sys.stderr)
        return 2
    if args.engine == "vllm":
        from kvbm.demo_vllm import run as run_vllm

        return run_vllm(args)
    args.conversations = 48 if args.conversations is None else args.conversations
    args.turns = 6 if args.turns is None else args.turns
    _check_args(args)
    # The demo reports the ranks' errors itself (SimError, each reason once): keep their logs quiet.
    os.environ.setdefault("KVBM_SIM_LOG", "CRITICAL")
    with Interrupts() as interrupts:
        return _run_sim(args, interrupts)


def _run_sim(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """The simulated engine's demo; exit code 0, 1 (a process died, or a mismatch), 2 or 130."""
    tmp = tempfile.mkdtemp(prefix="kvbm-demo-")
    s3 = None
    try:
        if args.object_store == "local":
            s3 = _local_s3()
        cfg = _config(args, tmp, s3.endpoint if s3 is not None else None)
        model = SimModel(num_layers=8, kv_heads=4, head_dim=64, block_size=BLOCK_SIZE, num_gpu_blocks=args.gpu_blocks)
        prompts = chat_workload(args.conversations, args.turns, system_tokens=SYSTEM_TOKENS,
                                turn_tokens=TURN_TOKENS, seed=args.seed)
        total = args.conversations * args.turns
        block_bytes = model.slice_bytes * args.ranks
        host = _tier(cfg.host_blocks(block_bytes), None if cfg.cpu_cache_num_blocks else cfg.cpu_cache_gb,
                     "DYN_KVBM_CPU_CACHE_GB")
        disk = _tier(cfg.disk_blocks(block_bytes), None if cfg.disk_cache_num_blocks else cfg.disk_cache_gb,
                     "DYN_KVBM_DISK_CACHE_GB")
        print(f"kvbm demo: leader + {args.ranks} rank processes, engine pool {args.gpu_blocks} blocks/rank, "
              f"host pool {host}, disk {disk}" + (f" in {cfg.disk_cache_dir}" if disk != "off" else ""))
        if cfg.object_enabled:
            print(object_tier_line(cfg))
        started = time.monotonic()
        sim = SimEngine(cfg, world_size=args.ranks, model=model, seed=args.seed)
        try:
            sim.start()
            sim.wait_ready()
            while True:
                chunk = list(itertools.islice(prompts, CHUNK))
                if not chunk:
                    break
                for prompt in chunk:
                    # One request at a time, each settled (every ack applied, every disk write
                    # done) before the next: a seed then gives the same figures on every run.
                    # Served concurrently, what is matchable would depend on when the leader
                    # applies acks and finishes G2->G3 writes relative to the next lookup.
                    sim.run([prompt])
                    sim.quiesce()
                if sys.stdout.isatty():
                    print(progress_line(sim.stats, total, started), end="", flush=True)
                elif sim.stats.requests % (CHUNK * 8) == 0:
                    print(progress_line(sim.stats, total, started).lstrip("\r"), flush=True)
            leader = sim.quiesce()
        except (SimError, LeaderStartError):
            if interrupts.explain(sim):
                raise KeyboardInterrupt from None
            # A dead process is the cause to name, not the wait it broke (e.g. an init sync).
            rank_gone, leader_gone = sim.dead_rank(), sim.dead_leader()
            if rank_gone is not None:
                raise RankDied(rank_gone) from None
            if leader_gone is not None:
                raise LeaderDied(leader_gone) from None
            raise
        finally:
            interrupts.raising = False  # stop everything, even on a second Ctrl-C
            leader_died = sim.dead_leader() is not None
            sim.stop()
            if leader_died:
                sweep_stale_segments()  # a killed leader cannot unlink its host pool
        print(progress_line(sim.stats, total, started).lstrip("\r") if not sys.stdout.isatty() else "")
        print("\nSummary")
        print(summary(sim.stats, leader, time.monotonic() - started, args.ranks))
        return 0 if sim.stats.mismatches == 0 else 1
    except (RankDied, LeaderDied, LeaderStartError) as e:  # a process died
        if interrupts.arrived(0):  # Ctrl-C while the demo stopped everything after the death
            return _interrupted()
        print(f"\nkvbm demo: error: {e}; leader and ranks stopped, shared memory released", file=sys.stderr)
        return 1
    except SimError as e:  # start-up: the leader's or the ranks' one-line reason, not a traceback
        print(f"kvbm demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        if s3 is not None:
            s3.kill()
        shutil.rmtree(tmp, ignore_errors=True)
