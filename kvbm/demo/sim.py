"""``kvbm demo`` (``--engine sim``): a leader, TP ranks and a multi-turn chat workload on the simulated engine.

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
from kvbm.demo.report import object_tier_line, progress_line, sim_summary
from kvbm.ipc.shm import sweep_stale_segments
from kvbm.leader.spawn import LeaderStartError
from kvbm.testing.sim.engine import LeaderDied, RankDied, SimEngine, SimError, chat_workload
from kvbm.testing.sim.rank import SimModel

if TYPE_CHECKING:
    from kvbm.testing.s3server import S3Server

CHUNK = 8  # prompts between two progress updates
BLOCK_SIZE = 16
SYSTEM_TOKENS = 256  # shared system prompt that opens each conversation
TURN_TOKENS = 96  # tokens each turn adds
LOCAL_BUCKET = "kvbm-demo"  # --object-store local
RANK_INTERRUPTED = 130  # a rank's exit code when Ctrl-C stopped it (kvbm.testing.sim.rank)
# After a child's death, how long a Ctrl-C may still arrive here and make it an interruption. The
# group's SIGINT is pending in this process once a child has exited of it; this only covers its
# delivery to the main thread.
INTERRUPT_GRACE_S = 0.5


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
    from kvbm.testing.s3server import S3Server

    try:
        return S3Server(LOCAL_BUCKET)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--object-store local: cannot start moto's S3 server ({e}); pip install 'moto[server]'")


def run(args: argparse.Namespace) -> int:
    """``kvbm demo --engine sim``: its exit status."""
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
        print(sim_summary(sim.stats, leader, time.monotonic() - started, args.ranks))
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
