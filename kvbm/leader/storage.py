"""The byte side of the leader's cache: the shared host pool and disk I/O, behind small interfaces.

The leader core (:mod:`kvbm.leader.core`) decides which slot holds what; it never touches bytes.
It asks a :class:`StorageFactory` for the storage once the world is known, and moves blocks
between G2 and G3 through :class:`DiskIO`: it submits reads and writes and later applies the
typed completions :meth:`DiskIO.drain` reports. Nothing here changes a pool's block state.

:func:`shm_storage` is the real implementation: a shared-memory :class:`HostPool` the ranks map
and an O_DIRECT block file (:class:`kvbm.leader.disk.DiskStore`) whose I/O runs on its threads
straight between the pool and the file. Tests give the core an in-memory implementation.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvbm.ipc.shm import HostPool, PoolGeometry
from kvbm.leader.disk import BlockKey, StoredBlock

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.leader.disk import DiskStore, ReadResult, WriteResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskWriteDone:
    """A G2 -> G3 write finished; ``checksum`` (of the bytes written) is valid only when ``ok``."""

    disk_slot: int
    host_slot: int
    ok: bool
    checksum: int
    seconds: float
    error: str


@dataclass(frozen=True)
class DiskReadDone:
    """A G3 -> G2 read finished: ``ok`` only if it worked *and* the checksum matched."""

    disk_slot: int
    host_slot: int
    ok: bool
    mismatch: bool  # the read worked but the bytes differ from what was written
    seconds: float
    error: str


DiskCompletion = DiskWriteDone | DiskReadDone


class DiskIO(Protocol):
    """Block I/O between host slots and disk slots; completions come back through :meth:`drain`."""

    @property
    def failure(self) -> str | None:
        """The first I/O error of the device, if any (later I/O fails at once)."""

    def write(self, disk_slot: int, host_slot: int, key: BlockKey) -> None:
        """Start copying host slot -> disk slot holding ``key`` (reported as a DiskWriteDone)."""

    def read(self, disk_slot: int, host_slot: int, checksum: int) -> None:
        """Start copying disk slot -> host slot, checking ``checksum`` (reported as a DiskReadDone)."""

    def restored(self) -> list[StoredBlock]:
        """Blocks an earlier leader left in a persistent disk cache, found at open (else empty)."""

    def drain(self) -> list[DiskCompletion]:
        """Completions since the last call, in the order they finished."""

    def close(self) -> None:
        """Stop (waiting for I/O in flight) and release the device."""


class CacheStorage(Protocol):
    """What the core needs of the storage it sized: the pool's name for grants, and disk I/O."""

    @property
    def segment(self) -> str:
        """The shared-memory segment the ranks map (PoolGrant.segment)."""

    @property
    def disk(self) -> DiskIO | None:
        """Disk I/O, or None without a disk tier."""

    def close(self) -> None:
        """Release the host pool (unlinked) and the disk device."""


# (host_blocks, block_bytes, disk_blocks, layout fingerprint) -> storage;
# raises ShmError/OSError/RuntimeError/ValueError.
StorageFactory = Callable[[int, int, int, str], CacheStorage]


class StoreIO:
    """:class:`DiskIO` over a :class:`DiskStore` and a mapped :class:`HostPool`."""

    def __init__(self, store: DiskStore, memory: HostPool, notify: Callable[[], None]) -> None:
        """``notify`` wakes the leader's loop when a completion is queued (from an I/O thread)."""
        self.store = store
        self.memory = memory
        self._notify = notify
        self._done: queue.SimpleQueue[DiskCompletion] = queue.SimpleQueue()

    @property
    def failure(self) -> str | None:
        return self.store.failure

    def write(self, disk_slot: int, host_slot: int, key: BlockKey) -> None:
        fut = self.store.write(disk_slot, self.memory.block(host_slot), key)

        def done(f: Future[WriteResult]) -> None:
            res = _write_result(f, disk_slot)
            self._put(DiskWriteDone(disk_slot, host_slot, res.ok, res.checksum, res.seconds, res.error or ""))

        fut.add_done_callback(done)

    def read(self, disk_slot: int, host_slot: int, checksum: int) -> None:
        fut = self.store.read(disk_slot, self.memory.block(host_slot), checksum)

        def done(f: Future[ReadResult]) -> None:
            res = _read_result(f, disk_slot)
            self._put(DiskReadDone(disk_slot, host_slot, res.ok and res.checksum_ok, res.mismatch, res.seconds,
                                   res.error or ""))

        fut.add_done_callback(done)

    def restored(self) -> list[StoredBlock]:
        return self.store.restored

    def _put(self, done: DiskCompletion) -> None:
        self._done.put(done)
        self._notify()

    def drain(self) -> list[DiskCompletion]:
        out: list[DiskCompletion] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.store.close()


class ShmStorage:
    """The real storage: a shared-memory host pool and, when configured, a disk block file."""

    def __init__(self, pool: HostPool, disk: StoreIO | None) -> None:
        self.pool = pool
        self._disk = disk

    @property
    def segment(self) -> str:
        return self.pool.name

    @property
    def disk(self) -> StoreIO | None:
        return self._disk

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self.pool.close()


def shm_storage(config: KvbmConfig, instance: str, notify: Callable[[], None]) -> StorageFactory:
    """A factory creating the instance's shared-memory pool and (if sized) its disk block file.

    With ``DYN_KVBM_DISK_CACHE_PERSIST`` the disk file is the layout's persistent one; if a live
    leader holds it, this leader falls back to a private file (logged), never sharing it.
    """

    def create(host_blocks: int, block_bytes: int, disk_blocks: int, layout: str) -> CacheStorage:
        from kvbm.leader.capacity import check_cache_space

        check_cache_space(config, block_bytes)  # one clear line before any allocation
        # The ranks pre-fault their mappings (they copy on the engine's critical path); the
        # leader only touches blocks for disk I/O, off that path, so it maps lazily.
        pool = HostPool.create(instance, PoolGeometry(host_blocks, block_bytes), prefault=False)
        if disk_blocks <= 0:
            return ShmStorage(pool, None)
        try:
            store = _disk_store(config, instance, disk_blocks, block_bytes, layout)
            return ShmStorage(pool, StoreIO(store, pool, notify))
        except BaseException:
            pool.close()  # the disk tier failed after the host pool was made
            raise

    return create


def layout_key(layout: str) -> int:
    """The 64-bit layout fingerprint that names a persistent cache (and its blocks' headers)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(layout.encode())


def _disk_store(cfg: KvbmConfig, instance: str, disk_blocks: int, block_bytes: int, layout: str) -> DiskStore:
    from kvbm.leader.disk import DiskInUse, DiskStore, disk_file_path

    if cfg.disk_cache_persist:
        try:
            store = _open_disk_store(cfg, instance, disk_blocks, block_bytes, layout_key(layout))
            log.info("persistent disk cache %s (layout %s): %d blocks re-indexed", store.path, layout,
                     len(store.restored))
            return store
        except DiskInUse as e:
            log.warning("%s; this leader uses a private, non-persistent disk file instead", e)

    # We hold the instance lock, so a block file of this instance is a dead leader's.
    stale = disk_file_path(cfg.disk_cache_dir, instance)
    if os.path.isfile(stale) and not os.path.islink(stale) and os.stat(stale).st_uid == os.getuid():
        log.warning("removing %s left by a previous leader of this instance", stale)
        os.unlink(stale)
    return _open_disk_store(cfg, instance, disk_blocks, block_bytes, None)


def _open_disk_store(cfg: KvbmConfig, instance: str, disk_blocks: int, block_bytes: int,
                     layout: int | None) -> DiskStore:
    from kvbm.leader.disk import DiskStore

    return DiskStore(
        cfg.disk_cache_dir,
        instance,
        disk_blocks,
        block_bytes,
        o_direct=not cfg.disk_disable_o_direct,
        zerofill_fallback=cfg.disk_zerofill_fallback,
        max_concurrent=cfg.max_concurrent_transfers,
        layout=layout,
    )


def _write_result(fut: Future[WriteResult], slot: int) -> WriteResult:
    from kvbm.leader.disk import WriteResult

    try:
        return fut.result()
    except Exception as e:  # the store reports errors in results; this is a last resort
        return WriteResult(slot=slot, ok=False, checksum=0, error=repr(e), seconds=0.0)


def _read_result(fut: Future[ReadResult], slot: int) -> ReadResult:
    from kvbm.leader.disk import ReadResult

    try:
        return fut.result()
    except Exception as e:
        return ReadResult(slot=slot, ok=False, error=repr(e), checksum_ok=False, seconds=0.0)
