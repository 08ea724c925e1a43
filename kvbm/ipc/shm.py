"""The G2 host pool: one POSIX shared-memory segment shared by the leader and every rank.

Layout: a 4096-byte header (magic, owner pid and start time, geometry) followed by
``num_blocks`` blocks of ``block_bytes`` each (a multiple of 4096, so disk I/O from the
pool can use O_DIRECT). Block ``b`` starts at ``HEADER_BYTES + b * block_bytes``; each
rank's slice sits at a fixed offset inside the block.

The leader creates the segment (mode 0600, name carrying the instance), reserves its
memory up front with ``posix_fallocate`` (ENOSPC now rather than SIGBUS later), and
unlinks it at shutdown. Every process pre-faults its mapping (MAP_POPULATE), because
first touch costs ~0.7 s/GiB. A start-up sweep removes segments whose owner died.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass

import numpy as np

from kvbm.config import TierSize, format_bytes
from kvbm.ipc.names import safe_name

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "kvbm-"
HEADER_BYTES = 4096
ALIGN = 4096
"""Block size granule: pool blocks (and so disk offsets and buffers) suit O_DIRECT."""
_MAGIC = b"KVBMPOOL"
# magic, version, owner pid, owner start time (clock ticks), num_blocks, block_bytes
_HEADER = struct.Struct("<8sIIQQQ")
_HEADER_VERSION = 1


class ShmError(RuntimeError):
    """A host-pool segment could not be created or attached; the message says why."""


def align_up(n: int, align: int = ALIGN) -> int:
    """Round ``n`` up to a multiple of ``align``."""
    return (n + align - 1) // align * align


def segment_name(instance: str) -> str:
    """The POSIX shm name of an instance's host pool (without the leading slash)."""
    return f"{SEGMENT_PREFIX}{safe_name(instance)}-g2"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist.

    Recorded next to the pid so that a recycled pid is not mistaken for the owner.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class PoolGeometry:
    """Size of the pool: ``num_blocks`` blocks of ``block_bytes`` (a multiple of 4096)."""

    num_blocks: int
    block_bytes: int

    @property
    def data_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def segment_bytes(self) -> int:
        return HEADER_BYTES + self.data_bytes


def _shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _fallocate(fd: int, size: int) -> None:
    os.posix_fallocate(fd, 0, size)


class HostPool:
    """A mapped host-pool segment. Use :meth:`create` (leader) or :meth:`attach` (ranks)."""

    def __init__(self, name: str, geometry: PoolGeometry, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.geometry = geometry
        self._mm: mmap.mmap | None = mm
        self.owner = owner
        self._array: np.ndarray | None = np.frombuffer(
            mm, dtype=np.uint8, count=geometry.data_bytes, offset=HEADER_BYTES
        ).reshape(geometry.num_blocks, geometry.block_bytes)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, instance: str, geometry: PoolGeometry, *, prefault: bool = True) -> "HostPool":
        """Create, reserve and map the segment of ``instance`` (leader side)."""
        if geometry.block_bytes <= 0 or geometry.block_bytes % ALIGN:
            raise ShmError(f"host pool block size {geometry.block_bytes} is not a positive multiple of {ALIGN}")
        if geometry.num_blocks <= 0:
            raise ShmError(f"host pool needs at least one block, got {geometry.num_blocks}")
        name = segment_name(instance)
        size = geometry.segment_bytes
        check_shm_space(size)
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ShmError(
                f"shared-memory segment {path} already exists: another kvbm instance named "
                f"{instance!r} is running (or a dead one left it and it is not ours to remove)"
            ) from None
        try:
            try:
                _fallocate(fd, size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ShmError(
                        f"cannot reserve {format_bytes(size)} for the host pool in {SHM_DIR}: no space "
                        f"left; lower DYN_KVBM_CPU_CACHE_GB or enlarge {SHM_DIR}"
                    ) from None
                raise
            mm = _map(fd, size, prefault)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        start = process_start_time(os.getpid()) or 0
        mm[: _HEADER.size] = _HEADER.pack(
            _MAGIC, _HEADER_VERSION, os.getpid(), start, geometry.num_blocks, geometry.block_bytes
        )
        log.info("created host pool %s: %d blocks x %d B (%.2f GB)", path, geometry.num_blocks,
                 geometry.block_bytes, geometry.data_bytes / 1e9)
        return cls(name, geometry, mm, owner=True)

    @classmethod
    def attach(cls, name: str, geometry: PoolGeometry, *, prefault: bool = True) -> "HostPool":
        """Map an existing segment (rank side), refusing anything unexpected."""
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmError(f"cannot open host pool {path}: {os.strerror(e.errno or 0)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShmError(f"host pool {path} is not a regular shared-memory segment")
            if st.st_uid != os.getuid():
                raise ShmError(f"host pool {path} is owned by uid {st.st_uid}, not us ({os.getuid()}); refusing it")
            if st.st_mode & 0o077:
                raise ShmError(f"host pool {path} has mode {oct(st.st_mode & 0o777)}, expected 0600; refusing it")
            if st.st_size != geometry.segment_bytes:
                raise ShmError(
                    f"host pool {path} has {st.st_size} bytes, expected {geometry.segment_bytes}; refusing it"
                )
            mm = _map(fd, geometry.segment_bytes, prefault)
        finally:
            os.close(fd)
        magic, version, _pid, _start, nb, bb = _HEADER.unpack_from(mm, 0)
        if magic != _MAGIC or version != _HEADER_VERSION or (nb, bb) != (geometry.num_blocks, geometry.block_bytes):
            mm.close()
            raise ShmError(f"host pool {path} has an unexpected header; refusing it")
        return cls(name, geometry, mm, owner=False)

    # -- access ---------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The pool as a ``[num_blocks, block_bytes]`` uint8 array (zero-copy)."""
        if self._array is None:
            raise ShmError(f"host pool {self.name} is closed")
        return self._array

    def block(self, slot: int) -> memoryview:
        """A writable view of one block (page-aligned: usable for O_DIRECT I/O)."""
        return memoryview(self.array[slot]).cast("B")

    def close(self) -> None:
        """Unmap; the owner also unlinks the segment. Idempotent."""
        self._array = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # A caller still holds a view; the mapping goes when the process does.
                log.debug("host pool %s still has exported views; leaving the mapping", self.name)
            self._mm = None
        if self.owner:
            _unlink_quietly(_shm_path(self.name))
            self.owner = False

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map(fd: int, size: int, prefault: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED
    if prefault:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as e:
        raise ShmError(f"{SHM_DIR} is not usable: {os.strerror(e.errno or 0)}") from None
    return st.f_bavail * st.f_frsize


def check_shm_space(size: int) -> None:
    """Fail early, before anything is created, if /dev/shm cannot hold ``size`` bytes."""
    free = _shm_free_bytes()
    if size > free:
        raise ShmError(
            f"{SHM_DIR} has {format_bytes(free)} free but the host pool needs {format_bytes(size)}; "
            f"lower DYN_KVBM_CPU_CACHE_GB (or ..._OVERRIDE_NUM_BLOCKS) or enlarge {SHM_DIR}"
        )


def check_host_pool_space(size: TierSize) -> None:
    """Refuse, in one line naming the variable, a host pool that /dev/shm cannot hold.

    The leader calls this before creating the segment (and before sizing anything after it).
    """
    free = _shm_free_bytes()
    if HEADER_BYTES + size.nbytes > free:
        raise ShmError(size.too_big("host pool", SHM_DIR, max(0, free - HEADER_BYTES),
                                    f" (or enlarge {SHM_DIR})"))


def sweep_stale_segments() -> list[str]:
    """Remove kvbm segments of ours whose owning leader is dead. Returns the removed names."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                continue
            head = os.pread(fd, _HEADER.size, 0)
        finally:
            os.close(fd)
        if len(head) < _HEADER.size:
            # A segment of ours without a header: the creator died between create and write.
            # Only remove it when it is old enough that no creator can still be writing it.
            if time.time() - st.st_mtime > 60:
                _unlink_quietly(path)
                removed.append(name)
            continue
        magic, _v, pid, start, _nb, _bb = _HEADER.unpack(head)
        if magic != _MAGIC:
            continue
        if process_start_time(pid) == start:
            continue  # owner alive
        _unlink_quietly(path)
        removed.append(name)
        log.warning("removed stale host pool %s left by dead leader pid %d", path, pid)
    return removed
