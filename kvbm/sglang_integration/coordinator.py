"""Agreeing on kvbm ops for page batches across the TP ranks of an SGLang instance.

SGLang calls every rank's backend on its own, with the same page keys (each rank its slice of
the bytes), and each rank's ``batch_set`` reports its own outcome. kvbm's leader counts an op
done once every rank reported its part of it, so the ranks must share the op: rank 0 runs a
:class:`Coordinator` (a ZMQ ROUTER on its own thread, ``<run dir>/<instance>-ranks.sock``) and
every rank's call joins its batch (:meth:`RankLink.join`).

* **Stores** are granted at once: the first rank to join a page allocates it (``AllocateStore``);
  a rank joining later gets the op and slot of that page, so the ranks need not send the same
  batches. Each rank copies its slice and reports to the leader the slots it stored; the leader
  commits the pages every rank stored and drops the rest. An op some rank did not join within
  ``JOIN_WAIT_S`` is released for that rank (``ReleaseOp`` with the absent ranks): its pages are
  never matchable, and nothing waits for the missing rank.
* **Loads** pin pages every rank copies, so they wait until every rank joined the same batch;
  then the coordinator asks the leader once (``PrepareLoad``, waiting for disk staging) and hands
  the same grant to all of them. A batch not joined by every rank within ``JOIN_WAIT_S`` is
  answered with no grant (a miss, nothing pinned).

Bounded everywhere: a rank waits a little longer than the coordinator for its answer, and a
grant that reaches a rank after it gave up is reported failed, so no slot stays held.

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

JOIN_WAIT_S = 5.0  # how long a load batch, or a store op, waits for every rank to join it
STAGE_WAIT_S = 5.0  # how long a load waits for its pages to be staged from disk into the host pool
REPLY_MARGIN_S = 3.0  # a rank waits JOIN_WAIT_S + STAGE_WAIT_S + this for its grant
READERS_WAIT_S = 10.0  # MLA: how long rank 0 holds a load's pin for readers still copying


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

HELD, NO_ROOM = -1, -2  # store slots: the page is held already / the pool had no room for it


@dataclass(frozen=True)
class StoreGrant:
    """A rank's store of a batch: page i goes to slot ``slots[i]`` of op ``ops[i]`` (``HELD``:
    held already, nothing to copy; ``NO_ROOM``: not stored), both int64."""

    ops: np.ndarray
    slots: np.ndarray


@dataclass
class _StoreOp:
    """A store op waiting for the ranks that have not joined it yet."""

    started: float
    hashes: list[int]
    joined: set[int]


def _pack(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


@dataclass
class _Batch:
    """A load batch waiting for every rank to join it."""

    hashes: bytes
    started: float
    waiting: dict[int, list[tuple[bytes, int]]] = field(default_factory=dict)  # rank -> [(peer, request id)]


@dataclass
class _ReadersWait:
    started: float
    readers: set[int]  # ranks that have not reported yet
    failed: bool = False
    rank0: tuple[bytes, int] | None = None  # rank 0 waiting for the verdict


class Coordinator:
    """Rank 0's side: grants the ranks' stores page by page, joins their load batches into one
    leader op each. Runs on its own thread."""

    def __init__(self, endpoint: str, leader_endpoint: str, tp_size: int, kvbm_world: int,
                 pool_location: Callable[[], PoolLocation | None]) -> None:
        self.endpoint = endpoint
        self.tp_size = tp_size
        self.kvbm_world = kvbm_world
        self._pool_location = pool_location
        self._leader_endpoint = leader_endpoint
        self._stop = threading.Event()
        self._batches: dict[bytes, _Batch] = {}  # loads waiting for every rank, by their hashes
        self._stores: dict[int, _StoreOp] = {}  # store ops some rank has not joined yet
        self._pending: dict[int, tuple[int, int]] = {}  # their pages: hash -> (op id, slot)
        self._readers: dict[int, _ReadersWait] = {}
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-sglang-coordinator", daemon=True)
        self._thread.start()
        self._bound.wait(5.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=JOIN_WAIT_S + STAGE_WAIT_S + 2)

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
                now = time.monotonic()
                self._expire(sock, now)
                self._expire_stores(client, now)
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
        if tag == "store":
            rank, hashes, parent = args
            ops, slots = self._join_store(client, rank, np.frombuffer(hashes, dtype="<u8"), parent, now)
            sock.send_multipart([peer, _pack("stored", rid, ops.astype("<i8").tobytes(),
                                             slots.astype("<i8").tobytes())])
        elif tag == "load":
            rank, hashes = args
            batch = self._batches.setdefault(hashes, _Batch(hashes, now))
            batch.waiting.setdefault(rank, []).append((peer, rid))
            if len(batch.waiting) >= self.tp_size:
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

    def _join_store(self, client: LeaderClient, rank: int, hashes: np.ndarray, parent: int,
                    now: float) -> tuple[np.ndarray, np.ndarray]:
        """Rank ``rank``'s store of ``hashes``: the pending ops of the pages another rank
        allocated, a new op for the others."""
        n = len(hashes)
        ops, slots = np.zeros(n, np.int64), np.full(n, NO_ROOM, np.int64)
        fresh: list[int] = []
        joined: set[int] = set()
        for i, h in enumerate(hashes.tolist()):
            pending = self._pending.get(h)
            if pending is not None and rank not in self._stores[pending[0]].joined:
                ops[i], slots[i] = pending
                joined.add(pending[0])
            else:
                fresh.append(i)
        for op_id in joined:
            self._stores[op_id].joined.add(rank)
            self._settle_store(op_id)
        if fresh:
            first = fresh[0]
            chain = hashes[fresh]
            g = client.allocate_store(chain, int(hashes[first - 1]) if first else parent)
            got = np.asarray(g.slots, np.int64)
            idx = np.asarray(fresh[: len(got)], np.int64)
            slots[idx] = got  # -1 (HELD) where the leader holds the page already
            if g.op_id:
                new = idx[got >= 0]
                ops[new] = g.op_id
                self._stores[g.op_id] = _StoreOp(now, hashes[new].tolist(), {rank})
                for i in new.tolist():
                    self._pending[int(hashes[i])] = (g.op_id, int(slots[i]))
                self._settle_store(g.op_id)
        return ops, slots

    def _settle_store(self, op_id: int) -> None:
        """Forget a store op once every kvbm rank joined it: its pages are no longer pending."""
        op = self._stores[op_id]
        if len(op.joined) >= self.kvbm_world:
            del self._stores[op_id]
            for h in op.hashes:
                self._pending.pop(h, None)

    def _grant(self, sock: zmq.Socket, client: LeaderClient, batch: _Batch) -> None:
        members = {rank: waits.pop(0) for rank, waits in batch.waiting.items()}
        batch.waiting = {r: w for r, w in batch.waiting.items() if w}
        if not batch.waiting:
            del self._batches[batch.hashes]
        lg = client.prepare_load(np.frombuffer(batch.hashes, dtype="<u8"))
        op_id, slots = lg.op_id, np.asarray(lg.slots, np.int64)
        if op_id and not lg.ready and not self._staged(client, op_id):
            client.release(op_id)
            op_id, slots = 0, np.zeros(0, np.int64)
        readers = self.kvbm_world < self.tp_size
        pool = self._pool_location() if readers else None
        if op_id and readers and pool is None:
            client.release(op_id)
            op_id, slots = 0, np.zeros(0, np.int64)
        if op_id and readers:
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

    def _expire_stores(self, client: LeaderClient, now: float) -> None:
        """Store ops a rank did not join in time: released for the absent ranks (never matchable)."""
        for op_id, op in list(self._stores.items()):
            if now - op.started > JOIN_WAIT_S:
                del self._stores[op_id]
                for h in op.hashes:
                    self._pending.pop(h, None)
                absent = sorted(set(range(self.kvbm_world)) - op.joined)
                log.warning("kvbm: store op %d: rank(s) %s did not store its %d pages within %.0f s; dropped",
                            op_id, absent, len(op.hashes), JOIN_WAIT_S)
                client.release(op_id, absent)

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

    def __init__(self, endpoint: str, rank: int, on_stale_grant: Callable[[list[int]], None]) -> None:
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
            # A grant we gave up on: fail our part so the leader releases its slots.
            if tag == "grant" and args[0]:
                self._on_stale_grant([int(args[0])])
            elif tag == "stored":
                self._on_stale_grant(sorted({int(o) for o in np.frombuffer(args[0], dtype="<i8") if o}))

    def store(self, hashes: np.ndarray, parent: int = 0) -> StoreGrant:
        """Where this rank stores the pages ``hashes`` (``parent``: the hash before the first);
        every page ``NO_ROOM`` when the coordinator did not answer."""
        got = self._call(JOIN_WAIT_S + STAGE_WAIT_S + REPLY_MARGIN_S, "store", self.rank,
                         hashes.astype("<u8").tobytes(), int(parent))
        if not got:
            log.warning("kvbm: rank %d: no answer from the rank coordinator at %s; not stored", self.rank,
                        self.endpoint)
            n = len(hashes)
            return StoreGrant(np.zeros(n, np.int64), np.full(n, NO_ROOM, np.int64))
        ops, slots = got
        return StoreGrant(np.frombuffer(ops, dtype="<i8").astype(np.int64),
                          np.frombuffer(slots, dtype="<i8").astype(np.int64))

    def load(self, hashes: np.ndarray) -> Grant:
        """The load op of this batch, agreed by all ranks; ``NO_GRANT`` when none (a miss)."""
        got = self._call(JOIN_WAIT_S + STAGE_WAIT_S + REPLY_MARGIN_S, "load", self.rank, hashes.astype("<u8").tobytes())
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
