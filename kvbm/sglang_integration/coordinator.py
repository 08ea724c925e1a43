"""Agreeing on one kvbm op per page batch across the TP ranks of an SGLang instance.

SGLang calls every rank's backend on its own, with the same page keys (each rank its slice of
the bytes). kvbm's leader counts a store or load as done once every rank reported its part of
*one* op, so the ranks must share the op: rank 0 runs a :class:`Coordinator` (a ZMQ ROUTER on
its own thread, ``<run dir>/<instance>-ranks.sock``); every rank's call :meth:`RankLink.join`\\ s
the batch; once every rank that takes part joined the same (kind, pages), the coordinator asks
the leader once (``AllocateStore`` / ``PrepareLoad``, waiting for disk staging) and hands the
same grant to all of them. Each rank then copies its slice and reports to the leader itself.

Bounded everywhere: a batch not joined by every rank within ``JOIN_WAIT_S`` is answered with
no grant (a miss, nothing allocated); a rank waits a little longer than that for its answer,
and a grant that reaches a rank after it gave up is reported failed, so no slot stays held.

MLA (replicated KV): rank 0 is the only kvbm rank; the others are readers that map rank 0's
pool (its location comes with the grant) and copy loads from it. Rank 0 reports a load only
after every reader reported its copy done (``AwaitReaders``), so the leader keeps the slots
pinned while they read.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import msgpack
import numpy as np
import zmq

from kvbm.leader.client import LeaderClient

log = logging.getLogger("kvbm.sglang")

JOIN_WAIT_S = 5.0  # how long a batch waits for every rank to join it
STAGE_WAIT_S = 5.0  # how long a load waits for its pages to be staged from disk into the host pool
REPLY_MARGIN_S = 3.0  # a rank waits JOIN_WAIT_S + STAGE_WAIT_S + this for its grant
READERS_WAIT_S = 10.0  # MLA: how long rank 0 holds a load's pin for readers still copying

STORE, LOAD = "store", "load"


@dataclass(frozen=True)
class PoolLocation:
    """Where rank 0's slice of the host pool is (for MLA readers)."""

    segment: str
    num_blocks: int
    block_bytes: int
    slice_offset: int


@dataclass(frozen=True)
class Grant:
    """One op for a batch: ``slots[i]`` for page i (-1: stores only, already held); may be shorter
    than the batch. ``op_id`` 0: nothing to copy."""

    op_id: int
    slots: np.ndarray  # int64
    pool: PoolLocation | None = None


NO_GRANT = Grant(0, np.zeros(0, np.int64))


def _pack(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


@dataclass
class _Batch:
    kind: str
    hashes: bytes
    parent: int
    started: float
    waiting: dict[int, list[tuple[bytes, int]]] = field(default_factory=dict)  # rank -> [(peer, request id)]


@dataclass
class _ReadersWait:
    started: float
    readers: set[int]  # ranks that have not reported yet
    failed: bool = False
    rank0: tuple[bytes, int] | None = None  # rank 0 waiting for the verdict


class Coordinator:
    """Rank 0's side: batches ranks' joins into one leader op each. Runs on its own thread."""

    def __init__(self, endpoint: str, leader_endpoint: str, tp_size: int, kvbm_world: int,
                 pool_location: Callable[[], PoolLocation | None]) -> None:
        self.endpoint = endpoint
        self.tp_size = tp_size
        self.kvbm_world = kvbm_world
        self._pool_location = pool_location
        self._leader_endpoint = leader_endpoint
        self._stop = threading.Event()
        self._batches: dict[tuple[str, bytes], _Batch] = {}
        self._readers: dict[int, _ReadersWait] = {}
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-sglang-coordinator", daemon=True)
        self._thread.start()
        self._bound.wait(5.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=JOIN_WAIT_S + STAGE_WAIT_S + 2)

    def _participants(self, kind: str) -> int:
        return self.kvbm_world if kind == STORE else self.tp_size

    def _run(self) -> None:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        client = LeaderClient(self._leader_endpoint)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            log.error("kvbm: cannot bind the SGLang rank coordinator at %s: %s", self.endpoint, e)
            self._bound.set()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    while sock.poll(0):
                        peer, frame = sock.recv_multipart()
                        self._handle(sock, client, peer, frame)
                self._expire(sock, time.monotonic())
        except Exception:  # never take the engine down; ranks then time out into misses
            log.exception("kvbm: SGLang rank coordinator failed")
        finally:
            client.close()
            sock.close(0)

    def _handle(self, sock: zmq.Socket, client: LeaderClient, peer: bytes, frame: bytes) -> None:
        try:
            tag, rid, *args = msgpack.unpackb(frame, raw=False)
        except Exception:
            log.warning("kvbm: dropping a malformed frame from an SGLang rank")
            return
        now = time.monotonic()
        if tag == "join":
            kind, rank, hashes, parent = args
            batch = self._batches.setdefault((kind, hashes), _Batch(kind, hashes, parent, now))
            batch.waiting.setdefault(rank, []).append((peer, rid))
            if len(batch.waiting) >= self._participants(kind):
                self._grant(sock, client, batch)
        elif tag == "copied":  # an MLA reader finished (or failed) copying a load
            rank, op_id, ok = args
            wait = self._readers.get(op_id)
            if wait is not None:
                wait.readers.discard(rank)
                wait.failed |= not ok
            sock.send_multipart([peer, _pack("confirmed", rid, wait is not None)])
            self._settle_readers(sock, op_id)
        elif tag == "await_readers":
            (op_id,) = args
            wait = self._readers.get(op_id)
            if wait is None:
                sock.send_multipart([peer, _pack("confirmed", rid, True)])
            else:
                wait.rank0 = (peer, rid)
                self._settle_readers(sock, op_id)

    def _grant(self, sock: zmq.Socket, client: LeaderClient, batch: _Batch) -> None:
        members = {rank: waits.pop(0) for rank, waits in batch.waiting.items()}
        batch.waiting = {r: w for r, w in batch.waiting.items() if w}
        if not batch.waiting:
            del self._batches[(batch.kind, batch.hashes)]
        hashes = np.frombuffer(batch.hashes, dtype="<u8")
        op_id, slots = 0, np.zeros(0, np.int64)
        if batch.kind == STORE:
            g = client.allocate_store(hashes, batch.parent)
            op_id, slots = g.op_id, np.asarray(g.slots, np.int64)
        else:
            lg = client.prepare_load(hashes)
            op_id, slots = lg.op_id, np.asarray(lg.slots, np.int64)
            if op_id and not lg.ready and not self._staged(client, op_id):
                client.release(op_id)
                op_id, slots = 0, np.zeros(0, np.int64)
        pool = self._pool_location() if batch.kind == LOAD and self.kvbm_world < self.tp_size else None
        if op_id and pool is None and batch.kind == LOAD and self.kvbm_world < self.tp_size:
            client.release(op_id)
            op_id, slots = 0, np.zeros(0, np.int64)
        if op_id and batch.kind == LOAD and self.kvbm_world < self.tp_size:
            self._readers[op_id] = _ReadersWait(time.monotonic(), set(range(self.kvbm_world, self.tp_size)))
        loc = [pool.segment, pool.num_blocks, pool.block_bytes, pool.slice_offset] if pool else None
        for peer, rid in members.values():
            sock.send_multipart([peer, _pack("grant", rid, op_id, slots.astype("<i8").tobytes(), loc)])

    def _staged(self, client: LeaderClient, op_id: int) -> bool:
        """Wait (bounded) until the leader staged a load's disk pages into the host pool."""
        deadline = time.monotonic() + STAGE_WAIT_S
        while time.monotonic() < deadline:
            ready, failed = client.poll_loads([op_id])
            if op_id in ready:
                return True
            if op_id in failed:
                return False
            time.sleep(0.002)
        log.warning("kvbm: load op %d still staging from disk after %.0f s; serving a miss", op_id, STAGE_WAIT_S)
        return False

    def _settle_readers(self, sock: zmq.Socket, op_id: int, expired: bool = False) -> None:
        wait = self._readers.get(op_id)
        if wait is None or wait.rank0 is None or (wait.readers and not expired):
            return
        del self._readers[op_id]
        ok = not wait.failed and not wait.readers
        sock.send_multipart([wait.rank0[0], _pack("confirmed", wait.rank0[1], ok)])

    def _expire(self, sock: zmq.Socket, now: float) -> None:
        for key, batch in list(self._batches.items()):
            if now - batch.started > JOIN_WAIT_S:
                del self._batches[key]
                for waits in batch.waiting.values():
                    for peer, rid in waits:
                        sock.send_multipart([peer, _pack("grant", rid, 0, b"", None)])
        for op_id, wait in list(self._readers.items()):
            if now - wait.started > 2 * READERS_WAIT_S:
                del self._readers[op_id]  # rank 0 never asked (it gave up on the grant)
            elif now - wait.started > READERS_WAIT_S:
                if wait.rank0 is None:
                    wait.failed = True  # rank 0 asks later: it gets "failed" at once
                    wait.readers.clear()
                else:
                    self._settle_readers(sock, op_id, expired=True)


class RankLink:
    """A rank's connection to the coordinator; safe to call from several threads (one socket each)."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, rank: int, on_stale_grant: Callable[[int], None]) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self._on_stale_grant = on_stale_grant
        self._local = threading.local()
        self._socks: list[zmq.Socket] = []
        self._lock = threading.Lock()

    def _sock(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._local.sock = sock
            with self._lock:
                self._socks.append(sock)
        return sock

    def _call(self, timeout_s: float, *fields: object) -> list | None:
        sock = self._sock()
        rid = next(self._ids)
        try:
            sock.send(_pack(fields[0], rid, *fields[1:]), zmq.NOBLOCK)
        except zmq.Again:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return None
            tag, got, *args = msgpack.unpackb(sock.recv(), raw=False)
            if got == rid:
                return args
            if tag == "grant" and args[0]:
                self._on_stale_grant(int(args[0]))  # we gave up on it: release it at the leader

    def join(self, kind: str, hashes: np.ndarray, parent: int = 0) -> Grant:
        """The op of this batch, agreed by all ranks; ``NO_GRANT`` when none (a miss)."""
        got = self._call(JOIN_WAIT_S + STAGE_WAIT_S + REPLY_MARGIN_S, "join", kind, self.rank,
                         hashes.astype("<u8").tobytes(), int(parent))
        if not got:
            log.warning("kvbm: rank %d: no answer from the rank coordinator at %s; a miss", self.rank, self.endpoint)
            return NO_GRANT
        op_id, slots, loc = got
        pool = PoolLocation(*loc) if loc else None
        return Grant(int(op_id), np.frombuffer(slots, dtype="<i8").astype(np.int64), pool)

    def copied(self, op_id: int, ok: bool) -> bool:
        """MLA reader: report a load copied; True if rank 0 still held the pin (the copy is good)."""
        got = self._call(READERS_WAIT_S, "copied", self.rank, op_id, ok)
        return bool(got and got[0])

    def await_readers(self, op_id: int) -> bool:
        """MLA rank 0: wait until every reader copied load ``op_id``; False if one failed or timed out."""
        got = self._call(READERS_WAIT_S + REPLY_MARGIN_S, "await_readers", op_id)
        return bool(got and got[0])

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close(0)
            self._socks.clear()
