"""The leader core: every block-state transition, in one socket-free object.

:class:`LeaderCore` owns the ranks' membership (:mod:`kvbm.leader.membership`: init sync,
liveness), the block registry (G2 host, G3 disk and G4 object pools), the ops in flight and their
rank acks, and the index change log; block events go to :mod:`kvbm.leader.event_log`.
The traffic between G2 and each lower tier (offload, staging, admission, checksums, turning a
failed tier off) is a :class:`kvbm.leader.tiers.TierPipeline` the core dispatches to. Messages
come in as typed verbs with the time they are handled at (``now``); replies and messages for
other peers come out as :class:`Outbound` records. It never touches a socket, a clock or a byte
of KV: the bytes live behind :mod:`kvbm.leader.storage`, whose I/O reports completions that the
pipelines apply (:meth:`LeaderCore.apply_io`). The transport is :mod:`kvbm.leader.server`.

The rule at kvbm's heart lives here and nowhere else: **a block is matchable only after every
rank acknowledged its copy; a failed or partial transfer never is.** A store's slots stay
WRITING (never matchable) until every live rank reported; a slot is committed only if every
rank reported storing it, and aborted if any rank failed, died or did not store it
(:meth:`LeaderCore._finish`). In a replicated (MLA) world "every rank" of a store is the one
writer rank whose slice is the whole block, in the heads format one rank per distinct range of
KV heads (:meth:`kvbm.leader.world.World.op_ranks`); loads
still go to every rank. A load waiting for a staging read goes to the ranks only once the
read put the block whole in G2 (:meth:`LeaderCore._staged`); the pipelines commit a lower tier's
copy only after its write succeeded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderCounters, LeaderState, LeaderStats, encode_stats
from kvbm.leader.capacity import pool_blocks
from kvbm.leader.index import IndexLog
from kvbm.leader.ops import Op, OpKind
from kvbm.leader.polls import ParkedPoll, ParkedPolls
from kvbm.leader.event_log import BlockEventLog
from kvbm.leader.membership import Membership
from kvbm.leader.observers import Observers
from kvbm.leader.registry import BlockRegistry, Tier
from kvbm.leader.replies import Outbound, RequestRejected
from kvbm.leader.storage import CacheStorage, StorageFactory
from kvbm.leader.tiers import (
    DiskPipeline,
    ObjectPipeline,
    PipelineContext,
    Staged,
    StagingTable,
    TierPipeline,
    TransferDirection,
    pipelines,
)
from kvbm.leader.world import LayoutMismatch, World

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=m.Message)
_P = TypeVar("_P", bound=TierPipeline[Any])

OP_TIMEOUT_S = 300.0  # an op nobody completes (a client bug) is released after this


class LeaderCore:
    """All block state of one engine instance; see the module docstring. Not thread-safe."""

    def __init__(self, config: KvbmConfig, storage: StorageFactory, *, now: float, index_first_seq: int | None = None,
                 index_ring_entries: int | None = None) -> None:
        """``storage`` creates the host pool and disk I/O once the world is known; ``now``: start time."""
        self.config = config
        self._storage_factory = storage
        self.members = Membership(init_timeout_s=config.init_timeout_s,
                                  liveness_timeout_s=config.liveness_timeout_s, now=now)
        self.registry: BlockRegistry | None = None
        self.storage: CacheStorage | None = None
        self.counters = LeaderCounters()
        # Token ids are kept only for KV events (routers index a block by its tokens).
        self.events = BlockEventLog(keep_tokens=bool(config.kv_events_endpoint))
        self.observers = Observers()
        self.ops: dict[int, Op] = {}
        self.stop_requested = False
        self._op_ids = itertools.count(1)
        self._now = now
        ring = {} if index_ring_entries is None else {"ring_entries": index_ring_entries}
        self.index = IndexLog(first_seq=index_first_seq, **ring)
        self.polls = ParkedPolls()  # IndexSince long-polls waiting for the index to move
        # The lower tiers' pipelines, in staging order (G3 before G4); made with the cache.
        self.tiers: list[TierPipeline[Any]] = []
        self._staging = StagingTable()  # G2 slots being filled from a lower tier for loads
        self._handlers: dict[type[m.Message], Callable[[bytes, int, m.Message], list[Outbound] | m.Message | None]] = {
            m.RegisterRank: self._on_register,
            m.PoolAttached: self._on_attached,
            m.Heartbeat: self._on_heartbeat,
            m.TransferDone: self._on_transfer_done,
            m.GetStatus: lambda p, r, msg: self.status(),
            m.Match: self._on_match,
            m.PrepareLoad: self._on_prepare_load,
            m.PollLoads: lambda p, r, msg: self.poll_loads(_as(msg, m.PollLoads).op_ids),
            m.AllocateStore: self._on_allocate_store,
            m.ReleaseOp: self._on_release_op,
            m.GetStats: lambda p, r, msg: m.StatsReply(*encode_stats(self.stats()), self.index.next_seq),
            m.TakeEvents: lambda p, r, msg: self.events.take(),  # the first makes the leader keep tokens
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
        reply: list[Outbound] | m.Message | None
        try:
            if handler is None:  # a reply type (or another message the leader never receives)
                raise RequestRejected("bad_request", f"{msg.TAG} is not a request")
            reply = handler(peer, request_id, msg)
        except RequestRejected as e:
            reply = self.reject(e.code, str(e))
        except m.ProtocolError as e:
            reply = self.reject("bad_request", str(e))
        self._flush_events()
        if isinstance(reply, list):
            return reply
        return [] if reply is None else [Outbound(peer, request_id, reply)]

    def reject(self, code: str, message: str) -> m.ErrorReply:
        """Count a refused or malformed request and build its ErrorReply."""
        self.counters.rejected_messages += 1
        return m.ErrorReply(code, message)

    # ------------------------------------------------------------------------------------
    # init sync and liveness (who is in: :class:`Membership`; the cache and the ops: here)

    @property
    def state(self) -> LeaderState:
        return self.members.state

    @property
    def error(self) -> str:
        return self.members.error

    @property
    def world(self) -> World:
        return self.members.world

    def _on_register(self, peer: bytes, rid: int, msg: m.Message) -> list[Outbound] | m.Message | None:
        msg = _as(msg, m.RegisterRank)
        if self.state is LeaderState.FAILED:
            return m.ErrorReply("init_failed", self.error)
        if msg.slice_bytes > 1 << 34 or msg.num_layers > 4096:
            raise RequestRejected("bad_layout", f"rank {msg.rank}: implausible layout {msg}")
        running = self.storage is not None
        try:
            self.members.register(msg, peer, rid, self._now, running=running)
        except LayoutMismatch as e:
            raise RequestRejected("layout_mismatch", str(e)) from None
        if running:
            # A restarted rank joining a running world gets the existing pool. Its previous
            # incarnation is gone (maybe before the liveness check noticed): settle its ops now.
            self._settle_ops()
            return self._grant(msg.rank)
        if not self.world.complete:
            return None  # answered when the world is complete
        try:
            self._create_cache()
        except (OSError, RuntimeError, ValueError) as e:  # ShmError is a RuntimeError
            self.members.fail(f"cannot create the cache: {e}")
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
            stores=self.world.writes_stores(rank),
            heads=self.world.heads is not None,
        )

    def _create_cache(self) -> None:
        """Size the tiers for the world's block size and create the storage and the registry."""
        cfg = self.config
        block_bytes = self.world.block_bytes
        host_blocks, disk_blocks = pool_blocks(cfg, block_bytes)
        storage = self._storage_factory(host_blocks, block_bytes, disk_blocks, self.world.layout_fingerprint)
        self.storage = storage
        # The registry stamps use with the time of the verb being served.
        self.registry = BlockRegistry(host_blocks, disk_blocks if storage.disk is not None else 0,
                                      clock=lambda: self._now,
                                      object_capacity=cfg.object_num_blocks if storage.objects is not None else 0)
        ctx = PipelineContext(self.registry.host, self._staging, lambda: self._now, block_bytes,
                              self._observe_transfer)
        self.tiers = pipelines(cfg, storage, self.registry, ctx)
        log.info("cache created: %d host blocks of %d B, %d disk blocks", host_blocks, block_bytes,
                 self.disk_capacity())

    def _on_attached(self, peer: bytes, rid: int, msg: m.Message) -> list[Outbound]:
        msg = _as(msg, m.PoolAttached)
        to_tell = self.members.attach(msg.rank, peer, rid, self._now, running=self.storage is not None)
        ready = m.LeaderReady(self.registry.host.capacity if self.registry else 0, self.disk_capacity())
        return [Outbound(identity, request, ready) for identity, request in to_tell]

    def _on_heartbeat(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.Heartbeat)
        if msg.rank >= 0 and not self.members.heartbeat(msg.rank, peer, self._now):
            # E.g. this leader restarted, or declared the rank dead (it stalled past the
            # liveness timeout): the rank must register (and attach) again.
            return m.ErrorReply("not_registered", f"rank {msg.rank} is not registered with this leader")
        return m.Ack()

    def tick(self, now: float) -> list[Outbound]:
        """Periodic work at time ``now``: init deadline, rank liveness, op expiry."""
        self._now = now
        expired = self.members.expire_init(now)  # fails the leader at the deadline
        timeout = m.ErrorReply("init_timeout", self.error)
        out = [Outbound(identity, request, timeout) for identity, request in expired]
        if self.state in (LeaderState.READY, LeaderState.DEGRADED):
            if self.members.check_liveness(now):
                self._settle_ops()
            self._expire_ops(now)
        self._flush_events()
        return out

    def live_ranks(self) -> set[int]:
        return self.members.live_ranks()

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
        first = self.members.first_layout()
        reg = self.registry
        return m.Status(
            state=self.state.value,
            # While waiting, say for whom: an engine's start-up wait reports it at its deadline.
            error=self.error or (self.world.describe_missing() if self.state is LeaderState.WAITING else ""),
            world_size=self.world.world_size or 0,
            num_host_blocks=reg.host.capacity if reg else 0,
            num_disk_blocks=self.disk_capacity(),
            block_bytes=self.world.block_bytes if reg else 0,
            block_size=first.block_size if first else 0,
            fingerprint=first.fingerprint if first else "",
            dead_ranks=self.world.dead_ranks(),
        )

    def disk_capacity(self) -> int:
        """Disk blocks served (0 when there is no disk tier or it was turned off)."""
        disk = self.pipeline(DiskPipeline)
        return disk.pool.capacity if disk is not None and disk.enabled else 0

    def pipeline(self, kind: type[_P]) -> _P | None:
        """The pipeline of that kind, None when its tier is not configured (or not created yet)."""
        return next((t for t in self.tiers if isinstance(t, kind)), None)

    def _on_match(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.Match)
        return self.match(m.hash_array(msg.hashes), msg.first_parent or None)

    def match(self, hashes: np.ndarray, first_parent: int | None = None) -> m.MatchReply:
        """Blocks of ``hashes`` held per tier; ``first_parent``: the hash before ``hashes[0]``."""
        res = self._serving_registry().match(hashes)
        # Every shared tier gets the chance to look past the match (hence no short-circuit).
        pending = any([t.ask_past(hashes, res.total, first_parent) for t in self.tiers])
        self._count_match(len(hashes), res.host, res.disk, res.object)
        return m.MatchReply(res.host, res.disk, self.index.next_seq, res.object, pending)

    def lookup_report(self, report: m.LookupReport) -> None:
        """Count a lookup a client answered from its index replica (no reply)."""
        if report.host + report.disk > report.queried:
            raise RequestRejected("bad_request", f"lookup report of {report.host} + {report.disk} found blocks "
                                                 f"out of {report.queried} queried")
        self._count_match(report.queried, report.host, report.disk)

    def _count_match(self, queried: int, host: int, disk: int, obj: int = 0) -> None:
        self.observers.on_match(queried, host, disk, self.block_size(), obj=obj)
        self.counters.count_match(queried, host, disk, obj)

    def _on_prepare_load(self, peer: bytes, rid: int, msg: m.Message) -> m.Message:
        msg = _as(msg, m.PrepareLoad)
        return self.prepare_load(m.unpack_hashes(msg.hashes), msg.tokens)

    def prepare_load(self, hashes: list[int], tokens: bytes = b"") -> m.LoadGrant:
        """Pin the G2 prefix of ``hashes`` and stage its G3 / G4 continuation into fresh G2 slots.

        ``tokens``: the blocks' token ids (u32 LE, ``block_size`` a block) or empty; kept for the
        KV events of the staged blocks, whose tokens the leader may never have been told.
        """
        reg = self._serving_registry()
        per_block = self.events.per_block("prepare_load", tokens, len(hashes), self.block_size())
        op = Op(next(self._op_ids), OpKind.LOAD, [], [], self._now)
        # The G2 prefix is pinned in one call (a pin per block cost ~20 us each), before any
        # staging below takes G2 slots, which could otherwise evict these.
        n = 0
        while n < len(hashes) and (slot := reg.host.lookup(hashes[n])) is not None:
            op.slots.append(slot)
            n += 1
        reg.host.pin(op.slots)
        op.hashes += hashes[:n]
        for i, h in enumerate(hashes[n:], n):
            slot = reg.host.lookup(h)
            if slot is not None:
                reg.host.pin([slot])
            else:  # join a staging read of the block already under way, or start one
                slot = self._staging.join(op.op_id, h)
                if slot is None:
                    slot = next((s for s in (t.stage(op.op_id, h) for t in self.tiers) if s is not None), None)
                if slot is None:
                    break
                op.staged_from[self._staging.source(slot)] += 1
                op.staging.add(slot)
                if per_block:  # held in G3 or G4 now: dropped with the last tier's copy
                    self.events.keep_tokens(h, per_block[i])
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
        return self.allocate_store(m.unpack_hashes(msg.hashes), msg.first_parent, msg.priority, msg.tokens)

    def allocate_store(self, hashes: list[int], first_parent: int = 0, priority: int = 0,
                       tokens: bytes = b"") -> m.StoreGrant:
        """WRITING host slots for the hashes not held yet (-1: held); a prefix when the pool is full.

        ``tokens``: the blocks' token ids (u32 LE, ``block_size`` a block) for the KV events, or empty.
        """
        reg = self._serving_registry()
        if len(set(hashes)) != len(hashes):
            raise RequestRejected("bad_request", "allocate_store: duplicate hashes in one request")
        per_block = self.events.per_block("allocate_store", tokens, len(hashes), self.block_size())
        parents: list[int | None] = [first_parent or None, *hashes[:-1]][: len(hashes)]  # [] for no hashes
        got = reg.host.allocate(hashes, parents, priority=priority)
        slots = [-1 if s is None else s for s in got]
        new = [(h, s) for h, s in zip(hashes, got) if s is not None]
        if not new:
            return m.StoreGrant(0, m.pack_slots(slots))
        op = Op(next(self._op_ids), OpKind.STORE, [s for _, s in new], [h for h, _ in new], self._now)
        if per_block:
            op.tokens = [t for t, s in zip(per_block, got) if s is not None]
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
        if op is None or rank in op.acked or rank not in self.world.op_ranks(op.kind):
            return  # late, duplicate, unknown, or from a rank that takes no part: nothing to change
        op.ack(rank, ok, error, stored if op.kind is OpKind.STORE else None)
        if op.done(self.live_ranks() & self.world.op_ranks(op.kind)):
            self._finish(op)

    def index_since(self, seq: int) -> m.IndexUpdates:
        """Index changes from ``seq`` on (or a reset snapshot); served while ready or degraded."""
        if self.state not in (LeaderState.READY, LeaderState.DEGRADED):  # (the registry exists then)
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

    def answer_polls(self, now: float | None) -> list[Outbound]:
        """Answers to the parked IndexSince long-polls that are due at ``now``: the index moved
        past their position, or their wait is over (an answer with no changes); all of them when
        ``now`` is None (the leader is shutting down). Cheap when none is parked: the transport
        calls it after everything that may change the index."""
        due = self.polls.take_all() if now is None else self.polls.due(self.index.next_seq, now)
        out = []
        for poll in due:
            try:
                reply: m.Message = self.index_since(poll.seq)
            except RequestRejected as e:
                reply = self.reject(e.code, str(e))
            out.append(Outbound(poll.peer, poll.request_id, reply))
        return out

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
            kept = [i for i, s in enumerate(op.slots) if s not in op.missing]
            if not kept:
                self.counters.stores_aborted += 1
                return
            hashes, slots = [op.hashes[i] for i in kept], [op.slots[i] for i in kept]
            self.events.add_tokens((op.hashes[i], op.tokens[i]) for i in kept if op.tokens)
            reg.host.commit(slots)
            self._observe_transfer(TransferDirection.D2H, len(slots), self._now - op.created)
            self.counters.stores_committed += 1
            self.counters.blocks_stored += len(slots)
            for tier in self.tiers:
                tier.offload(hashes, slots)
        else:
            reg.host.unpin([s for s in op.slots if s not in op.staging])
            if op.failed:
                self.counters.loads_failed += 1
            else:
                self._observe_transfer(TransferDirection.H2D, len(op.slots), self._now - op.created)
                self.counters.count_load(len(op.slots), op.staged_from[Tier.DISK], op.staged_from[Tier.OBJECT])

    def _settle_ops(self) -> None:
        """After a rank died (or re-registered): its missing reports count as failures."""
        live = self.live_ranks()
        for op in list(self.ops.values()):
            # A rank that takes no part in an op (a replicated world's reader, for a store)
            # cannot spoil it by dying.
            taking_part = self.world.op_ranks(op.kind)
            op.rank_died([r for r in taking_part if r not in live])
            if (op.kind is OpKind.STORE or op.dispatched) and op.done(live & taking_part):
                self._finish(op)

    def _expire_ops(self, now: float) -> None:
        for op in list(self.ops.values()):
            if now - op.created > OP_TIMEOUT_S and not op.staging:
                log.warning("%s op %d was never completed by the ranks after %.0f s; releasing it",
                            op.kind.value, op.op_id, now - op.created)
                op.failed, op.error = True, "expired"
                self._finish(op)

    # ------------------------------------------------------------------------------------
    # the lower tiers' completions

    def apply_io(self, now: float) -> None:
        """Apply the lower tiers' I/O completions reported since the last call."""
        self._now = now
        for tier in self.tiers:
            for done in tier.apply():
                self._staged(done)
        self._flush_events()

    def _staged(self, done: Staged) -> None:
        """A staging read finished: each load waiting for it keeps the slot pinned, or fails."""
        assert self.registry is not None
        for op in [o for o in map(self.ops.get, done.read.op_ids) if o is not None]:  # loads still here
            op.staging.discard(done.host_slot)
            if done.ok:
                self.registry.host.pin([done.host_slot])
            else:
                op.failed, op.error = True, done.error
                op.slots = [s for s in op.slots if s != done.host_slot]
            if op.released and not op.staging:
                self._finish(op)

    # ------------------------------------------------------------------------------------
    # events and stats

    def _flush_events(self) -> None:
        reg = self.registry
        if reg is None:
            return
        evs = reg.drain_events()
        if not evs:
            return
        self.events.record(evs, self.counters)
        # The index stream (client replicas) carries the local tiers; G4 hits need a Match.
        local = evs if reg.object is None else [e for e in evs if e.tier is not Tier.OBJECT]
        if local:
            self.index.record(local, lambda tier, h: reg.pool(tier).lookup(h) is not None)
        self.observers.on_events(evs)
        self.events.forget_tokens(evs, reg.pools)

    def block_size(self) -> int:
        """Tokens per block (0 before the first rank registered)."""
        first = self.members.first_layout()
        return first.block_size if first else 0

    def _observe_transfer(self, direction: TransferDirection, blocks: int, seconds: float) -> None:
        nbytes = blocks * (self.world.block_bytes if self.registry else 0)
        self.observers.on_transfer(direction.value, blocks, nbytes, seconds)

    def stats(self) -> LeaderStats:
        """A typed snapshot of counters and gauges (the StatsReply and metrics source)."""
        reg = self.registry
        disk, objects = self.pipeline(DiskPipeline), self.pipeline(ObjectPipeline)
        return LeaderStats(
            state=self.state,
            counters=replace(self.counters),
            ranks_alive=len(self.live_ranks()),
            world_size=self.world.world_size or 0,
            ops_in_flight=len(self.ops),
            host=reg.host.occupancy() if reg is not None else None,
            disk=disk.pool.occupancy() if disk is not None else None,
            block_bytes=self.world.block_bytes if reg is not None else None,
            disk_tier=disk.stats() if disk is not None else None,
            object=objects.pool.occupancy() if objects is not None else None,
            object_tier=objects.stats() if objects is not None else None,
            index_polls_parked=len(self.polls),
        )

    def close(self) -> None:
        """Release the storage (host pool segment unlinked, disk file closed)."""
        if self.storage is not None:
            self.storage.close()
            self.storage = None


def _as(msg: m.Message, cls: type[_M]) -> _M:
    assert isinstance(msg, cls)
    return msg
