"""The leader's stats as typed records, and the one codec that turns them into StatsReply fields.

:class:`LeaderStats` is what the leader measures (counters, gauges, pool occupancy, the state of
each lower tier) and what a client reads after :func:`decode_stats`: every reader uses attributes,
never key strings. On the wire a snapshot travels as the leader's state (a :class:`LeaderState`
value) and a flat ``name -> number`` map (:func:`encode_stats`). The names are derived here from
the records' field names and nowhere else: a record's fields under its prefix (``host_`` /
``disk_`` / ``object_`` for the pools and the tiers, none for :class:`LeaderCounters`).
:data:`STAT_KEYS` is the set of every name, which :class:`kvbm.ipc.messages.StatsReply` checks
on decode. Text (a tier's off reason) does not travel: a remote reader gets ``""``.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar


class LeaderState(enum.Enum):
    """Where the leader is in its life; the value is the ``state`` of Status and StatsReply."""

    WAITING = "waiting"  # init sync in progress
    READY = "ready"
    DEGRADED = "degraded"  # a rank is dead: no new ops until it comes back
    FAILED = "failed"  # init failed; the error says why


@dataclass
class LeaderCounters:
    """Plain counters; metrics and stats replies are views of these."""

    match_requests: int = 0
    match_blocks_queried: int = 0
    match_host_blocks: int = 0
    match_disk_blocks: int = 0
    match_object_blocks: int = 0
    stores_committed: int = 0
    stores_aborted: int = 0
    blocks_stored: int = 0  # G1 -> G2 (offload d2h)
    loads_completed: int = 0
    loads_failed: int = 0
    blocks_loaded: int = 0  # G2 -> G1 (onboard h2d), whatever tier staged them
    blocks_loaded_from_disk: int = 0  # G3 -> G1 via G2 staging (onboard d2d)
    blocks_loaded_from_object: int = 0  # G4 -> G1 via G2 staging (onboard o2d)
    host_evictions: int = 0
    disk_evictions: int = 0
    object_evictions: int = 0  # forgotten by the G4 index (the objects stay in the store)
    rejected_messages: int = 0

    def count_load(self, blocks: int, from_disk: int, from_object: int) -> None:
        """A load every rank finished: ``blocks`` reached G1, so many of them staged from G3 / G4."""
        self.loads_completed += 1
        self.blocks_loaded += blocks
        self.blocks_loaded_from_disk += from_disk
        self.blocks_loaded_from_object += from_object

    def count_match(self, queried: int, host: int, disk: int, obj: int) -> None:
        """One lookup: blocks asked about and found in G2, then G3, then G4."""
        self.match_requests += 1
        self.match_blocks_queried += queried
        self.match_host_blocks += host
        self.match_disk_blocks += disk
        self.match_object_blocks += obj


@dataclass
class TierCounters:
    """What every lower tier (G3, G4) counts of its traffic with the host pool."""

    offloaded_blocks: int = 0  # G2 -> tier copies that succeeded
    onboarded_blocks: int = 0  # tier -> G2 staging reads that returned the block whole
    offload_skipped_filter: int = 0  # refused by the admission filter
    offload_skipped_busy: int = 0  # the write budget or the tier's queue was full
    checksum_failures: int = 0  # staged blocks that came back wrong (dropped, never served)
    bytes_written: int = 0
    bytes_read: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0


@dataclass
class DiskCounters(TierCounters):
    io_errors: int = 0  # failed reads or writes (the first turns the tier off)


@dataclass
class ObjectCounters(TierCounters):
    write_failures: int = 0  # failed puts
    read_failures: int = 0  # missing, corrupt (checksum, short, foreign) or failed gets
    lookups: int = 0  # batched existence queries sent
    lookup_blocks: int = 0
    lookup_found: int = 0  # blocks the store had that this leader did not know


_C = TypeVar("_C", bound=TierCounters)


@dataclass(frozen=True)
class PoolStats:
    """Occupancy of one tier's pool."""

    capacity: int
    registered: int
    free: int
    writing: int
    pinned: int


@dataclass(frozen=True)
class TierStats(Generic[_C]):
    """A lower tier's pipeline: on or off (and why), copies in flight, its counters."""

    enabled: bool
    busy: int  # G2 -> tier writes in flight
    counters: _C
    reason: str = ""  # why the tier is off ('' while on; not sent to remote readers)


@dataclass(frozen=True)
class ObjectTierStats(TierStats[ObjectCounters]):
    lookups_pending: int = 0  # hashes being asked of the store


DiskTierStats = TierStats[DiskCounters]


@dataclass(frozen=True)
class LeaderStats:
    """A snapshot of the leader: counters, gauges, pool occupancy (None: not created yet)."""

    state: LeaderState
    counters: LeaderCounters = field(default_factory=LeaderCounters)
    ranks_alive: int = 0
    world_size: int = 0
    ops_in_flight: int = 0
    host: PoolStats | None = None
    disk: PoolStats | None = None
    block_bytes: int | None = None
    disk_tier: DiskTierStats | None = None
    object: PoolStats | None = None
    object_tier: ObjectTierStats | None = None
    index_polls_parked: int = 0  # IndexSince long-polls waiting for the index to move

    @property
    def idle(self) -> bool:
        """No op, disk write or object put in flight: every ack and copy has been applied."""
        return (self.ops_in_flight == 0 and (self.disk_tier is None or self.disk_tier.busy == 0)
                and (self.object_tier is None or self.object_tier.busy == 0))


# --------------------------------------------------------------------------------------
# the wire codec

_GAUGES = ("ranks_alive", "world_size", "ops_in_flight", "index_polls_parked", "block_bytes")
# LeaderStats' record fields and the prefix of their names on the wire.
_PREFIXES = {"counters": "", "host": "host_", "disk": "disk_", "object": "object_",
             "disk_tier": "disk_", "object_tier": "object_"}


def _scalars(cls: type[Any]) -> list[tuple[str, Any]]:
    """The numeric fields of a record class (nested records and text do not travel as one number)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in fields(cls) if hints[f.name] in (int, float, bool)]


def _flatten(prefix: str, record: Any) -> dict[str, float]:
    out = {prefix + name: float(getattr(record, name)) for name, _t in _scalars(type(record))}
    counters = getattr(record, "counters", None)
    if isinstance(counters, TierCounters):  # a tier's counters share its prefix
        out.update(_flatten(prefix, counters))
    return out


def _record(cls: type[Any], prefix: str, values: dict[str, float], **extra: Any) -> Any:
    """``cls`` built from its numbers under ``prefix``, or None when the first is absent (the
    pool or tier does not exist); each number converted to the field's type."""
    scalars = _scalars(cls)
    if prefix + scalars[0][0] not in values:
        return None
    try:
        return cls(**{name: typ(values[prefix + name]) for name, typ in scalars}, **extra)
    except KeyError as e:
        raise ValueError(f"stats: {e.args[0]!r} is missing (the {prefix.rstrip('_') or 'leader'} record is "
                         "partial)") from None


def encode_stats(stats: LeaderStats) -> tuple[str, dict[str, float]]:
    """The StatsReply fields of a snapshot: the state's value and the flat number map."""
    out = {name: float(getattr(stats, name)) for name in _GAUGES if getattr(stats, name) is not None}
    for name, prefix in _PREFIXES.items():
        record = getattr(stats, name)
        if record is not None:
            out.update(_flatten(prefix, record))
    return stats.state.value, out


def decode_stats(state: str, values: dict[str, float]) -> LeaderStats:
    """The snapshot a StatsReply carries; ValueError for an unknown state, a partial record or a
    name no record has."""
    try:
        leader_state = LeaderState(state)
    except ValueError:
        raise ValueError(f"stats: unknown leader state {state!r}") from None
    disk_counters = _record(DiskCounters, "disk_", values)
    object_counters = _record(ObjectCounters, "object_", values)
    block_bytes = values.get("block_bytes")
    stats = LeaderStats(
        state=leader_state,
        counters=_record(LeaderCounters, "", values) or LeaderCounters(),
        ranks_alive=int(values.get("ranks_alive", 0)),
        world_size=int(values.get("world_size", 0)),
        ops_in_flight=int(values.get("ops_in_flight", 0)),
        host=_record(PoolStats, "host_", values),
        disk=_record(PoolStats, "disk_", values),
        block_bytes=None if block_bytes is None else int(block_bytes),
        disk_tier=None if disk_counters is None else _record(TierStats, "disk_", values, counters=disk_counters),
        object=_record(PoolStats, "object_", values),
        object_tier=None if object_counters is None
        else _record(ObjectTierStats, "object_", values, counters=object_counters),
        index_polls_parked=int(values.get("index_polls_parked", 0)),
    )
    stray = values.keys() - encode_stats(stats)[1].keys()
    if stray:  # e.g. a tier's counters without its gauges: no record to put them in
        raise ValueError(f"stats: {sorted(stray)[:8]} belong to no complete record")
    return stats


def _all_keys() -> frozenset[str]:
    pool = PoolStats(0, 0, 0, 0, 0)
    full = LeaderStats(LeaderState.READY, host=pool, disk=pool, object=pool, block_bytes=0,
                       disk_tier=TierStats(False, 0, DiskCounters()), object_tier=ObjectTierStats(False, 0, ObjectCounters()))
    return frozenset(encode_stats(full)[1])


STAT_KEYS = _all_keys()  # every name a StatsReply may carry
