"""A rank's agent: init sync with the leader, host-pool mapping, copies and acks.

Everything runs off the caller's thread: :meth:`RankAgent.start` returns at once (vLLM
registers KV caches before the leader exists); a socket thread registers the layout, maps
the pool when granted, heartbeats, and sends acks; a copy thread runs the copies. The engine
side submits ops and collects finished ones with :meth:`take_finished`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import zmq

from kvbm.ipc import messages as m
from kvbm.ipc.block_format import HeadSplit, Placement
from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError
from kvbm.worker.copy import CopyEngine, Direction, NumpyCopyEngine
from kvbm.worker.layout import EngineKV, KVSource, host_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """A completed op on this rank."""

    op_id: int
    kind: Direction  # a str enum: compares equal to "store" / "load"
    ok: bool
    error: str = ""
    copied: bool = True  # False: a replicated world's store that another rank copies


@dataclass(frozen=True)
class RankIdentity:
    rank: int
    world_size: int
    block_size: int
    fingerprint: str
    # Every rank holds the same KV (MLA's latent cache): the world keeps one copy of each block,
    # written by one rank and loaded by all.
    replicated: bool = False
    # The rank's KV heads among the model's (MHA/GQA split over TP): with every rank's heads
    # known, the world keeps its blocks in the TP-independent heads format.
    heads: HeadSplit | None = None


@dataclass(frozen=True)
class _Flush:
    """A marker in the outbox: ``done`` is set once the leader answered what follows the
    reports queued before it (one socket, handled in order, so it applied them)."""

    done: threading.Event


@dataclass(frozen=True)
class _CopyJob:
    """One op for the copy thread (the lists are copies: the caller may reuse its own)."""

    direction: Direction
    op_id: int
    engine_blocks: list[int]
    slots: list[int]


CopyEngineFactory = Callable[[Any, HostPool, Placement], CopyEngine]


def numpy_engine(kv: EngineKV, pool: HostPool, placement: Placement) -> CopyEngine:
    """The CPU copy engine (the default factory)."""
    return NumpyCopyEngine(kv, host_view(pool.array, placement, kv.layout))


class RankAgent:
    """One TP rank's connection to the leader and its copy worker."""

    def __init__(
        self,
        endpoint: str,
        ident: RankIdentity,
        kv: KVSource,
        *,
        init_timeout_s: float,
        heartbeat_interval_s: float = 0.25,
        liveness_timeout_s: float = 1.5,
        engine_factory: CopyEngineFactory = numpy_engine,
    ) -> None:
        self.endpoint = endpoint
        self.ident = ident
        self.kv = kv
        self.init_timeout_s = init_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_timeout_s = liveness_timeout_s
        self._engine_factory = engine_factory
        self.pool: HostPool | None = None
        self.engine: CopyEngine | None = None
        self.writes_stores = True  # the leader's grant says; False: another rank copies the one slice
        self.error: str | None = None
        self._ready = threading.Event()
        self._done = threading.Event()  # init finished, successfully or not
        self._stop = threading.Event()
        self._outbox: queue.SimpleQueue[m.Message | _Flush] = queue.SimpleQueue()
        self._flushes: dict[int, threading.Event] = {}  # heartbeat request id -> flush waiting for it
        self._finished: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[_CopyJob | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._last_ack = 0.0
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin the init sync in the background; never blocks."""
        for target, name in ((self._socket_loop, "sock"), (self._copy_loop, "copy")):
            t = threading.Thread(target=target, name=f"kvbm-rank{self.ident.rank}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until init finished (True if ready; False on error or timeout)."""
        self._done.wait(timeout_s)
        return self.ready

    @property
    def leader_alive(self) -> bool:
        return self.ready and time.monotonic() - self._last_ack < self.liveness_timeout_s

    def close(self) -> None:
        """Stop the threads (in-flight copies finish first) and unmap the pool."""
        self._stop.set()
        self._jobs.put(None)
        self._wake()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._release_pool()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- engine-facing API ---------------------------------------------------------------
    def submit_store(self, op_id: int, engine_blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Store (G1 -> G2, d2h) engine blocks into host slots (after the engine wrote them), then ack."""
        self._jobs.put(_CopyJob(Direction.STORE, op_id, list(engine_blocks), list(slots)))

    def submit_load(self, op_id: int, slots: Sequence[int], engine_blocks: Sequence[int]) -> None:
        """Load (G2 -> G1, h2d) host slots into engine blocks, then ack the leader."""
        self._jobs.put(_CopyJob(Direction.LOAD, op_id, list(engine_blocks), list(slots)))

    def report(self, op_id: int, ok: bool, error: str = "", stored: Sequence[int] | None = None) -> None:
        """Report this rank's part of op ``op_id`` as done (or failed) to the leader, for an
        adapter that copies on its own thread (SGLang's storage calls) instead of submitting here.
        ``stored`` (a store, ``ok``, not empty): the only slots of the op this rank stored."""
        packed = m.pack_slots(stored) if stored is not None and ok else b""
        self._outbox.put(m.TransferDone(self.ident.rank, op_id, ok, error[:1000], packed))
        self._wake()

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the leader applied every report made so far; False
        if it did not answer in time."""
        done = threading.Event()
        self._outbox.put(_Flush(done))
        self._wake()
        return done.wait(timeout_s)

    def take_finished(self, wait_s: float = 0.0) -> list[Finished]:
        """The copies finished since the last call; with ``wait_s``, wait up to that long for the
        first one when none has (the caller blocks on a queue, the GIL released to the copy thread)."""
        out = []
        if wait_s > 0:
            try:
                out.append(self._finished.get(timeout=wait_s))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                return out

    # -- copy thread ---------------------------------------------------------------------
    def _copy_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ok, error = True, ""
            try:
                if self.engine is None:
                    raise RuntimeError(self.error or "host pool not attached yet")
                # The whole op is one batch: the engine coalesces it into runs (fewest, largest copies).
                if job.direction is Direction.STORE and not self.writes_stores:
                    # A replicated world: the writer rank copies these very bytes and the leader
                    # waits for its report alone. Done here, so the engine may free the blocks
                    # once every rank said so (the writer says so only after its copy).
                    self._finished.put(Finished(job.op_id, job.direction, True, copied=False))
                    continue
                if job.direction is Direction.STORE:
                    self.engine.store(job.engine_blocks, job.slots)
                else:
                    self.engine.load(job.slots, job.engine_blocks)
            except Exception as e:  # a failed copy is reported, never silently "done"
                ok, error = False, f"{type(e).__name__}: {e}"
                log.error("rank %d: %s op %d failed: %s", self.ident.rank, job.direction.value, job.op_id, error)
            self._finished.put(Finished(job.op_id, job.direction, ok, error))
            self._outbox.put(m.TransferDone(self.ident.rank, job.op_id, ok, error[:1000]))
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- socket thread -------------------------------------------------------------------
    def _socket_loop(self) -> None:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                self._init_sync(sock)
                if self.error is not None or not self._serve(sock):
                    break
                self._detach()  # a new leader asked us to register again
        except Exception as e:  # keep the engine alive; report through .error
            self.error = f"rank {self.ident.rank}: kvbm agent crashed: {type(e).__name__}: {e}"
            log.exception("%s", self.error)
        finally:
            self._done.set()
            sock.close()

    def _recv(self, sock: zmq.Socket, deadline: float) -> tuple[int, m.Message] | None:
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if sock.poll(int(min(remaining, 0.1) * 1000) + 1):
                try:
                    return m.decode(sock.recv())
                except m.ProtocolError as e:
                    log.warning("rank %d: dropping a malformed frame from the leader: %s", self.ident.rank, e)
        return None

    def _init_sync(self, sock: zmq.Socket) -> None:
        deadline = time.monotonic() + self.init_timeout_s
        lay = self.kv.layout
        heads = self.ident.heads
        if heads is not None and heads.region_bytes(self.ident.block_size) != lay.region_bytes:
            self.error = (f"rank {self.ident.rank}: KV regions of {lay.region_bytes} B are not {heads.count} heads x "
                          f"{self.ident.block_size} tokens x {heads.head_bytes} B")
            log.error("%s", self.error)
            return
        reg = m.RegisterRank(
            rank=self.ident.rank, world_size=self.ident.world_size, num_layers=lay.num_layers,
            slice_bytes=lay.slice_bytes, dtype=lay.dtype, engine_layout=f"{lay.outer}x{lay.region_bytes}",
            block_size=self.ident.block_size, fingerprint=self.ident.fingerprint, pid=os.getpid(),
            replicated=self.ident.replicated,
            # No heads named (kv_heads 0): the rank's slice is opaque bytes.
            kv_heads=heads.total if heads else 0, first_head=heads.first if heads else 0,
            num_heads=heads.count if heads else 0, head_bytes=heads.head_bytes if heads else 0,
            head_major=heads.head_major if heads else False,
        )
        step = "receive the host pool from the leader (other ranks or the leader may be missing)"
        reg_id = next(self._ids)
        sock.send(m.encode(reg, reg_id))
        # Re-send the registration while nobody answers: the leader may start after us.
        next_resend = time.monotonic() + 1.0
        grant: m.PoolGrant | None = None
        while grant is None:
            got = self._recv(sock, min(deadline, next_resend))
            if got is None:
                if self._stop.is_set():
                    return
                if time.monotonic() >= deadline:
                    self._fail_init(step)
                    return
                if self._last_ack == 0.0:
                    sock.send(m.encode(reg, reg_id))
                next_resend = time.monotonic() + 1.0
                continue
            rid, msg = got
            if rid != reg_id:
                continue  # a late reply to a heartbeat sent to a previous leader
            if isinstance(msg, m.ErrorReply):
                self._refused(msg)
                return
            self._last_ack = time.monotonic()  # the leader is there; stop re-sending
            if isinstance(msg, m.PoolGrant):
                grant = msg
        try:
            geometry = PoolGeometry(grant.num_blocks, grant.block_bytes)
            self.pool = HostPool.attach(grant.segment, geometry)
            if grant.heads and heads is not None:
                placement = Placement.heads(heads, self.ident.block_size)
            else:
                placement = Placement.sliced(grant.slice_offset, lay.region_bytes)
            self.engine = self._engine_factory(self.kv, self.pool, placement)
            self.writes_stores = grant.stores
        except (ShmError, ValueError, RuntimeError) as e:
            self._fail_init(f"attach the host pool: {e}")
            return
        attach_id = next(self._ids)
        sock.send(m.encode(m.PoolAttached(self.ident.rank), attach_id))
        while True:
            got = self._recv(sock, deadline)
            if got is None:
                if not self._stop.is_set():
                    self._fail_init("receive 'ready' from the leader after attaching the pool")
                return
            if got[0] != attach_id:
                continue
            msg = got[1]
            if isinstance(msg, m.ErrorReply):
                self._refused(msg)
                return
            if isinstance(msg, m.LeaderReady):
                break
        self._last_ack = time.monotonic()
        self._ready.set()
        self._done.set()
        log.info("rank %d ready: host pool %s mapped (%d blocks)", self.ident.rank, grant.segment, grant.num_blocks)

    def _fail_init(self, step: str) -> None:
        self.error = (
            f"rank {self.ident.rank}/{self.ident.world_size}: kvbm init sync with the leader at {self.endpoint} "
            f"did not complete within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS={self.init_timeout_s:g} s: "
            f"could not {step}"
        )
        log.error("%s", self.error)
        self._done.set()

    def _refused(self, reply: m.ErrorReply) -> None:
        """The leader gave up on init: its one line is the error (not an init timeout of ours).

        A cache the leader cannot create is the same line for every rank: rank 0 logs it, the
        others only keep it as their ``error``, so a TP world shows it once. Other refusals
        (the leader's own init deadline, a layout mismatch) are logged by each rank.
        """
        self.error = f"rank {self.ident.rank}/{self.ident.world_size}: kvbm leader at {self.endpoint}: {reply.message}"
        once = reply.code == "init_failed" and self.ident.rank != 0
        log.log(logging.DEBUG if once else logging.ERROR, "%s", self.error)
        self._done.set()

    def _detach(self) -> None:
        log.warning("rank %d: the leader restarted; registering again", self.ident.rank)
        self._ready.clear()
        self._done.clear()
        self._release_pool()
        self._last_ack = 0.0

    def _release_pool(self) -> None:
        """Close the copy engine (a GPU one unpins the pool) before unmapping the pool."""
        engine, self.engine = self.engine, None
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _serve(self, sock: zmq.Socket) -> bool:
        """Heartbeats and acks until stopped (False) or a new leader wants a re-registration (True)."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                sock.send(m.encode(m.Heartbeat(self.ident.rank), next(self._ids)), zmq.NOBLOCK)
                next_beat = now + self.heartbeat_interval_s
            ready = dict(poller.poll(int(self.heartbeat_interval_s * 1000)))
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            while True:
                try:
                    out = self._outbox.get_nowait()
                except queue.Empty:
                    break
                rid = 0
                if isinstance(out, _Flush):  # a heartbeat whose answer marks the reports before it applied
                    rid = next(self._ids)
                    self._flushes[rid] = out.done
                    out = m.Heartbeat(self.ident.rank)
                try:
                    sock.send(m.encode(out, rid), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # leader gone; it settles the op when it notices
            while sock in ready and sock.poll(0):
                try:
                    rid, msg = m.decode(sock.recv())
                except m.ProtocolError:
                    continue
                flushed = self._flushes.pop(rid, None)
                if flushed is not None:
                    flushed.set()
                if isinstance(msg, m.ErrorReply) and msg.code == "not_registered":
                    return True
                self._last_ack = time.monotonic()
        return False
