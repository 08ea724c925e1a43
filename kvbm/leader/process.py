"""The leader as a process: start-up (lock, stale sweeps, bind), run, clean shutdown.

Exit codes: 0 clean stop, 2 bad configuration or start-up error (the one-line reason is the
last line on stderr), 3 another leader already serves this instance.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.ipc.shm import sweep_stale_segments
from kvbm.ipc.transport import (
    check_bind_endpoint,
    ensure_private_dir,
    instance_endpoint,
)
from kvbm.ipc.names import safe_name

if TYPE_CHECKING:
    from kvbm.leader.server import LeaderServer

EXIT_ALREADY_RUNNING = 3
EXIT_START_ERROR = 2

log = logging.getLogger("kvbm.leader")


def lock_path(run_dir: str, instance: str) -> str:
    return os.path.join(run_dir, f"{safe_name(instance)}.lock")


DESCRIPTION = (
    "Run a kvbm leader: it owns the host pool (G2, POSIX shared memory) and the lower tiers of one "
    "engine instance. Run on its own (a sidecar next to the engine), its pool outlives the engine: "
    "engines started with DYN_KVBM_LEADER_ENDPOINT set to its --endpoint attach to it, and a "
    "restarted engine is served what the previous one stored. Configured by DYN_KVBM_* variables; "
    "SIGTERM or SIGINT stops it and frees the pool. Exit status: 0 stopped, 2 start-up error, "
    "3 the instance already has a leader."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The leader's command-line options (``kvbm leader`` and ``python -m kvbm.leader``)."""
    parser.add_argument("--instance", required=True, help="instance name (unique per engine)")
    parser.add_argument("--endpoint", default=None,
                        help="ZMQ address to bind (default: DYN_KVBM_LEADER_ENDPOINT, else an ipc socket in the run dir)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")


def main(argv: list[str] | None = None) -> int:
    """``python -m kvbm.leader``: parse ``argv`` and :func:`run`."""
    parser = argparse.ArgumentParser(prog="kvbm leader", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``kvbm leader``: the same process as ``python -m kvbm.leader``."""
    parser = subparsers.add_parser("leader", help="run a leader on its own (a pool that outlives its engine)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Serve until stopped; returns the exit status."""
    try:
        cfg = load_config()
    except ConfigError as e:
        print(f"kvbm leader: error: {e}", file=sys.stderr)
        return EXIT_START_ERROR
    # force: under the ``kvbm`` command the root logger is already set up (warnings only).
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s kvbm-leader %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    try:
        ensure_private_dir(cfg.run_dir)
        endpoint = args.endpoint or cfg.leader_endpoint or instance_endpoint(cfg.run_dir, args.instance)
        check_bind_endpoint(endpoint, cfg.allow_non_loopback)
    except (OSError, PermissionError) as e:
        print(f"kvbm leader: error: {e}", file=sys.stderr)
        return EXIT_START_ERROR
    # One leader per instance: whoever holds the lock serves; a second spawner backs off.
    lock_fd = os.open(lock_path(cfg.run_dir, args.instance), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"kvbm leader: instance {args.instance!r} already has a running leader", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    # The lock file names the leader holding it, so a spawner can tell its own leader from
    # one that already answered on the same endpoint (kvbm.leader.spawn).
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
    sweep_stale_segments()
    if cfg.has_disk_tier:
        from kvbm.leader.disk import sweep_stale_disk_files

        sweep_stale_disk_files(cfg.disk_cache_dir)
    from kvbm.leader.server import LeaderServer

    try:
        server = LeaderServer(cfg, args.instance, endpoint, parent_pid=args.parent_pid)
    except Exception as e:  # bind errors and the like: one clear line for the spawner
        print(f"kvbm leader: error: cannot start on {endpoint}: {e}", file=sys.stderr)
        return EXIT_START_ERROR
    sinks = _start_observability(server, cfg)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("leader %s listening on %s (pid %d)", args.instance, endpoint, os.getpid())
    try:
        server.serve_forever()
    finally:
        for close in sinks:
            close()
        server.close()
        if endpoint.startswith("ipc://"):
            try:
                os.unlink(endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
        os.close(lock_fd)
        log.info("leader %s stopped", args.instance)
    return 0


def _start_observability(server: LeaderServer, cfg: KvbmConfig) -> list[Callable[[], None]]:
    """Start what the configuration asks for (metrics, KV events); returns their close calls.

    Neither is fatal: a busy port or a refused endpoint is logged and the leader serves on.
    """
    closers: list[Callable[[], None]] = []
    if cfg.metrics_enabled:
        from kvbm.leader.metrics import start_leader_metrics

        http = start_leader_metrics(server, cfg)
        if http is not None:
            closers.append(http.close)
    if cfg.kv_events_endpoint:
        from kvbm.leader.events import start_leader_events

        pub = start_leader_events(server, cfg)
        if pub is not None:
            closers.append(pub.close)
    return closers


if __name__ == "__main__":
    sys.exit(main())
