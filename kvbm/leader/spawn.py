"""Spawning and stopping a leader process from the engine side."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.ipc.transport import (
    LeaderUnavailable,
    RemoteError,
    RpcClient,
    ensure_private_dir,
    instance_endpoint,
)
from kvbm.ipc.names import safe_name
from kvbm.leader.process import EXIT_ALREADY_RUNNING, lock_path

log = logging.getLogger(__name__)


LAST_LOG_NAME = "last-leader.log"
"""The log of the last leader stopped, kept in the run dir (a running leader's log is
``<run dir>/<instance>.<spawner pid>.log``)."""


class LeaderStartError(RuntimeError):
    """The leader process exited at start-up; the message is the leader's own error."""


@dataclass
class LeaderProcess:
    """A leader this process spawned (``popen`` set) or found already running (``popen`` None)."""

    instance: str
    endpoint: str
    popen: subprocess.Popen[bytes] | None
    log_path: str | None

    @property
    def spawned(self) -> bool:
        return self.popen is not None

    def alive(self) -> bool:
        return self.popen is None or self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask our leader to shut down; terminate, then kill it if it does not. No-op if not ours.

        Its log is kept as ``<run dir>/last-leader.log``.
        """
        if self.popen is None:
            return
        if self.popen.poll() is None:
            client = RpcClient(self.endpoint)
            try:
                client.call(m.Shutdown(), 0.5, m.Ack)
            except (LeaderUnavailable, RemoteError):
                # The Ack can be lost when the leader closes its socket right after sending
                # it; terminate only a leader that is still running.
                if self.popen.poll() is None:
                    self.popen.terminate()
            finally:
                client.close()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("leader %s did not stop in %.0f s; killing it", self.instance, timeout_s)
                self.popen.kill()
                self.popen.wait()
        if self.log_path:
            self._keep_log(self.log_path)
            self.log_path = None

    def _keep_log(self, path: str) -> None:
        """Keep the stopped leader's log as ``<run dir>/last-leader.log`` (replacing the previous
        one, so logs never pile up); warn with its path if the leader did not exit cleanly."""
        kept = os.path.join(os.path.dirname(path), LAST_LOG_NAME)
        try:
            os.replace(path, kept)
        except FileNotFoundError:
            return
        code = self.popen.returncode if self.popen is not None else 0
        if code:
            log.warning("kvbm leader %s exited with %s; its log: %s", self.instance,
                        f"signal {-code}" if code < 0 else f"code {code}", kept)


THREAD_PLACEMENT_VARS = frozenset({"GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES"})
"""OpenMP runtimes bind the process's main thread at start-up by these; vLLM's CPU platform sets
``GOMP_CPU_AFFINITY`` to its compute cores and preloads libgomp into every child process."""


def release_cpu_binding(pid: int) -> None:
    """Let process ``pid`` run on every CPU the machine (its cpuset) allows.

    A spawned leader inherits its spawner's CPU binding, and the spawner is often an engine
    process bound to the cores of its compute threads (vLLM's CPU worker, by
    ``VLLM_CPU_OMP_THREADS_BIND``). Confined there, the leader waits behind those threads'
    spinning: measured on 2 cores, a restarted engine's first load stalled 5 s in the leader and
    vLLM failed the request. Called right after the spawn, before the leader starts any thread
    (threads inherit the mask of the thread that starts them); the spawn also drops
    :data:`THREAD_PLACEMENT_VARS`, or a preloaded OpenMP runtime binds the leader again.
    """
    if not hasattr(os, "sched_setaffinity"):  # not Linux
        return
    try:  # the kernel keeps the part of the mask that the cpuset allows
        os.sched_setaffinity(pid, range(os.cpu_count() or 1))
    except OSError as e:
        log.info("kvbm: the leader (pid %d) keeps its spawner's CPU binding: %s", pid, e)


def _tail(path: str | None, lines: int = 5) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return ""
    errors = [line for line in text if "error" in line.lower()]
    return (errors[-1] if errors else "\n".join(text[-lines:])).strip()


def _lock_holder(run_dir: str, instance: str) -> int | None:
    """Pid written into the instance lock file by the leader holding it (None if unknown)."""
    try:
        with open(lock_path(run_dir, instance)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def spawn_leader(
    config: KvbmConfig,
    instance: str,
    *,
    endpoint: str | None = None,
    wait_s: float = 30.0,
    parent_pid: int | None = None,
) -> LeaderProcess:
    """Start ``python -m kvbm.leader`` for ``instance`` and wait until it answers.

    It waits for the leader to *listen*, not to be ready: readiness needs the ranks.
    If a leader for the instance is already running (another spawner won the race), returns
    a handle to that one that does not own it. Raises LeaderStartError with the leader's own
    message if it exits at start-up.
    """
    endpoint = endpoint or config.leader_endpoint or instance_endpoint(config.run_dir, instance)
    # The leader gets exactly this configuration, not whatever DYN_KVBM_* we inherited, nor the
    # engine's placement of its compute threads (see release_cpu_binding).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_") and k not in THREAD_PLACEMENT_VARS}
    env.update(config.to_env())
    # One log per instance in the private run dir (not a new temp file per start): a leader
    # killed with its spawner leaves at most this file behind, and the next start reuses it.
    ensure_private_dir(config.run_dir)
    log_path = os.path.join(config.run_dir, f"{safe_name(instance)}.{os.getpid()}.log")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    cmd = [sys.executable, "-m", "kvbm.leader", "--instance", instance, "--endpoint", endpoint,
           "--parent-pid", str(parent_pid if parent_pid is not None else os.getpid())]
    popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True)
    os.close(fd)
    release_cpu_binding(popen.pid)
    handle = LeaderProcess(instance, endpoint, popen, log_path)
    client = RpcClient(endpoint)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            code = popen.poll()
            if code is not None:
                reason = _tail(log_path)
                os.unlink(log_path)
                handle.log_path = None
                if code == EXIT_ALREADY_RUNNING:
                    log.info("a leader for %s is already running; using it", instance)
                    return LeaderProcess(instance, endpoint, None, None)
                raise LeaderStartError(reason or f"leader exited with code {code}")
            try:
                client.call(m.GetStatus(), 0.2, m.Status)
                # Another spawner's leader may be the one answering while ours is still
                # starting (it will find the lock taken and exit): ours only if it holds the lock.
                if _lock_holder(config.run_dir, instance) == popen.pid:
                    log.info("kvbm leader %s (pid %d) logs to %s", instance, popen.pid, log_path)
                    return handle
            except LeaderUnavailable:
                pass
            if time.monotonic() > deadline:
                handle.stop()
                raise LeaderStartError(f"leader for {instance} did not answer within {wait_s:g} s")
            time.sleep(0.02)
    finally:
        client.close()
