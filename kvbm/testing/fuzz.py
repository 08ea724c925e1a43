"""Fuzzing the leader's socket: malformed frames against a live leader.

Every case is built so that its outcome is known in advance: the leader must answer with an
ErrorReply, answer a harmless request (status, stats, a lookup), or ignore it (an ack that is
not from a rank's socket). Cases are sent in batches, each closed by a GetStats whose reply
proves the leader is alive and serves its pool state; that state (registered, free, pinned,
writing slots, ops in flight, tier sizes) must never change. Well-formed requests that may
legitimately change state (stores, loads, a matching rank registration, reset, shutdown) are
never sent.

Case kinds: random bytes, truncated frames, bit flips (classified by decoding them here),
wrong protocol version, unknown message types, wrong field counts, wrong field types,
out-of-range integers, bad request ids, msgpack headers claiming huge lengths, huge lists,
hashes of the wrong size, duplicate hashes, reply types sent to the leader (with garbage,
duplicate and out-of-range slot ids), acks of unknown ops or from the wrong socket, release of
unknown ops, attaches and registrations that do not fit the world, multi-frame messages.

The benchmark that runs it against a simulated engine's leader is ``kvbm.bench.fuzz``;
``tests/test_reliability.py`` runs a CI subset.
"""

from __future__ import annotations

import random
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import zmq

from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderStats


_REQUESTS = (m.RegisterRank, m.PoolAttached, m.Heartbeat, m.TransferDone, m.GetStatus, m.Match,
             m.PrepareLoad, m.PollLoads, m.AllocateStore, m.ReleaseOp, m.GetStats, m.TakeEvents,
             m.IndexSince, m.LookupReport, m.ResetCache, m.Shutdown)
_REPLIES = (m.Ack, m.ErrorReply, m.PoolGrant, m.LeaderReady, m.Status, m.MatchReply, m.LoadGrant,
            m.LoadPoll, m.StoreGrant, m.StatsReply, m.EventsReply, m.IndexUpdates)
ALL_TYPES = _REQUESTS + _REPLIES
"""Every message type of the protocol."""
_HARMLESS = (m.GetStatus, m.GetStats, m.Match, m.PollLoads, m.Heartbeat, m.IndexSince)

ERROR, REPLY, SILENT = "error", "reply", "silent"


@dataclass(frozen=True)
class Case:
    """One fuzz input: the frames of one ZMQ message and the leader's required reaction."""

    kind: str
    frames: list[bytes]
    expect: str  # ERROR: an ErrorReply; REPLY: a non-error reply; SILENT: nothing


def _raw(version: Any, tag: Any, rid: Any, body: Any) -> bytes:
    return msgpack.packb([version, tag, rid, body], use_bin_type=True)


def classify(frame: bytes) -> str | None:
    """The required reaction to one frame, or None when a well-formed request may change state.

    Assumes a ready leader with no op in flight that does not know the sender's socket.
    """
    try:
        _rid, msg = m.decode(frame)
    except m.ProtocolError:
        return ERROR
    if isinstance(msg, (*_REPLIES, m.ReleaseOp, m.PoolAttached)):
        return ERROR  # not a request / no such op / not a rank's socket
    if isinstance(msg, (m.Match, m.PrepareLoad, m.AllocateStore)):
        if len(msg.hashes) % 8:
            return ERROR
        if not msg.hashes:
            return REPLY  # nothing to look up, load or store: an empty answer
        if isinstance(msg, m.AllocateStore):
            hashes = m.unpack_hashes(msg.hashes)
            return ERROR if len(set(hashes)) != len(hashes) else None
        return REPLY if isinstance(msg, m.Match) else None
    if isinstance(msg, m.TransferDone):
        return SILENT
    if isinstance(msg, m.LookupReport):
        return ERROR if msg.host + msg.disk > msg.queried else SILENT
    if isinstance(msg, m.Heartbeat) and msg.rank >= 0:
        return ERROR  # not this rank's socket: it must register
    if isinstance(msg, _HARMLESS):
        return REPLY
    return None  # RegisterRank, TakeEvents, ResetCache, Shutdown


_SPECS: dict[type[m.Message], list[tuple[str, Any, dict[str, int]]]] = {}


def field_spec(cls: type[m.Message]) -> list[tuple[str, Any, dict[str, int]]]:
    """(name, type, range metadata) of each field of a message type, in wire order."""
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = _SPECS[cls] = [(f.name, hints[f.name], dict(f.metadata)) for f in fields(cls)]
    return spec


class CaseGenerator:
    """Deterministic stream of fuzz cases (``seed``); ``huge_every``: one huge case per that many."""

    def __init__(self, seed: int = 0, *, huge_every: int = 500) -> None:
        self.rng = random.Random(seed)
        self.huge_every = huge_every
        self.count = 0
        self._kinds: list[Callable[[], Case | None]] = [
            self.random_bytes, self.truncated, self.bit_flip, self.bad_version, self.unknown_type,
            self.field_count, self.wrong_type, self.out_of_range, self.bad_request_id, self.huge_header,
            self.bad_hashes, self.duplicate_hashes, self.reply_type, self.transfer_done, self.release_op,
            self.pool_attached, self.bad_register, self.multipart, self.harmless,
        ]
        self._huge: list[Callable[[], Case]] = [self.huge_list_over_limit, self.huge_poll, self.huge_match,
                                                self.long_string, self.big_map]

    def __iter__(self) -> Iterator[Case]:
        while True:
            yield self.next()

    def next(self) -> Case:
        self.count += 1
        if self.huge_every and self.count % self.huge_every == 0:
            return self.rng.choice(self._huge)()
        while True:
            case = self.rng.choice(self._kinds)()
            if case is not None:
                return case

    # -- values -----------------------------------------------------------------------------
    def _good(self, name: str, typ: Any, meta: dict[str, int]) -> Any:
        r = self.rng
        if typ is bool:
            return r.random() < 0.5
        if typ is int:
            lo, hi = meta.get("min", 0), meta.get("max", 1 << 32)
            return r.choice([lo, hi, r.randint(lo, min(hi, lo + 100)), r.randint(lo, hi)])
        if typ is str:
            return "".join(r.choice("abcxyz_-0123") for _ in range(r.randint(0, 12)))
        if typ is bytes:
            return self._hashes(r.randint(0, 8))
        if typ == list[int]:
            lo, hi = meta.get("min", 0), meta.get("max", 1 << 32)
            return [r.randint(lo, hi) for _ in range(r.randint(0, 5))]
        return {"x": 1.5}

    def _bad(self, typ: Any, meta: dict[str, int]) -> Any:
        """A value of a type the field never accepts."""
        r = self.rng
        if typ is bool:
            return r.choice([0, 1, "true", None, 1.0, b"\x01", []])
        if typ is int:
            return r.choice([True, False, 1.0, -0.0, "1", b"\x01", None, [1], {"a": 1}, float("nan")])
        if typ is str:
            return r.choice([b"abc", 1, None, ["a"], True, 2.5])
        if typ is bytes:
            return r.choice(["abcdefgh", 8, None, [1, 2], True])
        if typ == list[int]:
            return r.choice([1, b"\x01\x02", "1,2", None, [1.5], ["a"], [True], [[1]], [None]])
        return r.choice([[1, 2], "x", 3, {1: 2}, {"a": "b"}, {"a": [1]}])

    def _hashes(self, n: int) -> bytes:
        return self.rng.randbytes(8 * n)

    def _valid_body(self, cls: type[m.Message]) -> list[Any]:
        return [self._good(n, t, meta) for n, t, meta in field_spec(cls)]

    def _rid(self) -> int:
        return self.rng.randint(1, (1 << 64) - 1)

    def _encoded(self, cls: type[m.Message] | None = None) -> bytes:
        cls = cls or self.rng.choice(ALL_TYPES)
        return _raw(m.PROTOCOL_VERSION, cls.TAG, self._rid(), self._valid_body(cls))

    # -- kinds ------------------------------------------------------------------------------
    def random_bytes(self) -> Case:
        n = self.rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 200, 1000, 4096])
        return Case("random bytes", [self.rng.randbytes(n)], ERROR)

    def truncated(self) -> Case:
        frame = self._encoded()
        return Case("truncated msgpack", [frame[: self.rng.randrange(len(frame))]], ERROR)

    def bit_flip(self) -> Case | None:
        frame = bytearray(self._encoded(self.rng.choice(_REPLIES + _HARMLESS + (m.ReleaseOp, m.TransferDone))))
        for _ in range(self.rng.randint(1, 3)):
            frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
        expect = classify(bytes(frame))
        return None if expect is None else Case("bit flip", [bytes(frame)], expect)

    def bad_version(self) -> Case:
        pv = m.PROTOCOL_VERSION
        v = self.rng.choice([0, pv - 1, pv + 1, -1, 255, 1 << 40, str(pv), float(pv), True, None, b"\x01", [pv]])
        cls = self.rng.choice(ALL_TYPES)
        return Case("wrong protocol version", [_raw(v, cls.TAG, self._rid(), self._valid_body(cls))], ERROR)

    def unknown_type(self) -> Case:
        tag = self.rng.choice(["", "matchx", "MATCH", "register", "x" * 300, 7, None, b"match", ["match"], 1.5])
        return Case("unknown message type", [_raw(m.PROTOCOL_VERSION, tag, self._rid(), [])], ERROR)

    def field_count(self) -> Case:
        cls = self.rng.choice(ALL_TYPES)
        body = self._valid_body(cls)
        if body and self.rng.random() < 0.5:
            body.pop(self.rng.randrange(len(body)))
        else:
            body.insert(self.rng.randint(0, len(body)), self.rng.choice([0, "", b"", None]))
        envelope: Any = body
        if self.rng.random() < 0.2:
            envelope = self.rng.choice([None, 0, "fields", {"a": 1}, b""])  # not a list at all
        return Case("wrong field count", [_raw(m.PROTOCOL_VERSION, cls.TAG, self._rid(), envelope)], ERROR)

    def wrong_type(self) -> Case | None:
        cls = self.rng.choice(ALL_TYPES)
        spec = field_spec(cls)
        if not spec:
            return None
        body = self._valid_body(cls)
        i = self.rng.randrange(len(spec))
        body[i] = self._bad(spec[i][1], spec[i][2])
        return Case("wrong field type", [_raw(m.PROTOCOL_VERSION, cls.TAG, self._rid(), body)], ERROR)

    def out_of_range(self) -> Case | None:
        cls = self.rng.choice(ALL_TYPES)
        spec = field_spec(cls)
        ints = [(i, meta) for i, (_n, t, meta) in enumerate(spec) if t is int or t == list[int]]
        if not ints:
            return None
        body = self._valid_body(cls)
        i, meta = self.rng.choice(ints)
        lo, hi = meta.get("min", m.I64_MIN), meta.get("max", m.U64_MAX)
        bad = [v for v in (lo - 1, hi + 1, -(1 << 63)) if m.I64_MIN <= v <= m.U64_MAX and not lo <= v <= hi]
        if not bad:
            return None
        v = self.rng.choice(bad)
        body[i] = [v] if spec[i][1] == list[int] else v
        return Case("integer out of range", [_raw(m.PROTOCOL_VERSION, cls.TAG, self._rid(), body)], ERROR)

    def bad_request_id(self) -> Case:
        rid = self.rng.choice([-1, -(1 << 63), "7", 1.0, None, True, b"\x07", [7]])
        cls = self.rng.choice(_HARMLESS)
        return Case("bad request id", [_raw(m.PROTOCOL_VERSION, cls.TAG, rid, self._valid_body(cls))], ERROR)

    def huge_header(self) -> Case:
        """A msgpack header claiming far more data than the frame holds."""
        head = b"\x94\x01\xa5match" + msgpack.packb(self._rid()) + b"\x91"
        claim = self.rng.choice([
            b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
            b"\xc5\xff\xff",  # bin16 of 64 KiB
            b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
            b"\xdd\xff\xff\xff\xff",  # array32 of 4G elements
            b"\xdf\xff\xff\xff\xff",  # map32 of 4G pairs
            b"\xc9\xff\xff\xff\xff\x01",  # ext32 (extensions refused)
        ])
        frame = head + claim + self.rng.randbytes(self.rng.randint(0, 64))
        if self.rng.random() < 0.3:
            frame = b"\xdd\xff\xff\xff\xff" + frame  # the outer array claims 4G elements
        return Case("huge length header", [frame], ERROR)

    def bad_hashes(self) -> Case:
        classes: list[type[m.Message]] = [m.Match, m.PrepareLoad, m.AllocateStore]
        cls = self.rng.choice(classes)
        n = self.rng.choice([1, 7, 9, 15, 17, 801, 4095])
        body = self._valid_body(cls)
        body[0] = self.rng.randbytes(n)
        return Case("hashes of the wrong size", [_raw(m.PROTOCOL_VERSION, cls.TAG, self._rid(), body)], ERROR)

    def duplicate_hashes(self) -> Case:
        hs = [self.rng.getrandbits(64) for _ in range(self.rng.randint(1, 20))]
        hs.insert(self.rng.randint(0, len(hs)), self.rng.choice(hs))
        frame = m.encode(m.AllocateStore(m.pack_hashes(hs), 0, self.rng.randint(0, 100)), self._rid())
        return Case("duplicate hashes in a store", [frame], ERROR)

    def reply_type(self) -> Case:
        """Replies sent to the leader, with garbage, duplicate and out-of-range slot ids."""
        r = self.rng
        slots = r.choice([[-1, -1], [0, 0, 0], [2**31 - 1, -2**31], [5, 5, 10**9], list(range(64))])
        msg: m.Message = r.choice([
            m.LoadGrant(r.getrandbits(64), m.pack_slots(slots), True),
            m.StoreGrant(r.getrandbits(64), m.pack_slots(slots)),
            m.LoadGrant(1, r.randbytes(r.choice([3, 5, 7])), False),
            m.PoolGrant("kvbm-evil-g2", 1 << 40, 4096, 0),
            m.Ack(), m.ErrorReply("x", "y"), m.LeaderReady(1, 1), m.MatchReply(1, 1),
            m.LoadPoll([1, 2], [3]), m.StatsReply("ready", {"ops_in_flight": 0.0}), m.EventsReply(b"\x00", b"\x00", b"", b""),
            m.Status("ready", "", 1, 1, 1, 1, 1, "fp", [0]),
        ])
        return Case("reply type sent to the leader", [m.encode(msg, self._rid())], ERROR)

    def transfer_done(self) -> Case:
        r = self.rng
        msg = m.TransferDone(r.randint(0, 3), r.choice([0, 1, 2, r.getrandbits(64)]), r.random() < 0.5,
                             r.choice(["", "boom"]))
        return Case("ack from a socket that is not the rank's", [m.encode(msg, self._rid())], SILENT)

    def release_op(self) -> Case:
        op = self.rng.choice([0, 1, 2, 3, 1 << 63, self.rng.getrandbits(64)])
        return Case("release of an unknown op", [m.encode(m.ReleaseOp(op), self._rid())], ERROR)

    def pool_attached(self) -> Case:
        return Case("attach from an unknown socket", [m.encode(m.PoolAttached(self.rng.randint(0, 1023)), self._rid())],
                    ERROR)

    def bad_register(self) -> Case:
        """Registrations that cannot join the world (a matching one is a legitimate restart)."""
        r = self.rng
        world = r.randint(1, 1024)
        rank = r.randint(world, 1023) if world < 1024 else 0
        reg = m.RegisterRank(rank=rank, world_size=world, num_layers=r.randint(1, 1 << 48),
                             slice_bytes=r.randint(1, 1 << 48), dtype=r.choice(["float16", "int8", ""]),
                             engine_layout="fuzz", block_size=r.randint(1, 1 << 48),
                             fingerprint=f"fuzz-{r.getrandbits(32)}", pid=r.randint(0, 1 << 31))
        if rank == 0:  # world of 1024 with rank 0: make the layout implausible instead
            reg = m.RegisterRank(0, 1024, 5000, 1 << 40, "x", "fuzz", 16, "fuzz", 1)
        return Case("registration that does not fit the world", [m.encode(reg, self._rid())], ERROR)

    def multipart(self) -> Case:
        parts = [self._encoded(self.rng.choice(_HARMLESS)) for _ in range(self.rng.randint(2, 4))]
        if self.rng.random() < 0.3:
            parts.append(b"")
        return Case("multi-frame message", parts, ERROR)

    def harmless(self) -> Case:
        r = self.rng
        msg: m.Message = r.choice([
            m.GetStatus(), m.GetStats(), m.Heartbeat(-1),
            m.Match(self._hashes(r.randint(0, 64))), m.PollLoads([r.getrandbits(64) for _ in range(r.randint(0, 8))]),
            m.AllocateStore(b"", r.getrandbits(64), r.randint(0, 1 << 31)), m.PrepareLoad(b""),  # empty requests
        ])
        return Case("harmless request", [m.encode(msg, self._rid())], REPLY)

    # -- huge -------------------------------------------------------------------------------
    def huge_list_over_limit(self) -> Case:
        body = [[0] * (m.MAX_LIST_LEN + 1)]
        return Case("list over the length limit", [_raw(m.PROTOCOL_VERSION, m.PollLoads.TAG, self._rid(), body)], ERROR)

    def huge_poll(self) -> Case:
        ids = [self.rng.getrandbits(63) for _ in range(self.rng.choice([10_000, 100_000]))]
        return Case("huge poll of unknown ops", [m.encode(m.PollLoads(ids), self._rid())], REPLY)

    def huge_match(self) -> Case:
        """Lookups up to the per-request cap are answered; past it they are refused."""
        n = self.rng.choice([100_000, m.MAX_HASHES, m.MAX_HASHES + 1, 1 << 20])
        return Case("huge lookup", [m.encode(m.Match(self._hashes(n)), self._rid())],
                    REPLY if n <= m.MAX_HASHES else ERROR)

    def long_string(self) -> Case:
        return Case("string over the length limit",
                    [_raw(m.PROTOCOL_VERSION, m.ReleaseOp.TAG, self._rid(), ["x" * (m.MAX_STR_LEN + 1)])], ERROR)

    def big_map(self) -> Case:
        body = [{f"k{i}": i for i in range(5000)}]
        return Case("map over the size limit", [_raw(m.PROTOCOL_VERSION, m.StatsReply.TAG, self._rid(), body)], ERROR)


# ------------------------------------------------------------------------------------------
# running against a leader


@dataclass
class FuzzReport:
    """Outcome of one fuzz run against a live leader."""

    cases: int = 0
    seconds: float = 0.0
    errors: int = 0  # ErrorReplies received
    replies: int = 0  # other replies received
    expected_errors: int = 0
    expected_replies: int = 0
    leader_alive: bool = True
    state_changes: list[str] = field(default_factory=list)  # "key: before -> after" per change seen
    mismatched_batches: int = 0  # batches whose reply counts differ from the expectation
    rss_before_kib: int = 0
    rss_warm_kib: int = 0  # after the first tenth of the cases (allocator warm-up, huge cases seen)
    rss_after_kib: int = 0
    rss_peak_kib: int = 0  # high-water mark of the leader over its whole life
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def cases_per_s(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return (self.leader_alive and not self.state_changes and self.mismatched_batches == 0
                and self.errors == self.expected_errors and self.replies == self.expected_replies)


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """A ``/proc/<pid>/status`` memory figure in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _state(s: LeaderStats) -> dict[str, object]:
    """Leader stats that no fuzz case may change, by name."""
    c, disk = s.counters, s.disk
    return {"state": s.state, "host": s.host, "ops_in_flight": s.ops_in_flight, "ranks_alive": s.ranks_alive,
            "world_size": s.world_size, "disk": None if disk is None else (disk.capacity, disk.registered, disk.free),
            "stores_committed": c.stores_committed, "stores_aborted": c.stores_aborted,
            "blocks_stored": c.blocks_stored, "loads_completed": c.loads_completed, "loads_failed": c.loads_failed}


def fuzz_leader(endpoint: str, num_cases: int, *, seed: int = 0, leader_pid: int | None = None,
                batch: int = 256, huge_every: int = 500, reconnect_every: int = 64,
                timeout_s: float = 30.0) -> FuzzReport:
    """Send ``num_cases`` fuzz cases to the leader at ``endpoint``; see the module docstring.

    The leader must be ready with no op in flight and nobody else changing its state.
    ``reconnect_every``: open a fresh socket every that many batches (peer churn).
    """
    rep = FuzzReport()
    gen = CaseGenerator(seed, huge_every=huge_every)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock: zmq.Socket | None = None
    sentinel_ids = iter(range(1 << 63, 1 << 64))
    if leader_pid is not None:
        rep.rss_before_kib = rss_kib(leader_pid)
    baseline: dict[str, object] | None = None
    t0 = time.perf_counter()
    try:
        n_batches = 0
        while rep.cases < num_cases and rep.leader_alive:
            if sock is None or n_batches % reconnect_every == 0:
                if sock is not None:
                    sock.close(0)
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
            n_batches += 1
            want_err = want_rep = 0
            for _ in range(min(batch, num_cases - rep.cases)):
                case = gen.next()
                rep.kinds[case.kind] += 1
                rep.cases += 1
                want_err += case.expect == ERROR
                want_rep += case.expect == REPLY
                sock.send_multipart(case.frames)
            sid = next(sentinel_ids)
            sock.send(m.encode(m.GetStats(), sid))
            got_err = got_rep = 0
            deadline = time.monotonic() + timeout_s
            stats: LeaderStats | None = None
            while stats is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                    rep.leader_alive = False
                    break
                rid, reply = m.decode(sock.recv())
                if isinstance(reply, m.StatsReply) and rid == sid:
                    stats = reply.stats
                elif isinstance(reply, m.ErrorReply):
                    got_err += 1
                else:
                    got_rep += 1
            if stats is None:
                break
            rep.expected_errors += want_err
            rep.expected_replies += want_rep
            rep.errors += got_err
            rep.replies += got_rep
            rep.mismatched_batches += (got_err, got_rep) != (want_err, want_rep)
            if leader_pid is not None and not rep.rss_warm_kib and rep.cases >= num_cases // 10:
                rep.rss_warm_kib = rss_kib(leader_pid)
            state = _state(stats)
            if baseline is None:
                baseline = state  # the first batch's cases must not have changed it either: checked below
            for k, v in state.items():
                if baseline.get(k) != v:
                    rep.state_changes.append(f"{k}: {baseline.get(k)} -> {v}")
            if rep.state_changes:
                break
    finally:
        rep.seconds = time.perf_counter() - t0
        if sock is not None:
            sock.close(0)
    if leader_pid is not None:
        rep.rss_after_kib = rss_kib(leader_pid)
        rep.rss_peak_kib = rss_kib(leader_pid, "VmHWM")
    return rep


def leader_stats(endpoint: str, timeout_s: float = 5.0) -> LeaderStats:
    """One GetStats round trip on a fresh socket."""
    from kvbm.ipc.transport import RpcClient

    rpc = RpcClient(endpoint)
    try:
        return rpc.call(m.GetStats(), timeout_s, m.StatsReply).stats
    finally:
        rpc.close()


def send_oversize(endpoint: str, nbytes: int = m.MAX_FRAME_BYTES + 1) -> None:
    """Send one frame above the protocol's size limit on a throw-away socket."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    try:
        sock.send(b"\x00" * nbytes)
    finally:
        sock.close()
