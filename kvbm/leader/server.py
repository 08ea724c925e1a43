"""The leader: one ZMQ ROUTER loop that owns all block state of one engine instance.

Ranks (TP workers) register their layout; when the whole world has reported, the leader
sizes and creates the host pool, grants it to every rank, and becomes ready once all have
mapped it. It then serves the scheduler-side client (match, load, store) and applies the
ranks' completions. It is the single source of truth: a store becomes matchable only after
every rank acknowledged its copy.

Every frame is validated before use; a bad one gets an ErrorReply and changes nothing.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import zmq

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.ipc.shm import HostPool, PoolGeometry, ShmError
from kvbm.leader.admission import FrequencyFilter
from kvbm.leader.ops import Op, OpKind
from kvbm.leader.registry import BlockEvent, BlockRegistry, Tier
from kvbm.leader.world import LayoutMismatch, World

if TYPE_CHECKING:
    from kvbm.leader.tiering import DiskTier

log = logging.getLogger(__name__)

OP_TIMEOUT_S = 300.0  # an op nobody completes (a client bug) is released after this
MAX_EVENT_BACKLOG = 100_000
_EVENT_KIND = {"stored": 0, "removed": 1, "cleared": 2}


class LeaderState(enum.Enum):
    WAITING = "waiting"  # init sync in progress
    READY = "ready"
    DEGRADED = "degraded"  # a rank is dead: no new ops until it comes back
    FAILED = "failed"  # init failed; the error says why


class RequestRejected(Exception):
    """A well-formed request that cannot be served; becomes an ErrorReply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LeaderCounters:
    """Plain counters; metrics and stats replies are views of these."""

    match_requests: int = 0
    match_blocks_queried: int = 0
    match_host_blocks: int = 0
    match_disk_blocks: int = 0
    stores_committed: int = 0
    stores_aborted: int = 0
    blocks_stored: int = 0  # G1 -> G2 (offload d2h)
    loads_completed: int = 0
    loads_failed: int = 0
    blocks_loaded: int = 0  # G2 -> G1 (onboard h2d)
    blocks_loaded_from_disk: int = 0  # G3 -> G1 via G2 staging (onboard d2d)
    host_evictions: int = 0
    disk_evictions: int = 0
    rejected_messages: int = 0


class LeaderObserver(Protocol):
    """Hooks for metrics and KV-event publishers; called on the leader's loop thread."""

    def on_match(self, queried: int, host: int, disk: int, block_size: int) -> None:
        """One lookup: blocks asked about, found in G2, found in G3 after that."""

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        """A finished transfer. direction: "d2h" (G1->G2 store), "h2d" (G2->G1 load),
        "h2disk" (G2->G3 offload), "disk2h" (G3->G2 staging)."""

    def on_events(self, events: list[BlockEvent]) -> None:
        """Block registrations and removals (both tiers), in order."""


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
    ) -> None:
        self.config = config
        self.instance = instance
        self.endpoint = endpoint
        self.clock = clock
        self.parent_pid = parent_pid
        self.state = LeaderState.WAITING
        self.error = ""
        self.world = World()
        self.registry: BlockRegistry | None = None
        self.pool: HostPool | None = None
        self.disk: DiskTier | None = None
        self.counters = LeaderCounters()
        self.events: deque[BlockEvent] = deque(maxlen=MAX_EVENT_BACKLOG)
        self.observers: list[LeaderObserver] = []
        self._ops: dict[int, Op] = {}
        self._op_ids = itertools.count(1)
        self._started = clock()
        self._deadline = self._started + config.init_timeout_s
        self._stop = False
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Drop a peer that sends a frame over the protocol's limit before buffering it (memory bound).
        self._sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_FRAME_BYTES)
        self._sock.bind(endpoint)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._handlers: dict[type[m.Message], Callable[[bytes, int, m.Message], m.Message | None]] = {
            m.RegisterRank: self._on_register,
            m.PoolAttached: self._on_attached,
            m.Heartbeat: self._on_heartbeat,
            m.TransferDone: self._on_transfer_done,
            m.GetStatus: self._on_status,
            m.Match: self._on_match,
            m.PrepareLoad: self._on_prepare_load,
            m.PollLoads: self._on_poll_loads,
            m.AllocateStore: self._on_allocate_store,
            m.ReleaseOp: self._on_release_op,
            m.GetStats: self._on_stats,
            m.TakeEvents: self._on_take_events,
            m.ResetCache: self._on_reset_cache,
            m.Shutdown: self._on_shutdown,
        }

    # ------------------------------------------------------------------------------------
    # loop

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = 0.0
        while not self._stop:
            ready = dict(poller.poll(50))
            if self._sock in ready:
                for _ in range(256):  # bounded batch, then let periodic work run
                    try:
                        identity, *frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(identity, frames)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            self._apply_disk_completions()
            now = self.clock()
            if now >= next_tick:
                self._periodic(now)
                next_tick = now + 0.05

    def stop(self) -> None:
        self._stop = True
        self._notify()

    def close(self) -> None:
        """Release everything: disk file, host pool segment (unlinked), socket."""
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self._sock.close(0)
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

    # ------------------------------------------------------------------------------------
    # dispatch

    def handle(self, identity: bytes, frames: list[bytes]) -> None:
        """Validate and serve one request; never raises for bad input."""
        if len(frames) != 1:
            self.counters.rejected_messages += 1
            self._reply(identity, 0, m.ErrorReply("bad_request", f"expected 1 frame, got {len(frames)}"))
            return
        try:
            request_id, msg = m.decode(frames[0])
        except m.ProtocolError as e:
            self.counters.rejected_messages += 1
            self._reply(identity, 0, m.ErrorReply("bad_request", str(e)))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:  # a reply type (or another message the leader never receives)
            self.counters.rejected_messages += 1
            self._reply(identity, request_id, m.ErrorReply("bad_request", f"{msg.TAG} is not a request"))
            return
        try:
            reply = handler(identity, request_id, msg)
        except RequestRejected as e:
            self.counters.rejected_messages += 1
            reply = m.ErrorReply(e.code, str(e))
        except m.ProtocolError as e:
            self.counters.rejected_messages += 1
            reply = m.ErrorReply("bad_request", str(e))
        if reply is not None:
            self._reply(identity, request_id, reply)
        self._flush_events()

    def _reply(self, identity: bytes, request_id: int, msg: m.Message) -> None:
        try:
            self._sock.send_multipart([identity, m.encode(msg, request_id)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone; nothing to do

    # ------------------------------------------------------------------------------------
    # init sync and liveness

    def _on_register(self, identity: bytes, rid: int, msg: m.Message) -> m.Message | None:
        assert isinstance(msg, m.RegisterRank)
        if self.state is LeaderState.FAILED:
            return m.ErrorReply("init_failed", self.error)
        if msg.slice_bytes > 1 << 34 or msg.num_layers > 4096:
            raise RequestRejected("bad_layout", f"rank {msg.rank}: implausible layout {msg}")
        try:
            if self.pool is not None and msg.rank not in self.world.ranks:
                raise LayoutMismatch(f"rank {msg.rank} is not part of this world")
            info = self.world.add(msg, identity, rid, self.clock())
            # A rank joining a running world counts as alive only once it has mapped the pool.
            info.alive = self.pool is None
        except LayoutMismatch as e:
            if self.pool is None:
                self._fail(f"init sync failed: {e}")
            raise RequestRejected("layout_mismatch", str(e)) from None
        log.info("rank %d/%d registered (pid %d, %d B per block)", msg.rank, msg.world_size, msg.pid, msg.slice_bytes)
        if self.pool is not None:
            # A restarted rank joining a running world: give it the existing pool. Its previous
            # incarnation is gone (maybe before the liveness check noticed): settle its ops now
            # and serve nothing new until it has mapped the pool, or ops would complete without it.
            if self.state is LeaderState.READY:
                self.state = LeaderState.DEGRADED
            self._settle_ops()
            return self._grant(msg.rank)
        if self.world.complete:
            try:
                self._create_pool()
            except (ShmError, OSError, RuntimeError, ValueError) as e:
                self._fail(f"cannot create the cache: {e}")
                if self.pool is not None:  # the disk tier failed after the host pool was made
                    self.pool.close()
                    self.pool, self.registry = None, None
                for info in self.world.ranks.values():
                    self._reply(info.identity, info.register_request, m.ErrorReply("init_failed", self.error))
                return None
            for rank, info in self.world.ranks.items():
                if rank != msg.rank:
                    self._reply(info.identity, info.register_request, self._grant(rank))
            return self._grant(msg.rank)
        return None  # answered when the world is complete

    def _grant(self, rank: int) -> m.PoolGrant:
        assert self.pool is not None
        return m.PoolGrant(
            segment=self.pool.name,
            num_blocks=self.pool.geometry.num_blocks,
            block_bytes=self.pool.geometry.block_bytes,
            slice_offset=self.world.slice_offset(rank),
        )

    def _create_pool(self) -> None:
        from kvbm.leader.capacity import check_cache_space
        from kvbm.leader.tiering import DiskTier  # disk machinery only when configured

        cfg = self.config
        block_bytes = self.world.block_bytes
        host_blocks = cfg.host_blocks(block_bytes)
        disk_blocks = cfg.disk_blocks(block_bytes) if cfg.has_disk_tier else 0
        if host_blocks <= 0:
            if disk_blocks <= 0:
                raise ValueError(
                    f"the configured cache holds no block of {block_bytes} bytes; raise DYN_KVBM_CPU_CACHE_GB "
                    "or DYN_KVBM_DISK_CACHE_GB"
                )
            host_blocks = cfg.disk_bounce_blocks  # disk-only: a small bounce pool for staging
        check_cache_space(cfg, block_bytes)  # one clear line before any allocation
        # The ranks pre-fault their mappings (they copy on the engine's critical path); the
        # leader only touches blocks for disk I/O, off that path, so it maps lazily.
        self.pool = HostPool.create(self.instance, PoolGeometry(host_blocks, block_bytes), prefault=False)
        self.registry = BlockRegistry(host_blocks, disk_blocks, clock=self.clock)
        if disk_blocks > 0:
            from kvbm.leader.disk import DiskStore, disk_file_path

            # We hold the instance lock, so a block file of this instance is a dead leader's.
            stale = disk_file_path(cfg.disk_cache_dir, self.instance)
            if os.path.isfile(stale) and not os.path.islink(stale) and os.stat(stale).st_uid == os.getuid():
                log.warning("removing %s left by a previous leader of this instance", stale)
                os.unlink(stale)

            store = DiskStore(
                cfg.disk_cache_dir,
                self.instance,
                disk_blocks,
                block_bytes,
                o_direct=not cfg.disk_disable_o_direct,
                zerofill_fallback=cfg.disk_zerofill_fallback,
                max_concurrent=cfg.max_concurrent_transfers,
            )
            use_filter = cfg.has_cpu_tier and not cfg.disable_disk_offload_filter
            assert self.registry.disk is not None
            self.disk = DiskTier(
                store,
                self.registry.disk,
                self.registry.host,
                self.pool,
                FrequencyFilter(clock=self.clock) if use_filter else None,
                self._notify,
                max_pending_writes=max(16, host_blocks // 2),
                on_transfer=lambda direction, seconds: self._observe_transfer(direction, 1, seconds),
            )

    def _on_attached(self, identity: bytes, rid: int, msg: m.Message) -> m.Message | None:
        assert isinstance(msg, m.PoolAttached)
        info = self.world.ranks.get(msg.rank)
        if info is None or self.pool is None or info.identity != identity:
            raise RequestRejected("not_registered", f"rank {msg.rank} attached before registering")
        info.attached, info.attach_request, info.alive = True, rid, True
        info.last_seen = self.clock()
        ready = m.LeaderReady(self.pool.geometry.num_blocks, self._disk_capacity())
        if self.state is LeaderState.WAITING and self.world.all_attached:
            self.state = LeaderState.READY
            log.info("leader ready: %d ranks, %d host blocks of %d B, %d disk blocks (init took %.2f s)",
                     self.world.world_size, self.pool.geometry.num_blocks, self.pool.geometry.block_bytes,
                     self._disk_capacity(), self.clock() - self._started)
            for rank, other in self.world.ranks.items():
                if rank != msg.rank:
                    self._reply(other.identity, other.attach_request, ready)
            return ready
        if self.state is LeaderState.DEGRADED and not self.world.dead_ranks():
            self.state = LeaderState.READY
            log.info("rank %d is back; leader ready again", msg.rank)
        return ready if self.state is LeaderState.READY else None

    def _on_heartbeat(self, identity: bytes, rid: int, msg: m.Message) -> m.Message | None:
        assert isinstance(msg, m.Heartbeat)
        if msg.rank >= 0:
            info = self.world.ranks.get(msg.rank)
            if info is None or info.identity != identity or not info.alive:
                # E.g. this leader restarted, or declared the rank dead (it stalled past the
                # liveness timeout): the rank must register (and attach) again.
                return m.ErrorReply("not_registered", f"rank {msg.rank} is not registered with this leader")
            info.last_seen = self.clock()
        return m.Ack()

    def _fail(self, error: str) -> None:
        self.state = LeaderState.FAILED
        self.error = error
        log.error("%s", error)

    def _periodic(self, now: float) -> None:
        if self.state is LeaderState.WAITING and now >= self._deadline:
            self._fail(
                f"leader/worker init sync did not complete within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="
                f"{self.config.init_timeout_s:g} s: {self.world.describe_missing()}"
            )
            for info in self.world.ranks.values():
                req = info.attach_request if info.attached else info.register_request
                self._reply(info.identity, req, m.ErrorReply("init_timeout", self.error))
        if self.state in (LeaderState.READY, LeaderState.DEGRADED):
            self._check_liveness(now)
            self._expire_ops(now)
        if self.parent_pid is not None and not _alive(self.parent_pid):
            log.warning("parent process %d is gone; leader shutting down", self.parent_pid)
            self._stop = True

    def _check_liveness(self, now: float) -> None:
        for rank, info in self.world.ranks.items():
            if info.alive and now - info.last_seen > self.config.liveness_timeout_s:
                info.alive = False
                info.attached = False
                self.state = LeaderState.DEGRADED
                log.error("rank %d (pid %d) stopped responding (no heartbeat for %.1f s); "
                          "its in-flight stores are aborted", rank, info.layout.pid, now - info.last_seen)
                self._settle_ops()

    def _live_ranks(self) -> set[int]:
        return {r for r, info in self.world.ranks.items() if info.alive}

    # ------------------------------------------------------------------------------------
    # client requests

    def _serving_registry(self) -> BlockRegistry:
        if self.state is LeaderState.READY and self.registry is not None:
            return self.registry
        if self.state is LeaderState.DEGRADED:
            raise RequestRejected("degraded", f"rank(s) {self.world.dead_ranks()} are dead; no new transfers")
        if self.state is LeaderState.FAILED:
            raise RequestRejected("init_failed", self.error)
        raise RequestRejected("not_ready", f"init sync in progress: {self.world.describe_missing()}")

    def _on_status(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        geom = self.pool.geometry if self.pool is not None else None
        first = next(iter(self.world.ranks.values()), None)
        return m.Status(
            state=self.state.value,
            error=self.error,
            world_size=self.world.world_size or 0,
            num_host_blocks=geom.num_blocks if geom else 0,
            num_disk_blocks=self._disk_capacity(),
            block_bytes=geom.block_bytes if geom else 0,
            block_size=first.layout.block_size if first else 0,
            fingerprint=first.layout.fingerprint if first else "",
            dead_ranks=self.world.dead_ranks(),
        )

    def _disk_capacity(self) -> int:
        if self.registry is None or self.registry.disk is None or self.disk is None or not self.disk.enabled:
            return 0
        return self.registry.disk.capacity

    def _on_match(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        assert isinstance(msg, m.Match)
        reg = self._serving_registry()
        hashes = m.unpack_hashes(msg.hashes)
        res = reg.match(hashes)
        c = self.counters
        bs = self._block_size()
        for obs in self.observers:
            obs.on_match(len(hashes), res.host, res.disk, bs)
        c.match_requests += 1
        c.match_blocks_queried += len(hashes)
        c.match_host_blocks += res.host
        c.match_disk_blocks += res.disk
        return m.MatchReply(res.host, res.disk)

    def _on_prepare_load(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        assert isinstance(msg, m.PrepareLoad)
        reg = self._serving_registry()
        hashes = m.unpack_hashes(msg.hashes)
        op = Op(next(self._op_ids), OpKind.LOAD, [], [], self.clock())
        for h in hashes:
            slot = reg.host.lookup(h)
            if slot is not None:
                reg.host.pin([slot])
            elif self.disk is not None:
                slot = self.disk.stage(op.op_id, h)
                if slot is None:
                    break
                op.staging.add(slot)
                op.from_disk += 1
            else:
                break
            op.slots.append(slot)
            op.hashes.append(h)
        if op.slots:
            self._ops[op.op_id] = op
        return m.LoadGrant(op.op_id if op.slots else 0, m.pack_slots(op.slots), op.ready)

    def _on_poll_loads(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        assert isinstance(msg, m.PollLoads)
        ready, failed = [], []
        for op_id in msg.op_ids:
            op = self._ops.get(op_id)
            if op is None or op.kind is not OpKind.LOAD:
                failed.append(op_id)  # unknown (released, expired or failed earlier)
            elif op.failed and not op.staging:
                failed.append(op_id)
                self._finish(op)
            elif op.ready:
                ready.append(op_id)
        return m.LoadPoll(ready, failed)

    def _on_allocate_store(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        assert isinstance(msg, m.AllocateStore)
        reg = self._serving_registry()
        hashes = m.unpack_hashes(msg.hashes)
        if len(set(hashes)) != len(hashes):
            raise RequestRejected("bad_request", "allocate_store: duplicate hashes in one request")
        parents: list[int | None] = [msg.first_parent or None, *hashes[:-1]][: len(hashes)]  # [] for no hashes
        got = reg.host.allocate(hashes, parents, priority=msg.priority)
        slots = [-1 if s is None else s for s in got]
        new = [(h, s) for h, s in zip(hashes, got) if s is not None]
        if not new:
            return m.StoreGrant(0, m.pack_slots(slots))
        op = Op(next(self._op_ids), OpKind.STORE, [s for _, s in new], [h for h, _ in new], self.clock())
        self._ops[op.op_id] = op
        return m.StoreGrant(op.op_id, m.pack_slots(slots))

    def _on_release_op(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        assert isinstance(msg, m.ReleaseOp)
        op = self._ops.get(msg.op_id)
        if op is None:
            raise RequestRejected("unknown_op", f"op {msg.op_id} is not in flight")
        if op.dispatched:
            raise RequestRejected("op_dispatched", f"op {msg.op_id} already reached the ranks; it completes on its own")
        op.released, op.failed, op.error = True, True, "released by the client"
        if not op.staging:
            self._finish(op)
        return m.Ack()

    def _on_transfer_done(self, identity: bytes, rid: int, msg: m.Message) -> None:
        assert isinstance(msg, m.TransferDone)
        info = self.world.ranks.get(msg.rank)
        if info is None or info.identity != identity:
            self.counters.rejected_messages += 1
            return None  # not this rank's socket: ignore
        info.last_seen = self.clock()
        op = self._ops.get(msg.op_id)
        if op is None or msg.rank in op.acked:
            return None  # late, duplicate, or unknown: nothing to change
        op.ack(msg.rank, msg.ok, msg.error)
        if op.done(self._live_ranks()):
            self._finish(op)
        return None

    def _on_stats(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        return m.StatsReply(self.stats())

    def _on_take_events(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        evs = list(self.events)
        self.events.clear()
        return m.EventsReply(
            kinds=bytes(_EVENT_KIND[e.kind] for e in evs),
            tiers=bytes(int(e.tier) for e in evs),
            hashes=m.pack_hashes([e.seq_hash for e in evs]),
            parents=m.pack_hashes([e.parent_hash or 0 for e in evs]),
        )

    def _on_reset_cache(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        reg = self._serving_registry()
        reg.host.clear()
        if reg.disk is not None:
            reg.disk.clear()
        return m.Ack()

    def _on_shutdown(self, identity: bytes, rid: int, msg: m.Message) -> m.Message:
        log.info("shutdown requested")
        self._stop = True
        return m.Ack()

    # ------------------------------------------------------------------------------------
    # op completion

    def _finish(self, op: Op) -> None:
        """Release an op's slots: commit or abort a store, unpin a load."""
        reg = self.registry
        assert reg is not None
        self._ops.pop(op.op_id, None)
        if op.kind is OpKind.STORE:
            if op.failed:
                reg.host.abort(op.slots)
                self.counters.stores_aborted += 1
                log.warning("store op %d aborted: %s", op.op_id, op.error)
                return
            reg.host.commit(op.slots)
            self._observe_transfer("d2h", len(op.slots), self.clock() - op.created)
            self.counters.stores_committed += 1
            self.counters.blocks_stored += len(op.slots)
            if self.disk is not None:
                self.disk.offload(op.hashes, op.slots)
        else:
            reg.host.unpin([s for s in op.slots if s not in op.staging])
            if op.failed:
                self.counters.loads_failed += 1
            else:
                self.counters.loads_completed += 1
                self._observe_transfer("h2d", len(op.slots), self.clock() - op.created)
                self.counters.blocks_loaded += len(op.slots)
                self.counters.blocks_loaded_from_disk += op.from_disk

    def _settle_ops(self) -> None:
        """After a rank died: dead ranks count as failed reports."""
        live = self._live_ranks()
        for op in list(self._ops.values()):
            # A dead rank reports nothing more, not even when it comes back (a new incarnation
            # knows nothing of these ops): count it as a failed report so the live ranks finish
            # the op. A load it never finished failed: the engine is told and recomputes.
            dead = [r for r in self.world.ranks if r not in live and r not in op.acked]
            if dead and op.kind is OpKind.LOAD:
                op.failed, op.error = True, op.error or f"rank(s) {dead} died during the load"
            op.acked.update(dead)
            if op.kind is OpKind.STORE:
                # The dead rank's slice may be missing or half-written: never matchable.
                op.failed, op.error = True, op.error or "a rank died during the store"
            if (op.kind is OpKind.STORE or op.dispatched) and op.done(live):
                self._finish(op)

    def _expire_ops(self, now: float) -> None:
        for op in list(self._ops.values()):
            if now - op.created > OP_TIMEOUT_S and not op.staging:
                log.warning("%s op %d was never completed by the ranks after %.0f s; releasing it",
                            op.kind.value, op.op_id, now - op.created)
                op.failed, op.error = True, "expired"
                self._finish(op)

    def _apply_disk_completions(self) -> None:
        if self.disk is None:
            return
        for done in self.disk.drain():
            op = self._ops.get(done.op_id)
            if op is None:
                continue
            op.staging.discard(done.host_slot)
            if done.ok:
                self.registry.host.pin([done.host_slot])  # type: ignore[union-attr]
            else:
                op.failed, op.error = True, f"staging from disk failed: {done.reason}"
                op.slots = [s for s in op.slots if s != done.host_slot]
            if op.released and not op.staging:
                self._finish(op)
        self._flush_events()

    # ------------------------------------------------------------------------------------
    # events and stats

    def _flush_events(self) -> None:
        if self.registry is None:
            return
        evs = self.registry.drain_events()
        if not evs:
            return
        for e in evs:
            if e.kind == "removed":
                if e.tier is Tier.HOST:
                    self.counters.host_evictions += 1
                else:
                    self.counters.disk_evictions += 1
        self.events.extend(evs)
        for obs in self.observers:
            obs.on_events(evs)

    def _block_size(self) -> int:
        first = next(iter(self.world.ranks.values()), None)
        return first.layout.block_size if first else 0

    def _observe_transfer(self, direction: str, blocks: int, seconds: float) -> None:
        nbytes = blocks * (self.pool.geometry.block_bytes if self.pool else 0)
        for obs in self.observers:
            obs.on_transfer(direction, blocks, nbytes, seconds)

    def stats(self) -> dict[str, float]:
        """A flat snapshot of counters and gauges (the StatsReply and metrics source)."""
        out: dict[str, float] = {k: float(v) for k, v in vars(self.counters).items()}
        reg = self.registry
        out["state_ready"] = float(self.state is LeaderState.READY)
        out["ranks_alive"] = float(len(self._live_ranks()))
        out["world_size"] = float(self.world.world_size or 0)
        out["ops_in_flight"] = float(len(self._ops))
        if reg is not None:
            out["host_capacity"] = float(reg.host.capacity)
            out["host_registered"] = float(reg.host.num_registered)
            out["host_free"] = float(reg.host.num_free)
            out["host_writing"] = float(reg.host.num_writing)
            out["host_pinned"] = float(reg.host.num_pinned)
            if reg.disk is not None:
                out["disk_capacity"] = float(reg.disk.capacity)
                out["disk_registered"] = float(reg.disk.num_registered)
                out["disk_free"] = float(reg.disk.num_free)
                out["disk_writing"] = float(reg.disk.num_writing)
                out["disk_pinned"] = float(reg.disk.num_pinned)
        if self.pool is not None:
            out["block_bytes"] = float(self.pool.geometry.block_bytes)
        if self.disk is not None:
            out["disk_enabled"] = float(self.disk.enabled)
            out["disk_busy"] = float(self.disk.busy)
            for k, v in vars(self.disk.counters).items():
                out[f"disk_{k}"] = float(v)
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
