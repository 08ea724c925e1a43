"""G3 block file layer: real files on /tmp (ext4, O_DIRECT) and /dev/shm (tmpfs) where needed."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from kvbm.leader import disk
from kvbm.leader.disk import (
    DiskError,
    DiskStore,
    ReadResult,
    WriteResult,
    raw_direct_io_throughput,
)

BLOCK = 16 * 4096
N = 8


@pytest.fixture
def pool() -> Iterator[memoryview]:
    """A page-aligned 'host pool' of N blocks with distinct random contents."""
    m = mmap.mmap(-1, BLOCK * N)
    m.write(os.urandom(BLOCK * N))
    view = memoryview(m)
    yield view
    view.release()
    m.close()


def block(view: memoryview, i: int) -> memoryview:
    return view[i * BLOCK:(i + 1) * BLOCK]


def write_all(store: DiskStore, pool: memoryview) -> list[int]:
    results = [f.result() for f in store.write_many([(i, block(pool, i)) for i in range(N)])]
    assert all(r.ok and r.error is None for r in results), results
    return [r.checksum for r in results]


def test_roundtrip_file_properties_and_cleanup(tmp_path: Path, pool: memoryview) -> None:
    store = DiskStore(str(tmp_path), "rt", N, BLOCK)
    assert store.path == str(tmp_path / "kvbm-rt-disk.bin")
    st = os.stat(store.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == N * BLOCK and st.st_blocks * 512 >= N * BLOCK  # really allocated
    assert fcntl.fcntl(store._fd, fcntl.F_GETFL) & os.O_DIRECT
    sums = write_all(store, pool)
    assert sums == [xxhash.xxh3_64_intdigest(block(pool, i)) for i in range(N)]
    out = mmap.mmap(-1, BLOCK * N)
    with memoryview(out) as ov:
        reads = [f.result() for f in [store.read(i, block(ov, i), sums[i]) for i in reversed(range(N))]]
    assert all(r.ok and r.checksum_ok and r.error is None and r.seconds >= 0 for r in reads)
    assert out[:] == pool.tobytes()
    assert not store.failed and store.failure is None
    store.close()
    store.close()  # idempotent
    assert not os.path.exists(store.path)
    with pytest.raises(DiskError, match="closed"):
        store.write(0, block(pool, 0))


def test_unaligned_buffers_bounce_under_o_direct(tmp_path: Path) -> None:
    src_raw = bytearray(BLOCK + 1)
    src_raw[1:] = os.urandom(BLOCK)
    src = memoryview(src_raw)[1:]
    dst = memoryview(bytearray(BLOCK + 3))[3:]
    with DiskStore(str(tmp_path), "bounce", N, BLOCK) as store:
        w = store.write(5, src).result()
        assert w.ok
        r = store.read(5, dst, w.checksum).result()
        assert r.ok and dst.tobytes() == src.tobytes()
        # a read-only source (bytes) works too
        w2 = store.write(6, memoryview(bytes(src))).result()
        assert w2.ok and w2.checksum == w.checksum


def test_buffered_mode(tmp_path: Path, pool: memoryview) -> None:
    with DiskStore(str(tmp_path), "buf", N, BLOCK, o_direct=False) as store:
        assert not fcntl.fcntl(store._fd, fcntl.F_GETFL) & os.O_DIRECT
        sums = write_all(store, pool)
        dst = memoryview(bytearray(BLOCK + 1))[1:]
        assert store.read(2, dst, sums[2]).result().ok
        assert dst == block(pool, 2)


def test_io_runs_on_bounded_worker_threads_and_close_waits(tmp_path: Path, pool: memoryview) -> None:
    seen: set[str] = set()

    def slow(op: str, slot: int) -> None:
        seen.add(threading.current_thread().name)
        time.sleep(0.05)

    store = DiskStore(str(tmp_path), "thr", N, BLOCK, max_concurrent=2, io_fault=slow)
    futures = store.write_many([(i, block(pool, i)) for i in range(N)])
    store.close()  # waits for all in-flight and queued writes
    assert all(f.done() and f.result().ok for f in futures)
    assert threading.current_thread().name not in seen and 1 <= len(seen) <= 2


def test_bad_arguments(tmp_path: Path, pool: memoryview) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        DiskStore(str(tmp_path), "bad", N, 1000)
    with pytest.raises(ValueError, match="instance"):
        DiskStore(str(tmp_path), "a/b", N, BLOCK)
    with DiskStore(str(tmp_path), "args", N, BLOCK) as store:
        with pytest.raises(ValueError, match="out of range"):
            store.write(N, block(pool, 0))
        with pytest.raises(ValueError, match="bytes"):
            store.write(0, pool[:100])
        with pytest.raises(ValueError, match="read-only"):
            store.read(0, memoryview(bytes(BLOCK)), 0)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"cannot create .*ENOENT"):
        DiskStore(str(tmp_path / "nope"), "x", N, BLOCK)


# ---- pre-existing files -------------------------------------------------------------------


def test_existing_file_is_never_used(tmp_path: Path) -> None:
    path = tmp_path / "kvbm-dup-disk.bin"
    with DiskStore(str(tmp_path), "dup", N, BLOCK):
        with pytest.raises(DiskError, match="already exists"):
            DiskStore(str(tmp_path), "dup", N, BLOCK)
        assert path.exists()  # the live store's file is untouched
    path.write_bytes(b"x" * 4096)
    os.chmod(path, 0o600)
    with pytest.raises(DiskError, match=rf"size 4096 bytes, expected {N * BLOCK}"):
        DiskStore(str(tmp_path), "dup", N, BLOCK, persistent=True)
    assert path.read_bytes() == b"x" * 4096


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_existing_file_of_another_user(tmp_path: Path) -> None:
    path = tmp_path / "kvbm-other-disk.bin"
    with open(path, "wb") as f:
        f.truncate(N * BLOCK)
    os.chmod(path, 0o600)
    os.chown(path, 12345, -1)
    for persistent in (False, True):
        with pytest.raises(DiskError, match="owned by uid 12345"):
            DiskStore(str(tmp_path), "other", N, BLOCK, persistent=persistent)
    assert path.stat().st_uid == 12345


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "kvbm-link-disk.bin").symlink_to(target)
    for persistent in (False, True):
        with pytest.raises(DiskError):
            DiskStore(str(tmp_path), "link", N, BLOCK, persistent=persistent)
    assert target.read_bytes() == b"keep"


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "kvbm-fifo-disk.bin", 0o600)
    for persistent in (False, True):
        with pytest.raises(DiskError, match="not a regular file"):
            DiskStore(str(tmp_path), "fifo", N, BLOCK, persistent=persistent)


def test_persistent_file_is_kept_and_reused(tmp_path: Path, pool: memoryview) -> None:
    with DiskStore(str(tmp_path), "keep", N, BLOCK, persistent=True) as store:
        sums = write_all(store, pool)
    assert os.path.exists(store.path)
    with DiskStore(str(tmp_path), "keep", N, BLOCK, persistent=True) as again:
        dst = memoryview(mmap.mmap(-1, BLOCK))
        assert again.read(3, dst, sums[3]).result().ok
        assert dst == block(pool, 3)
        dst.release()
    os.unlink(store.path)


# ---- allocation ---------------------------------------------------------------------------


def _no_fallocate(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_fallocate_unsupported_zero_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "ZEROFILL_CHUNK", 3 * BLOCK)  # several chunks plus a partial one
    with DiskStore(str(tmp_path), "zf", N, BLOCK, zerofill_fallback=True, fallocate=_no_fallocate) as store:
        st = os.stat(store.path)
        assert st.st_size == N * BLOCK and st.st_blocks * 512 >= N * BLOCK
        dst = memoryview(bytearray(BLOCK))
        r = store.read(N - 1, dst, xxhash.xxh3_64_intdigest(bytes(BLOCK))).result()
        assert r.ok and not any(dst)


def test_fallocate_unsupported_without_fallback(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        DiskStore(str(tmp_path), "nozf", N, BLOCK, fallocate=_no_fallocate)
    assert list(tmp_path.iterdir()) == []


def test_enospc_at_allocation_seam(tmp_path: Path) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskError, match=rf"{N * BLOCK} bytes .* in {tmp_path}, \d+ bytes .* free"):
        DiskStore(str(tmp_path), "full", N, BLOCK, fallocate=full)
    assert list(tmp_path.iterdir()) == []


def test_enospc_at_allocation_real_tmpfs() -> None:
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    sv = os.statvfs(shm)
    too_big = 2 * sv.f_blocks * sv.f_frsize  # tmpfs refuses at once, writes nothing
    num = too_big // BLOCK + 1
    name = f"enospc-{os.getpid()}"
    with pytest.raises(DiskError, match=rf"not enough space .* requested in {shm}, \d+ bytes"):
        DiskStore(shm, name, num, BLOCK, o_direct=False)
    assert not os.path.exists(f"{shm}/kvbm-{name}-disk.bin")


def test_o_direct_refused_at_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int) -> None:  # what tmpfs does on kernels without O_DIRECT support
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(disk, "_set_o_direct", refuse)
    with pytest.raises(DiskError, match="refuses O_DIRECT.*DYN_KVBM_DISK_DISABLE_O_DIRECT=1"):
        DiskStore(str(tmp_path), "nod", N, BLOCK)
    assert list(tmp_path.iterdir()) == []
    DiskStore(str(tmp_path), "nod", N, BLOCK, o_direct=False).close()


# ---- corruption and I/O errors ------------------------------------------------------------


def test_corrupt_bytes_on_disk_fail_the_checksum(tmp_path: Path, pool: memoryview) -> None:
    with DiskStore(str(tmp_path), "corrupt", N, BLOCK) as store:
        sums = write_all(store, pool)
        fd = os.open(store.path, os.O_RDWR)
        byte = os.pread(fd, 1, 4 * BLOCK + 777)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), 4 * BLOCK + 777)
        os.close(fd)
        dst = memoryview(mmap.mmap(-1, BLOCK))
        r = store.read(4, dst, sums[4]).result()
        assert not r.ok and not r.checksum_ok and r.error is not None and r.error.startswith("checksum")
        assert "slot 4" in r.error and store.path in r.error
        assert not store.failed  # one bad block, not a broken tier
        assert store.read(3, dst, sums[3]).result().ok
        wrong = store.read(3, dst, sums[3] ^ 1).result()
        assert not wrong.ok and not wrong.checksum_ok
        dst.release()


def test_truncated_file_is_a_read_error(tmp_path: Path, pool: memoryview) -> None:
    with DiskStore(str(tmp_path), "trunc", N, BLOCK) as store:
        sums = write_all(store, pool)
        os.truncate(store.path, 2 * BLOCK)
        dst = memoryview(mmap.mmap(-1, BLOCK))
        r = store.read(5, dst, sums[5]).result()
        assert not r.ok and not r.checksum_ok and r.error is not None
        assert "short read" in r.error and isinstance(r.os_error, OSError)
        assert store.failed and store.failure == r.error
        later = store.read(0, dst, sums[0]).result()  # tier is off: fails fast
        assert not later.ok and "failed earlier" in (later.error or "")
        dst.release()


@pytest.mark.parametrize(
    ("op", "code", "hint"),
    [("write", errno.ENOSPC, "is full"), ("read", errno.EIO, ""), ("write", errno.ENOENT, "vanished"),
     ("read", errno.EINVAL, "DYN_KVBM_DISK_DISABLE_O_DIRECT=1")],
)
def test_io_errors_mark_the_store_failed(tmp_path: Path, pool: memoryview, op: str, code: int, hint: str) -> None:
    def fault(what: str, slot: int) -> None:
        if what == op and slot == 2:
            raise OSError(code, os.strerror(code))

    with DiskStore(str(tmp_path), "fault", N, BLOCK, io_fault=fault) as store:
        dst = memoryview(mmap.mmap(-1, BLOCK))
        ok = store.write(1, block(pool, 1)).result()
        assert ok.ok and not store.failed
        res: WriteResult | ReadResult
        if op == "write":
            res = store.write(2, block(pool, 2)).result()
        else:
            res = store.read(2, dst, store.write(2, block(pool, 2)).result().checksum).result()
            assert not res.checksum_ok
        assert not res.ok
        assert res.os_error is not None and res.os_error.errno == code
        name = errno.errorcode[code]
        assert res.error is not None and name in res.error and f"{op} of slot 2" in res.error
        assert hint in res.error and store.path in res.error
        assert store.failed and store.failure == res.error
        assert not store.write(3, block(pool, 3)).result().ok
        assert not store.read(1, dst, ok.checksum).result().ok
        dst.release()


def test_raw_direct_io_throughput(tmp_path: Path) -> None:
    for threads in (1, 3):
        w, r = raw_direct_io_throughput(str(tmp_path), BLOCK, N, threads=threads)
        assert w > 0 and r > 0
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_files_of_dead_stores(tmp_path: Path, pool: memoryview) -> None:
    """Hardening item 2: a killed owner's file goes; a live store's, a symlink and others stay."""
    code = ("import sys, time; from kvbm.leader.disk import DiskStore; "
            f"s = DiskStore(sys.argv[1], 'dead', {N}, {BLOCK}); print('ready', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        dead = disk.disk_file_path(str(tmp_path), "dead")
        assert disk.sweep_stale_disk_files(str(tmp_path)) == []  # its owner is alive
    finally:
        owner.kill()
        owner.wait(10)
    assert os.path.isfile(dead)  # kill -9 left it
    (tmp_path / "target").write_bytes(b"t")
    os.symlink(tmp_path / "target", tmp_path / "kvbm-link-disk.bin")
    (tmp_path / "kvbm-unrelated.bin").write_bytes(b"u")
    with DiskStore(str(tmp_path), "live", N, BLOCK) as live, \
            DiskStore(str(tmp_path), "keep", N, BLOCK, persistent=True):
        assert disk.sweep_stale_disk_files(str(tmp_path)) == [dead]
        sums = write_all(live, pool)  # the live store is untouched and works
        assert live.read(0, memoryview(bytearray(BLOCK)), sums[0]).result().ok
        with pytest.raises(DiskError, match="in use by another live store"):
            DiskStore(str(tmp_path), "keep", N, BLOCK, persistent=True)
    assert sorted(os.listdir(tmp_path)) == ["kvbm-keep-disk.bin", "kvbm-link-disk.bin", "kvbm-unrelated.bin",
                                            "target"]
    # The persistent file outlives its store; nobody holds it now, so a sweep takes it.
    assert disk.sweep_stale_disk_files(str(tmp_path)) == [disk.disk_file_path(str(tmp_path), "keep")]
