"""The leader's transport: one ZMQ ROUTER loop around the socket-free :class:`LeaderCore`.

Ranks (TP workers) and scheduler-side clients send requests; this module decodes and validates
each frame (a bad one gets an ErrorReply and changes nothing), hands the message with the time
to the core, and sends what the core returns. It also runs the timers (the core's ``tick``) and
applies disk and object-store completions when their threads wake the loop. IndexSince long-polls
the core parked are answered at the end of each loop round, once the index moved or their wait ended. All block state, and the rule that
a block is matchable only after every rank acknowledged it, live in :mod:`kvbm.leader.core`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import zmq

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.leader.core import LeaderCore, LeaderState
from kvbm.leader.replies import Outbound
from kvbm.leader.storage import StorageFactory, shm_storage

__all__ = ["LeaderServer", "LeaderState"]

log = logging.getLogger(__name__)


class LeaderServer:
    """Serve one engine instance until :meth:`stop` (or a Shutdown message)."""

    def __init__(
        self,
        config: KvbmConfig,
        instance: str,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        parent_pid: int | None = None,
        storage: StorageFactory | None = None,
    ) -> None:
        """``storage`` replaces the shared-memory pool and disk file (default: :func:`shm_storage`)."""
        self.instance = instance
        self.endpoint = endpoint
        self.clock = clock
        self.parent_pid = parent_pid
        self._grace_s = config.leader_grace_s
        # Since when the parent is gone and no rank is alive (None: not orphaned, or ranks alive).
        self._idle_since: float | None = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.core = LeaderCore(config, storage or shm_storage(config, instance, self._notify), now=clock())
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Drop a peer that sends a frame over the protocol's limit before buffering it (memory bound).
        self._sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_FRAME_BYTES)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._close_fds()
            raise

    # ------------------------------------------------------------------------------------
    # loop

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = 0.0
        while not self._stop:
            ready = dict(poller.poll(50))
            if self._sock in ready:  # requests first: a waiting client is not kept behind housekeeping
                self._serve_waiting()
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            self.core.apply_io(self.clock())
            now = self.clock()
            if now >= next_tick:
                self._periodic(now)
                next_tick = now + 0.05
            # After everything above that may have moved the index; also expires waits at the
            # loop's poll granularity (50 ms at most).
            self._send(self.core.answer_polls(now))
        self._send(self.core.answer_polls(None))  # parked long-polls are answered, not left to time out

    def _serve_waiting(self) -> None:
        """Serve the requests waiting, up to a bounded batch (then the loop's periodic work runs).

        Frame by frame rather than ``recv_multipart``: that asks the socket for RCVMORE after
        each frame (a getsockopt, several microseconds in pyzmq), where a zero-copy frame knows
        whether more follow. A ROUTER delivers a message whole, so the frames after the
        identity never block.
        """
        sock = self._sock
        for _ in range(256):
            try:
                identity = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            part = sock.recv(copy=False)
            frames = [part.bytes]
            while part.more:  # a malformed request; handle() rejects it
                part = sock.recv(copy=False)
                frames.append(part.bytes)
            self.handle(identity, frames)

    def stop(self) -> None:
        self._stop = True
        self._notify()

    def close(self) -> None:
        """Release everything: disk file, host pool segment (unlinked), socket."""
        self.core.close()
        self._sock.close(0)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _notify(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def _periodic(self, now: float) -> None:
        self._send(self.core.tick(now))
        if self.parent_pid is None or _alive(self.parent_pid):
            return
        if self._grace_s <= 0:
            log.warning("parent process %d is gone; leader shutting down", self.parent_pid)
            self._stop = True
            return
        # DYN_KVBM_LEADER_GRACE_SECS: the pool waits for a restarted engine (its connector finds
        # this leader holding the instance lock and attaches). Ranks alive keep it, whoever's.
        if self.core.live_ranks():
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
            log.warning("parent process %d is gone and no rank is attached; keeping the pool for %g s "
                        "(DYN_KVBM_LEADER_GRACE_SECS)", self.parent_pid, self._grace_s)
        elif now - self._idle_since >= self._grace_s:
            log.warning("no engine attached within DYN_KVBM_LEADER_GRACE_SECS=%g s of its parent %d exiting; "
                        "leader shutting down", self._grace_s, self.parent_pid)
            self._stop = True

    # ------------------------------------------------------------------------------------
    # dispatch

    def handle(self, identity: bytes, frames: list[bytes]) -> None:
        """Validate and serve one request; never raises for bad input."""
        if len(frames) != 1:
            self._send([Outbound(identity, 0, self.core.reject("bad_request", f"expected 1 frame, got {len(frames)}"))])
            return
        try:
            request_id, msg = m.decode(frames[0])
        except m.ProtocolError as e:
            self._send([Outbound(identity, 0, self.core.reject("bad_request", str(e)))])
            return
        self._send(self.core.handle(identity, request_id, msg, self.clock()))
        if self.core.stop_requested:
            self._stop = True

    def _send(self, out: list[Outbound]) -> None:
        sock = self._sock
        for o in out:
            frame = m.encode(o.message, o.request_id)
            try:  # two sends: cheaper than send_multipart's per-frame bookkeeping
                sock.send(o.peer, zmq.SNDMORE | zmq.NOBLOCK)
                sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # peer gone; nothing to do


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
