"""The leader core in-process: no process, socket or shared memory; time is passed in.

The storage is :class:`MemStorage`, an in-memory implementation of the core's storage
interface that really copies bytes between a host array and a disk array and checks checksums;
its I/O runs when a test says so, so every interleaving here is chosen, not raced.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from collections.abc import Callable

import numpy as np
import pytest

from kvbm.config import KvbmConfig
from kvbm.ipc import messages as m
from kvbm.ipc.messages import BlockEventKind
from kvbm.ipc.stats import LeaderStats
from kvbm.leader.core import OP_TIMEOUT_S, LeaderCore, LeaderState
from kvbm.leader.replies import Outbound
from kvbm.leader.index import IndexLog
from kvbm.leader.polls import ParkedPolls
from kvbm.leader.disk import BlockKey, StoredBlock
from kvbm.leader.registry import Tier
from kvbm.leader.objects import GetStatus
from kvbm.leader.storage import (
    CacheStorage,
    DiskCompletion,
    DiskReadDone,
    DiskWriteDone,
    ObjectCompletion,
    ObjectLookupDone,
    ObjectReadDone,
    ObjectReady,
    ObjectWriteDone,
)

BB = 4096  # two ranks' 2048-byte slices side by side
STORED, REMOVED, CLEARED = BlockEventKind.STORED, BlockEventKind.REMOVED, BlockEventKind.CLEARED


class MemDisk:
    """Disk I/O between two in-memory arrays; queued until :meth:`run`."""

    def __init__(self, host: bytearray, disk_blocks: int) -> None:
        self.host = host
        self.disk = bytearray(disk_blocks * BB)
        self._queue: list[Callable[[], DiskCompletion]] = []
        self._done: list[DiskCompletion] = []
        self.fail_io: str | None = None  # the error every following I/O fails with
        self.failure: str | None = None

    def write(self, disk_slot: int, host_slot: int, key: BlockKey) -> None:
        def do() -> DiskCompletion:
            if self.fail_io:
                self.failure = self.failure or self.fail_io
                return DiskWriteDone(disk_slot, host_slot, False, 0, 0.0, self.fail_io)
            data = self.host[host_slot * BB:(host_slot + 1) * BB]
            self.disk[disk_slot * BB:(disk_slot + 1) * BB] = data
            return DiskWriteDone(disk_slot, host_slot, True, zlib.crc32(data), 0.001, "")

        self._queue.append(do)

    def read(self, disk_slot: int, host_slot: int, checksum: int) -> None:
        def do() -> DiskCompletion:
            if self.fail_io:
                self.failure = self.failure or self.fail_io
                return DiskReadDone(disk_slot, host_slot, False, False, 0.0, self.fail_io)
            data = self.disk[disk_slot * BB:(disk_slot + 1) * BB]
            self.host[host_slot * BB:(host_slot + 1) * BB] = data
            if zlib.crc32(data) != checksum:
                return DiskReadDone(disk_slot, host_slot, False, True, 0.001, "checksum mismatch")
            return DiskReadDone(disk_slot, host_slot, True, False, 0.001, "")

        self._queue.append(do)

    def run(self) -> int:
        """Perform every queued I/O; returns how many."""
        todo, self._queue = self._queue, []
        self._done.extend(do() for do in todo)
        return len(todo)

    def restored(self) -> list[StoredBlock]:
        return []

    def drain(self) -> list[DiskCompletion]:
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        self._queue.clear()


class MemObjects:
    """Object I/O against a dict (hash -> bytes, None: a corrupt object); queued until :meth:`run`."""

    def __init__(self, host: bytearray, ready: ObjectReady, queue_cap: int = 64) -> None:
        self.host = host
        self.store: dict[int, bytes | None] = {}
        self.queue_cap = queue_cap
        self.fail_io: str | None = None  # the error every following put/get fails with
        self._puts: list[Callable[[], ObjectCompletion]] = []
        self._queue: list[Callable[[], ObjectCompletion]] = []
        self._done: list[ObjectCompletion] = [ready]

    def write(self, host_slot: int, seq_hash: int) -> bool:
        if len(self._puts) >= self.queue_cap:
            return False
        data = bytes(self.host[host_slot * BB:(host_slot + 1) * BB])

        def do() -> ObjectCompletion:
            if self.fail_io:
                return ObjectWriteDone(seq_hash, host_slot, False, 0.0, self.fail_io)
            self.store[seq_hash] = data
            return ObjectWriteDone(seq_hash, host_slot, True, 0.001, "")

        self._puts.append(do)
        return True

    def read(self, host_slot: int, seq_hash: int) -> None:
        def do() -> ObjectCompletion:
            if self.fail_io:
                return ObjectReadDone(seq_hash, host_slot, GetStatus.FAILED, 0.0, self.fail_io)
            if seq_hash not in self.store:
                return ObjectReadDone(seq_hash, host_slot, GetStatus.MISSING, 0.001, "")
            data = self.store[seq_hash]
            if data is None:
                return ObjectReadDone(seq_hash, host_slot, GetStatus.CORRUPT, 0.001, f"object of {seq_hash:016x} "
                                      "failed its checksum")
            self.host[host_slot * BB:(host_slot + 1) * BB] = data
            return ObjectReadDone(seq_hash, host_slot, GetStatus.OK, 0.001, "")

        self._queue.append(do)

    def lookup(self, hashes: list[int]) -> None:
        batch = tuple(hashes)
        self._queue.append(lambda: ObjectLookupDone(batch, tuple(h in self.store for h in batch), 0.001))

    def run(self) -> int:
        todo, self._puts, self._queue = self._puts + self._queue, [], []
        self._done.extend(do() for do in todo)
        return len(todo)

    def drain(self) -> list[ObjectCompletion]:
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        self.run()  # a clean shutdown finishes the queued puts


class MemStorage:
    def __init__(self, host_blocks: int, block_bytes: int, disk_blocks: int,
                 objects: ObjectReady | None = None) -> None:
        assert block_bytes == BB
        self.host = bytearray(host_blocks * block_bytes)
        self.mem_disk = MemDisk(self.host, disk_blocks) if disk_blocks else None
        self.mem_objects = MemObjects(self.host, objects) if objects is not None else None
        self.closed = False

    @property
    def segment(self) -> str:
        return "mem"

    @property
    def disk(self) -> MemDisk | None:
        return self.mem_disk

    @property
    def objects(self) -> MemObjects | None:
        return self.mem_objects

    def close(self) -> None:
        self.closed = True


class Harness:
    """A core with ``world`` ranks (peers r0, r1, ...) and a client peer; time moves only on request."""

    def __init__(self, cfg: KvbmConfig, world: int = 2, *, first_seq: int = 1, ring: int | None = None,
                 objects: ObjectReady | None = None, replicated: bool = False) -> None:
        self.storages: list[MemStorage] = []

        def create(host_blocks: int, block_bytes: int, disk_blocks: int, layout: str) -> CacheStorage:
            self.storages.append(MemStorage(host_blocks, block_bytes, disk_blocks, objects))
            return self.storages[-1]

        self.now = 1000.0
        self.world = world
        self.core = LeaderCore(cfg, create, now=self.now, index_first_seq=first_seq, index_ring_entries=ring)
        self.rid = 0
        for r in range(world):
            self.send(f"r{r}".encode(), _layout(r, world, replicated))
        for r in range(world):
            self.send(f"r{r}".encode(), m.PoolAttached(r))
        assert self.core.state is LeaderState.READY

    @property
    def disk(self) -> MemDisk:
        d = self.storages[-1].mem_disk
        assert d is not None
        return d

    def send(self, peer: bytes, msg: m.Message) -> list[Outbound]:
        self.rid += 1
        return self.core.handle(peer, self.rid, msg, self.now)

    def ask(self, msg: m.Message, peer: bytes = b"client") -> m.Message:
        """The one reply to ``msg`` from the client's peer."""
        out = self.send(peer, msg)
        assert len(out) == 1 and out[0].peer == peer and out[0].request_id == self.rid, out
        return out[0].message

    def allocate(self, hashes: list[int], first_parent: int = 0) -> tuple[int, list[int]]:
        g = self.ask(m.AllocateStore(m.pack_hashes(hashes), first_parent, 0))
        assert isinstance(g, m.StoreGrant), g
        return g.op_id, m.unpack_slots(g.slots).tolist()

    def ack(self, rank: int, op_id: int, ok: bool = True) -> None:
        assert self.send(f"r{rank}".encode(), m.TransferDone(rank, op_id, ok, "" if ok else "copy failed")) == []

    def store(self, hashes: list[int], first_parent: int = 0) -> None:
        """A store every rank copied."""
        op_id, _ = self.allocate(hashes, first_parent)
        for r in range(self.world):
            self.ack(r, op_id)

    def match(self, hashes: list[int]) -> tuple[int, int]:
        r = self.ask(m.Match(m.pack_hashes(hashes)))
        assert isinstance(r, m.MatchReply), r
        return r.host, r.disk

    def load(self, hashes: list[int]) -> m.LoadGrant:
        g = self.ask(m.PrepareLoad(m.pack_hashes(hashes)))
        assert isinstance(g, m.LoadGrant), g
        return g

    def poll(self, *op_ids: int) -> tuple[list[int], list[int]]:
        p = self.ask(m.PollLoads(list(op_ids)))
        assert isinstance(p, m.LoadPoll)
        return p.ready, p.failed

    def heartbeats(self, ranks: list[int]) -> None:
        for r in ranks:
            assert isinstance(self.ask(m.Heartbeat(r), f"r{r}".encode()), m.Ack)

    def advance(self, seconds: float) -> list[Outbound]:
        self.now += seconds
        return self.core.tick(self.now)

    def io(self) -> None:
        """Run the disk I/O queued so far and let the core apply the completions."""
        self.disk.run()
        self.core.apply_io(self.now)

    def object_io(self) -> None:
        """Run the object I/O queued so far and let the core apply the completions."""
        objects = self.storages[-1].mem_objects
        assert objects is not None
        objects.run()
        self.core.apply_io(self.now)

    def stats(self) -> LeaderStats:
        """The core's stats as a client reads them: through GetStats and the wire codec."""
        reply = self.ask(m.GetStats())
        _, wire = m.decode(m.encode(reply))
        assert isinstance(wire, m.StatsReply)
        s = wire.stats
        local = self.core.stats()
        assert s == replace(local, disk_tier=local.disk_tier and replace(local.disk_tier, reason=""),
                            object_tier=local.object_tier and replace(local.object_tier, reason=""))
        assert self.core.registry is not None
        self.core.registry.check_invariants()
        return s

    def since(self, seq: int) -> m.IndexUpdates:
        r = self.ask(m.IndexSince(seq))
        assert isinstance(r, m.IndexUpdates), r
        return r


def _layout(rank: int, world: int, replicated: bool = False) -> m.RegisterRank:
    """Rank ``rank``'s slice: a share of a BB-byte block, or (replicated: MLA) all of it."""
    return m.RegisterRank(rank, world, 2, BB if replicated else BB // world, "float16", "test", 16, "fp",
                          100 + rank, replicated)


def _entries(u: m.IndexUpdates) -> list[tuple[BlockEventKind, Tier, int]]:
    return [(BlockEventKind(k), Tier(t), h) for k, t, h in zip(u.kinds, u.tiers, m.unpack_hashes(u.hashes))]


@pytest.fixture
def host_only(make_config) -> Callable[..., Harness]:
    def make(host: int = 8, world: int = 2, **kw: int) -> Harness:
        return Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=str(host)), world, **kw)

    return make


@pytest.fixture
def with_disk(make_config, tmp_path) -> Callable[..., Harness]:
    def make(host: int = 4, disk: int = 16) -> Harness:
        cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=str(host),
                          DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS=str(disk), DYN_KVBM_DISK_CACHE_DIR=str(tmp_path),
                          DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
        return Harness(cfg)

    return make


# ------------------------------------------------------------------------------------------
# init and the acks rule


def test_init_sync_grants_every_rank_once_the_world_is_complete(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    core = LeaderCore(cfg, lambda h, b, d, layout: MemStorage(h, b, d), now=0.0)
    assert core.handle(b"r1", 7, _layout(1, 2), 0.0) == []  # answered when the world is complete
    out = core.handle(b"r0", 8, _layout(0, 2), 0.1)
    grants = {(o.peer, o.request_id): o.message for o in out}
    assert set(grants) == {(b"r0", 8), (b"r1", 7)}
    assert grants[(b"r1", 7)] == m.PoolGrant("mem", 8, BB, BB // 2)
    assert core.handle(b"r0", 9, m.PoolAttached(0), 0.2) == [] and core.state is LeaderState.WAITING
    ready = core.handle(b"r1", 10, m.PoolAttached(1), 0.3)
    assert {(o.peer, o.request_id) for o in ready} == {(b"r0", 9), (b"r1", 10)}
    assert core.state is LeaderState.READY


def test_init_timeout_fails_with_the_missing_ranks(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    core = LeaderCore(cfg, lambda h, b, d, layout: MemStorage(h, b, d), now=0.0)
    core.handle(b"r0", 1, _layout(0, 2), 0.0)
    assert core.tick(cfg.init_timeout_s - 0.1) == []
    (out,) = core.tick(cfg.init_timeout_s)
    assert out.peer == b"r0" and out.request_id == 1 and isinstance(out.message, m.ErrorReply)
    assert out.message.code == "init_timeout" and "rank(s) [1] did not register" in out.message.message
    assert core.state is LeaderState.FAILED


def test_store_is_matchable_only_after_every_rank_acked(host_only) -> None:
    h = host_only()
    hashes = [11, 12, 13]
    op_id, slots = h.allocate(hashes)
    assert op_id and slots == [0, 1, 2]
    assert h.match(hashes) == (0, 0) and h.stats().host.writing == 3
    h.ack(0, op_id)
    assert h.match(hashes) == (0, 0)  # one rank of two: not yet
    h.ack(0, op_id)  # a duplicate changes nothing
    assert h.match(hashes) == (0, 0)
    h.ack(1, op_id)
    assert h.match(hashes) == (3, 0)
    s = h.stats()
    assert s.counters.stores_committed == 1 and s.counters.blocks_stored == 3 and s.ops_in_flight == 0


def test_partial_acks_one_rank_fails_never_matchable(host_only) -> None:
    h = host_only()
    op_id, _ = h.allocate([21, 22])
    h.ack(0, op_id, ok=True)
    h.ack(1, op_id, ok=False)
    assert h.match([21, 22]) == (0, 0)
    s = h.stats()
    assert s.counters.stores_aborted == 1 and s.host.free == s.host.capacity and s.ops_in_flight == 0
    # A failure first, then a success: still aborted, only when both reported.
    op_id, _ = h.allocate([21, 22])
    h.ack(1, op_id, ok=False)
    assert h.stats().host.writing == 2  # slots stay reserved while rank 0 may still copy
    h.ack(0, op_id, ok=True)
    assert h.match([21, 22]) == (0, 0) and h.stats().counters.stores_aborted == 2
    assert _entries(h.since(0)) == []  # nothing ever became matchable


def test_a_store_commits_only_the_slots_every_rank_stored(host_only) -> None:
    h = host_only()
    op_id, slots = h.allocate([41, 42, 43, 44])
    h.ack(0, op_id)  # rank 0: all of them
    h.send(b"r1", m.TransferDone(1, op_id, True, "", m.pack_slots(slots[:2])))  # rank 1: the first two
    assert h.match([41, 42]) == (2, 0) and h.match([43]) == (0, 0) and h.match([44]) == (0, 0)
    s = h.stats()
    assert s.counters.blocks_stored == 2 and s.counters.stores_committed == 1 and s.host.writing == 0
    assert s.host.free == s.host.capacity - 2 and s.ops_in_flight == 0
    assert [e[2] for e in _entries(h.since(0))] == [41, 42]  # only those ever became matchable
    # A rank that stored none of the op's slots reported on others': nothing commits.
    op_id, slots = h.allocate([51, 52])
    h.send(b"r0", m.TransferDone(0, op_id, True, "", m.pack_slots([slots[0]])))
    h.send(b"r1", m.TransferDone(1, op_id, True, "", m.pack_slots([slots[1]])))
    assert h.match([51]) == (0, 0) and h.match([52]) == (0, 0)
    assert h.stats().counters.stores_aborted == 1 and h.stats().host.writing == 0


def test_a_store_released_for_a_rank_it_never_reached(host_only) -> None:
    h = host_only()
    op_id, _ = h.allocate([61, 62])
    assert isinstance(h.ask(m.ReleaseOp(op_id, [1])), m.Ack)  # rank 1 never got it
    assert h.stats().host.writing == 2  # rank 0 may still be copying: reserved until it reports
    h.ack(0, op_id)
    assert h.match([61]) == (0, 0)
    s = h.stats()
    assert s.counters.stores_aborted == 1 and s.host.writing == 0 and s.ops_in_flight == 0
    # The absent rank's report after all cannot revive it; a load or an unknown rank is refused.
    h.ack(1, op_id)
    assert h.match([61]) == (0, 0)
    op_id, _ = h.allocate([63])
    bad = h.ask(m.ReleaseOp(op_id, [5]))
    assert isinstance(bad, m.ErrorReply) and bad.code == "bad_request"
    h.store([64])
    g = h.load([64])
    bad = h.ask(m.ReleaseOp(g.op_id, [1]))
    assert isinstance(bad, m.ErrorReply) and bad.code == "bad_request"


def test_a_transfer_done_from_another_socket_is_ignored(host_only) -> None:
    h = host_only()
    op_id, _ = h.allocate([31])
    h.ack(0, op_id)
    assert h.send(b"r0", m.TransferDone(1, op_id, True, "")) == []  # rank 1's report from rank 0's socket
    assert h.match([31]) == (0, 0) and h.stats().counters.rejected_messages == 1
    h.ack(1, op_id)
    assert h.match([31]) == (1, 0)


# ------------------------------------------------------------------------------------------
# replicated (MLA) worlds: one slice, written by rank 0, loaded by every rank


def test_replicated_world_grants_one_slice_and_one_writer(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    core = LeaderCore(cfg, lambda h, b, d, layout: MemStorage(h, b, d), now=0.0)
    assert core.handle(b"r1", 1, _layout(1, 2, replicated=True), 0.0) == []
    out = core.handle(b"r0", 2, _layout(0, 2, replicated=True), 0.1)
    grants = {o.peer: o.message for o in out}
    assert grants == {b"r0": m.PoolGrant("mem", 8, BB, 0, stores=True),
                      b"r1": m.PoolGrant("mem", 8, BB, 0, stores=False)}  # BB, not 2 x BB
    assert f"slices=once:{BB};" in core.world.layout_fingerprint  # no TP size: any TP serves any


def test_replicated_and_sliced_ranks_never_share_a_world(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    core = LeaderCore(cfg, lambda h, b, d, layout: MemStorage(h, b, d), now=0.0)
    core.handle(b"r0", 1, _layout(0, 2, replicated=True), 0.0)
    (out,) = core.handle(b"r1", 2, m.RegisterRank(1, 2, 2, BB, "float16", "test", 16, "fp", 101, False), 0.1)
    assert isinstance(out.message, m.ErrorReply) and out.message.code == "layout_mismatch"
    assert "replicated" in out.message.message


def test_replicated_store_commits_on_the_writer_alone_loads_need_every_rank(make_config) -> None:
    h = Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8"), 2, replicated=True)
    op_id, _ = h.allocate([1, 2])
    h.ack(1, op_id, ok=False)  # a rank that takes no part in stores: its report changes nothing
    assert h.match([1, 2]) == (0, 0) and h.stats().host.writing == 2
    h.ack(0, op_id)
    assert h.match([1, 2]) == (2, 0)
    load = h.load([1, 2])
    h.ack(0, load.op_id)
    assert h.stats().host.pinned == 2  # rank 1 has not copied the slice yet
    h.ack(1, load.op_id)
    s = h.stats()
    assert s.host.pinned == 0 and s.counters.loads_completed == 1 and s.ops_in_flight == 0


def test_replicated_store_fails_only_if_the_writer_dies(make_config) -> None:
    h = Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8"), 2, replicated=True)
    kept, _ = h.allocate([1, 2])
    h.advance(1.0)
    h.heartbeats([0])
    h.advance(h.core.config.liveness_timeout_s)  # rank 1 (a reader) is dead
    assert h.core.world.dead_ranks() == [1] and h.stats().host.writing == 2
    h.ack(0, kept)  # the writer's copy is the whole block: it commits
    assert h.core.registry is not None and h.core.registry.match([1, 2]).host == 2
    h.heartbeats([0])
    assert isinstance(h.ask(_layout(1, 2, True), b"r1"), m.PoolGrant)  # it restarts on the same socket id
    assert isinstance(h.ask(m.PoolAttached(1), b"r1"), m.LeaderReady)
    lost, _ = h.allocate([3, 4])
    h.advance(1.0)
    h.heartbeats([1])
    h.advance(h.core.config.liveness_timeout_s)  # now the writer is dead mid-store
    assert h.core.world.dead_ranks() == [0]
    s = h.stats()
    assert s.counters.stores_aborted == 1 and s.host.writing == 0
    assert h.core.registry.match([1, 2, 3, 4]).host == 2


# ------------------------------------------------------------------------------------------
# rank death, expiry


def test_rank_death_aborts_stores_in_flight_degrades_then_rejoins(host_only) -> None:
    h = host_only()
    h.store([1, 2])
    op_id, _ = h.allocate([3, 4])
    h.ack(0, op_id)  # rank 1 goes silent before copying
    load = h.load([1, 2])
    assert load.op_id and load.ready
    h.ack(0, load.op_id)
    h.advance(1.0)
    h.heartbeats([0])
    h.advance(h.core.config.liveness_timeout_s)  # rank 1's last report is now too old
    assert h.core.state is LeaderState.DEGRADED and h.core.world.dead_ranks() == [1]
    s = h.stats()
    assert s.counters.stores_aborted == 1 and s.ops_in_flight == 0 and s.host.writing == 0 and s.host.pinned == 0
    assert s.counters.loads_failed == 1  # rank 1 never confirmed its part of the load
    err = h.ask(m.Match(m.pack_hashes([1, 2])))
    assert isinstance(err, m.ErrorReply) and err.code == "degraded"
    assert h.core.registry is not None and h.core.registry.match([1, 2, 3, 4]).host == 2  # the aborted store: never
    # A dead rank's heartbeat is refused: it must register again.
    hb = h.ask(m.Heartbeat(1), b"r1")
    assert isinstance(hb, m.ErrorReply) and hb.code == "not_registered"
    # It restarts (new socket), is granted the existing pool and, once attached, the leader serves again.
    grant = h.ask(_layout(1, 2), b"r1-new")
    assert isinstance(grant, m.PoolGrant) and grant.slice_offset == BB // 2
    assert h.core.state is LeaderState.DEGRADED
    ready = h.ask(m.PoolAttached(1), b"r1-new")
    assert isinstance(ready, m.LeaderReady) and h.core.state is LeaderState.READY
    op_id, _ = h.allocate([3, 4])
    h.ack(0, op_id)
    h.send(b"r1-new", m.TransferDone(1, op_id, True, ""))
    assert h.match([1, 2, 3, 4]) == (4, 0)


def test_a_rank_reregistering_aborts_the_stores_its_old_self_had_acked(host_only) -> None:
    h = host_only()
    op_id, _ = h.allocate([5])
    h.ack(1, op_id)  # the old rank 1 copied, then restarted before rank 0 reported
    assert isinstance(h.ask(_layout(1, 2), b"r1-new"), m.PoolGrant)
    h.ack(0, op_id)
    assert h.core.registry is not None and h.core.registry.match([5]).host == 0
    assert h.stats().counters.stores_aborted == 1


def test_ops_nobody_completes_expire(host_only) -> None:
    h = host_only()
    h.store([1, 2])
    store_op, _ = h.allocate([3])
    load = h.load([1, 2])
    assert h.stats().host.pinned == 2 and h.stats().ops_in_flight == 2
    for _ in range(int(OP_TIMEOUT_S) // 1 + 2):  # ranks stay alive (heartbeats) but never report
        h.heartbeats([0, 1])
        h.advance(1.0)
    s = h.stats()
    assert s.ops_in_flight == 0 and s.host.pinned == 0 and s.host.writing == 0
    assert s.counters.stores_aborted == 1 and s.counters.loads_failed == 1 and h.match([1, 2, 3]) == (2, 0)
    assert h.poll(load.op_id) == ([], [load.op_id])
    h.ack(0, store_op)  # a late report of an expired op changes nothing
    assert h.match([3]) == (0, 0)


# ------------------------------------------------------------------------------------------
# disk tier: offload and staging


def _disk_only_block(h: Harness, seq_hash: int) -> None:
    """Store ``seq_hash``, offload it, then push it out of the 4-block host pool."""
    h.store([seq_hash])
    h.io()
    h.store([seq_hash + 100 + i for i in range(4)])
    h.io()
    assert h.match([seq_hash]) == (0, 1)


def _corrupt_on_disk(h: Harness, seq_hash: int) -> None:
    """Change the disk copy's bytes behind the leader's back."""
    reg = h.core.registry
    assert reg is not None and reg.disk is not None
    dslot = reg.disk.lookup(seq_hash)
    assert dslot is not None
    h.disk.disk[dslot * BB] ^= 0xFF


def test_offloaded_block_is_matchable_on_disk_only_after_its_write(with_disk) -> None:
    h = with_disk()
    h.store([7])
    assert h.stats().disk_tier.busy == 1 and h.stats().host.pinned == 1  # source pinned while written
    assert h.core.registry is not None and h.core.registry.disk is not None
    assert h.core.registry.disk.lookup(7) is None
    h.io()
    assert h.core.registry.disk.lookup(7) is not None
    s = h.stats()
    assert s.disk_tier.counters.offloaded_blocks == 1 and s.disk_tier.busy == 0 and s.host.pinned == 0


def test_staging_from_disk_loads_then_the_block_is_back_in_g2(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    load = h.load([7])
    assert load.op_id and not load.ready and h.poll(load.op_id) == ([], [])
    assert h.match([7]) == (0, 1)  # the staging slot is not matchable until the read checked out
    h.io()
    assert h.poll(load.op_id) == ([load.op_id], [])
    h.ack(0, load.op_id)
    h.ack(1, load.op_id)
    s = h.stats()
    assert s.counters.loads_completed == 1 and s.counters.blocks_loaded_from_disk == 1 and s.host.pinned == 0
    assert h.match([7]) == (1, 0)


def test_staging_checksum_mismatch_fails_the_load_and_drops_the_block(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    _corrupt_on_disk(h, 7)
    load = h.load([7])
    h.io()
    assert h.poll(load.op_id) == ([], [load.op_id])
    assert h.match([7]) == (0, 0)  # neither the bad disk copy nor the staged G2 slot
    s = h.stats()
    assert s.disk_tier.counters.checksum_failures == 1 and s.counters.loads_failed == 1 and s.disk_tier.enabled == 1
    assert s.host.writing == 0 and s.host.pinned == 0 and s.ops_in_flight == 0


def test_a_disk_read_error_fails_the_load_and_turns_the_tier_off(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    h.store([8])  # its offload is in flight when the device fails
    load = h.load([7])
    h.disk.fail_io = "EIO: input/output error"
    h.io()
    assert h.poll(load.op_id) == ([], [load.op_id])
    s = h.stats()
    assert s.disk_tier.enabled == 0 and s.disk.registered == 0 and s.disk_tier.counters.io_errors >= 1
    assert s.counters.loads_failed == 1 and s.disk_tier.busy == 0 and s.host.writing == 0
    assert "EIO" in h.core.stats().disk_tier.reason
    assert h.match([7]) == (0, 0) and h.match([8]) == (1, 0)  # G2 keeps serving
    assert h.core.status().num_disk_blocks == 0
    assert _entries(h.since(0)) == [(STORED, Tier.HOST, x) for x in sorted(h.core.index.matchable(Tier.HOST))]


def test_a_staged_load_released_before_its_read_finishes(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    load = h.load([7])
    assert isinstance(h.ask(m.ReleaseOp(load.op_id)), m.Ack)
    assert h.stats().ops_in_flight == 1  # its staging slot is still being written
    h.io()
    s = h.stats()
    assert s.ops_in_flight == 0 and s.host.pinned == 0 and s.counters.loads_failed == 1
    assert h.match([7]) == (1, 0)  # the read checked out: the block is in G2, just not loaded


def test_a_second_load_of_a_block_being_staged_waits_for_the_same_read(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    _disk_only_block(h, 8)
    first = h.load([7])
    second = h.load([7, 8])  # 7 is being read into G2 for the first load: one read serves both
    s1, s2 = m.unpack_slots(first.slots).tolist(), m.unpack_slots(second.slots).tolist()
    assert len(s2) == 2 and s2[0] == s1[0] and not second.ready
    assert h.disk.run() == 2  # one read of 7, one of 8
    h.core.apply_io(h.now)
    assert h.poll(first.op_id, second.op_id) == ([first.op_id, second.op_id], [])
    assert h.stats().host.pinned == 2  # 7 pinned twice (once per load), 8 once
    for op in (first, second):
        h.ack(0, op.op_id)
        h.ack(1, op.op_id)
    s = h.stats()
    assert s.counters.loads_completed == 2 and s.counters.blocks_loaded_from_disk == 3 and s.disk_tier.counters.onboarded_blocks == 2
    assert s.host.pinned == 0 and s.host.writing == 0 and s.ops_in_flight == 0
    assert h.match([7, 8]) == (2, 0)


def test_a_failed_shared_staging_read_fails_every_load_waiting_for_it(with_disk) -> None:
    h = with_disk()
    _disk_only_block(h, 7)
    _corrupt_on_disk(h, 7)
    first, second = h.load([7]), h.load([7])
    assert isinstance(h.ask(m.ReleaseOp(first.op_id)), m.Ack)  # one gives up before the read ends
    h.io()
    assert h.poll(second.op_id) == ([], [second.op_id])
    s = h.stats()
    assert s.counters.loads_failed == 2 and s.disk_tier.counters.checksum_failures == 1
    assert s.host.pinned == 0 and s.host.writing == 0 and s.ops_in_flight == 0
    assert h.match([7]) == (0, 0)


# ------------------------------------------------------------------------------------------
# eviction under pins


def test_pinned_blocks_are_never_evicted_and_a_full_pinned_pool_allocates_nothing(host_only) -> None:
    h = host_only(host=4)
    h.store([1, 2, 3, 4])
    load = h.load([1, 2])
    assert load.op_id and m.unpack_slots(load.slots).tolist() == [0, 1]
    op_id, slots = h.allocate([5, 6, 7])
    assert slots == [2, 3]  # only the unpinned blocks were evicted; the answer is a prefix
    h.ack(0, op_id)
    h.ack(1, op_id)
    assert h.match([1, 2]) == (2, 0) and h.match([3]) == (0, 0) and h.match([5, 6]) == (2, 0)
    other = h.load([5, 6])
    assert other.op_id
    before = h.stats()
    assert before.host.pinned == 4
    grant = h.ask(m.AllocateStore(m.pack_hashes([8, 9]), 0, 0))
    assert grant == m.StoreGrant(0, m.pack_slots([]))  # everything pinned: nothing, cleanly
    after = h.stats()
    assert after.host.registered == 4 and after.counters.host_evictions == before.counters.host_evictions
    for lo in (load, other):
        h.ack(0, lo.op_id)
        h.ack(1, lo.op_id)
    _, slots = h.allocate([8])
    assert slots == [0]  # least recently used (block 1) goes first once unpinned
    assert h.match([1]) == (0, 0) and h.match([2]) == (1, 0)


# ------------------------------------------------------------------------------------------
# the index change stream


def test_index_since_orders_changes_and_resumes(host_only) -> None:
    h = host_only(host=4)
    first = h.since(0)
    assert first.reset and _entries(first) == [] and first.next_seq == 1
    h.store([1, 2, 3])
    u = h.since(first.next_seq)
    assert not u.reset and _entries(u) == [(STORED, Tier.HOST, 1), (STORED, Tier.HOST, 2), (STORED, Tier.HOST, 3)]
    assert u.next_seq == 4
    assert h.since(u.next_seq) == m.IndexUpdates(False, 4, b"", b"", b"")  # nothing new
    h.store([4, 5])  # the allocation evicts block 1 (least recently used); both commit after the acks
    u2 = h.since(u.next_seq)
    assert _entries(u2) == [(REMOVED, Tier.HOST, 1), (STORED, Tier.HOST, 4), (STORED, Tier.HOST, 5)]
    assert _entries(h.since(u.next_seq + 2)) == [(STORED, Tier.HOST, 5)]  # any point in the ring
    load = h.load([2])
    assert isinstance(h.ask(m.ResetCache()), m.Ack)  # keeps the pinned block 2
    u3 = h.since(u2.next_seq)
    assert _entries(u3) == [(CLEARED, Tier.HOST, 0), (STORED, Tier.HOST, 2)]
    snap = h.since(0)
    assert snap.reset and _entries(snap) == [(STORED, Tier.HOST, 2)] and snap.next_seq == u3.next_seq
    h.ack(0, load.op_id)
    h.ack(1, load.op_id)


def test_index_since_ring_overflow_gives_a_reset_snapshot(host_only) -> None:
    h = host_only(host=64, ring=8)
    h.store([1, 2, 3])
    seq = h.since(0).next_seq
    h.store(list(range(10, 20)))  # 10 changes: the ring of 8 lost the first two after ``seq``
    u = h.since(seq)
    assert u.reset and u.next_seq == seq + 10
    assert _entries(u) == [(STORED, Tier.HOST, x) for x in [1, 2, 3, *range(10, 20)]]
    assert not h.since(seq + 2).reset  # the oldest change still held


def test_index_since_from_a_restarted_leader_resets(host_only) -> None:
    old = host_only(first_seq=1)
    old.store([1, 2])
    stale = old.since(0).next_seq
    new = host_only(first_seq=1)  # a new leader that has seen fewer changes
    u = new.since(stale)
    assert u.reset and _entries(u) == [] and u.next_seq == 1
    # By default sequence numbers start at the start time (ns), above any earlier leader's.
    a, b = IndexLog(), IndexLog()
    assert b.next_seq > a.next_seq


def test_index_since_caps_one_reply(host_only) -> None:
    h = host_only(host=64)
    h.core.index._max_reply = 4
    seq = h.since(0).next_seq
    h.store(list(range(1, 11)))
    got: list[int] = []
    while True:
        u = h.since(seq)
        assert not u.reset and len(u.kinds) <= 4
        if u.next_seq == seq:
            break
        got += m.unpack_hashes(u.hashes)
        seq = u.next_seq
    assert got == list(range(1, 11))


def _park(h: Harness, peer: bytes, seq: int, wait_ms: int) -> int:
    """Send a long-poll that the core parks; its request id."""
    assert h.send(peer, m.IndexSince(seq, wait_ms)) == []
    return h.rid


def test_a_long_poll_is_parked_until_the_index_moves(host_only) -> None:
    h = host_only(host=8)
    seq = h.since(0).next_seq
    rid = _park(h, b"f1", seq, 500)
    assert h.core.answer_polls(h.now) == [] and h.stats().index_polls_parked == 1
    h.store([1, 2])
    out = h.core.answer_polls(h.now)  # what the server calls after handling the acks
    assert [(o.peer, o.request_id) for o in out] == [(b"f1", rid)]
    u = out[0].message
    assert isinstance(u, m.IndexUpdates) and _entries(u) == [(STORED, Tier.HOST, 1), (STORED, Tier.HOST, 2)]
    assert h.stats().index_polls_parked == 0 and h.core.answer_polls(h.now + 10) == []


def test_a_long_poll_times_out_with_no_changes(host_only) -> None:
    h = host_only()
    seq = h.since(0).next_seq
    rid = _park(h, b"f1", seq, 500)
    assert h.core.answer_polls(h.now + 0.499) == []
    out = h.core.answer_polls(h.now + 0.5)  # the follower is gone or idle: nothing is left behind
    assert out == [Outbound(b"f1", rid, m.IndexUpdates(False, seq, b"", b"", b""))]
    assert len(h.core.polls) == 0


def test_several_long_polls_park_at_once_one_per_peer(host_only) -> None:
    h = host_only()
    seq = h.since(0).next_seq
    rids = {peer: _park(h, peer, seq, 1000) for peer in (b"f1", b"f2", b"f3")}
    rids[b"f1"] = _park(h, b"f1", seq, 1000)  # f1 asked again (gave up): its first poll is dropped
    assert len(h.core.polls) == 3
    h.store([7])
    out = h.core.answer_polls(h.now)
    assert sorted((o.peer, o.request_id) for o in out) == sorted(rids.items())
    assert all(_entries(o.message) == [(STORED, Tier.HOST, 7)] for o in out)  # type: ignore[arg-type]
    rid = _park(h, b"f2", seq + 1, 1000)
    assert h.core.answer_polls(None) == [Outbound(b"f2", rid, m.IndexUpdates(False, seq + 1, b"", b"", b""))]
    assert len(h.core.polls) == 0


def test_a_long_poll_with_something_to_say_is_answered_at_once(host_only) -> None:
    h = host_only()
    seq = h.since(0).next_seq
    h.store([1])
    assert _entries(h.ask(m.IndexSince(seq, 1000))) == [(STORED, Tier.HOST, 1)]  # type: ignore[arg-type]
    assert h.ask(m.IndexSince(0, 1000)).reset  # type: ignore[union-attr]
    assert h.ask(m.IndexSince(seq + 99, 1000)).reset  # type: ignore[union-attr]  # a position never issued
    h.core.polls = ParkedPolls(limit=1)
    _park(h, b"f1", seq + 1, 1000)
    assert h.ask(m.IndexSince(seq + 1, 1000), peer=b"f2") == m.IndexUpdates(False, seq + 1, b"", b"", b"")  # full
    assert len(h.core.polls) == 1


def test_a_long_poll_is_not_parked_by_a_leader_that_cannot_serve(make_config) -> None:
    core = LeaderCore(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8"), lambda *a: MemStorage(*a[:3]),
                      now=0.0)  # no rank registered yet
    out = core.handle(b"f1", 1, m.IndexSince(1, 1000), 0.0)
    assert len(out) == 1 and isinstance(out[0].message, m.ErrorReply) and out[0].message.code == "not_ready"
    assert len(core.polls) == 0


def test_index_updates_validate_on_the_wire() -> None:
    good = m.IndexUpdates(True, 5, bytes([0, 1]), bytes([2, 3]), m.pack_hashes([1, 2]))
    assert m.decode(m.encode(good, 9)) == (9, good)
    assert m.decode(m.encode(m.IndexSince(2**64 - 1, m.MAX_INDEX_WAIT_MS)))[1] == m.IndexSince(2**64 - 1, 60_000)
    for bad, why in ((m.MAX_INDEX_WAIT_MS + 1, "index_since.wait_ms: 60001 is out of range"),
                     (-1, "index_since.wait_ms: -1 is out of range"), (1.5, "index_since.wait_ms: expected an integer")):
        with pytest.raises(m.ProtocolError, match=why):
            m.decode(m.encode(m.IndexSince(1, bad)))  # type: ignore[arg-type]
    with pytest.raises(m.ProtocolError, match="same entries"):
        m.IndexUpdates(False, 1, b"\x00", b"\x02", b"")
    with pytest.raises(m.ProtocolError, match="not block event kinds"):
        m.IndexUpdates(False, 1, b"\x07", b"\x02", m.pack_hashes([1]))
    with pytest.raises(m.ProtocolError, match="not tiers"):
        m.IndexUpdates(False, 1, b"\x00", b"\x01", m.pack_hashes([1]))
    bad = m.encode(good).replace(bytes([2, 3]), bytes([2, 9]))
    with pytest.raises(m.ProtocolError):
        m.decode(bad)


# ------------------------------------------------------------------------------------------
# the object tier (G4)


@pytest.fixture
def with_objects(make_config) -> Callable[..., Harness]:
    def make(host: int = 4, ready: ObjectReady = ObjectReady(True, ""), **env: str) -> Harness:
        cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=str(host), DYN_KVBM_OBJECT_ENABLED="1",
                          DYN_KVBM_OBJECT_WRITE_THROUGH="1", DYN_KVBM_OBJECT_NUM_BLOCKS="64", **env)
        h = Harness(cfg, objects=ready)
        h.object_io()  # the start-up check's answer
        return h

    return make


def _objects(h: Harness) -> MemObjects:
    o = h.storages[-1].mem_objects
    assert o is not None
    return o


def _lookup(h: Harness, hashes: list[int]) -> m.MatchReply:
    r = h.ask(m.Match(m.pack_hashes(hashes)))
    assert isinstance(r, m.MatchReply), r
    return r


def _fill(h: Harness, hashes: list[int]) -> dict[int, bytes]:
    """Store ``hashes`` with distinct bytes written into their host slots (as the ranks would)."""
    op_id, slots = h.allocate(hashes)
    data = {}
    for hh, s in zip(hashes, slots):
        data[hh] = bytes([hh % 251]) * BB
        h.storages[-1].host[s * BB:(s + 1) * BB] = data[hh]
    for r in range(h.world):
        h.ack(r, op_id)
    return data


def test_object_put_is_matchable_only_after_it_succeeded_and_loads_stage_back(with_objects) -> None:
    h = with_objects(host=4)
    data = _fill(h, [1, 2, 3])
    assert h.stats().object.writing == 3 and h.stats().host.pinned == 3  # sources held for the puts
    h.store([4, 5, 6, 7])  # host pool of 4: 1-3 cannot be evicted while their puts are in flight
    assert h.match([4, 5]) == (1, 0) and _lookup(h, [1, 2, 3]).object == 0
    h.object_io()
    st = h.stats()
    assert st.object.registered == 4 and st.object_tier.counters.offloaded_blocks == 4 and st.host.pinned == 0
    h.store([8, 9, 10, 11])  # now 1-3 leave G2
    h.object_io()  # (the puts of 8-11 hold every G2 slot until they are done)
    r = _lookup(h, [1, 2, 3, 99])
    assert (r.host, r.disk, r.object) == (0, 0, 3)
    g = h.load([1, 2, 3])
    assert g.op_id and not g.ready and len(m.unpack_slots(g.slots)) == 3
    assert h.poll(g.op_id) == ([], [])  # staging from the store
    h.object_io()
    assert h.poll(g.op_id) == ([g.op_id], [])
    for hh, s in zip([1, 2, 3], m.unpack_slots(g.slots).tolist()):
        assert bytes(h.storages[-1].host[s * BB:(s + 1) * BB]) == data[hh]
    for r in range(h.world):
        h.ack(r, g.op_id)
    st = h.stats()
    assert st.counters.blocks_loaded_from_object == 3 and st.object_tier.counters.onboarded_blocks == 3 and st.host.pinned == 0
    ev = h.core.events.take()
    stored_in_g4 = [hh for k, t, hh in zip(ev.kinds, ev.tiers, m.unpack_hashes(ev.hashes)) if (k, t) == (0, 4)]
    assert stored_in_g4 == [1, 2, 3, 4, 8, 9, 10, 11] and Tier.OBJECT.medium == "EXTERNAL"
    assert all(t != int(Tier.OBJECT) for t in h.since(0).tiers)  # the index stream carries G2/G3 only


def test_store_lookup_finds_another_instances_blocks_on_the_next_match(with_objects) -> None:
    h = with_objects()
    _objects(h).store.update({21: b"\x01" * BB, 22: b"\x02" * BB})  # put by another instance
    first = _lookup(h, [21, 22, 23])
    assert (first.object, first.pending) == (0, True)
    assert _lookup(h, [21, 22, 23]).pending  # asked already: no second lookup
    assert h.stats().object_tier.counters.lookups == 1
    h.object_io()
    again = _lookup(h, [21, 22, 23])
    assert (again.object, again.pending) == (2, False)  # 23: a miss the store just reported
    assert _lookup(h, [23]).pending is False and h.stats().object_tier.counters.lookups == 1
    h.now += 11.0  # the miss is forgotten: the store is asked again
    assert _lookup(h, [23]).pending is True


def test_corrupt_object_is_a_miss_and_dropped(with_objects) -> None:
    h = with_objects()
    _objects(h).store[31] = None  # corrupt
    _lookup(h, [31])
    h.object_io()
    assert _lookup(h, [31]).object == 1
    g = h.load([31])
    h.object_io()
    assert h.poll(g.op_id) == ([], [g.op_id])  # the load fails: the engine recomputes
    st = h.stats()
    assert st.object_tier.counters.read_failures == 1 and st.object_tier.counters.checksum_failures == 1
    assert st.host.writing == 0 and st.object.registered == 0
    assert _lookup(h, [31]).object == 0 and not _lookup(h, [31]).pending  # not asked again for a while


def test_full_put_queue_drops_and_store_errors_turn_the_tier_off(with_objects) -> None:
    h = with_objects(host=32)
    _objects(h).queue_cap = 2
    h.store([41, 42, 43])
    st = h.stats()
    assert st.object_tier.busy == 2 and st.object_tier.counters.offload_skipped_busy == 1
    h.object_io()
    _objects(h).queue_cap, _objects(h).fail_io = 64, "connection refused"
    h.store(list(range(50, 60)))  # 8 puts in flight at most (a quarter of the host pool)
    h.object_io()
    st = h.stats()
    assert st.object_tier.counters.write_failures >= 8 and st.object_tier.enabled == 0 and st.object.registered == 0
    assert st.host.pinned == 0 and st.object.writing == 0
    assert h.core.stats().object_tier.reason.startswith("8 store errors in a row")
    h.store([70])  # the host tier serves on
    assert h.match([70]) == (1, 0)


def test_store_refused_at_start_keeps_the_tier_off(with_objects) -> None:
    h = with_objects(ready=ObjectReady(False, "DYN_KVBM_OBJECT_BUCKET='x' at ...: no such bucket"))
    h.store([1, 2])
    assert _lookup(h, [1, 2, 3]).pending is False
    st = h.stats()
    assert st.object_tier.enabled == 0 and st.object_tier.busy == 0 and h.match([1, 2]) == (2, 0)
    assert "no such bucket" in h.core.stats().object_tier.reason


# ------------------------------------------------------------------------------------------
# token ids for KV events


def _toks(*hashes: int) -> bytes:
    return b"".join(np.full(16, h, "<u4").tobytes() for h in hashes)


def test_block_tokens_kept_while_a_tier_holds_the_block_and_only_with_events_on(make_config) -> None:
    h = Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="4",
                            DYN_KVBM_KV_EVENTS_ENDPOINT="tcp://127.0.0.1:5557"))
    tokens = h.core.events.block_tokens
    assert tokens == {}
    bad = h.ask(m.AllocateStore(m.pack_hashes([1, 2]), 0, 0, _toks(1)[:32] * 2))
    assert isinstance(bad, m.ErrorReply) and bad.code == "bad_request"  # 16 tokens a block, not 8
    g = h.ask(m.AllocateStore(m.pack_hashes([1, 2]), 0, 0, _toks(1, 2)))
    assert isinstance(g, m.StoreGrant) and tokens == {}  # known once every rank stored them
    h.ack(0, g.op_id)
    h.ack(1, g.op_id)
    assert tokens == {1: _toks(1), 2: _toks(2)} and h.core.events.token_ids(2) == _toks(2)
    failed = h.ask(m.AllocateStore(m.pack_hashes([7]), 2, 0, _toks(7)))
    assert isinstance(failed, m.StoreGrant)
    h.ack(0, failed.op_id, ok=False)
    h.ack(1, failed.op_id)
    # Block 2 (held: -1) is not sent again; block 1 is evicted for 3..5, its tokens dropped.
    g = h.ask(m.AllocateStore(m.pack_hashes([3, 4, 5]), 2, 0, _toks(3, 4, 5)))
    assert isinstance(g, m.StoreGrant)
    h.ack(0, g.op_id)
    h.ack(1, g.op_id)
    assert h.match([1]) == (0, 0) and sorted(tokens) == [2, 3, 4, 5] and h.core.events.token_ids(7) == b""
    assert isinstance(h.ask(m.ResetCache()), m.Ack)
    assert tokens == {}

    off = Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="4"))
    off.store([1])
    assert off.core.events.block_tokens is None and off.core.events.token_ids(1) == b""


def test_take_events_keeps_tokens_from_its_first_call_and_hands_them_out(make_config) -> None:
    """Without an event endpoint the leader keeps no tokens until an engine takes events; from
    then on a stored block's event carries its tokens while some tier holds it, and a block
    evicted before the events were taken goes out without them."""
    h = Harness(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="4"))

    def store(hashes: list[int], parent: int) -> None:
        g = h.ask(m.AllocateStore(m.pack_hashes(hashes), parent, 0, _toks(*hashes)))
        assert isinstance(g, m.StoreGrant)
        for r in range(h.world):
            h.ack(r, g.op_id)

    store([1], 0)
    assert h.core.events.block_tokens is None
    first = h.core.events.take()
    assert list(first.kinds) == [0] and first.tokened == b"" and first.tokens == b""
    store([2, 3], 1)
    store([4, 5, 6], 0)  # evicts 1 and 2 (least recently used)
    ev = h.core.events.take()
    hashes = m.unpack_hashes(ev.hashes)
    stored = [(hh, t) for k, hh, t in zip(ev.kinds, hashes, ev.tokened) if k == 0]
    assert stored == [(2, 0), (3, 1), (4, 1), (5, 1), (6, 1)] and ev.tokens == _toks(3, 4, 5, 6)
    assert sorted(hh for k, hh in zip(ev.kinds, hashes) if k == 1) == [1, 2]


def test_blocks_found_in_the_store_chain_to_the_prompt_and_are_staged_with_their_tokens(with_objects) -> None:
    """Blocks another instance put: the Match's first parent chains the first found block to the
    prompt's prefix, and PrepareLoad's tokens go with the staged blocks' G2 events."""
    h = with_objects(host=8)
    _objects(h).store.update({21: b"\x01" * BB, 22: b"\x02" * BB})  # put by another instance
    h.core.events.take()  # an engine forwarding events: the leader keeps tokens from now on
    first = h.ask(m.Match(m.pack_hashes([21, 22]), 20))  # past the engine's own hit, which ends at block 20
    assert isinstance(first, m.MatchReply) and first.pending  # asked of the store
    h.object_io()
    assert _lookup(h, [21, 22]).object == 2
    g = h.ask(m.PrepareLoad(m.pack_hashes([21, 22]), _toks(21, 22)))
    assert isinstance(g, m.LoadGrant) and g.op_id
    h.object_io()
    assert h.poll(g.op_id) == ([g.op_id], [])
    ev = h.core.events.take()
    stored = [(t, hh, p) for k, t, hh, p in zip(ev.kinds, ev.tiers, m.unpack_hashes(ev.hashes), m.unpack_hashes(ev.parents))
              if k == 0]
    assert stored == [(4, 21, 20), (4, 22, 21), (2, 21, 20), (2, 22, 21)], stored
    # Taken after the load: the G4 events too carry the tokens the leader holds by then.
    assert list(ev.tokened) == [1, 1, 1, 1] and ev.tokens == _toks(21, 22, 21, 22)


def test_a_whole_engine_restarting_gets_every_rank_its_ready(host_only) -> None:
    """Every rank of a new engine re-registers with the running pool before the liveness check
    noticed the old ones; the first to attach is answered too once the last is back."""
    h = host_only()
    for r in range(2):
        grant = h.send(f"n{r}".encode(), _layout(r, 2))
        assert len(grant) == 1 and isinstance(grant[0].message, m.PoolGrant)
    assert h.core.state is LeaderState.DEGRADED
    assert h.send(b"n0", m.PoolAttached(0)) == []  # rank 1 is not back yet
    out = h.send(b"n1", m.PoolAttached(1))
    assert sorted(o.peer for o in out) == [b"n0", b"n1"] and all(isinstance(o.message, m.LeaderReady) for o in out)
    assert h.core.state is LeaderState.READY
    assert h.send(b"n1", m.PoolAttached(1))[0].message == out[0].message  # a repeat is answered at once
