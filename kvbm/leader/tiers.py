"""Tier pipelines: the traffic between the host pool (G2) and one lower tier, G3 (disk) or G4
(an object store).

A :class:`TierPipeline` owns everything of its tier that is not the commit rule: which newly
committed G2 blocks it copies down (its admission filter and its budget of writes in flight),
staging its blocks back into fresh WRITING G2 slots for loads, applying the completions its
I/O reports, its counters, and turning itself off (:meth:`TierPipeline.disable`) when the tier
fails. :class:`DiskPipeline` and :class:`ObjectPipeline` fill in the I/O calls and how each
tier fails; a future tier is one more subclass.

A pipeline never decides when a load completes: a finished staging read comes back as a
:class:`Staged` record and :class:`kvbm.leader.core.LeaderCore` settles the loads that wait
for it. What a pipeline guarantees is what may become matchable: a tier copy only after its
write succeeded (:meth:`TierPipeline._wrote`), a staged G2 copy only after its read returned
the block whole (:meth:`TierPipeline._read`); an object is in the G4 index only after its put
succeeded or the store said it exists.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from kvbm.ipc.stats import DiskCounters, ObjectCounters, ObjectTierStats, TierCounters, TierStats
from kvbm.leader.admission import FrequencyFilter
from kvbm.leader.disk import BlockKey, StoredBlock
from kvbm.leader.objects import GetStatus
from kvbm.leader.registry import BlockRegistry, Tier, TierPool
from kvbm.leader.storage import (
    DiskIO,
    DiskReadDone,
    DiskWriteDone,
    ObjectIO,
    ObjectLookupDone,
    ObjectReadDone,
    ObjectReady,
    ObjectWriteDone,
)

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.leader.storage import CacheStorage

log = logging.getLogger(__name__)

CountersT = TypeVar("CountersT", bound=TierCounters)

OBJECT_LOOKUP_BATCH = 64  # hashes past a match asked of the store at once
OBJECT_LOOKUPS_MAX = 4096  # hashes being asked at most (more lookups wait for a later match)
OBJECT_MISS_TTL_S = 10.0  # a hash the store did not have is not asked again for this long
OBJECT_MISSES_MAX = 100_000  # remembered misses (oldest forgotten first)
OBJECT_FAILURES_OFF = 8  # store errors in a row that turn the object tier off


class TransferDirection(enum.Enum):
    """What a finished transfer moved (the metrics' ``direction`` label is the value)."""

    D2H = "d2h"  # G1 -> G2 store
    H2D = "h2d"  # G2 -> G1 load
    H2DISK = "h2disk"  # G2 -> G3 offload
    DISK2H = "disk2h"  # G3 -> G2 staging
    H2OBJ = "h2obj"  # G2 -> G4 put
    OBJ2H = "obj2h"  # G4 -> G2 staging


@dataclass
class StagingRead:
    """A G2 slot being filled from a lower tier for loads.

    The load that started the read and every later load that asked for the same block while
    it was still being read (``op_ids``, in order): they all wait for this one read, so loads
    of a shared prefix in one batch do not turn into recomputes."""

    op_ids: list[int]
    seq_hash: int
    source: Tier  # the tier it comes from
    source_slot: int  # its slot in that tier


class StagingTable:
    """Every staging read in flight, by G2 slot and by hash; shared by the pipelines so that a
    load joins a read of the same block whichever tier it comes from."""

    def __init__(self) -> None:
        self._by_slot: dict[int, StagingRead] = {}
        self._slot_of: dict[int, int] = {}  # sequence hash -> its G2 slot in _by_slot

    def start(self, host_slot: int, read: StagingRead) -> None:
        self._by_slot[host_slot] = read
        self._slot_of[read.seq_hash] = host_slot

    def end(self, host_slot: int) -> StagingRead:
        read = self._by_slot.pop(host_slot)
        del self._slot_of[read.seq_hash]
        return read

    def join(self, op_id: int, seq_hash: int) -> int | None:
        """The G2 slot a read of ``seq_hash`` fills, now awaited by ``op_id`` too; None if none."""
        slot = self._slot_of.get(seq_hash)
        if slot is not None:
            self._by_slot[slot].op_ids.append(op_id)
        return slot

    def source(self, host_slot: int) -> Tier:
        """The tier a staging G2 slot is being filled from."""
        return self._by_slot[host_slot].source


@dataclass(frozen=True)
class Staged:
    """A staging read finished: its G2 slot is committed (``ok``) or aborted; the loads of
    ``read.op_ids`` are the core's to settle (``error`` says why they fail)."""

    read: StagingRead
    host_slot: int
    ok: bool
    error: str


@dataclass(frozen=True)
class TierKind:
    """What names a lower tier: its pool, its name in log lines, its transfers' directions."""

    tier: Tier
    label: str
    write: TransferDirection  # G2 -> tier
    read: TransferDirection  # tier -> G2


@dataclass(frozen=True)
class PipelineContext:
    """What a pipeline uses of the leader: the host pool, the staging table, the clock of the
    verb being served, the size of a block and the transfer observers."""

    host: TierPool
    staging: StagingTable
    clock: Callable[[], float]
    block_bytes: int
    observe: Callable[[TransferDirection, int, float], None]  # direction, blocks, seconds


class TierPipeline(ABC, Generic[CountersT]):
    """G2 <-> one lower tier: offload, staging, completions, counters, on/off; see the module doc."""

    kind: ClassVar[TierKind]

    def __init__(self, ctx: PipelineContext, pool: TierPool, counters: CountersT, *,
                 admission: FrequencyFilter | None, max_writes: int, enabled: bool, reason: str = "") -> None:
        self.ctx = ctx
        self.pool = pool
        self.counters = counters
        self.enabled = enabled
        self.reason = reason  # why the tier is off ('' while on)
        self._admission = admission
        self._max_writes = max_writes
        self._writes: dict[int, int] = {}  # write key (the I/O's name for a write) -> tier slot

    # -- what each tier fills in ------------------------------------------------------------

    @abstractmethod
    def _start_write(self, slot: int, host_slot: int, seq_hash: int, parent: int | None) -> int | None:
        """Submit the copy of G2 ``host_slot`` into tier ``slot``; its write key, or None when the
        I/O refused it (queue full)."""

    @abstractmethod
    def _start_read(self, slot: int, host_slot: int, seq_hash: int) -> None:
        """Submit the copy of tier ``slot`` into the WRITING G2 ``host_slot``."""

    @abstractmethod
    def apply(self) -> list[Staged]:
        """Apply the completions the I/O reported since the last call; the staging reads that ended."""

    @abstractmethod
    def stats(self) -> TierStats[CountersT]:
        """A snapshot of the tier's state and counters."""

    def ask_past(self, hashes: np.ndarray, pos: int, first_parent: int | None = None) -> bool:
        """After a match of ``hashes[:pos]``: is the tier looking for ``hashes[pos:]`` elsewhere
        (another instance may have put them where this leader's index does not see)? Only a
        shared tier does; a later match of the same hashes sees what it finds. ``first_parent``:
        the hash before ``hashes[0]`` (None: the sequence's start)."""
        return False

    # -- the shared pipeline -----------------------------------------------------------------

    @property
    def busy(self) -> int:
        """G2 -> tier writes in flight."""
        return len(self._writes)

    def offload(self, hashes: list[int], host_slots: list[int]) -> None:
        """Consider newly committed G2 blocks for this tier (admission filter, then write budget)."""
        if not self.enabled:
            return
        host, c = self.ctx.host, self.counters
        for seq_hash, hslot in zip(hashes, host_slots):
            if self.pool.holds(seq_hash):
                continue  # in the tier already (or being written)
            if self._admission is not None and not self._admission.should_offload(seq_hash):
                c.offload_skipped_filter += 1
                continue
            parent = host.parent_of(hslot)
            got = self.pool.allocate([seq_hash], [parent]) if self.busy < self._max_writes else []
            if not got or got[0] is None:
                c.offload_skipped_busy += 1
                continue
            key = self._start_write(got[0], hslot, seq_hash, parent)
            if key is None:
                self.pool.abort([got[0]])
                c.offload_skipped_busy += 1
                continue
            host.pin([hslot])  # keep the source in G2 until the copy is done
            self._writes[key] = got[0]

    def stage(self, op_id: int, seq_hash: int) -> int | None:
        """Start reading ``seq_hash`` into a new WRITING G2 slot for load ``op_id``; that slot, or
        None when the tier lacks the block (or is off, or G2 has no room)."""
        slot = self.pool.lookup(seq_hash) if self.enabled else None
        if slot is None:
            return None
        got = self.ctx.host.allocate([seq_hash], [self.pool.parent_of(slot)])
        if not got or got[0] is None:
            return None
        hslot = got[0]
        self.pool.pin([slot])
        self.ctx.staging.start(hslot, StagingRead([op_id], seq_hash, self.kind.tier, slot))
        self._start_read(slot, hslot, seq_hash)
        return hslot

    def disable(self, reason: str) -> None:
        """Turn the tier off: nothing in it matches any more; the other tiers serve on."""
        self.enabled, self.reason = False, reason
        self.pool.clear()
        log.error("%s turned off: %s; serving continues from the other tiers", self.kind.label, reason)

    def _wrote(self, key: int, host_slot: int, ok: bool, seconds: float) -> int | None:
        """A write finished: its tier slot, committed (matchable) if it succeeded while the tier
        is on, else aborted (None)."""
        slot = self._writes.pop(key)
        self.ctx.host.unpin([host_slot])
        if not (ok and self.enabled):
            self.pool.abort([slot])
            return None
        self.pool.commit([slot])
        c = self.counters
        c.offloaded_blocks += 1
        c.bytes_written += self.ctx.block_bytes
        c.write_seconds += seconds
        self.ctx.observe(self.kind.write, 1, seconds)
        return slot

    def _read(self, host_slot: int, ok: bool, seconds: float) -> StagingRead:
        """A staging read finished: the G2 slot commits if it returned the block whole, else aborts
        (the caller drops the tier's copy)."""
        read = self.ctx.staging.end(host_slot)
        self.pool.unpin([read.source_slot])
        if not ok:
            self.ctx.host.abort([host_slot])
            return read
        self.ctx.host.commit([host_slot])
        c = self.counters
        c.onboarded_blocks += 1
        c.bytes_read += self.ctx.block_bytes
        c.read_seconds += seconds
        self.ctx.observe(self.kind.read, 1, seconds)
        return read

    def _checksum_failed(self, what: str) -> None:
        self.counters.checksum_failures += 1
        if self.counters.checksum_failures == 1:
            log.error("%s: dropped, never loaded (further failures are counted, not logged)", what)


class DiskPipeline(TierPipeline[DiskCounters]):
    """G2 <-> G3: writes with a checksum per slot, verified reads; the first I/O error turns it off."""

    kind = TierKind(Tier.DISK, "disk tier (G3)", TransferDirection.H2DISK, TransferDirection.DISK2H)

    def __init__(self, ctx: PipelineContext, pool: TierPool, io: DiskIO, *, admission: FrequencyFilter | None,
                 max_writes: int) -> None:
        super().__init__(ctx, pool, DiskCounters(), admission=admission, max_writes=max_writes, enabled=True)
        self.io = io
        self._checksums: dict[int, int] = {}  # disk slot -> checksum of its bytes

    def restore(self, found: list[StoredBlock]) -> int:
        """Re-index the blocks a persistent disk cache of an earlier leader holds; how many."""
        n = self.pool.restore([(b.slot, b.key.seq_hash, b.key.parent) for b in found])
        for b in found:
            if self.pool.hash_of(b.slot) == b.key.seq_hash:
                self._checksums[b.slot] = b.checksum
        return n

    def _start_write(self, slot: int, host_slot: int, seq_hash: int, parent: int | None) -> int | None:
        self.io.write(slot, host_slot, BlockKey(seq_hash, parent))
        return slot

    def _start_read(self, slot: int, host_slot: int, seq_hash: int) -> None:
        self.io.read(slot, host_slot, self._checksums[slot])

    def apply(self) -> list[Staged]:
        out = []
        for done in self.io.drain():
            if isinstance(done, DiskWriteDone):
                self._apply_write(done)
            else:
                out.append(self._apply_read(done))
        return out

    def _apply_write(self, done: DiskWriteDone) -> None:
        if self._wrote(done.disk_slot, done.host_slot, done.ok, done.seconds) is not None:
            self._checksums[done.disk_slot] = done.checksum
        elif not done.ok:
            self._failed(f"write of disk slot {done.disk_slot} failed: {done.error}")

    def _apply_read(self, done: DiskReadDone) -> Staged:
        read = self._read(done.host_slot, done.ok, done.seconds)
        if done.ok:
            return Staged(read, done.host_slot, True, "")
        if self.pool.evict(read.seq_hash):  # wrong or unreadable: never served again
            self._checksums.pop(read.source_slot, None)
        if done.mismatch:
            reason = "checksum mismatch"
            self._checksum_failed(f"disk block {read.seq_hash:016x} failed its checksum")
        else:
            reason = done.error or "read failed"
            self._failed(f"read of disk slot {read.source_slot} failed: {done.error}")
        return Staged(read, done.host_slot, False, f"staging from disk failed: {reason}")

    def _failed(self, what: str) -> None:
        """An I/O error: the disk cannot be trusted any more, so the first one turns the tier off."""
        self.counters.io_errors += 1
        if self.enabled:
            self.disable(f"{what}; {self.io.failure or ''}".strip("; "))

    def stats(self) -> TierStats[DiskCounters]:
        return TierStats(self.enabled, self.busy, replace(self.counters), self.reason)


class ObjectPipeline(TierPipeline[ObjectCounters]):
    """G2 <-> G4: puts, checksummed gets, and lookups of what other instances put in the store.

    The tier is on once the store answered the start-up check; a run of
    :data:`OBJECT_FAILURES_OFF` store errors in a row turns it off (a lone error is the network).
    """

    kind = TierKind(Tier.OBJECT, "object tier (G4)", TransferDirection.H2OBJ, TransferDirection.OBJ2H)

    def __init__(self, ctx: PipelineContext, pool: TierPool, io: ObjectIO, *, admission: FrequencyFilter | None,
                 max_writes: int) -> None:
        super().__init__(ctx, pool, ObjectCounters(), admission=admission, max_writes=max_writes, enabled=False,
                         reason="waiting for the object store to answer")
        self.io = io
        self._errors_in_row = 0
        # Hashes being asked of the store -> their parent (each found block enters the G4 index
        # with its real parent: KV events chain it, and routers drop a chain's broken link).
        self._asking: dict[int, int | None] = {}
        self._misses: OrderedDict[int, float] = OrderedDict()  # hash -> when the store lacked it

    def _start_write(self, slot: int, host_slot: int, seq_hash: int, parent: int | None) -> int | None:
        # A put completes by hash (the store's key), so the hash names the write.
        return seq_hash if self.io.write(host_slot, seq_hash) else None

    def _start_read(self, slot: int, host_slot: int, seq_hash: int) -> None:
        self.io.read(host_slot, seq_hash)

    def ask_past(self, hashes: np.ndarray, pos: int, first_parent: int | None = None) -> bool:
        """Start a batched lookup of the hashes from ``pos`` unless ``hashes[pos]`` is being asked
        already (True) or the store lacked it recently (False). Blocks the store has enter the G4
        index when the answer comes (:meth:`apply`)."""
        if not self.enabled or pos >= len(hashes):
            return False
        first = int(hashes[pos])
        if first in self._asking:
            return True
        missed = self._misses.get(first)
        if missed is not None and self.ctx.clock() - missed < OBJECT_MISS_TTL_S:
            return False
        asked = hashes[pos : pos + OBJECT_LOOKUP_BATCH].tolist()
        parents = [int(hashes[pos - 1]) if pos else first_parent, *asked[:-1]]
        batch = {h: p for h, p in zip(asked, parents) if h not in self._asking}
        if len(self._asking) + len(batch) > OBJECT_LOOKUPS_MAX:
            return False  # the store is slow: answer without it
        self._asking.update(batch)
        self.counters.lookups += 1
        self.counters.lookup_blocks += len(batch)
        self.io.lookup(list(batch))
        return True

    def apply(self) -> list[Staged]:
        out = []
        for done in self.io.drain():
            if isinstance(done, ObjectWriteDone):
                self._apply_write(done)
            elif isinstance(done, ObjectReadDone):
                out.append(self._apply_read(done))
            elif isinstance(done, ObjectLookupDone):
                self._apply_lookup(done)
            else:
                self._ready(done)
        return out

    def _ready(self, done: ObjectReady) -> None:
        if done.ok:
            self.enabled, self.reason = True, ""
            log.info("object tier (G4) on")
        else:
            self.reason = done.error
            log.error("object tier (G4) off: %s; serving continues from the other tiers", done.error)

    def _apply_write(self, done: ObjectWriteDone) -> None:
        if self._wrote(done.seq_hash, done.host_slot, done.ok, done.seconds) is not None:
            self._errors_in_row = 0
        elif not done.ok:
            self.counters.write_failures += 1
            self._error(f"put of {done.seq_hash:016x} failed: {done.error}")

    def _apply_read(self, done: ObjectReadDone) -> Staged:
        ok = done.status is GetStatus.OK
        read = self._read(done.host_slot, ok, done.seconds)
        if ok:
            self._errors_in_row = 0
            return Staged(read, done.host_slot, True, "")
        if self.pool.evict(read.seq_hash):  # missing or wrong: never served again
            self._remember_miss(read.seq_hash)
        self.counters.read_failures += 1
        if done.status is GetStatus.CORRUPT:
            self._checksum_failed(done.error)
        elif done.status is GetStatus.FAILED:
            self._error(f"get of {read.seq_hash:016x} failed: {done.error}")
        return Staged(read, done.host_slot, False,
                      f"staging from the object store failed: {done.status.value} {done.error}")

    def _apply_lookup(self, done: ObjectLookupDone) -> None:
        parents = {h: self._asking.pop(h, None) for h in done.hashes}
        if not self.enabled:
            return
        for h, found in zip(done.hashes, done.found):
            if not found:
                self._remember_miss(h)
            elif not self.pool.holds(h):
                got = self.pool.allocate([h], [parents[h]])
                if got and got[0] is not None:
                    self.pool.commit([got[0]])  # the store has it whole (or a get finds out)
                    self.counters.lookup_found += 1

    def _remember_miss(self, seq_hash: int) -> None:
        misses = self._misses
        misses[seq_hash] = self.ctx.clock()
        misses.move_to_end(seq_hash)
        while len(misses) > OBJECT_MISSES_MAX:
            misses.popitem(last=False)

    def _error(self, what: str) -> None:
        """A store error; a run of them turns the tier off."""
        self._errors_in_row += 1
        if self.enabled and self._errors_in_row >= OBJECT_FAILURES_OFF:
            self.disable(f"{self._errors_in_row} store errors in a row, the last: {what}")

    def stats(self) -> ObjectTierStats:
        return ObjectTierStats(self.enabled, self.busy, replace(self.counters), self.reason,
                               lookups_pending=len(self._asking))


def pipelines(config: KvbmConfig, storage: CacheStorage, registry: BlockRegistry,
              ctx: PipelineContext) -> list[TierPipeline[Any]]:
    """The pipelines of the lower tiers the storage has, in staging order (G3 before G4), with
    their admission filters and write budgets sized for the host pool."""
    out: list[TierPipeline[Any]] = []
    host_blocks = ctx.host.capacity
    if storage.disk is not None:
        assert registry.disk is not None
        # Without a CPU tier every block passes through the small bounce pool: no filter.
        use_filter = config.has_cpu_tier and not config.disable_disk_offload_filter
        disk = DiskPipeline(ctx, registry.disk, storage.disk, max_writes=max(16, host_blocks // 2),
                            admission=FrequencyFilter(clock=ctx.clock) if use_filter else None)
        found = storage.disk.restored()
        if found:  # a persistent disk cache an earlier leader of this layout filled
            log.info("disk tier: %d blocks of an earlier leader re-indexed", disk.restore(found))
        out.append(disk)
    if storage.objects is not None:  # on once the store answers
        assert registry.object is not None
        out.append(ObjectPipeline(ctx, registry.object, storage.objects, max_writes=max(4, host_blocks // 4),
                                  admission=None if config.object_write_through else FrequencyFilter(clock=ctx.clock)))
    return out
