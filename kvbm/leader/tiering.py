"""G2 <-> G3 movement run by the leader: offload to disk after registration, staging back.

The leader maps the host pool itself, so disk I/O goes straight between the pool and the
block file on the DiskStore's threads; the leader's message loop only submits work and
applies completions (delivered through :meth:`DiskTier.drain`).

* Offload: a block registered in G2 passes the admission filter (unless disabled, or in
  disk-only mode), gets a disk slot, and stays pinned in G2 while it is written. The disk
  slot becomes matchable only after the write succeeded; its checksum is kept.
* Staging: a load that continues on disk gets fresh G2 slots; each is committed (and pinned
  for the load) only after its read succeeded *and* its checksum matched. A mismatch evicts
  the disk block and fails the load: wrong KV is never served.
* Any I/O error (ENOSPC, EIO, vanished directory) turns the tier off; G2 keeps serving.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from kvbm.ipc.shm import HostPool
from kvbm.leader.admission import FrequencyFilter
from kvbm.leader.disk import DiskStore, ReadResult, WriteResult
from kvbm.leader.registry import TierPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageDone:
    """A staging read finished: ``host_slot`` now holds ``seq_hash`` (or failed)."""

    op_id: int
    host_slot: int
    seq_hash: int
    ok: bool
    reason: str


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


class DiskTier:
    """Owns the block file, the disk slot pool and the G2 <-> G3 pipeline."""

    def __init__(
        self,
        store: DiskStore,
        disk_pool: TierPool,
        host_pool: TierPool,
        host_memory: HostPool,
        admission: FrequencyFilter | None,
        notify: Callable[[], None],
        max_pending_writes: int,
        on_transfer: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.pool = disk_pool
        self.host = host_pool
        self.memory = host_memory
        self.admission = admission
        self._notify = notify
        self._max_pending = max_pending_writes
        self._on_transfer = on_transfer or (lambda direction, seconds: None)
        self._checksums: dict[int, int] = {}  # disk slot -> checksum of its bytes
        self._completions: queue.SimpleQueue[Callable[[], StageDone | None]] = queue.SimpleQueue()
        self._pending_writes = 0
        self.counters = DiskCounters()
        self.enabled = True
        self.disabled_reason = ""

    # -- offload -------------------------------------------------------------------------
    def offload(self, hashes: list[int], host_slots: list[int]) -> None:
        """Consider newly registered G2 blocks for G3 (called after a store commits)."""
        if not self.enabled:
            return
        for seq_hash, hslot in zip(hashes, host_slots):
            if self.pool.holds(seq_hash):
                continue  # already on disk (or being written)
            if self.admission is not None and not self.admission.should_offload(seq_hash):
                self.counters.offload_skipped_filter += 1
                continue
            if self._pending_writes >= self._max_pending:
                self.counters.offload_skipped_busy += 1
                continue
            got = self.pool.allocate([seq_hash], [self.host.parent_of(hslot)])
            if not got or got[0] is None:
                self.counters.offload_skipped_busy += 1
                continue
            dslot = got[0]
            self.host.pin([hslot])  # keep the source in G2 until the write completes
            self._pending_writes += 1
            fut = self.store.write(dslot, self.memory.block(hslot))
            fut.add_done_callback(self._on_write(dslot, hslot))

    def _on_write(self, dslot: int, hslot: int) -> Callable[[Future[WriteResult]], None]:
        def done(fut: Future[WriteResult]) -> None:
            res = _result(fut, dslot)

            def apply() -> None:
                self._pending_writes -= 1
                self.host.unpin([hslot])
                if res.ok:
                    self._checksums[dslot] = res.checksum
                    self.pool.commit([dslot])
                    self.counters.offloaded_blocks += 1
                    self.counters.bytes_written += self.store.block_bytes
                    self.counters.write_seconds += res.seconds
                    self._on_transfer("h2disk", res.seconds)
                else:
                    self.pool.abort([dslot])
                    self._io_failed(f"write of disk slot {dslot} failed: {res.error}")
                return None

            self._completions.put(apply)
            self._notify()

        return done

    # -- staging -------------------------------------------------------------------------
    def stage(self, op_id: int, seq_hash: int) -> int | None:
        """Start reading ``seq_hash`` from disk into a new G2 slot; returns that slot or None."""
        if not self.enabled:
            return None
        dslot = self.pool.lookup(seq_hash)
        if dslot is None:
            return None
        got = self.host.allocate([seq_hash], [self.pool.parent_of(dslot)])
        if not got or got[0] is None:
            return None
        hslot = got[0]
        self.pool.pin([dslot])
        fut = self.store.read(dslot, self.memory.block(hslot), self._checksums[dslot])
        fut.add_done_callback(self._on_read(op_id, seq_hash, dslot, hslot))
        return hslot

    def _on_read(self, op_id: int, seq_hash: int, dslot: int, hslot: int) -> Callable[[Future[ReadResult]], None]:
        def done(fut: Future[ReadResult]) -> None:
            res = _read_result(fut, dslot)

            def apply() -> StageDone:
                self.pool.unpin([dslot])
                if res.ok and res.checksum_ok:
                    self.host.commit([hslot])
                    self.counters.onboarded_blocks += 1
                    self.counters.bytes_read += self.store.block_bytes
                    self.counters.read_seconds += res.seconds
                    self._on_transfer("disk2h", res.seconds)
                    return StageDone(op_id, hslot, seq_hash, True, "")
                self.host.abort([hslot])
                if res.mismatch:
                    self.counters.checksum_failures += 1
                    if self.counters.checksum_failures == 1:
                        log.error("disk block %016x failed its checksum: dropped, never loaded "
                                  "(further failures are counted, not logged)", seq_hash)
                    self._drop(seq_hash, dslot)
                    return StageDone(op_id, hslot, seq_hash, False, "checksum mismatch")
                self._drop(seq_hash, dslot)
                self._io_failed(f"read of disk slot {dslot} failed: {res.error}")
                return StageDone(op_id, hslot, seq_hash, False, res.error or "read failed")

            self._completions.put(apply)
            self._notify()

        return done

    def _drop(self, seq_hash: int, dslot: int) -> None:
        if self.pool.evict(seq_hash):
            self._checksums.pop(dslot, None)

    # -- completions and failure ---------------------------------------------------------
    def drain(self) -> list[StageDone]:
        """Apply finished I/O on the caller's (the leader loop's) thread."""
        staged: list[StageDone] = []
        while True:
            try:
                apply = self._completions.get_nowait()
            except queue.Empty:
                return staged
            out = apply()
            if out is not None:
                staged.append(out)

    def _io_failed(self, what: str) -> None:
        self.counters.io_errors += 1
        if self.enabled:
            self.enabled = False
            self.disabled_reason = f"{what}; {self.store.failure or ''}".strip("; ")
            self.pool.clear()  # nothing on disk may match any more
            log.error("disk tier turned off: %s; serving continues from the host pool", self.disabled_reason)

    @property
    def busy(self) -> int:
        return self._pending_writes

    def close(self) -> None:
        self.store.close()
        self.drain()


def _result(fut: Future[WriteResult], slot: int) -> WriteResult:
    try:
        return fut.result()
    except Exception as e:  # the store reports errors in results; this is a last resort
        return WriteResult(slot=slot, ok=False, checksum=0, error=repr(e), seconds=0.0)


def _read_result(fut: Future[ReadResult], slot: int) -> ReadResult:
    try:
        return fut.result()
    except Exception as e:
        return ReadResult(slot=slot, ok=False, error=repr(e), checksum_ok=False, seconds=0.0)
