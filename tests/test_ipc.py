"""Protocol codec and shared-memory pool."""

from __future__ import annotations

import os
import stat

import msgpack
import numpy as np
import pytest

from kvbm.ipc import messages as m
from kvbm.ipc.stats import (
    STAT_KEYS,
    DiskCounters,
    LeaderCounters,
    LeaderState,
    LeaderStats,
    ObjectCounters,
    ObjectTierStats,
    PoolStats,
    TierStats,
    encode_stats,
)
from kvbm.ipc.shm import HEADER_BYTES, HostPool, PoolGeometry, ShmError, segment_name, sweep_stale_segments
from kvbm.testing.support import shm_segments


def test_round_trip_every_message_type() -> None:
    samples = [
        m.RegisterRank(rank=1, world_size=2, num_layers=4, slice_bytes=8192, dtype="float16",
                       engine_layout="2x1024", block_size=16, fingerprint="x", pid=123),
        m.Match(m.pack_hashes([1, 2, 2**64 - 1]), 2**64 - 1),
        m.PrepareLoad(m.pack_hashes([1, 2]), np.arange(32, dtype="<u4").tobytes()),
        m.PollLoads([1, 2, 3]),
        m.StatsReply("degraded", {"ops_in_flight": 2, "host_capacity": 8.0, "host_registered": 1, "host_free": 7,
                                  "host_writing": 0, "host_pinned": 0}),
        m.TransferDone(rank=0, op_id=7, ok=False, error="boom"),
        m.AllocateStore(m.pack_hashes([5, 6]), 4, 0, np.arange(32, dtype="<u4").tobytes()),
        m.EventsReply(bytes([0, 1, 0]), bytes([2, 2, 3]), m.pack_hashes([5, 6, 7]), m.pack_hashes([0, 0, 5]),
                      bytes([1, 0, 0]), np.arange(16, dtype="<u4").tobytes()),
    ]
    for msg in samples:
        rid, back = m.decode(m.encode(msg, 42))
        assert rid == 42 and back == msg


@pytest.mark.parametrize("frame, needle", [
    (b"\xc1", "not a msgpack"),
    (msgpack.packb([99, "match", 1, [b""]]), "protocol version"),
    (msgpack.packb([m.PROTOCOL_VERSION, "nope", 1, []]), "unknown message type"),
    (msgpack.packb([m.PROTOCOL_VERSION, "match", 1, []]), "expected 2 fields"),
    (msgpack.packb([m.PROTOCOL_VERSION, "match", 1, ["text", 0]]), "expected bytes"),
    (msgpack.packb([m.PROTOCOL_VERSION, "transfer_done", 1, [0, -1, True, "", b""]]), "out of range"),
    (msgpack.packb([m.PROTOCOL_VERSION, "transfer_done", 1, [0, 1, 1, "", b""]]), "expected a boolean"),
    (msgpack.packb([m.PROTOCOL_VERSION, "register_rank", 1, [5000, 2, 1, 1, "", "", 1, "", 1, False, 0, 0, 0, 0, False]]), "out of range"),
    (msgpack.packb({"v": 1}), "frame is not"),
    (msgpack.packb([m.PROTOCOL_VERSION, "allocate_store", 1, [bytes(16), 0, 0, bytes(12)]]), "not whole u32 blocks"),
    (msgpack.packb([m.PROTOCOL_VERSION, "allocate_store", 1, [b"", 0, 0, bytes(8)]]), "not whole u32 blocks"),
    (msgpack.packb([m.PROTOCOL_VERSION, "events_reply", 1, [b"\0\0", b"\2\2", bytes(16), bytes(16), b"\1", bytes(64)]]),
     "1 token flags"),
    (msgpack.packb([m.PROTOCOL_VERSION, "events_reply", 1, [b"\0", b"\2", bytes(8), bytes(8), b"\2", bytes(64)]]),
     "token flags"),
    (msgpack.packb([m.PROTOCOL_VERSION, "events_reply", 1, [b"\0", b"\2", bytes(8), bytes(8), b"\1", b""]]),
     "not whole u32 blocks"),
    (msgpack.packb([m.PROTOCOL_VERSION, "match", -5, [b""]]), "request id"),
    (msgpack.packb([m.PROTOCOL_VERSION, "stats_reply", 1, ["ready", {"host_fre": 1}, 0]]), "unknown stats"),
    (msgpack.packb([m.PROTOCOL_VERSION, "stats_reply", 1, ["fine", {}, 0]]), "not a leader state"),
    (msgpack.packb([m.PROTOCOL_VERSION, "stats_reply", 1, ["ready", {"host_capacity": 4}, 0]]), "missing"),
    (msgpack.packb([m.PROTOCOL_VERSION, "stats_reply", 1, ["ready", {"disk_io_errors": 1}, 0]]), "no complete record"),
    (msgpack.packb([m.PROTOCOL_VERSION, "status", 1, ["up", "", 0, 0, 0, 0, 0, "", []]]), "not a leader state"),
])
def test_malformed_frames_are_rejected(frame: bytes, needle: str) -> None:
    with pytest.raises(m.ProtocolError, match=needle):
        m.decode(frame)


def test_stats_travel_as_the_typed_record() -> None:
    """Every field of the leader's stats comes back as it was sent, under one name each."""
    pool = PoolStats(10, 4, 5, 1, 2)
    sent = LeaderStats(LeaderState.DEGRADED, LeaderCounters(blocks_stored=3, blocks_loaded_from_object=2), 1, 2, 3,
                       host=pool, disk=pool, block_bytes=4096, index_polls_parked=1,
                       disk_tier=TierStats(False, 2, DiskCounters(io_errors=1, read_seconds=0.25)),
                       object=pool, object_tier=ObjectTierStats(True, 1, ObjectCounters(lookup_found=7), lookups_pending=4))
    _, back = m.decode(m.encode(m.StatsReply(*encode_stats(sent), 9), 1))
    assert isinstance(back, m.StatsReply) and back.index_seq == 9 and back.stats == sent
    assert set(encode_stats(sent)[1]) == STAT_KEYS  # a full snapshot names every stat
    bare = LeaderStats(LeaderState.WAITING)  # before the cache exists: no pool, no tier
    assert m.StatsReply(*encode_stats(bare)).stats == bare


def test_hash_wire_format_is_little_endian_u64() -> None:
    data = m.pack_hashes([1, 2**64 - 1])
    assert data == (1).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little")
    assert m.unpack_hashes(data) == [1, 2**64 - 1]
    with pytest.raises(m.ProtocolError):
        m.unpack_hashes(b"123")


def test_pool_create_attach_share_and_unlink() -> None:
    inst = f"sim-{os.getpid()}-shmtest"
    geom = PoolGeometry(4, 8192)
    pool = HostPool.create(inst, geom)
    path = f"/dev/shm/{segment_name(inst)}"
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == HEADER_BYTES + 4 * 8192
        other = HostPool.attach(pool.name, geom)
        pool.array[2, :16] = np.arange(16, dtype=np.uint8)
        assert other.array[2, :16].tolist() == list(range(16))
        assert pool.block(1).nbytes == 8192
        other.close()
        with pytest.raises(ShmError, match="expected"):
            HostPool.attach(pool.name, PoolGeometry(5, 8192))  # unexpected size: refused
        with pytest.raises(ShmError, match="already exists"):
            HostPool.create(inst, geom)
    finally:
        pool.close()
    assert not os.path.exists(path)


def test_pool_refuses_unaligned_blocks_and_oversize() -> None:
    with pytest.raises(ShmError, match="multiple of 4096"):
        HostPool.create(f"sim-{os.getpid()}-bad", PoolGeometry(1, 1000))
    with pytest.raises(ShmError, match="/dev/shm has"):
        HostPool.create(f"sim-{os.getpid()}-huge", PoolGeometry(1 << 20, 1 << 30))
    assert shm_segments(f"sim-{os.getpid()}-huge") == shm_segments(f"sim-{os.getpid()}-bad") == []


def test_sweep_removes_segment_of_dead_owner() -> None:
    inst = f"sim-{os.getpid()}-stale"
    pool = HostPool.create(inst, PoolGeometry(1, 4096))
    name = pool.name
    # Forge a dead owner: a pid that cannot exist.
    import mmap
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    mm[12:16] = (2**22 + 12345).to_bytes(4, "little")
    mm.close()
    os.close(fd)
    pool.owner = False  # the "dead leader" will not unlink it
    pool.close()
    assert name in sweep_stale_segments()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_sweep_keeps_live_segments() -> None:
    inst = f"sim-{os.getpid()}-live"
    with HostPool.create(inst, PoolGeometry(1, 4096)) as pool:
        assert pool.name not in sweep_stale_segments()
        assert os.path.exists(f"/dev/shm/{pool.name}")


def test_hash_lists_are_capped_per_request() -> None:
    assert len(m.unpack_hashes(b"\0" * 8 * m.MAX_HASHES)) == m.MAX_HASHES
    with pytest.raises(m.ProtocolError, match="limit"):
        m.unpack_hashes(b"\0" * 8 * (m.MAX_HASHES + 1))
