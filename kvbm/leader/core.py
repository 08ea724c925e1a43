"""The leader core: every block-state transition of every tier, in one socket-free object.

:class:`LeaderCore` owns the world of ranks (init sync, liveness), the block registry (G2 host,
G3 disk and G4 object pools), the ops in flight and their rank acks, the G2 <-> G3 pipeline
(offload, staging, checksums, admission), the G2 <-> G4 pipeline (puts after commit, store
lookups, staging) and the index change log. Messages come in as typed verbs with
the time they are handled at (``now``); replies and messages for other peers come out as
:class:`Outbound` records. It never touches a socket, a clock or a byte of KV: the bytes live
behind :mod:`kvbm.leader.storage`, whose disk I/O reports completions that the core applies
(:meth:`LeaderCore.apply_disk`). The transport is :mod:`kvbm.leader.server`.

The rule at kvbm's heart lives here and nowhere else: **a block is matchable only after every
rank acknowledged its copy; a failed or partial transfer never is.** A store's slots stay
WRITING (never matchable) until every live rank reported; a slot is committed only if every
rank reported storing it, and aborted if any rank failed, died or did not store it
(:meth:`LeaderCore._finish`). A disk copy
is matchable only after its write succeeded; a staged G2 copy only after its read succeeded
and its checksum matched (:meth:`LeaderCore._apply_write`, :meth:`LeaderCore._apply_read`).
An object is in the G4 index only after its put succeeded, or after the store said it exists
(another instance put it); its G2 copy only after the get returned it whole with its checksum
(:meth:`LeaderCore._apply_object_write`, :meth:`LeaderCore._apply_object_read`).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.leader.admission import FrequencyFilter
from kvbm.leader.disk import BlockKey
from kvbm.leader.index import IndexLog
from kvbm.leader.ops import Op, OpKind
from kvbm.leader.polls import ParkedPoll, ParkedPolls
from kvbm.leader.registry import BlockEvent, BlockRegistry, Tier, TierPool
from kvbm.leader.objects import GetStatus
from kvbm.leader.storage import (
    CacheStorage,
    DiskReadDone,
    DiskWriteDone,
    ObjectIO,
    ObjectLookupDone,
    ObjectReadDone,
    ObjectReady,
    ObjectWriteDone,
    StorageFactory,
)
from kvbm.leader.world import LayoutMismatch, World

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=m.Message)

OP_TIMEOUT_S = 300.0  # an op nobody completes (a client bug) is released after this
MAX_EVENT_BACKLOG = 100_000
OBJECT_LOOKUP_BATCH = 64  # hashes past a match asked of the store at once
OBJECT_LOOKUPS_MAX = 4096  # hashes being asked at most (more lookups wait for a later match)
OBJECT_MISS_TTL_S = 10.0  # a hash the store did not have is not asked again for this long
OBJECT_MISSES_MAX = 100_000  # remembered misses (oldest forgotten first)
OBJECT_FAILURES_OFF = 8  # store errors in a row that turn the object tier off


class LeaderState(enum.Enum):
    WAITING = "waiting"  # init sync in progress
    READY = "ready"
    DEGRADED = "degraded"  # a rank is dead: no new ops until it comes back
    FAILED = "failed"  # init failed; the error says why


class TransferDirection(enum.Enum):
    """What a finished transfer moved (the metrics' ``direction`` label is the value)."""

    D2H = "d2h"  # G1 -> G2 store
    H2D = "h2d"  # G2 -> G1 load
    H2DISK = "h2disk"  # G2 -> G3 offload
    DISK2H = "disk2h"  # G3 -> G2 staging
    H2OBJ = "h2obj"  # G2 -> G4 put
    OBJ2H = "obj2h"  # G4 -> G2 staging


class RequestRejected(Exception):
    """A well-formed request that cannot be served; becomes an ErrorReply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Outbound:
    """A message for a peer: ``request_id`` is the request it answers."""

    peer: bytes
    request_id: int
    message: m.Message


@dataclass
class LeaderCounters:
    """Plain counters; metrics and stats replies are views of these."""

    match_requests: int = 0
    match_blocks_queried: int = 0
    match_host_blocks: int = 0
    match_disk_blocks: int = 0
    match_object_blocks: int = 0
    stores_committed: int = 0
    stores_aborted: int = 0
    blocks_stored: int = 0  # G1 -> G2 (offload d2h)
    loads_completed: int = 0
    loads_failed: int = 0
    blocks_loaded: int = 0  # G2 -> G1 (onboard h2d)
    blocks_loaded_from_disk: int = 0  # G3 -> G1 via G2 staging (onboard d2d)
    blocks_loaded_from_object: int = 0  # G4 -> G1 via G2 staging (onboard o2d)
    host_evictions: int = 0
    disk_evictions: int = 0
    object_evictions: int = 0  # forgotten by the G4 index (the objects stay in the store)
    rejected_messages: int = 0


@dataclass
class DiskCounters:
    offloaded_blocks: int = 0  # G2 -> G3 writes that succeeded
    onboarded_blocks: int = 0  # G3 -> G2 reads that succeeded
    offload_skipped_filter: int = 0
    offload_skipped_busy: int = 0
    checksum_failures: int = 0
    io_errors: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0


@dataclass
class ObjectCounters:
    offloaded_blocks: int = 0  # G2 -> G4 puts that succeeded
    onboarded_blocks: int = 0  # G4 -> G2 gets that returned the block whole
    offload_skipped_filter: int = 0
    offload_skipped_busy: int = 0  # too many puts in flight, or the put queue was full
    write_failures: int = 0
    read_failures: int = 0  # missing, corrupt (checksum, short, foreign) or failed gets
    checksum_failures: int = 0  # of which corrupt
    lookups: int = 0  # batched existence queries sent
    lookup_blocks: int = 0
    lookup_found: int = 0  # blocks the store had that this leader did not know
    bytes_written: int = 0
    bytes_read: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0


@dataclass(frozen=True)
class PoolStats:
    """Occupancy of one tier's pool."""

    capacity: int
    registered: int
    free: int
    writing: int
    pinned: int

    @classmethod
    def of(cls, pool: TierPool) -> PoolStats:
        return cls(pool.capacity, pool.num_registered, pool.num_free, pool.num_writing, pool.num_pinned)


@dataclass(frozen=True)
class DiskTierStats:
    enabled: bool
    busy: int  # writes in flight
    counters: DiskCounters


@dataclass(frozen=True)
class ObjectTierStats:
    enabled: bool  # the store answered and no run of errors turned the tier off
    busy: int  # puts in flight
    lookups: int  # hashes being asked of the store
    counters: ObjectCounters
    reason: str  # why the tier is off ('' while on)


@dataclass(frozen=True)
class LeaderStats:
    """A snapshot of the leader: counters, gauges, pool occupancy (None: not created yet)."""

    state: LeaderState
    counters: LeaderCounters
    ranks_alive: int
    world_size: int
    ops_in_flight: int
    host: PoolStats | None = None
    disk: PoolStats | None = None
    block_bytes: int | None = None
    disk_tier: DiskTierStats | None = None
    object: PoolStats | None = None
    object_tier: ObjectTierStats | None = None
    index_polls_parked: int = 0  # IndexSince long-polls waiting for the index to move

    def flat(self) -> dict[str, float]:
        """The StatsReply form: ``name -> value``, pool and tier fields prefixed ``host_`` / ``disk_`` /
        ``object_``."""
        out: dict[str, float] = {k: float(v) for k, v in vars(self.counters).items()}
        out["state_ready"] = float(self.state is LeaderState.READY)
        out["ranks_alive"] = float(self.ranks_alive)
        out["world_size"] = float(self.world_size)
        out["ops_in_flight"] = float(self.ops_in_flight)
        out["index_polls_parked"] = float(self.index_polls_parked)
        for prefix, pool in (("host", self.host), ("disk", self.disk), ("object", self.object)):
            if pool is not None:
                out.update({f"{prefix}_{k}": float(v) for k, v in vars(pool).items()})
        if self.block_bytes is not None:
            out["block_bytes"] = float(self.block_bytes)
        if self.disk_tier is not None:
            out["disk_enabled"] = float(self.disk_tier.enabled)
            out["disk_busy"] = float(self.disk_tier.busy)
            out.update({f"disk_{k}": float(v) for k, v in vars(self.disk_tier.counters).items()})
        if self.object_tier is not None:
            out["object_enabled"] = float(self.object_tier.enabled)
            out["object_busy"] = float(self.object_tier.busy)
            out["object_lookups_pending"] = float(self.object_tier.lookups)
            out.update({f"object_{k}": float(v) for k, v in vars(self.object_tier.counters).items()})
        return out


class LeaderObserver(Protocol):
    """Hooks for metrics and KV-event publishers; called on the leader's loop thread."""

    def on_match(self, queried: int, host: int, disk: int, block_size: int, obj: int = 0) -> None:
        """One lookup: blocks asked about, found in G2, found in G3 after that, then in G4."""

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        """A finished transfer; ``direction`` is a :class:`TransferDirection` value."""

    def on_events(self, events: list[BlockEvent]) -> None:
        """Block registrations and removals (both tiers), in order."""


@dataclass
class _Staging:
    """A G2 slot being filled from disk or the object store for loads.

    The load that started the read and every later load that asked for the same block while
    it was still being read (``op_ids``, in order): they all wait for this one read, so loads
    of a shared prefix in one batch do not turn into recomputes."""

    op_ids: list[int]
    seq_hash: int
    source: Tier  # where it comes from: Tier.DISK (G3) or Tier.OBJECT (G4)
    source_slot: int  # its slot in that tier


class LeaderCore:
    """All block state of one engine instance; see the module docstring. Not thread-safe."""

    def __init__(self, config: KvbmConfig, storage: StorageFactory, *, now: float, index_first_seq: int | None = None,
                 index_ring_entries: int | None = None) -> None:
        """``storage`` creates the host pool and disk I/O once the world is known; ``now``: start time."""
        self.config = config
        self._storage_factory = storage
        self.state = LeaderState.WAITING
        self.error = ""
        self.world = World()
        self.registry: BlockRegistry | None = None
        self.storage: CacheStorage | None = None
        self.counters = LeaderCounters()
        self.events: deque[BlockEvent] = deque(maxlen=MAX_EVENT_BACKLOG)
        self.observers: list[LeaderObserver] = []
        self.ops: dict[int, Op] = {}
        self.stop_requested = False
        self._op_ids = itertools.count(1)
        self._now = now
        self._started = now
        self._deadline = now + config.init_timeout_s
        ring = {} if index_ring_entries is None else {"ring_entries": index_ring_entries}
        self.index = IndexLog(first_seq=index_first_seq, **ring)
        self.polls = ParkedPolls()  # IndexSince long-polls waiting for the index to move
        # The disk tier (G3); on only when the storage has disk I/O.
        self.disk_counters = DiskCounters()
        self.disk_enabled = False
        self.disk_disabled_reason = ""
        self._admission: FrequencyFilter | None = None
        self._checksums: dict[int, int] = {}  # disk slot -> checksum of its bytes
        self._staging: dict[int, _Staging] = {}  # host slot -> what it is being filled with
        self._staging_slot: dict[int, int] = {}  # sequence hash -> its host slot in _staging
        self._pending_writes = 0
        self._max_pending_writes = 0
        # The object tier (G4); on once the store answered the start-up check.
        self.object_counters = ObjectCounters()
        self.object_enabled = False
        self.object_disabled_reason = "waiting for the object store to answer"
        self._object_admission: FrequencyFilter | None = None
        self._object_puts: dict[int, int] = {}  # seq hash -> object slot of a put in flight
        self._max_object_puts = 0
        self._object_errors_in_row = 0
        self._asking: set[int] = set()  # hashes being asked of the store
        self._store_misses: OrderedDict[int, float] = OrderedDict()  # hash -> when the store lacked it
        self._handlers: dict[type[m.Message], Callable[[bytes, int, m.Message], list[Outbound] | m.Message | None]] = {
            m.RegisterRank: self._on_register,
            m.PoolAttached: self._on_attached,
            m.Heartbeat: self._on_heartbeat,
            m.TransferDone: self._on_transfer_done,
            m.GetStatus: lambda p, r, msg: self.status(),
            m.Match: self._on_match,
            m.PrepareLoad: lambda p, r, msg: self.prepare_load(m.unpack_hashes(_as(msg, m.PrepareLoad).hashes)),
            m.PollLoads: lambda p, r, msg: self.poll_loads(_as(msg, m.PollLoads).op_ids),
            m.AllocateStore: self._on_allocate_store,
            m.ReleaseOp: self._on_release_op,
            m.GetStats: lambda p, r, msg: m.StatsReply(self.stats().flat(), self.index.next_seq),
            m.TakeEvents: lambda p, r, msg: self.take_events(),
            m.IndexSince: self._on_index_since,
            m.LookupReport: lambda p, r, msg: self.lookup_report(_as(msg, m.LookupReport)),
            m.ResetCache: lambda p, r, msg: self.reset_cache(),
            m.Shutdown: self._on_shutdown,
        }

    # ------------------------------------------------------------------------------------
    # dispatch

    def handle(self, peer: bytes, request_id: int, msg: m.Message, now: float) -> list[Outbound]:
        """Serve one decoded request from ``peer`` at time ``now``; never raises for bad input."""
        self._now = now
        handler = self._handlers.get(type(msg))
        out: list[Outbound] = []
        if handler is None:  # a reply type (or another message the leader never receives)
            reply: list[Outbound] | m.Message | None = self.reject("bad_request", f"{msg.TAG} is not a request")
        else:
            try:
                reply = handler(peer, request_id, msg)
            except RequestRejected as e:
                reply = self.reject(e.code, str(e))
            except m.ProtocolError as e:
                reply = self.reject("bad_request", str(e))
        if isinstance(reply, list):
            out = reply
        elif reply is not None:
            out = [Outbound(peer, request_id, reply)]
        self._flush_events()
        return out

    def reject(self, code: str, message: str) -> m.ErrorReply:
        """Count a refused or malformed request and build its ErrorReply."""
        self.counters.rejected_messages += 1
        return m.ErrorReply(code, message)

    # ------------------------------------------------------------------------------------
    # init sync and liveness

    def _on_register(self, peer: bytes, rid: int, msg: m.Message) -> list[Outbound] | m.Message | None:
        msg = _as(msg, m.RegisterRank)
        if self.state is LeaderState.FAILED:
            return m.ErrorReply("init_failed", self.error)
        if msg.slice_bytes > 1 << 34 or msg.num_layers > 4096:
            raise RequestRejected("bad_layout", f"rank {msg.rank}: implausible layout {msg}")
        try:
            if self.storage is not None and msg.rank not in self.world.ranks:
                raise LayoutMismatch(f"rank {msg.rank} is not part of this world")
            info = self.world.add(msg, peer, rid, self._now)
            # A rank joining a running world counts as alive only once it has mapped the pool.
            info.alive = self.storage is None
        except LayoutMismatch as e:
            if self.storage is None:
                self._fail(f"init sync failed: {e}")
            raise RequestRejected("layout_mismatch", str(e)) from None
        log.info("rank %d/%d registered (pid %d, %d B per block)", msg.rank, msg.world_size, msg.pid, msg.slice_bytes)
        if self.storage is not None:
            # A restarted rank joining a running world: give it the existing pool. Its previous
            # incarnation is gone (maybe before the liveness check noticed): settle its ops now
            # and serve nothing new until it has mapped the pool, or ops would complete without it.
            if self.state is LeaderState.READY:
                self.state = LeaderState.DEGRADED
            self._settle_ops()
            return self._grant(msg.rank)
        if not self.world.complete:
            return None  # answered when the world is complete
        try:
            self._create_cache()
        except (OSError, RuntimeError, ValueError) as e:  # ShmError is a RuntimeError
            self._fail(f"cannot create the cache: {e}")
            failed = m.ErrorReply("init_failed", self.error)
            return [Outbound(info.identity, info.register_request, failed) for info in self.world.ranks.values()]
        return [Outbound(info.identity, info.register_request, self._grant(rank))
                for rank, info in self.world.ranks.items()]

    def _grant(self, rank: int) -> m.PoolGrant:
        assert self.storage is not None and self.registry is not None
        return m.PoolGrant(
            segment=self.storage.segment,
            num_blocks=self.registry.host.capacity,
            block_bytes=self.world.block_bytes,
            slice_offset=self.world.slice_offset(rank),
        )

    def _create_cache(self) -> None:
        """Size the tiers for the world's block size and create the storage and the registry."""
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
        storage = self._storage_factory(host_blocks, block_bytes, disk_blocks, self.world.layout_fingerprint)
        self.storage = storage
        # The registry stamps use with the time of the verb being served.
        self.registry = BlockRegistry(host_blocks, disk_blocks if storage.disk is not None else 0,
                                      clock=lambda: self._now,
                                      object_capacity=cfg.object_num_blocks if storage.objects is not None else 0)
        if storage.objects is not None:  # enabled once the store answers (apply_objects)
            self._object_admission = (None if cfg.object_write_through
                                      else FrequencyFilter(clock=lambda: self._now))
            self._max_object_puts = max(4, host_blocks // 4)
        if storage.disk is not None:
            assert self.registry.disk is not None
            found = storage.disk.restored()
            if found:  # a persistent disk cache an earlier leader of this layout filled
                n = self.registry.disk.restore([(b.slot, b.key.seq_hash, b.key.parent) for b in found])
                for b in found:
                    if self.registry.disk.hash_of(b.slot) == b.key.seq_hash:
                        self._checksums[b.slot] = b.checksum
                log.info("disk tier: %d blocks of an earlier leader re-indexed", n)
            self.disk_enabled = True
            use_filter = cfg.has_cpu_tier and not cfg.disable_disk_offload_filter
            self._admission = FrequencyFilter(clock=lambda: self._now) if use_filter else None
            self._max_pending_writes = max(16, host_blocks // 2)

    def _on_attached(self, peer: bytes, rid: int, msg: m.Message) -> list[Outbound] | m.Message | None:
        msg = _as(msg, m.PoolAttached)
        info = self.world.ranks.get(msg.rank)
        if info is None or self.storage is None or info.identity != peer:
            raise RequestRejected("not_registered", f"rank {msg.rank} attached before registering")
        info.attached, info.attach_request, info.alive = True, rid, True
        info.last_seen = self._now
        ready = m.LeaderReady(self.registry.host.capacity if self.registry else 0, self.disk_capacity())
        if self.state is LeaderState.WAITING and self.world.all_attached:
            self.state = LeaderState.READY
            log.info("leader ready: %d ranks, %d host blocks of %d B, %d disk blocks (init took %.2f s)",
                     self.world.world_size, ready.num_host_blocks, self.world.block_bytes,
                     ready.num_disk_blocks, self._now - self._started)
            return [Outbound(other.identity, other.attach_request, ready) for other in self.world.ranks.values()]
        if self.state is LeaderState.DEGRADED and not self.world.dead_ranks():
            self.state = LeaderState.READY
            log.info("rank %d is back; leader ready again", msg.rank)
        return ready if self.state is LeaderState.READY else None

    def _on_heartbeat(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.Heartbeat)
        if msg.rank >= 0:
            info = self.world.ranks.get(msg.rank)
            if info is None or info.identity != peer or not info.alive:
                # E.g. this leader restarted, or declared the rank dead (it stalled past the
                # liveness timeout): the rank must register (and attach) again.
                return m.ErrorReply("not_registered", f"rank {msg.rank} is not registered with this leader")
            info.last_seen = self._now
        return m.Ack()

    def _fail(self, error: str) -> None:
        self.state = LeaderState.FAILED
        self.error = error
        log.error("%s", error)

    def tick(self, now: float) -> list[Outbound]:
        """Periodic work at time ``now``: init deadline, rank liveness, op expiry."""
        self._now = now
        out: list[Outbound] = []
        if self.state is LeaderState.WAITING and now >= self._deadline:
            self._fail(
                f"leader/worker init sync did not complete within DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="
                f"{self.config.init_timeout_s:g} s: {self.world.describe_missing()}"
            )
            timeout = m.ErrorReply("init_timeout", self.error)
            for info in self.world.ranks.values():
                out.append(Outbound(info.identity, info.attach_request if info.attached else info.register_request,
                                    timeout))
        if self.state in (LeaderState.READY, LeaderState.DEGRADED):
            self._check_liveness(now)
            self._expire_ops(now)
        self._flush_events()
        return out

    def _check_liveness(self, now: float) -> None:
        for rank, info in self.world.ranks.items():
            if info.alive and now - info.last_seen > self.config.liveness_timeout_s:
                info.alive = False
                info.attached = False
                self.state = LeaderState.DEGRADED
                log.error("rank %d (pid %d) stopped responding (no heartbeat for %.1f s); "
                          "its in-flight stores are aborted", rank, info.layout.pid, now - info.last_seen)
                self._settle_ops()

    def live_ranks(self) -> set[int]:
        return {r for r, info in self.world.ranks.items() if info.alive}

    # ------------------------------------------------------------------------------------
    # client verbs

    def _serving_registry(self) -> BlockRegistry:
        if self.state is LeaderState.READY and self.registry is not None:
            return self.registry
        if self.state is LeaderState.DEGRADED:
            raise RequestRejected("degraded", f"rank(s) {self.world.dead_ranks()} are dead; no new transfers")
        if self.state is LeaderState.FAILED:
            raise RequestRejected("init_failed", self.error)
        raise RequestRejected("not_ready", f"init sync in progress: {self.world.describe_missing()}")

    def status(self) -> m.Status:
        first = next(iter(self.world.ranks.values()), None)
        reg = self.registry
        return m.Status(
            state=self.state.value,
            # While waiting, say for whom: an engine's start-up wait reports it at its deadline.
            error=self.error or (self.world.describe_missing() if self.state is LeaderState.WAITING else ""),
            world_size=self.world.world_size or 0,
            num_host_blocks=reg.host.capacity if reg else 0,
            num_disk_blocks=self.disk_capacity(),
            block_bytes=self.world.block_bytes if reg else 0,
            block_size=first.layout.block_size if first else 0,
            fingerprint=first.layout.fingerprint if first else "",
            dead_ranks=self.world.dead_ranks(),
        )

    def disk_capacity(self) -> int:
        """Disk blocks served (0 when there is no disk tier or it was turned off)."""
        if self.registry is None or self.registry.disk is None or not self.disk_enabled:
            return 0
        return self.registry.disk.capacity

    def _on_match(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        return self.match(m.hash_array(_as(msg, m.Match).hashes))

    def match(self, hashes: np.ndarray) -> m.MatchReply:
        res = self._serving_registry().match(hashes)
        pending = self._ask_store(hashes, res.total)
        self._count_match(len(hashes), res.host, res.disk, res.object)
        return m.MatchReply(res.host, res.disk, self.index.next_seq, res.object, pending)

    def lookup_report(self, report: m.LookupReport) -> None:
        """Count a lookup a client answered from its index replica (no reply)."""
        if report.host + report.disk > report.queried:
            raise RequestRejected("bad_request", f"lookup report of {report.host} + {report.disk} found blocks "
                                                 f"out of {report.queried} queried")
        self._count_match(report.queried, report.host, report.disk)

    def _count_match(self, queried: int, host: int, disk: int, obj: int = 0) -> None:
        c = self.counters
        for obs in self.observers:
            obs.on_match(queried, host, disk, self.block_size(), obj=obj)
        c.match_requests += 1
        c.match_blocks_queried += queried
        c.match_host_blocks += host
        c.match_disk_blocks += disk
        c.match_object_blocks += obj

    def prepare_load(self, hashes: list[int]) -> m.LoadGrant:
        """Pin the G2 prefix of ``hashes`` and stage its G3 / G4 continuation into fresh G2 slots."""
        reg = self._serving_registry()
        op = Op(next(self._op_ids), OpKind.LOAD, [], [], self._now)
        for h in hashes:
            slot = reg.host.lookup(h)
            if slot is not None:
                reg.host.pin([slot])
                op.slots.append(slot)
                op.hashes.append(h)
                continue
            slot = self._join_staging(op.op_id, h)
            if slot is None:
                slot = self._stage(op.op_id, h)
            if slot is None:
                slot = self._stage_object(op.op_id, h)
            if slot is None:
                break
            if self._staging[slot].source is Tier.DISK:
                op.from_disk += 1
            else:
                op.from_object += 1
            op.staging.add(slot)
            op.slots.append(slot)
            op.hashes.append(h)
        if op.slots:
            self.ops[op.op_id] = op
        return m.LoadGrant(op.op_id if op.slots else 0, m.pack_slots(op.slots), op.ready)

    def poll_loads(self, op_ids: list[int]) -> m.LoadPoll:
        ready, failed = [], []
        for op_id in op_ids:
            op = self.ops.get(op_id)
            if op is None or op.kind is not OpKind.LOAD:
                failed.append(op_id)  # unknown (released, expired or failed earlier)
            elif op.failed and not op.staging:
                failed.append(op_id)
                self._finish(op)
            elif op.ready:
                ready.append(op_id)
        return m.LoadPoll(ready, failed)

    def _on_allocate_store(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.AllocateStore)
        return self.allocate_store(m.unpack_hashes(msg.hashes), msg.first_parent, msg.priority)

    def allocate_store(self, hashes: list[int], first_parent: int = 0, priority: int = 0) -> m.StoreGrant:
        """WRITING host slots for the hashes not held yet (-1: held); a prefix when the pool is full."""
        reg = self._serving_registry()
        if len(set(hashes)) != len(hashes):
            raise RequestRejected("bad_request", "allocate_store: duplicate hashes in one request")
        parents: list[int | None] = [first_parent or None, *hashes[:-1]][: len(hashes)]  # [] for no hashes
        got = reg.host.allocate(hashes, parents, priority=priority)
        slots = [-1 if s is None else s for s in got]
        new = [(h, s) for h, s in zip(hashes, got) if s is not None]
        if not new:
            return m.StoreGrant(0, m.pack_slots(slots))
        op = Op(next(self._op_ids), OpKind.STORE, [s for _, s in new], [h for h, _ in new], self._now)
        self.ops[op.op_id] = op
        return m.StoreGrant(op.op_id, m.pack_slots(slots))

    def _on_release_op(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.ReleaseOp)
        return self.release_op(msg.op_id, msg.absent)

    def release_op(self, op_id: int, absent: list[int] | None = None) -> m.Ack:
        """The client gives up an op that never reached the ranks (store: aborted, load: unpinned),
        or, with ``absent``, a store that never reached those ranks: they count as having stored
        none of it (a rank that has it still reports; its slots stay reserved until then)."""
        op = self.ops.get(op_id)
        if op is None:
            raise RequestRejected("unknown_op", f"op {op_id} is not in flight")
        if absent:
            if op.kind is not OpKind.STORE or not set(absent) <= set(self.world.ranks):
                raise RequestRejected("bad_request", f"release of op {op_id}: absent ranks {absent} of a "
                                                     f"{op.kind.value} op in a world of {sorted(self.world.ranks)}")
            for rank in absent:
                self.transfer_done(rank, op_id, False, "the op never reached this rank")
            return m.Ack()
        if op.dispatched:
            raise RequestRejected("op_dispatched", f"op {op_id} already reached the ranks; it completes on its own")
        op.released, op.failed, op.error = True, True, "released by the client"
        if not op.staging:
            self._finish(op)
        return m.Ack()

    def _on_transfer_done(self, peer: bytes, rid: int, msg: m.Message) -> None:
        msg = _as(msg, m.TransferDone)
        info = self.world.ranks.get(msg.rank)
        if info is None or info.identity != peer:
            self.counters.rejected_messages += 1
            return None  # not this rank's socket: ignore
        info.last_seen = self._now
        stored = set(m.unpack_slots(msg.stored, "stored").tolist()) if msg.stored else None
        self.transfer_done(msg.rank, msg.op_id, msg.ok, msg.error, stored)
        return None

    def transfer_done(self, rank: int, op_id: int, ok: bool, error: str = "", stored: set[int] | None = None) -> None:
        """Rank ``rank`` finished its part of op ``op_id`` (a store: of its slots, only ``stored``
        if given); the op completes once every live rank did."""
        op = self.ops.get(op_id)
        if op is None or rank in op.acked:
            return  # late, duplicate, or unknown: nothing to change
        op.ack(rank, ok, error, stored if op.kind is OpKind.STORE else None)
        if op.done(self.live_ranks()):
            self._finish(op)

    def take_events(self) -> m.EventsReply:
        evs = list(self.events)
        self.events.clear()
        return m.EventsReply(
            kinds=bytes(e.kind for e in evs),
            tiers=bytes(int(e.tier) for e in evs),
            hashes=m.pack_hashes([e.seq_hash for e in evs]),
            parents=m.pack_hashes([e.parent_hash or 0 for e in evs]),
        )

    def index_since(self, seq: int) -> m.IndexUpdates:
        """Index changes from ``seq`` on (or a reset snapshot); served while ready or degraded."""
        if self.registry is None or self.state not in (LeaderState.READY, LeaderState.DEGRADED):
            self._serving_registry()  # raises the reason
        return self.index.since(seq)

    def _on_index_since(self, peer: bytes, rid: int, msg: m.Message) -> m.Message | None:
        msg = _as(msg, m.IndexSince)
        self.polls.forget(peer)  # a client that asks again gave up on its parked poll
        reply = self.index_since(msg.seq)  # raises while not serving, parks nothing then
        if (msg.wait_ms and msg.seq == self.index.next_seq
                and self.polls.park(ParkedPoll(peer, rid, msg.seq, self._now + msg.wait_ms / 1000))):
            return None  # nothing new yet: answered by answer_polls
        return reply

    def answer_polls(self, now: float) -> list[Outbound]:
        """Answers to the parked IndexSince long-polls that are due at ``now``: the index moved
        past their position, or their wait is over (an answer with no changes). Cheap when none
        is parked: the transport calls it after everything that may change the index."""
        return [self._answer_poll(p) for p in self.polls.due(self.index.next_seq, now)]

    def drain_polls(self) -> list[Outbound]:
        """Answers to every parked long-poll now (the leader is shutting down)."""
        return [self._answer_poll(p) for p in self.polls.take_all()]

    def _answer_poll(self, poll: ParkedPoll) -> Outbound:
        try:
            reply: m.Message = self.index_since(poll.seq)
        except RequestRejected as e:
            reply = self.reject(e.code, str(e))
        return Outbound(poll.peer, poll.request_id, reply)

    def reset_cache(self) -> m.Ack:
        """Forget every unpinned block of every tier (objects stay in the store: other instances
        may use them; the G4 index forgets them and store lookups find them again)."""
        reg = self._serving_registry()
        for pool in reg.pools:
            pool.clear()
        self._flush_events()  # the reply names the index position after the clear
        return m.Ack(self.index.next_seq)

    def _on_shutdown(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        log.info("shutdown requested")
        self.stop_requested = True
        return m.Ack()

    # ------------------------------------------------------------------------------------
    # op completion: the matchable-only-after-all-acks rule

    def _finish(self, op: Op) -> None:
        """Release an op's slots: commit a store every rank copied, abort any other, unpin a load."""
        reg = self.registry
        assert reg is not None
        self.ops.pop(op.op_id, None)
        if op.kind is OpKind.STORE:
            if op.failed:
                reg.host.abort(op.slots)
                self.counters.stores_aborted += 1
                log.warning("store op %d aborted: %s", op.op_id, op.error)
                return
            if op.missing:  # some rank did not store these: they must never be matchable
                reg.host.abort([s for s in op.slots if s in op.missing])
                log.info("store op %d: %d of %d blocks not stored by every rank, dropped", op.op_id,
                         len(op.missing), len(op.slots))
            kept = [(h, s) for h, s in zip(op.hashes, op.slots) if s not in op.missing]
            if not kept:
                self.counters.stores_aborted += 1
                return
            hashes, slots = [h for h, _ in kept], [s for _, s in kept]
            reg.host.commit(slots)
            self._observe_transfer(TransferDirection.D2H, len(slots), self._now - op.created)
            self.counters.stores_committed += 1
            self.counters.blocks_stored += len(slots)
            self._offload(hashes, slots)
            self._offload_objects(hashes, slots)
        else:
            reg.host.unpin([s for s in op.slots if s not in op.staging])
            if op.failed:
                self.counters.loads_failed += 1
            else:
                self.counters.loads_completed += 1
                self._observe_transfer(TransferDirection.H2D, len(op.slots), self._now - op.created)
                self.counters.blocks_loaded += len(op.slots)
                self.counters.blocks_loaded_from_disk += op.from_disk
                self.counters.blocks_loaded_from_object += op.from_object

    def _settle_ops(self) -> None:
        """After a rank died (or re-registered): its missing reports count as failures."""
        live = self.live_ranks()
        dead = [r for r in self.world.ranks if r not in live]
        for op in list(self.ops.values()):
            op.rank_died(dead)
            if (op.kind is OpKind.STORE or op.dispatched) and op.done(live):
                self._finish(op)

    def _expire_ops(self, now: float) -> None:
        for op in list(self.ops.values()):
            if now - op.created > OP_TIMEOUT_S and not op.staging:
                log.warning("%s op %d was never completed by the ranks after %.0f s; releasing it",
                            op.kind.value, op.op_id, now - op.created)
                op.failed, op.error = True, "expired"
                self._finish(op)

    # ------------------------------------------------------------------------------------
    # the disk tier (G3): offload after a store commits, staging for loads

    def _offload(self, hashes: list[int], host_slots: list[int]) -> None:
        """Consider newly registered G2 blocks for G3."""
        reg = self.registry
        disk = self.storage.disk if self.storage else None
        if not self.disk_enabled or disk is None or reg is None or reg.disk is None:
            return
        for seq_hash, hslot in zip(hashes, host_slots):
            if reg.disk.holds(seq_hash):
                continue  # already on disk (or being written)
            if self._admission is not None and not self._admission.should_offload(seq_hash):
                self.disk_counters.offload_skipped_filter += 1
                continue
            if self._pending_writes >= self._max_pending_writes:
                self.disk_counters.offload_skipped_busy += 1
                continue
            got = reg.disk.allocate([seq_hash], [reg.host.parent_of(hslot)])
            if not got or got[0] is None:
                self.disk_counters.offload_skipped_busy += 1
                continue
            reg.host.pin([hslot])  # keep the source in G2 until the write completes
            self._pending_writes += 1
            disk.write(got[0], hslot, BlockKey(seq_hash, reg.host.parent_of(hslot)))

    def _start_staging(self, host_slot: int, st: _Staging) -> None:
        self._staging[host_slot] = st
        self._staging_slot[st.seq_hash] = host_slot

    def _end_staging(self, host_slot: int) -> _Staging:
        st = self._staging.pop(host_slot)
        del self._staging_slot[st.seq_hash]
        return st

    def _join_staging(self, op_id: int, seq_hash: int) -> int | None:
        """The G2 slot another load is reading ``seq_hash`` into, now awaited by ``op_id`` too; None if none."""
        slot = self._staging_slot.get(seq_hash)
        if slot is not None:
            self._staging[slot].op_ids.append(op_id)
        return slot

    def _stage(self, op_id: int, seq_hash: int) -> int | None:
        """Start reading ``seq_hash`` from disk into a new WRITING G2 slot; returns that slot or None."""
        reg = self.registry
        disk = self.storage.disk if self.storage else None
        if not self.disk_enabled or disk is None or reg is None or reg.disk is None:
            return None
        dslot = reg.disk.lookup(seq_hash)
        if dslot is None:
            return None
        got = reg.host.allocate([seq_hash], [reg.disk.parent_of(dslot)])
        if not got or got[0] is None:
            return None
        hslot = got[0]
        reg.disk.pin([dslot])
        self._start_staging(hslot, _Staging([op_id], seq_hash, Tier.DISK, dslot))
        disk.read(dslot, hslot, self._checksums[dslot])
        return hslot

    def apply_disk(self, now: float) -> None:
        """Apply the disk I/O completions reported since the last call."""
        disk = self.storage.disk if self.storage else None
        if disk is None:
            return
        self._now = now
        for done in disk.drain():
            if isinstance(done, DiskWriteDone):
                self._apply_write(done)
            else:
                self._apply_read(done)
        self._flush_events()

    def _apply_write(self, done: DiskWriteDone) -> None:
        reg = self.registry
        assert reg is not None and reg.disk is not None
        self._pending_writes -= 1
        reg.host.unpin([done.host_slot])
        if done.ok and self.disk_enabled:
            self._checksums[done.disk_slot] = done.checksum
            reg.disk.commit([done.disk_slot])
            self.disk_counters.offloaded_blocks += 1
            self.disk_counters.bytes_written += self.world.block_bytes
            self.disk_counters.write_seconds += done.seconds
            self._observe_transfer(TransferDirection.H2DISK, 1, done.seconds)
        else:
            reg.disk.abort([done.disk_slot])
            if not done.ok:
                self._disk_failed(f"write of disk slot {done.disk_slot} failed: {done.error}")

    def _apply_read(self, done: DiskReadDone) -> None:
        reg = self.registry
        assert reg is not None and reg.disk is not None
        st = self._end_staging(done.host_slot)
        reg.disk.unpin([st.source_slot])
        reason = ""
        if done.ok:
            reg.host.commit([done.host_slot])
            self.disk_counters.onboarded_blocks += 1
            self.disk_counters.bytes_read += self.world.block_bytes
            self.disk_counters.read_seconds += done.seconds
            self._observe_transfer(TransferDirection.DISK2H, 1, done.seconds)
        else:
            reg.host.abort([done.host_slot])
            self._drop_disk_block(st.seq_hash, st.source_slot)  # wrong or unreadable: never served again
            if done.mismatch:
                reason = "checksum mismatch"
                self.disk_counters.checksum_failures += 1
                if self.disk_counters.checksum_failures == 1:
                    log.error("disk block %016x failed its checksum: dropped, never loaded "
                              "(further failures are counted, not logged)", st.seq_hash)
            else:
                reason = done.error or "read failed"
                self._disk_failed(f"read of disk slot {st.source_slot} failed: {done.error}")
        self._staged(st, done.host_slot, done.ok, f"staging from disk failed: {reason}")

    def _staged(self, st: _Staging, host_slot: int, ok: bool, error: str) -> None:
        """A staging read finished: each load waiting for it keeps the slot pinned, or fails."""
        reg = self.registry
        assert reg is not None
        for op_id in st.op_ids:
            op = self.ops.get(op_id)
            if op is None:
                continue
            op.staging.discard(host_slot)
            if ok:
                reg.host.pin([host_slot])
            else:
                op.failed, op.error = True, error
                op.slots = [s for s in op.slots if s != host_slot]
            if op.released and not op.staging:
                self._finish(op)

    def _drop_disk_block(self, seq_hash: int, dslot: int) -> None:
        assert self.registry is not None and self.registry.disk is not None
        if self.registry.disk.evict(seq_hash):
            self._checksums.pop(dslot, None)

    def _disk_failed(self, what: str) -> None:
        """An I/O error: turn the tier off (nothing on disk matches any more); G2 keeps serving."""
        self.disk_counters.io_errors += 1
        if not self.disk_enabled:
            return
        self.disk_enabled = False
        failure = self.storage.disk.failure if self.storage and self.storage.disk else None
        self.disk_disabled_reason = f"{what}; {failure or ''}".strip("; ")
        assert self.registry is not None and self.registry.disk is not None
        self.registry.disk.clear()
        log.error("disk tier turned off: %s; serving continues from the host pool", self.disk_disabled_reason)

    # ------------------------------------------------------------------------------------
    # the object tier (G4): puts after a store commits, store lookups, staging for loads

    def _object_io(self) -> ObjectIO | None:
        """The object I/O while the tier serves, else None."""
        if not self.object_enabled or self.storage is None or self.registry is None:
            return None
        return self.storage.objects

    def _offload_objects(self, hashes: list[int], host_slots: list[int]) -> None:
        """Put newly registered G2 blocks in the store (admission filter unless write-through)."""
        io = self._object_io()
        reg = self.registry
        if io is None or reg is None or reg.object is None:
            return
        oc = self.object_counters
        for seq_hash, hslot in zip(hashes, host_slots):
            if reg.object.holds(seq_hash):
                continue  # in the store already (or being put)
            if self._object_admission is not None and not self._object_admission.should_offload(seq_hash):
                oc.offload_skipped_filter += 1
                continue
            parent = reg.host.parent_of(hslot)
            got = reg.object.allocate([seq_hash], [parent]) if len(self._object_puts) < self._max_object_puts else []
            if not got or got[0] is None:
                oc.offload_skipped_busy += 1
                continue
            if not io.write(hslot, seq_hash):
                reg.object.abort([got[0]])
                oc.offload_skipped_busy += 1
                continue
            reg.host.pin([hslot])  # keep the source in G2 until the put has copied it
            self._object_puts[seq_hash] = got[0]

    def _stage_object(self, op_id: int, seq_hash: int) -> int | None:
        """Start getting ``seq_hash`` from the store into a new WRITING G2 slot; that slot or None."""
        io = self._object_io()
        reg = self.registry
        if io is None or reg is None or reg.object is None:
            return None
        oslot = reg.object.lookup(seq_hash)
        if oslot is None:
            return None
        got = reg.host.allocate([seq_hash], [reg.object.parent_of(oslot)])
        if not got or got[0] is None:
            return None
        hslot = got[0]
        reg.object.pin([oslot])
        self._start_staging(hslot, _Staging([op_id], seq_hash, Tier.OBJECT, oslot))
        io.read(hslot, seq_hash)
        return hslot

    def _ask_store(self, hashes: np.ndarray, pos: int) -> bool:
        """After a match of ``hashes[:pos]``: is the store being asked about ``hashes[pos]``?

        Starts a batched lookup of the hashes from ``pos`` unless ``hashes[pos]`` is being asked
        already (True) or the store lacked it recently (False). Blocks it finds enter the G4 index
        when the answer comes (:meth:`apply_objects`): a later match of the same hashes sees them.
        """
        io = self._object_io()
        if io is None or pos >= len(hashes):
            return False
        first = int(hashes[pos])
        if first in self._asking:
            return True
        missed = self._store_misses.get(first)
        if missed is not None and self._now - missed < OBJECT_MISS_TTL_S:
            return False
        batch = [h for h in hashes[pos : pos + OBJECT_LOOKUP_BATCH].tolist() if h not in self._asking]
        if len(self._asking) + len(batch) > OBJECT_LOOKUPS_MAX:
            return False  # the store is slow: answer without it
        self._asking.update(batch)
        self.object_counters.lookups += 1
        self.object_counters.lookup_blocks += len(batch)
        io.lookup(batch)
        return True

    def apply_objects(self, now: float) -> None:
        """Apply the object store completions reported since the last call."""
        io = self.storage.objects if self.storage else None
        if io is None:
            return
        self._now = now
        for done in io.drain():
            if isinstance(done, ObjectWriteDone):
                self._apply_object_write(done)
            elif isinstance(done, ObjectReadDone):
                self._apply_object_read(done)
            elif isinstance(done, ObjectLookupDone):
                self._apply_lookup(done)
            else:
                self._object_ready(done)
        self._flush_events()

    def _object_ready(self, done: ObjectReady) -> None:
        if done.ok:
            self.object_enabled, self.object_disabled_reason = True, ""
            log.info("object tier (G4) on")
        else:
            self.object_disabled_reason = done.error
            log.error("object tier (G4) off: %s; serving continues from the other tiers", done.error)

    def _apply_object_write(self, done: ObjectWriteDone) -> None:
        reg = self.registry
        assert reg is not None and reg.object is not None
        oslot = self._object_puts.pop(done.seq_hash)
        reg.host.unpin([done.host_slot])
        if done.ok and self.object_enabled:
            reg.object.commit([oslot])
            oc = self.object_counters
            oc.offloaded_blocks += 1
            oc.bytes_written += self.world.block_bytes
            oc.write_seconds += done.seconds
            self._object_errors_in_row = 0
            self._observe_transfer(TransferDirection.H2OBJ, 1, done.seconds)
        else:
            reg.object.abort([oslot])
            if not done.ok:
                self.object_counters.write_failures += 1
                self._object_error(f"put of {done.seq_hash:016x} failed: {done.error}")

    def _apply_object_read(self, done: ObjectReadDone) -> None:
        reg = self.registry
        assert reg is not None and reg.object is not None
        st = self._end_staging(done.host_slot)
        reg.object.unpin([st.source_slot])
        ok = done.status is GetStatus.OK
        oc = self.object_counters
        if ok:
            reg.host.commit([done.host_slot])
            oc.onboarded_blocks += 1
            oc.bytes_read += self.world.block_bytes
            oc.read_seconds += done.seconds
            self._object_errors_in_row = 0
            self._observe_transfer(TransferDirection.OBJ2H, 1, done.seconds)
        else:
            reg.host.abort([done.host_slot])
            if reg.object.evict(st.seq_hash):  # missing or wrong: never served again
                self._remember_miss(st.seq_hash)
            oc.read_failures += 1
            if done.status is GetStatus.CORRUPT:
                oc.checksum_failures += 1
                if oc.checksum_failures == 1:
                    log.error("%s: dropped, never loaded (further failures are counted, not logged)", done.error)
            elif done.status is GetStatus.FAILED:
                self._object_error(f"get of {st.seq_hash:016x} failed: {done.error}")
        self._staged(st, done.host_slot, ok, f"staging from the object store failed: {done.status.value} {done.error}")

    def _apply_lookup(self, done: ObjectLookupDone) -> None:
        reg = self.registry
        assert reg is not None and reg.object is not None
        self._asking.difference_update(done.hashes)
        if not self.object_enabled:
            return
        for i, (h, found) in enumerate(zip(done.hashes, done.found)):
            if not found:
                self._remember_miss(h)
            elif not reg.object.holds(h):
                got = reg.object.allocate([h], [done.hashes[i - 1] if i else None])
                if got and got[0] is not None:
                    reg.object.commit([got[0]])  # the store has it whole (or a get finds out)
                    self.object_counters.lookup_found += 1

    def _remember_miss(self, seq_hash: int) -> None:
        misses = self._store_misses
        misses[seq_hash] = self._now
        misses.move_to_end(seq_hash)
        while len(misses) > OBJECT_MISSES_MAX:
            misses.popitem(last=False)

    def _object_error(self, what: str) -> None:
        """A store error; a run of them turns the tier off (the rest of kvbm serves on)."""
        self._object_errors_in_row += 1
        if not self.object_enabled or self._object_errors_in_row < OBJECT_FAILURES_OFF:
            return
        self.object_enabled = False
        self.object_disabled_reason = f"{self._object_errors_in_row} store errors in a row, the last: {what}"
        assert self.registry is not None and self.registry.object is not None
        self.registry.object.clear()
        log.error("object tier (G4) turned off: %s; serving continues from the other tiers",
                  self.object_disabled_reason)

    # ------------------------------------------------------------------------------------
    # events and stats

    def _flush_events(self) -> None:
        if self.registry is None:
            return
        evs = self.registry.drain_events()
        if not evs:
            return
        for e in evs:
            if e.kind is m.BlockEventKind.REMOVED:
                if e.tier is Tier.HOST:
                    self.counters.host_evictions += 1
                elif e.tier is Tier.DISK:
                    self.counters.disk_evictions += 1
                else:
                    self.counters.object_evictions += 1
        self.events.extend(evs)
        reg = self.registry
        # The index stream (client replicas) carries the local tiers; G4 hits need a Match.
        local = evs if reg.object is None else [e for e in evs if e.tier is not Tier.OBJECT]
        if local:
            self.index.record(local, lambda tier, h: reg.pool(tier).lookup(h) is not None)
        for obs in self.observers:
            obs.on_events(evs)

    def block_size(self) -> int:
        """Tokens per block (0 before the first rank registered)."""
        first = next(iter(self.world.ranks.values()), None)
        return first.layout.block_size if first else 0

    def _observe_transfer(self, direction: TransferDirection, blocks: int, seconds: float) -> None:
        nbytes = blocks * (self.world.block_bytes if self.registry else 0)
        for obs in self.observers:
            obs.on_transfer(direction.value, blocks, nbytes, seconds)

    def stats(self) -> LeaderStats:
        """A typed snapshot of counters and gauges (the StatsReply and metrics source)."""
        reg = self.registry
        has_disk = reg is not None and reg.disk is not None
        return LeaderStats(
            state=self.state,
            counters=dataclasses.replace(self.counters),
            ranks_alive=len(self.live_ranks()),
            world_size=self.world.world_size or 0,
            ops_in_flight=len(self.ops),
            host=PoolStats.of(reg.host) if reg is not None else None,
            disk=PoolStats.of(reg.disk) if reg is not None and reg.disk is not None else None,
            block_bytes=self.world.block_bytes if reg is not None else None,
            disk_tier=DiskTierStats(self.disk_enabled, self._pending_writes, dataclasses.replace(self.disk_counters))
            if has_disk else None,
            object=PoolStats.of(reg.object) if reg is not None and reg.object is not None else None,
            object_tier=ObjectTierStats(self.object_enabled, len(self._object_puts), len(self._asking),
                                        dataclasses.replace(self.object_counters), self.object_disabled_reason)
            if reg is not None and reg.object is not None else None,
            index_polls_parked=len(self.polls),
        )

    @property
    def disk_busy(self) -> int:
        """G2 -> G3 writes in flight."""
        return self._pending_writes

    def close(self) -> None:
        """Release the storage (host pool segment unlinked, disk file closed)."""
        if self.storage is not None:
            self.storage.close()
            self.storage = None


def _as(msg: m.Message, cls: type[_M]) -> _M:
    assert isinstance(msg, cls)
    return msg
