"""G3 disk tier: block file I/O only (no cache policy).

One preallocated file per store, ``{directory}/kvbm-{instance}-disk.bin``, holds
``num_blocks`` slots of ``block_bytes`` each (slot ``s`` at offset ``s * block_bytes``).
A *layout* store (the persistent disk cache) is instead named by its layout fingerprint,
``{directory}/kvbm-layout-{fingerprint:016x}.kvcache``, and starts with a header region: one
64-byte :class:`BlockHeader` a slot (sequence hash, parent, checksum, fingerprint), written
after the slot's data, so a new store of the same layout re-indexes the file
(:attr:`DiskStore.restored`); a block whose data does not match its header's checksum is
reported by :meth:`DiskStore.read` like any corrupt block.
Reads and writes run on a thread pool and return futures; every written block gets an
xxh3-64 checksum that the caller keeps and hands back to :meth:`DiskStore.read`, so a
corrupt or truncated block is always reported, never served.

With O_DIRECT (the default) offsets, sizes and buffers are 4096-aligned: the host pool is
a page-aligned shared-memory mapping, so blocks go straight from/to it; unaligned caller
buffers go through a per-thread aligned bounce buffer.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import xxhash

from kvbm.config import TierSize, format_bytes
from kvbm.ipc.shm import ALIGN, align_up

_R = TypeVar("_R")
log = logging.getLogger(__name__)

ZEROFILL_CHUNK = 16 << 20
"""Chunk size of the zero-fill fallback (as Dynamo: 16 MiB, 4096-aligned)."""

_HINT_O_DIRECT = "set DYN_KVBM_DISK_DISABLE_O_DIRECT=1"
_HINT_ZEROFILL = "set DYN_KVBM_DISK_ZEROFILL_FALLBACK=1 to allocate by writing zeros"

# Syscall seams: tests replace these to exercise file systems we do not have here.
_fallocate: Callable[[int, int, int], None] = os.posix_fallocate


def _set_o_direct(fd: int) -> None:
    """Turn on O_DIRECT on an open fd (EINVAL where the file system refuses it)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)


class DiskError(RuntimeError):
    """The disk tier cannot be set up or used; the message is one line naming file, op and cause."""


class DiskInUse(DiskError):
    """The (persistent) file is locked by another live store: it is neither shared nor overwritten."""


BLOCK_HEADER_BYTES = 64
"""Bytes of one slot's header in a layout store's header region."""

_HEADER_MAGIC = b"KVBMBLK1"
# magic, layout fingerprint, sequence hash, parent hash, flags (bit 0: has a parent), checksum of
# the block's bytes, then xxh3-64 of those fields (a torn or foreign header is ignored).
_HEADER = struct.Struct("<8sQQQQQ")
_HEADER_DTYPE = np.dtype([("magic", "S8"), ("layout", "<u8"), ("seq_hash", "<u8"), ("parent", "<u8"),
                          ("flags", "<u8"), ("checksum", "<u8"), ("check", "<u8"), ("pad", "V8")])
assert _HEADER_DTYPE.itemsize == BLOCK_HEADER_BYTES


@dataclass(frozen=True)
class BlockKey:
    """What a layout store's header says a slot holds."""

    seq_hash: int
    parent: int | None


@dataclass(frozen=True)
class StoredBlock:
    """A block a layout store found in its file at open: ``checksum`` of its bytes, as written."""

    slot: int
    key: BlockKey
    checksum: int


def _pack_header(layout: int, key: BlockKey, checksum: int) -> bytes:
    fields = _HEADER.pack(_HEADER_MAGIC, layout, key.seq_hash, key.parent or 0, int(key.parent is not None),
                          checksum)
    return (fields + struct.pack("<Q", xxhash.xxh3_64_intdigest(fields))).ljust(BLOCK_HEADER_BYTES, b"\0")


def parse_headers(raw: bytes, layout: int) -> list[StoredBlock]:
    """The valid headers of ``layout`` in a header region (torn, foreign or empty ones skipped)."""
    arr = np.frombuffer(raw, dtype=_HEADER_DTYPE)
    candidates = np.flatnonzero((arr["magic"] == _HEADER_MAGIC) & (arr["layout"] == np.uint64(layout)))
    out: list[StoredBlock] = []
    for slot in candidates.tolist():
        start = slot * BLOCK_HEADER_BYTES
        if xxhash.xxh3_64_intdigest(raw[start:start + _HEADER.size]) != int(arr["check"][slot]):
            continue
        h = arr[slot]
        parent = int(h["parent"]) if int(h["flags"]) & 1 else None
        out.append(StoredBlock(slot, BlockKey(int(h["seq_hash"]), parent), int(h["checksum"])))
    return out


@dataclass(frozen=True)
class WriteResult:
    """Outcome of one block write. ``checksum`` (xxh3-64 of the block) is valid only when ``ok``.

    ``seconds`` is the time the worker spent on the op (not the queue wait).
    """

    slot: int
    ok: bool
    checksum: int
    error: str | None
    seconds: float
    os_error: OSError | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ReadResult:
    """Outcome of one block read. When not ``ok`` the destination holds garbage and must not be used.

    ``checksum_ok`` is True only when the bytes read matched the expected checksum; a mismatch
    gives ``ok=False`` with ``error`` starting with ``"checksum"``.
    """

    slot: int
    ok: bool
    error: str | None
    checksum_ok: bool
    seconds: float
    os_error: OSError | None = field(default=None, compare=False)
    mismatch: bool = False  # the read worked but the bytes differ from what was written


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "OSError"


def _address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


DISK_FILE_PREFIX = "kvbm-"
DISK_FILE_SUFFIX = "-disk.bin"


def _names_fd(path: str, fd: int) -> bool:
    """True if ``path`` (not followed) is the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def sweep_stale_disk_files(directory: str) -> list[str]:
    """Remove block files of dead stores in ``directory``. Returns the removed paths.

    Only files named as :func:`disk_file_path` names them, regular, owned by our uid and not
    locked: a live :class:`DiskStore` holds an exclusive ``flock`` on its file for its whole
    life, and the kernel releases it when the owner exits or is killed. Another user's file, a
    live store's file and anything else are left alone. A ``persistent`` store's file is
    removed too once its owner is gone, so persistent stores belong in their own directory.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(DISK_FILE_PREFIX) and name.endswith(DISK_FILE_SUFFIX)):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone, a symlink, or not ours to open
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live store holds it
            # Holding the lock, unlink only if the name still leads to the file we checked.
            if _names_fd(path, fd):
                os.unlink(path)
                removed.append(path)
                log.warning("removed disk cache file %s (%s) left by a dead kvbm leader", path,
                            format_bytes(st.st_size))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def check_disk_space(directory: str, size: TierSize) -> None:
    """Refuse, in one line naming the variable, a disk tier that ``directory`` cannot hold.

    Called before anything is allocated for the tier (the leader's per-block state included).
    A file system that does not report its free space is not refused here; fallocate decides.
    """
    free = _free_bytes(directory)
    if free is not None and size.nbytes > free:
        raise DiskError(size.too_big("disk cache", directory, free))


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.pwritev(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write: {done} of {len(buf)} bytes")
        done += n


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            # EOF inside the file's nominal size: it was truncated under us.
            raise OSError(errno.EIO, f"short read: {done} of {len(buf)} bytes (file truncated?)")
        done += n


def _pread_bytes(fd: int, n: int) -> bytes:
    buf = bytearray(n)
    _pread_all(fd, memoryview(buf), 0)
    return bytes(buf)


def disk_file_path(directory: str, instance: str) -> str:
    """Where the block file of ``instance`` lives."""
    return os.path.join(directory, f"{DISK_FILE_PREFIX}{instance}{DISK_FILE_SUFFIX}")


def layout_file_path(directory: str, layout: int) -> str:
    """Where the persistent block file of a layout fingerprint lives (never swept)."""
    return os.path.join(directory, f"{DISK_FILE_PREFIX}layout-{layout:016x}.kvcache")


class DiskStore:
    """A fixed array of block slots in one preallocated file; I/O on ``max_concurrent`` threads.

    Args:
        directory: where the file goes (must exist).
        instance: caller-chosen name part; the file is ``kvbm-{instance}-disk.bin``.
        num_blocks: number of slots.
        block_bytes: bytes per slot, a multiple of 4096 (the host pool's block size).
        o_direct: open with O_DIRECT (off: ``DYN_KVBM_DISK_DISABLE_O_DIRECT``).
        zerofill_fallback: when fallocate is unsupported, allocate by writing zeros
            (``DYN_KVBM_DISK_ZEROFILL_FALLBACK``); otherwise that is an error.
        max_concurrent: I/O worker threads (``DYN_KVBM_MAX_CONCURRENT_TRANSFERS``).
        fallocate: replaces ``os.posix_fallocate(fd, offset, length)`` (test seam).
        io_fault: called in the worker before each op with ``("read"|"write", slot)``; an
            OSError it raises is handled as that op's I/O error (test seam).
        persistent: keep the file on close, and reuse an existing one if it is a regular file
            owned by us, mode 0600 and of the exact size (contents are the caller's concern).
            Once no store holds it, :func:`sweep_stale_disk_files` of its directory removes it.
        layout: a layout fingerprint (64-bit): makes a persistent *layout store* named by it
            (``instance`` unused), with a header per slot; an existing file of another size is
            emptied and resized; its valid headers become :attr:`restored`. Raises
            :class:`DiskInUse` if a live store holds the file.

    The first I/O error marks the store ``failed``; later ops then fail at once without
    touching the disk (the caller turns the tier off). A checksum mismatch fails only that read.
    """

    def __init__(
        self,
        directory: str,
        instance: str,
        num_blocks: int,
        block_bytes: int,
        *,
        o_direct: bool = True,
        zerofill_fallback: bool = False,
        max_concurrent: int = 4,
        fallocate: Callable[[int, int, int], None] | None = None,
        io_fault: Callable[[str, int], None] | None = None,
        persistent: bool = False,
        layout: int | None = None,
    ) -> None:
        if block_bytes <= 0 or block_bytes % ALIGN:
            raise ValueError(f"disk block_bytes must be a positive multiple of {ALIGN}, got {block_bytes}")
        if num_blocks <= 0:
            raise ValueError(f"disk num_blocks must be positive, got {num_blocks}")
        if max_concurrent <= 0:
            raise ValueError(f"disk max_concurrent must be positive, got {max_concurrent}")
        if not instance or "/" in instance or "\0" in instance:
            raise ValueError(f"disk instance must be a non-empty name without '/', got {instance!r}")
        self.directory = directory
        self.layout = layout
        self.path = disk_file_path(directory, instance) if layout is None else layout_file_path(directory, layout)
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.o_direct = o_direct
        self.persistent = persistent or layout is not None
        # A layout store's headers come first, padded so the slots stay 4096-aligned.
        self._base = 0 if layout is None else align_up(num_blocks * BLOCK_HEADER_BYTES)
        self.size = self._base + num_blocks * block_bytes
        self._zerofill_fallback = zerofill_fallback
        self._fallocate = fallocate
        self._io_fault = io_fault
        self._lock = threading.Lock()
        self._closed = False
        self._failure: str | None = None
        self._local = threading.local()
        self._fd, self._ident = self._open()
        self._hfd = -1
        self.restored: list[StoredBlock] = []
        if layout is not None:
            try:
                # Headers are small unaligned writes: a second, buffered descriptor of the same file.
                self._hfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
                self.restored = parse_headers(_pread_bytes(self._hfd, self._base), layout)
            except OSError as e:
                if self._hfd >= 0:
                    os.close(self._hfd)
                os.close(self._fd)
                raise DiskError(f"cannot read the block headers of {self.path}: {_errno_name(e)} ({e.strerror})") from e
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="kvbm-disk")

    # ---- set-up -------------------------------------------------------------------------

    def _open(self) -> tuple[int, tuple[int, int]]:
        """Create (or, persistent, reuse) and lock the file, set O_DIRECT, allocate; clean up on failure."""
        for _ in range(3):
            fd, created = self._create_or_reuse()
            if self._own(fd, created):
                break
            os.close(fd)  # a sweep removed our new file before we locked it: create it again
        else:
            raise DiskError(f"cannot create disk cache file {self.path}: removed again and again while "
                            "being created (is another kvbm sweeping this directory in a loop?)")
        try:
            st = os.fstat(fd)
            if not created and st.st_size != self.size:  # a layout file of another cache size
                log.warning("disk cache file %s has %d bytes, this cache needs %d: emptying it",
                            self.path, st.st_size, self.size)
                os.ftruncate(fd, 0)
                created = True
            if self.o_direct:
                try:
                    _set_o_direct(fd)
                except OSError as e:
                    hint = f"; {_HINT_O_DIRECT}" if e.errno == errno.EINVAL else ""
                    raise DiskError(f"the file system of {self.directory} refuses O_DIRECT on {self.path}: "
                                    f"{_errno_name(e)} ({e.strerror}){hint}") from e
            if created:
                self._allocate(fd)
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(self.path)
            raise
        return fd, (st.st_dev, st.st_ino)

    def _create_or_reuse(self) -> tuple[int, bool]:
        """Open the file: (fd, True) when created now, (fd, False) for a reused persistent one."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(self.path, flags, 0o600), True
        except FileExistsError:
            if not self.persistent:
                try:
                    problem = self._existing_problem(os.lstat(self.path))
                except OSError:
                    problem = None
                raise DiskError(problem or (
                    f"disk cache file {self.path} already exists (another store of this instance is "
                    "open, or a crashed run left it): remove it or use another instance name")) from None
            return self._reopen_existing(), False
        except OSError as e:
            raise DiskError(f"cannot create disk cache file {self.path}: {_errno_name(e)} ({e.strerror})") from e

    def _own(self, fd: int, created: bool) -> bool:
        """Hold the owner lock on ``fd`` for the store's life; False if a sweep unlinked the new file.

        The lock is how :func:`sweep_stale_disk_files` tells a live store's file from a dead
        one's: the kernel drops it when the owner dies, however it dies.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not created:
                os.close(fd)
                raise DiskInUse(f"disk cache file {self.path} is in use by another live store") from None
        # A sweep opened our file between create and lock: wait for its verdict, then check
        # whether the name still leads to our file.
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _names_fd(self.path, fd)

    def _existing_problem(self, st: os.stat_result) -> str | None:
        """Why an existing file (stat ``st``) may not be used, or None if it only lacks persistence."""
        what = f"disk cache file {self.path} already exists and is never reused:"
        if not stat.S_ISREG(st.st_mode):
            return f"{what} not a regular file"
        if st.st_uid != os.geteuid():
            return f"{what} owned by uid {st.st_uid}, not {os.geteuid()}"
        if st.st_size != self.size and self.layout is None:
            return f"{what} size {st.st_size} bytes, expected {self.size}"
        if st.st_mode & 0o077:
            return f"{what} mode {oct(stat.S_IMODE(st.st_mode))}, expected 0o600"
        return None

    def _reopen_existing(self) -> int:
        """Open an existing persistent file; checks run on the opened fd (no check/use race)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise DiskError(f"cannot reopen disk cache file {self.path}: {_errno_name(e)} ({e.strerror})") from e
        problem = self._existing_problem(os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise DiskError(problem)
        os.set_blocking(fd, True)
        return fd

    def _allocate(self, fd: int) -> None:
        fallocate = self._fallocate or _fallocate
        try:
            fallocate(fd, 0, self.size)
            return
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise self._alloc_error("fallocate", e) from e
            if not self._zerofill_fallback:
                raise DiskError(f"fallocate is not supported by the file system of {self.directory} "
                                f"({self.path}, {_errno_name(e)}): {_HINT_ZEROFILL}") from e
        self._zerofill(fd)

    def _zerofill(self, fd: int) -> None:
        """Write zeros from an aligned anonymous mapping (zeroed, page-aligned: O_DIRECT-safe)."""
        chunk = min(ZEROFILL_CHUNK, self.size)
        zeros = mmap.mmap(-1, chunk)
        view = memoryview(zeros)
        try:
            for off in range(0, self.size, chunk):
                _pwrite_all(fd, view[: min(chunk, self.size - off)], off)
        except OSError as e:
            raise self._alloc_error("zero-fill", e) from e
        finally:
            view.release()
            zeros.close()

    def _alloc_error(self, op: str, e: OSError) -> DiskError:
        if e.errno == errno.ENOSPC:
            free = _free_bytes(self.directory)
            free_s = "unknown" if free is None else f"{free} bytes ({free / 2**30:.2f} GiB)"
            return DiskError(f"not enough space for the disk cache ({op} ENOSPC): {self.size} bytes "
                             f"({self.size / 2**30:.2f} GiB, {self.num_blocks} blocks of {self.block_bytes}) "
                             f"requested in {self.directory}, {free_s} free")
        hint = f"; {_HINT_O_DIRECT}" if e.errno == errno.EINVAL and self.o_direct else ""
        return DiskError(f"{op} of {self.size} bytes for {self.path} failed: "
                         f"{_errno_name(e)} ({e.strerror}){hint}")

    # ---- I/O ------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """True once an I/O error happened; the tier should then be turned off."""
        return self._failure is not None

    @property
    def failure(self) -> str | None:
        """The first I/O error, as a one-line message."""
        return self._failure

    def write(self, slot: int, src: memoryview, key: BlockKey | None = None) -> Future[WriteResult]:
        """Write one block (``src``: exactly ``block_bytes``) to ``slot`` on a worker thread.

        ``src`` must stay unchanged until the future is done. The result carries the
        block's checksum, to be passed to :meth:`read`. A layout store writes ``key`` into the
        slot's header after the data (without a key the header is left as it was).
        """
        view = self._check(slot, src, writable=False)
        return self._submit(self._do_write, slot, view, key)

    def read(self, slot: int, dst: memoryview, expected_checksum: int) -> Future[ReadResult]:
        """Read ``slot`` into ``dst`` (exactly ``block_bytes``, writable) and verify its checksum."""
        view = self._check(slot, dst, writable=True)
        return self._submit(self._do_read, slot, view, expected_checksum)

    def write_many(self, pairs: Sequence[tuple[int, memoryview]]) -> list[Future[WriteResult]]:
        """Submit one :meth:`write` per ``(slot, src)`` pair; they run concurrently."""
        return [self.write(slot, src) for slot, src in pairs]

    def _check(self, slot: int, buf: memoryview, *, writable: bool) -> memoryview:
        if not 0 <= slot < self.num_blocks:
            raise ValueError(f"disk slot {slot} out of range [0, {self.num_blocks}) for {self.path}")
        view = memoryview(buf)
        if not view.c_contiguous:
            raise ValueError("disk I/O buffer must be C-contiguous")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes != self.block_bytes:
            raise ValueError(f"disk I/O buffer has {view.nbytes} bytes, block is {self.block_bytes}")
        if writable and view.readonly:
            raise ValueError("disk read destination is read-only")
        return view

    def _submit(self, fn: Callable[..., _R], *args: object) -> Future[_R]:
        with self._lock:
            if self._closed:
                raise DiskError(f"disk store {self.path} is closed")
            return self._pool.submit(fn, *args)

    def _direct_ok(self, buf: memoryview) -> bool:
        return not self.o_direct or _address(buf) % ALIGN == 0

    def _bounce(self) -> memoryview:
        """This worker thread's aligned buffer for unaligned caller buffers under O_DIRECT."""
        view: memoryview | None = getattr(self._local, "bounce", None)
        if view is None:
            # Freed with the thread's locals when the pool shuts down.
            view = self._local.bounce = memoryview(mmap.mmap(-1, self.block_bytes))
        return view

    def _io_error(self, op: str, slot: int, e: OSError) -> str:
        hints = {
            errno.EINVAL: _HINT_O_DIRECT if self.o_direct else "",
            errno.ENOSPC: f"the file system of {self.directory} is full",
            errno.ENOENT: f"the cache directory {self.directory} or file vanished",
        }
        hint = hints.get(e.errno or 0, "")
        msg = (f"disk {op} of slot {slot} (offset {self._offset(slot)}) in {self.path} failed: "
               f"{_errno_name(e)} ({e.strerror}){'; ' + hint if hint else ''}")
        with self._lock:
            if self._failure is None:
                self._failure = msg
        return msg

    def _earlier_failure(self, op: str, slot: int) -> str | None:
        failure = self._failure
        return None if failure is None else f"disk {op} of slot {slot} skipped: store failed earlier: {failure}"

    def _offset(self, slot: int) -> int:
        return self._base + slot * self.block_bytes

    def _do_write(self, slot: int, src: memoryview, key: BlockKey | None) -> WriteResult:
        t0 = time.perf_counter()
        skipped = self._earlier_failure("write", slot)
        if skipped is not None:
            return WriteResult(slot, False, 0, skipped, 0.0)
        try:
            if self._io_fault is not None:
                self._io_fault("write", slot)
            checksum = xxhash.xxh3_64_intdigest(src)
            buf = src
            if not self._direct_ok(src):
                buf = self._bounce()
                buf[:] = src
            _pwrite_all(self._fd, buf, self._offset(slot))
            if key is not None and self.layout is not None:
                # After the data: a crash in between leaves the old header, whose checksum then fails.
                _pwrite_all(self._hfd, memoryview(_pack_header(self.layout, key, checksum)),
                            slot * BLOCK_HEADER_BYTES)
        except OSError as e:
            # Drop the traceback: its frames would pin the caller's buffer (e.g. the host pool mmap).
            return WriteResult(slot, False, 0, self._io_error("write", slot, e), time.perf_counter() - t0,
                               e.with_traceback(None))
        return WriteResult(slot, True, checksum, None, time.perf_counter() - t0)

    def _do_read(self, slot: int, dst: memoryview, expected: int) -> ReadResult:
        t0 = time.perf_counter()
        skipped = self._earlier_failure("read", slot)
        if skipped is not None:
            return ReadResult(slot, False, skipped, False, 0.0)
        try:
            if self._io_fault is not None:
                self._io_fault("read", slot)
            if self._direct_ok(dst):
                _pread_all(self._fd, dst, self._offset(slot))
            else:
                bounce = self._bounce()
                _pread_all(self._fd, bounce, self._offset(slot))
                dst[:] = bounce
        except OSError as e:
            return ReadResult(slot, False, self._io_error("read", slot, e), False, time.perf_counter() - t0,
                              e.with_traceback(None))
        got = xxhash.xxh3_64_intdigest(dst)
        if got != expected:
            msg = (f"checksum mismatch reading slot {slot} of {self.path}: "
                   f"expected {expected:#018x}, got {got:#018x}")
            return ReadResult(slot, False, msg, False, time.perf_counter() - t0, mismatch=True)
        return ReadResult(slot, True, None, True, time.perf_counter() - t0)

    # ---- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for in-flight I/O, close the file and unlink it (unless persistent). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        if self._hfd >= 0:
            os.close(self._hfd)
        os.close(self._fd)
        if not self.persistent:
            try:
                st = os.lstat(self.path)
                # Only unlink our own file, not one a later store created under the same name.
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_direct_io_throughput(directory: str, block_bytes: int, num_blocks: int,
                             *, threads: int = 1) -> tuple[float, float]:
    """Physical limit for benchmarks: (write GB/s, read GB/s) of bare O_DIRECT pwrite/pread.

    Writes then reads ``num_blocks`` blocks of ``block_bytes`` in a scratch file in
    ``directory``, each block from/to its own slice of a page-aligned random-filled mapping
    (like a host pool), split over ``threads`` threads; GB = 1e9 bytes. A first, untimed
    write pass converts the fallocated (unwritten) extents, as a long-lived cache file's
    slots have been written before.
    """
    if block_bytes % ALIGN:
        raise ValueError(f"block_bytes must be a multiple of {ALIGN}")
    total = num_blocks * block_bytes
    fd, path = tempfile.mkstemp(prefix="kvbm-rawio-", dir=directory)
    region = mmap.mmap(-1, total)
    try:
        # Distinct data per block: identical blocks run at odd speeds on cached virtual disks.
        np.frombuffer(region, dtype=np.uint64)[:] = np.random.default_rng().bit_generator.random_raw(total // 8)
        os.posix_fallocate(fd, 0, total)
        _set_o_direct(fd)
        errors: list[OSError] = []

        def run(io: Callable[[int, memoryview, int], None]) -> float:
            def worker(i: int) -> None:
                try:
                    with memoryview(region) as view:
                        for slot in range(i, num_blocks, threads):
                            off = slot * block_bytes
                            io(fd, view[off:off + block_bytes], off)
                except OSError as e:  # re-raised on the caller's thread below
                    errors.append(e)

            ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if errors:
                raise errors[0]
            return total / (time.perf_counter() - t0) / 1e9

        run(_pwrite_all)
        return run(_pwrite_all), run(_pread_all)
    finally:
        os.close(fd)
        os.unlink(path)
        region.close()
