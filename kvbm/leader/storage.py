"""The byte side of the leader's cache: the shared host pool, disk I/O and object I/O, behind small interfaces.

The leader core (:mod:`kvbm.leader.core`) decides which slot holds what; it never touches bytes.
It asks a :class:`StorageFactory` for the storage once the world is known, and moves blocks
between G2 and G3 through :class:`DiskIO` and between G2 and G4 (an object store) through
:class:`ObjectIO`: it submits reads and writes and later applies the typed completions their
``drain()`` reports. Nothing here changes a pool's block state.

:func:`shm_storage` is the real implementation: a shared-memory :class:`HostPool` the ranks map,
an O_DIRECT block file (:class:`kvbm.leader.disk.DiskStore`) whose I/O runs on its threads
straight between the pool and the file, and :class:`BlockObjectIO`, background threads moving
blocks between the pool and checksummed objects (:class:`kvbm.leader.objects.BlockObjects`).
Tests give the core an in-memory implementation.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from kvbm.ipc.shm import HostPool, PoolGeometry
from kvbm.leader.disk import BlockKey, StoredBlock
from kvbm.leader.objects import GetStatus

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.leader.disk import DiskStore, ReadResult, WriteResult
    from kvbm.leader.objects import BlockObjects, ObjectBackend, ObjectStoreSettings, S3Backend

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


@dataclass(frozen=True)
class ObjectReady:
    """The start-up check of the object store: ``ok``, or the one-line reason it cannot be used."""

    ok: bool
    error: str


@dataclass(frozen=True)
class ObjectWriteDone:
    """A G2 -> G4 put finished (``ok``: the object is whole in the store)."""

    seq_hash: int
    host_slot: int
    ok: bool
    seconds: float
    error: str


@dataclass(frozen=True)
class ObjectReadDone:
    """A G4 -> G2 get finished; the host slot holds the block only when ``status`` is OK."""

    seq_hash: int
    host_slot: int
    status: GetStatus
    seconds: float
    error: str


@dataclass(frozen=True)
class ObjectLookupDone:
    """A batched existence query: ``found[i]`` tells whether ``hashes[i]`` has an object."""

    hashes: tuple[int, ...]
    found: tuple[bool, ...]
    seconds: float


ObjectCompletion = ObjectReady | ObjectWriteDone | ObjectReadDone | ObjectLookupDone


class ObjectIO(Protocol):
    """Block I/O between host slots and an object store; completions come back through :meth:`drain`.

    The first completion is an :class:`ObjectReady` (the store was checked in the background:
    an unreachable endpoint, a missing bucket or refused credentials never block the leader).
    """

    def write(self, host_slot: int, seq_hash: int) -> bool:
        """Queue a put of the block in ``host_slot``; False (nothing queued) when the queue is full."""

    def read(self, host_slot: int, seq_hash: int) -> None:
        """Start a get of the block into ``host_slot`` (reported as an ObjectReadDone)."""

    def lookup(self, hashes: Sequence[int]) -> None:
        """Start asking the store which of ``hashes`` it holds (reported as an ObjectLookupDone)."""

    def drain(self) -> list[ObjectCompletion]:
        """Completions since the last call, in the order they finished."""

    def close(self) -> None:
        """Finish the queued puts within a bounded time (the rest is dropped, logged), then stop."""


class CacheStorage(Protocol):
    """What the core needs of the storage it sized: the pool's name for grants, disk and object I/O."""

    @property
    def segment(self) -> str:
        """The shared-memory segment the ranks map (PoolGrant.segment)."""

    @property
    def disk(self) -> DiskIO | None:
        """Disk I/O, or None without a disk tier."""

    @property
    def objects(self) -> ObjectIO | None:
        """Object store I/O, or None without an object tier."""

    def close(self) -> None:
        """Release the host pool (unlinked), the disk device and the object store (puts drained)."""


# (host_blocks, block_bytes, disk_blocks, layout fingerprint) -> storage;
# raises ShmError/OSError/RuntimeError/ValueError.
StorageFactory = Callable[[int, int, int, str], CacheStorage]


_T = TypeVar("_T")


def _take_all(q: queue.SimpleQueue[_T]) -> list[_T]:
    """Everything in ``q`` now, without waiting (completion queues filled by I/O threads)."""
    out: list[_T] = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


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
        return _take_all(self._done)

    def close(self) -> None:
        self.store.close()


OBJECT_WRITERS = 4  # puts in flight
OBJECT_READERS = 4  # gets and lookups in flight
OBJECT_QUEUE_CAP = 512  # queued puts; more are dropped (Dynamo's DYN_KVBM_G4_DRAIN_QUEUE_CAP default)
OBJECT_DRAIN_S = 5.0  # a clean shutdown waits this long for queued puts (the spawner waits 10 s)


class BlockObjectIO:
    """:class:`ObjectIO` over :class:`BlockObjects` and a mapped :class:`HostPool`.

    Puts go through a bounded queue to writer threads; gets and lookups run on a small pool.
    Each copies the block between the pool and a private buffer under a lock that :meth:`close`
    takes too, so no thread touches the pool once it is released, however long the network takes.
    """

    def __init__(self, objects: BlockObjects, memory: HostPool, notify: Callable[[], None],
                 check: Callable[[], None], *, writers: int = OBJECT_WRITERS, readers: int = OBJECT_READERS,
                 queue_cap: int = OBJECT_QUEUE_CAP, drain_s: float = OBJECT_DRAIN_S) -> None:
        """``check`` raises :class:`kvbm.leader.objects.ObjectError` if the store cannot be used."""
        self.objects = objects
        self.memory = memory
        self._notify = notify
        self._drain_s = drain_s
        self._done: queue.SimpleQueue[ObjectCompletion] = queue.SimpleQueue()
        self._puts: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=queue_cap)
        self._mem = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="kvbm-obj-get")
        self._pool.submit(self._check, check)
        self._writers = [threading.Thread(target=self._write_loop, name=f"kvbm-obj-put-{i}", daemon=True)
                         for i in range(writers)]
        for t in self._writers:
            t.start()

    def _put(self, done: ObjectCompletion) -> None:
        self._done.put(done)
        self._notify()

    def _check(self, check: Callable[[], None]) -> None:
        from kvbm.leader.objects import ObjectError

        try:
            check()
            self._put(ObjectReady(True, ""))
        except ObjectError as e:
            self._put(ObjectReady(False, str(e)))
        except Exception as e:  # a bug or an unexpected transport error: the tier stays off
            self._put(ObjectReady(False, f"object store check failed: {e!r}"))

    def write(self, host_slot: int, seq_hash: int) -> bool:
        try:
            self._puts.put_nowait((host_slot, seq_hash))
            return True
        except queue.Full:
            return False

    def _write_loop(self) -> None:
        while True:
            item = self._puts.get()
            if item is None:
                return
            slot, seq_hash = item
            t0 = time.perf_counter()
            with self._mem:
                data = None if self._closed else bytes(self.memory.block(slot))
            if data is None:
                continue
            try:
                self.objects.put(seq_hash, memoryview(data))
                done = ObjectWriteDone(seq_hash, slot, True, time.perf_counter() - t0, "")
            except Exception as e:  # ObjectError, or anything the transport raised
                done = ObjectWriteDone(seq_hash, slot, False, time.perf_counter() - t0, str(e))
            self._put(done)

    def read(self, host_slot: int, seq_hash: int) -> None:
        def get() -> None:
            t0 = time.perf_counter()
            try:
                res, payload = self.objects.fetch(seq_hash)
            except Exception as e:
                self._put(ObjectReadDone(seq_hash, host_slot, GetStatus.FAILED, time.perf_counter() - t0, str(e)))
                return
            if payload is not None:
                with self._mem:
                    if self._closed:
                        return
                    self.memory.block(host_slot)[:] = payload
            self._put(ObjectReadDone(seq_hash, host_slot, res.status, time.perf_counter() - t0, res.error))

        self._pool.submit(get)

    def lookup(self, hashes: Sequence[int]) -> None:
        batch = tuple(hashes)

        def ask() -> None:
            t0 = time.perf_counter()
            found = tuple(self.objects.contains(batch))
            self._put(ObjectLookupDone(batch, found, time.perf_counter() - t0))

        self._pool.submit(ask)

    def drain(self) -> list[ObjectCompletion]:
        return _take_all(self._done)

    def close(self) -> None:
        deadline = time.monotonic() + self._drain_s
        for _ in self._writers:  # after the queued puts: each writer stops at one
            try:
                self._puts.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
        for t in self._writers:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._mem:
            self._closed = True  # from here no thread reads or writes the pool
        dropped = 0
        while True:
            try:
                dropped += self._puts.get_nowait() is not None
            except queue.Empty:
                break
        if dropped or any(t.is_alive() for t in self._writers):
            log.warning("object tier: %d queued puts dropped at shutdown (not done within %.0f s)",
                        dropped, self._drain_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.objects.close(wait=False)


class ShmStorage:
    """The real storage: a shared-memory host pool and, when configured, a disk block file and an
    object store."""

    def __init__(self, pool: HostPool, disk: StoreIO | None, objects: BlockObjectIO | None = None) -> None:
        self.pool = pool
        self._disk = disk
        self._objects = objects

    @property
    def segment(self) -> str:
        return self.pool.name

    @property
    def disk(self) -> StoreIO | None:
        return self._disk

    @property
    def objects(self) -> BlockObjectIO | None:
        return self._objects

    def close(self) -> None:
        if self._objects is not None:  # first: its puts read the pool
            self._objects.close()
            self._objects = None
        if self._disk is not None:
            self._disk.close()
            self._disk = None
        self.pool.close()


def shm_storage(config: KvbmConfig, instance: str, notify: Callable[[], None]) -> StorageFactory:
    """A factory creating the instance's shared-memory pool and (if sized) its disk block file.

    With ``DYN_KVBM_DISK_CACHE_PERSIST`` the disk file is the layout's persistent one; if a live
    leader holds it, this leader falls back to a private file (logged), never sharing it. With
    ``DYN_KVBM_OBJECT_ENABLED`` the object store is checked in the background (see :class:`ObjectIO`);
    a store that cannot be made at all (boto3 missing) is logged and the tier is off.
    """

    def create(host_blocks: int, block_bytes: int, disk_blocks: int, layout: str) -> CacheStorage:
        from kvbm.leader.capacity import check_cache_space

        check_cache_space(config, block_bytes)  # one clear line before any allocation
        # The ranks pre-fault their mappings (they copy on the engine's critical path); the
        # leader only touches blocks for disk I/O, off that path, so it maps lazily.
        pool = HostPool.create(instance, PoolGeometry(host_blocks, block_bytes), prefault=False)
        try:
            disk = None
            if disk_blocks > 0:
                disk = StoreIO(_disk_store(config, instance, disk_blocks, block_bytes, layout), pool, notify)
            objects = _object_io(config, instance, block_bytes, layout, pool, notify)
            return ShmStorage(pool, disk, objects)
        except BaseException:
            pool.close()  # a tier failed after the host pool was made
            raise

    return create


def object_settings(config: KvbmConfig, instance: str) -> ObjectStoreSettings:
    """Where the instance's objects go; keys not configured come from the AWS variables (if set)."""
    from kvbm.leader.objects import ObjectStoreSettings

    return ObjectStoreSettings(
        bucket=config.object_bucket_for(instance),
        endpoint=config.object_endpoint,
        region=config.object_region,
        access_key=config.object_access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=config.object_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )


def _object_io(config: KvbmConfig, instance: str, block_bytes: int, layout: str, pool: HostPool,
               notify: Callable[[], None]) -> BlockObjectIO | None:
    from kvbm.config import ConfigError
    from kvbm.leader.objects import BlockObjects, ObjectBackend, ObjectError, S3Backend

    if not config.object_enabled:
        return None
    try:
        settings = object_settings(config, instance)
        s3 = S3Backend(settings)  # the start-up check and the lookups; the transport too unless NIXL's
        backend: ObjectBackend = s3
        transport = "boto3"
        if config.object_transport == "nixl":
            backend, transport = _nixl_backend(settings, s3), "NIXL OBJ"
    except (ObjectError, ConfigError) as e:
        log.error("object tier (G4) off: %s; serving continues from the other tiers", e)
        return None
    log.info("object tier (G4): bucket %s at %s through %s", settings.bucket, settings.endpoint or "AWS", transport)
    objects = BlockObjects(backend, layout_key(layout), block_bytes)
    return BlockObjectIO(objects, pool, notify, s3.check)


def _nixl_backend(settings: ObjectStoreSettings, s3: S3Backend) -> ObjectBackend:
    """NIXL OBJ for the bytes, boto3 (``s3``) for lookups; raises ObjectError (``s3`` closed)."""
    from kvbm.leader.objects import NixlObjBackend, ObjectError, SplitBackend

    try:
        return SplitBackend(NixlObjBackend(settings), s3)
    except ObjectError as e:
        s3.close()
        raise ObjectError(f"DYN_KVBM_OBJECT_TRANSPORT=nixl: {e}") from None


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
