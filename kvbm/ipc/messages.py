"""Leader protocol: message types as small typed records and their msgpack codec.

Wire format of every frame: ``msgpack([PROTOCOL_VERSION, type_tag, request_id, [fields...]])``.
Fields travel positionally in declaration order. Hash lists travel as little-endian uint64
``bytes`` and slot lists as little-endian int32 ``bytes`` (10x cheaper than int lists).

:func:`decode` validates everything before a message is used: frame size, version, tag,
field count, each field's type and range. Anything wrong raises :class:`ProtocolError`,
which receivers turn into an :class:`ErrorReply` without changing any state.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import msgpack
import numpy as np

from kvbm.hashing import hashes_from_bytes, hashes_to_bytes
from kvbm.ipc.block_format import HeadSplit
from kvbm.ipc.stats import STAT_KEYS, LeaderState, LeaderStats, decode_stats

PROTOCOL_VERSION = 8  # 8: EventsReply carries the stored blocks' token ids, PrepareLoad the loaded ones', Match the first parent; 7: RegisterRank names its KV heads, PoolGrant.heads (the TP-independent heads format); 6: AllocateStore carries the blocks' token ids (KV events); RegisterRank.replicated, PoolGrant.stores (MLA: one copy for all ranks); 4: StatsReply carries the leader state and its names are checked; per-slot store reports (TransferDone.stored, ReleaseOp.absent)
MAX_FRAME_BYTES = 64 << 20
MAX_LIST_LEN = 1 << 20
MAX_STR_LEN = 4096
MAX_HASHES = 1 << 18  # per request: a 4M-token prompt at block size 16
U64_MAX = (1 << 64) - 1
MAX_INDEX_WAIT_MS = 60_000  # the longest IndexSince long-poll a leader parks
I64_MIN = -(1 << 63)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class BlockEventKind(enum.IntEnum):
    """Kind of a block event; its value is the u8 on the wire (EventsReply, IndexUpdates)."""

    STORED = 0  # a hash became matchable in a tier
    REMOVED = 1  # a hash left a tier (eviction, failed checksum, disk failure)
    CLEARED = 2  # every block of a tier was dropped (reset_cache, disk tier turned off)


# Tier values on the wire: kvbm.leader.registry.Tier (G2 host, G3 disk).
WIRE_TIERS = frozenset({2, 3})


def _bounds(lo: int, hi: int) -> dict[str, int]:
    return {"min": lo, "max": hi}


def _check_block_tokens(tag: str, hashes: bytes, tokens: bytes) -> None:
    """``tokens`` is empty or whole u32 blocks, the same number of tokens for each of ``hashes``."""
    n = len(hashes) // 8
    if tokens and (not n or len(tokens) % (4 * n)):
        raise ProtocolError(f"{tag}: {len(tokens)} token bytes are not whole u32 blocks of the {n} hashes")


# Field metadata shortcuts for integer ranges.
RANK = _bounds(0, 1023)
WORLD = _bounds(1, 1024)
COUNT = _bounds(0, 1 << 40)
POSITIVE = _bounds(1, 1 << 48)
OP_ID = _bounds(0, U64_MAX)
HASH = _bounds(0, U64_MAX)


@dataclass(frozen=True)
class Message:
    """Base of all protocol messages; subclasses set ``TAG``."""

    TAG: ClassVar[str] = ""


@dataclass(frozen=True)
class _Spec:
    """How one message type travels: its fields in wire order and a cheap validity test per field.

    ``accepts[i](value)`` is True when the i-th field's value is valid; only when one says no does
    :func:`decode` build the detailed error (:func:`_check`), so a valid frame pays one call and a
    type/range test per field, not the error strings.
    """

    cls: type[Message]
    fields: list[tuple[str, Any, dict[str, int]]]
    names: tuple[str, ...]
    accepts: tuple[Callable[[Any], bool], ...]
    post_init: bool  # the class validates across fields in __post_init__


_REGISTRY: dict[str, _Spec] = {}
_SPECS: dict[type[Message], _Spec] = {}


def _register(cls: type[Message]) -> type[Message]:
    if not cls.TAG or cls.TAG in _REGISTRY:
        raise TypeError(f"bad or duplicate message tag on {cls.__name__}")
    hints = typing.get_type_hints(cls)
    spec_fields = [(f.name, hints[f.name], dict(f.metadata)) for f in fields(cls)]
    spec = _Spec(cls, spec_fields, tuple(name for name, _t, _m in spec_fields),
                 tuple(_acceptor(typ, meta) for _n, typ, meta in spec_fields), hasattr(cls, "__post_init__"))
    _REGISTRY[cls.TAG] = spec
    _SPECS[cls] = spec
    return cls


def _acceptor(typ: Any, meta: dict[str, int]) -> Callable[[Any], bool]:
    """The cheap validity test of a field of type ``typ`` (the same rules as :func:`_check`)."""
    lo, hi = meta.get("min", I64_MIN), meta.get("max", U64_MAX)
    if typ is bool:
        return lambda v: type(v) is bool
    if typ is int:
        return lambda v: type(v) is int and lo <= v <= hi
    if typ is str:
        return lambda v: isinstance(v, str)
    if typ is bytes:
        return lambda v: isinstance(v, bytes)
    origin = typing.get_origin(typ)
    if origin is list:
        return lambda v: isinstance(v, list) and all(type(x) is int and lo <= x <= hi for x in v)
    if origin is dict:
        return lambda v: isinstance(v, dict) and all(isinstance(k, str) and type(x) in (int, float)
                                                     for k, x in v.items())
    raise TypeError(f"unsupported field type {typ!r}")  # a bug in this module


def _int(meta: dict[str, int]) -> Any:
    """An integer field with a range checked on decode."""
    return field(default=0, metadata=meta)


# --------------------------------------------------------------------------------------
# rank (worker) -> leader


@_register
@dataclass(frozen=True)
class RegisterRank(Message):
    """A rank's layout, sent at init; the leader answers with a PoolGrant once all ranks came."""

    TAG: ClassVar[str] = "register_rank"
    rank: int = _int(RANK)
    world_size: int = _int(WORLD)
    num_layers: int = _int(POSITIVE)
    slice_bytes: int = _int(POSITIVE)  # bytes of this rank's slice of one block
    dtype: str = ""
    engine_layout: str = ""
    block_size: int = _int(POSITIVE)  # tokens per block
    fingerprint: str = ""  # model / cache identity; must agree across ranks
    pid: int = _int(_bounds(0, 1 << 31))
    # Every rank holds the same KV (MLA's latent cache): the world stores one slice, not one per rank.
    replicated: bool = False
    # The rank's KV is heads [first_head, first_head + num_heads) of the model's kv_heads, each
    # head_bytes per token, head-major or not (kvbm.ipc.block_format.HeadSplit); kv_heads 0:
    # not known, the world keeps one slice per rank.
    kv_heads: int = _int(COUNT)
    first_head: int = _int(COUNT)
    num_heads: int = _int(COUNT)
    head_bytes: int = _int(COUNT)
    head_major: bool = False

    @property
    def heads(self) -> HeadSplit | None:
        """The rank's KV heads, None when it did not name them (its bytes are one opaque slice)."""
        if not self.kv_heads:
            return None
        return HeadSplit(self.kv_heads, self.first_head, self.num_heads, self.head_bytes, self.head_major)


@_register
@dataclass(frozen=True)
class PoolAttached(Message):
    TAG: ClassVar[str] = "pool_attached"
    rank: int = _int(RANK)


@_register
@dataclass(frozen=True)
class Heartbeat(Message):
    """Liveness ping from a rank (``rank`` >= 0) or a client (``rank`` = -1)."""

    TAG: ClassVar[str] = "heartbeat"
    rank: int = _int(_bounds(-1, 1023))


@_register
@dataclass(frozen=True)
class TransferDone(Message):
    """A rank finished its part of a store or load op (``ok`` False: it failed).

    ``stored`` (stores only, :func:`pack_slots`): when not empty, the op's slots this rank
    stored; the others it did not (a rank that stores its own batches, e.g. SGLang's, may copy
    fewer pages of an op than another rank). Empty: all of them if ``ok``.
    """

    TAG: ClassVar[str] = "transfer_done"
    rank: int = _int(RANK)
    op_id: int = _int(OP_ID)
    ok: bool = True
    error: str = ""
    stored: bytes = b""


# --------------------------------------------------------------------------------------
# leader -> rank


@_register
@dataclass(frozen=True)
class PoolGrant(Message):
    TAG: ClassVar[str] = "pool_grant"
    segment: str = ""
    num_blocks: int = _int(POSITIVE)
    block_bytes: int = _int(POSITIVE)
    slice_offset: int = _int(COUNT)  # where the rank's slice starts in a host block (rank-slices format)
    stores: bool = True  # this rank copies the bytes of store ops (False: another rank writes its bytes)
    # The heads format (kvbm.ipc.block_format): the rank's bytes lie at Placement.heads of the
    # heads it registered, not in a slice of its own.
    heads: bool = False


@_register
@dataclass(frozen=True)
class LeaderReady(Message):
    TAG: ClassVar[str] = "leader_ready"
    num_host_blocks: int = _int(COUNT)
    num_disk_blocks: int = _int(COUNT)


# --------------------------------------------------------------------------------------
# scheduler-side client -> leader


@_register
@dataclass(frozen=True)
class GetStatus(Message):
    TAG: ClassVar[str] = "get_status"


@_register
@dataclass(frozen=True)
class Match(Message):
    """How many of ``hashes`` (from the first) are held in G2, then G3, then G4. No block changes
    state; with a G4 tier the leader may start a store lookup of the hashes past the match.

    ``first_parent``: the hash before ``hashes[0]`` (0: none, the prompt's start), the parent
    of a block the store lookup finds first (its KV events chain it to the prompt's prefix).
    """

    TAG: ClassVar[str] = "match"
    hashes: bytes = b""
    first_parent: int = _int(HASH)


@_register
@dataclass(frozen=True)
class PrepareLoad(Message):
    """Pin the G2 blocks of ``hashes`` and stage their G3 continuation into G2.

    ``tokens``: the blocks' token ids as in :class:`AllocateStore` (empty: not sent), for the KV
    events of the blocks staged into G2 (put in the store by another instance, or on disk from
    an earlier run: the leader was not told their tokens when they were stored).
    """

    TAG: ClassVar[str] = "prepare_load"
    hashes: bytes = b""
    tokens: bytes = b""

    def __post_init__(self) -> None:
        _check_block_tokens("prepare_load", self.hashes, self.tokens)


@_register
@dataclass(frozen=True)
class PollLoads(Message):
    TAG: ClassVar[str] = "poll_loads"
    op_ids: list[int] = field(default_factory=list, metadata=OP_ID)


@_register
@dataclass(frozen=True)
class AllocateStore(Message):
    """Allocate host slots for new blocks; ``first_parent`` is the hash before ``hashes[0]`` (0: none).

    ``tokens``: the blocks' token ids as little-endian u32, block after block (empty: not sent), for
    the leader's KV events; routers index a block by its tokens. Every block has the same number
    of tokens; the leader checks it against its block size.
    """

    TAG: ClassVar[str] = "allocate_store"
    hashes: bytes = b""
    first_parent: int = _int(HASH)
    priority: int = _int(_bounds(0, 1 << 31))
    tokens: bytes = b""

    def __post_init__(self) -> None:
        _check_block_tokens("allocate_store", self.hashes, self.tokens)


@_register
@dataclass(frozen=True)
class ReleaseOp(Message):
    """Give up an op that will never reach the ranks (store: aborted, load: unpinned).

    ``absent`` (stores only): the ranks this op never reached, while others may have it; they
    count as having stored none of it, and the op completes when the others reported.
    """

    TAG: ClassVar[str] = "release_op"
    op_id: int = _int(OP_ID)
    absent: list[int] = field(default_factory=list, metadata=RANK)


@_register
@dataclass(frozen=True)
class GetStats(Message):
    TAG: ClassVar[str] = "get_stats"


@_register
@dataclass(frozen=True)
class TakeEvents(Message):
    """The block events since the last TakeEvents (an engine forwarding them as its own KV events).

    The first one also makes the leader keep the token ids the engine's store allocations carry
    (which it otherwise keeps only with ``DYN_KVBM_KV_EVENTS_ENDPOINT``), so that later replies
    carry them: an engine that forwards events asks once before it serves.
    """

    TAG: ClassVar[str] = "take_events"


@_register
@dataclass(frozen=True)
class IndexSince(Message):
    """Index changes from sequence number ``seq`` on (0: from the start, always a snapshot).

    ``wait_ms`` > 0 makes it a long-poll: when the leader has nothing past ``seq`` it answers
    as soon as it has, or with no changes after ``wait_ms``; 0 answers at once.
    """

    TAG: ClassVar[str] = "index_since"
    seq: int = _int(_bounds(0, U64_MAX))
    wait_ms: int = _int(_bounds(0, MAX_INDEX_WAIT_MS))


@_register
@dataclass(frozen=True)
class LookupReport(Message):
    """A lookup a client answered from its index replica (no reply): the leader counts it in
    its match statistics and hit-rate metrics as if it had served the Match itself."""

    TAG: ClassVar[str] = "lookup_report"
    queried: int = _int(COUNT)  # blocks looked up
    host: int = _int(COUNT)  # of which found in G2 (a prefix)
    disk: int = _int(COUNT)  # then in G3


@_register
@dataclass(frozen=True)
class ResetCache(Message):
    TAG: ClassVar[str] = "reset_cache"


@_register
@dataclass(frozen=True)
class Shutdown(Message):
    TAG: ClassVar[str] = "shutdown"


# --------------------------------------------------------------------------------------
# leader -> client replies


@_register
@dataclass(frozen=True)
class Ack(Message):
    """``index_seq``: the leader's index position after the request, where a client needs it
    (ResetCache: lookups must not see the index from before the reset); 0 elsewhere."""

    TAG: ClassVar[str] = "ack"
    index_seq: int = _int(_bounds(0, U64_MAX))


@_register
@dataclass(frozen=True)
class ErrorReply(Message):
    TAG: ClassVar[str] = "error"
    code: str = ""
    message: str = ""


@_register
@dataclass(frozen=True)
class Status(Message):
    TAG: ClassVar[str] = "status"
    state: str = LeaderState.WAITING.value  # a LeaderState value: read it as leader_state
    error: str = ""
    world_size: int = _int(COUNT)
    num_host_blocks: int = _int(COUNT)
    num_disk_blocks: int = _int(COUNT)
    block_bytes: int = _int(COUNT)
    block_size: int = _int(COUNT)
    fingerprint: str = ""
    dead_ranks: list[int] = field(default_factory=list, metadata=RANK)

    def __post_init__(self) -> None:
        _leader_state("status", self.state)

    @property
    def leader_state(self) -> LeaderState:
        return LeaderState(self.state)


def _leader_state(tag: str, state: str) -> None:
    if state not in _STATES:
        raise ProtocolError(f"{tag}.state: {state!r} is not a leader state (accepted: {sorted(_STATES)})")


_STATES = frozenset(s.value for s in LeaderState)


@_register
@dataclass(frozen=True)
class MatchReply(Message):
    """Blocks from the first hash held in G2, then to stage from G3, then from G4 (the object store).

    ``index_seq``: the leader's index position the answer reflects (IndexUpdates.next_seq).
    ``pending``: the leader is asking the object store about the hashes past the match (blocks
    other instances put there); the same Match asked again shortly may find more.
    """

    TAG: ClassVar[str] = "match_reply"
    host: int = _int(COUNT)
    disk: int = _int(COUNT)
    index_seq: int = _int(_bounds(0, U64_MAX))
    object: int = _int(COUNT)
    pending: bool = False


@_register
@dataclass(frozen=True)
class LoadGrant(Message):
    """Slots holding (or about to hold, when not ``ready``) the first ``len(slots)`` blocks."""

    TAG: ClassVar[str] = "load_grant"
    op_id: int = _int(OP_ID)
    slots: bytes = b""
    ready: bool = False


@_register
@dataclass(frozen=True)
class LoadPoll(Message):
    TAG: ClassVar[str] = "load_poll"
    ready: list[int] = field(default_factory=list, metadata=OP_ID)
    failed: list[int] = field(default_factory=list, metadata=OP_ID)


@_register
@dataclass(frozen=True)
class StoreGrant(Message):
    """Slot per hash (-1: already held, skip); shorter than the request when the pool is full."""

    TAG: ClassVar[str] = "store_grant"
    op_id: int = _int(OP_ID)
    slots: bytes = b""


@_register
@dataclass(frozen=True)
class StatsReply(Message):
    """A :class:`kvbm.ipc.stats.LeaderStats` snapshot as :func:`kvbm.ipc.stats.encode_stats` lays it
    out (read it as :attr:`stats`). ``index_seq``: the leader's index position when it was taken."""

    TAG: ClassVar[str] = "stats_reply"
    state: str = LeaderState.WAITING.value
    values: dict[str, float] = field(default_factory=dict)
    index_seq: int = _int(_bounds(0, U64_MAX))

    def __post_init__(self) -> None:
        _leader_state("stats_reply", self.state)
        unknown = self.values.keys() - STAT_KEYS
        if unknown:
            raise ProtocolError(f"stats_reply.values: unknown stats {sorted(unknown)[:8]}")
        try:
            decode_stats(self.state, self.values)  # a partial record is a malformed frame
        except ValueError as e:
            raise ProtocolError(str(e)) from None

    @property
    def stats(self) -> LeaderStats:
        """The typed snapshot."""
        return decode_stats(self.state, self.values)


@_register
@dataclass(frozen=True)
class EventsReply(Message):
    """KV events as parallel arrays: kind (0 stored, 1 removed, 2 cleared), tier, hash, parent.

    ``tokened``: a u8 per event, 1 when ``tokens`` holds that (stored) block's token ids (empty:
    no event has them); ``tokens``: those blocks' token ids as little-endian u32, block after
    block in event order, every block the same number of tokens.
    """

    TAG: ClassVar[str] = "events_reply"
    kinds: bytes = b""
    tiers: bytes = b""
    hashes: bytes = b""
    parents: bytes = b""
    tokened: bytes = b""
    tokens: bytes = b""

    def __post_init__(self) -> None:
        n = sum(self.tokened)
        if self.tokened and (len(self.tokened) != len(self.kinds) or set(self.tokened) - {0, 1}):
            raise ProtocolError(f"events_reply: {len(self.tokened)} token flags (0 or 1) for {len(self.kinds)} events")
        if bool(n) != bool(self.tokens) or (n and len(self.tokens) % (4 * n)):
            raise ProtocolError(f"events_reply: {len(self.tokens)} token bytes are not whole u32 blocks of the "
                                f"{n} events that have tokens")


@_register
@dataclass(frozen=True)
class IndexUpdates(Message):
    """Index changes as parallel arrays: a u8 BlockEventKind, a u8 tier and a u64 hash per entry.

    ``reset``: drop the whole view first; the entries are then a snapshot of every matchable hash
    in every tier (all STORED). ``next_seq``: the ``IndexSince.seq`` to ask for next.
    """

    TAG: ClassVar[str] = "index_updates"
    reset: bool = False
    next_seq: int = _int(_bounds(0, U64_MAX))
    kinds: bytes = b""
    tiers: bytes = b""
    hashes: bytes = b""

    def __post_init__(self) -> None:
        n = len(self.kinds)
        if len(self.tiers) != n or len(self.hashes) != 8 * n:
            raise ProtocolError(f"index_updates: {n} kinds, {len(self.tiers)} tiers and {len(self.hashes)} hash "
                                "bytes do not describe the same entries (1, 1 and 8 bytes per entry)")
        bad_kind = set(self.kinds) - set(BlockEventKind)
        if bad_kind:
            raise ProtocolError(f"index_updates.kinds: {sorted(bad_kind)} are not block event kinds "
                                f"(accepted: {[int(k) for k in BlockEventKind]})")
        bad_tier = set(self.tiers) - WIRE_TIERS
        if bad_tier:
            raise ProtocolError(f"index_updates.tiers: {sorted(bad_tier)} are not tiers (accepted: {sorted(WIRE_TIERS)})")


# --------------------------------------------------------------------------------------
# codec


def encode(msg: Message, request_id: int = 0) -> bytes:
    """Serialise ``msg`` with the protocol version and ``request_id``."""
    values = msg.__dict__
    body = [values[name] for name in _SPECS[type(msg)].names]
    return msgpack.packb([PROTOCOL_VERSION, msg.TAG, request_id, body], use_bin_type=True)


_new = object.__new__


def decode(frame: bytes | bytearray | memoryview) -> tuple[int, Message]:
    """Parse and validate one frame; returns ``(request_id, message)`` or raises ProtocolError."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame is not bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_FRAME_BYTES,
            max_array_len=MAX_LIST_LEN,
            max_map_len=4096,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    if type(obj) is not list or len(obj) != 4:
        raise ProtocolError("frame is not [version, type, request_id, fields]")
    version, tag, request_id, body = obj
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(f"protocol version {version!r} is not supported (expected {PROTOCOL_VERSION})")
    spec = _REGISTRY.get(tag) if type(tag) is str else None
    if spec is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    if type(request_id) is not int or not 0 <= request_id <= U64_MAX:
        raise ProtocolError("request id is not an unsigned 64-bit integer")
    if type(body) is not list or len(body) != len(spec.names):
        raise ProtocolError(f"{tag}: expected {len(spec.names)} fields")
    for accept, value in zip(spec.accepts, body):
        if not accept(value):
            for (name, typ, meta), v in zip(spec.fields, body):
                _check(tag, name, typ, meta, v)  # raises the detailed error
            raise ProtocolError(f"{tag}: invalid fields")  # unreachable: _acceptor and _check agree
    # Every field is valid: fill the frozen record directly (what its __init__ would store).
    msg = _new(spec.cls)
    msg.__dict__.update(zip(spec.names, body))
    if spec.post_init:
        msg.__post_init__()  # type: ignore[attr-defined]
    return request_id, msg


def _check(tag: str, name: str, typ: Any, meta: dict[str, int], value: Any) -> Any:
    where = f"{tag}.{name}"
    if typ is bool:
        if type(value) is not bool:
            raise ProtocolError(f"{where}: expected a boolean")
        return value
    if typ is int:
        return _check_int(where, meta, value)
    if typ is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected a string")
        return value
    if typ is bytes:
        if not isinstance(value, bytes):
            raise ProtocolError(f"{where}: expected bytes")
        return value
    origin = typing.get_origin(typ)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        return [_check_int(where, meta, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        for k, v in value.items():
            if not isinstance(k, str) or type(v) not in (int, float):
                raise ProtocolError(f"{where}: expected a map of names to numbers")
        return value
    raise TypeError(f"{where}: unsupported field type {typ!r}")  # a bug in this module


def _check_int(where: str, meta: dict[str, int], value: Any) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{where}: expected an integer")
    lo, hi = meta.get("min", I64_MIN), meta.get("max", U64_MAX)
    if not lo <= value <= hi:
        raise ProtocolError(f"{where}: {value} is out of range [{lo}, {hi}]")
    return value


pack_hashes = hashes_to_bytes
"""Little-endian uint64 wire form of a hash list (:func:`kvbm.hashing.hashes_to_bytes`)."""


def unpack_hashes(data: bytes, where: str = "hashes") -> list[int]:
    """Inverse of :func:`pack_hashes`; ProtocolError if the size is not a multiple of 8."""
    _check_hash_bytes(data, where)
    return hashes_from_bytes(data)


def hash_array(data: bytes, where: str = "hashes") -> np.ndarray:
    """Like :func:`unpack_hashes`, as a read-only uint64 view of ``data`` (no Python int a hash)."""
    _check_hash_bytes(data, where)
    return np.frombuffer(data, "<u8").astype(np.uint64, copy=False)


def _check_hash_bytes(data: bytes, where: str) -> None:
    if len(data) % 8:
        raise ProtocolError(f"{where}: {len(data)} bytes is not a whole number of 64-bit hashes")
    if len(data) > 8 * MAX_HASHES:
        raise ProtocolError(f"{where}: {len(data) // 8} hashes exceed the {MAX_HASHES}-hash limit per request")


def pack_slots(slots: typing.Sequence[int] | np.ndarray) -> bytes:
    """Little-endian int32 wire form of a slot list (-1 marks 'none')."""
    return np.asarray(slots, dtype="<i4").tobytes()


def unpack_slots(data: bytes, where: str = "slots") -> np.ndarray:
    if len(data) % 4:
        raise ProtocolError(f"{where}: {len(data)} bytes is not a whole number of 32-bit slots")
    return np.frombuffer(data, dtype="<i4")
