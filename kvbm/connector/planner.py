"""The engine-neutral scheduler-side planner every engine adapter drives.

Per request it keeps kvbm's own sequence hashes (incremental, salted), the request's engine
block ids, and how many of its full blocks were already offered for storing. An adapter
(vLLM's connector, the simulated engine, TensorRT-LLM's) translates its engine's calls:

* :meth:`Planner.lookup`: blocks past the engine's own hit that kvbm holds, answered by the
  local index replica (no round trip) or, until it has a snapshot, by the leader's Match;
  the last block is held back when the whole sequence matched, so the engine computes a token;
* :meth:`Planner.load_after_alloc`: pin / stage those blocks for the engine blocks the engine
  allocated (posted, not waited for);
* :meth:`Planner.step`: the step's load ops whose pins and staging finished, store ops for the
  blocks earlier steps computed, preempted requests and delayed frees;
* :meth:`Planner.stores_done` counts rank acks, :meth:`Planner.finished` decides delayed frees.

Hot path: nothing here waits for the leader on the engine's scheduler thread except the
fallback Match. Pins (PrepareLoad), store allocations (AllocateStore) and staging polls
(PollLoads) are posted on an :class:`AsyncLink` and their replies drained at the next step:
a load reaches the workers a step later (loads are asynchronous anyway), a store op for the
blocks step N computes goes out with step N+1 (or later) while the request still holds them:
``finished`` delays the free of a request with a store allocation in flight, and a request
preempted before its allocation came back has it released instead of copied.

While the leader is not ready, or gone, the answer is "no external hits" and nothing is stored.

KV cache groups (hybrid models): an engine whose layers keep KV in several groups, each with
its own engine block ids (vLLM's hybrid allocator), passes one window per group (``None``:
full attention). kvbm's identity of a block of group ``g > 0`` is its sequence hash folded with
``g`` (:func:`group_hash`), so every (group, block) is its own kvbm block; group 0 keeps the
plain sequence hash, so a single-group engine is unchanged. A hit of ``n`` blocks needs every
full-attention group's blocks ``..n`` and each sliding-window group's blocks inside the window
that computing token ``n * block_size`` reads; a sliding-window block is stored only while the
engine still holds it (the engine frees blocks that slid out of the window while the request
runs), and a load or store that cannot cover every group is dropped whole.
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kvbm.connector.index import IndexReplica
from kvbm.connector.link import AsyncLink, Reply
from kvbm.connector.ops import LoadOp, StepPlan, StoreOp
from kvbm.hashing import EMPTY_SALT_HASH, SequenceHasher
from kvbm.ipc import messages as m
from kvbm.leader.client import LeaderClient, LoadGrantInfo, TierBlocks
from kvbm.leader.events import wire_events
from kvbm.leader.registry import BlockEvent, Tier

log = logging.getLogger("kvbm.connector")

# A load whose disk staging has not finished after this long is given up (recomputed).
STAGING_TIMEOUT_S = 30.0
_MASK64 = (1 << 64) - 1


def group_hash(seq_hash: int, group: int) -> int:
    """kvbm's identity of KV cache group ``group``'s block with sequence hash ``seq_hash``
    (splitmix64 of the two); group 0 is the sequence hash itself. Never 0 (0 means no parent)."""
    if group == 0:
        return seq_hash
    x = ((seq_hash ^ (group * 0xD1B54A32D192ED03)) + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) or 1


def first_in_window(n_blocks: int, window: int | None, block_size: int) -> int:
    """The first block that computing token ``n_blocks * block_size`` reads: 0 for full
    attention; past the blocks wholly before a ``window``-token sliding window (what vLLM's
    sliding-window manager frees as skipped)."""
    if window is None:
        return 0
    return max(0, (n_blocks * block_size - window + 1) // block_size)


# A request whose lookup left the leader asking the object store (G4) is "not yet" answered
# (Planner.not_yet) for at most this long; then it goes with what the leader knew.
OBJECT_LOOKUP_WAIT_S = 2.0


@dataclass
class ScheduledRequest:
    """One request the engine scheduled this step.

    ``new_block_ids``: engine blocks added this step; with ``replace_blocks`` (a new or resumed
    request) they are the request's whole block list. ``group_block_ids``: the same for KV
    cache groups 1.. of a multi-group engine (negative ids: no block, the engine's null block).
    """

    req_id: str
    num_computed_tokens: int
    num_scheduled_tokens: int
    new_block_ids: Sequence[int] | None
    replace_blocks: bool = False
    group_block_ids: Sequence[Sequence[int] | None] = ()


@dataclass
class ConnectorCounters:
    """What a planner counted since the last :meth:`Planner.take_counters`."""

    lookup_tokens: int = 0  # asked about, past the engine's own hit
    hit_host_tokens: int = 0  # allocated by the engine as loaded, by the tier the lookup found them in
    hit_disk_tokens: int = 0
    hit_object_tokens: int = 0
    onboard_host_blocks: int = 0  # in load ops sent to the workers, by tier
    onboard_disk_blocks: int = 0
    onboard_object_blocks: int = 0
    offload_blocks: int = 0  # host slots allocated for stores
    load_error_blocks: int = 0  # promised blocks that will be recomputed
    remote_lookups: int = 0  # lookups the leader answered (no synced index replica)
    index_waits: int = 0  # lookups that waited for the replica to catch up
    remote_pins: int = 0  # firm lookups (lookup_pinned)
    pin_shortfall_blocks: int = 0  # promised blocks gone by the time they were pinned
    staging_failures: int = 0  # loads whose G3 / G4 staging failed or timed out

    def hits(self, blocks: TierBlocks, block_size: int) -> None:
        """The engine took these blocks as loaded."""
        self.hit_host_tokens += blocks.host * block_size
        self.hit_disk_tokens += blocks.disk * block_size
        self.hit_object_tokens += blocks.object * block_size

    def onboarded(self, blocks: TierBlocks) -> None:
        """A load op of these blocks went to the workers."""
        self.onboard_host_blocks += blocks.host
        self.onboard_disk_blocks += blocks.disk
        self.onboard_object_blocks += blocks.object


@dataclass
class _Match:
    start: int  # first block past the engine's own hit
    blocks: TierBlocks
    grant: LoadGrantInfo | None = None  # held pin of a firm lookup (lookup_pinned)


@dataclass
class _Req:
    req_id: str
    tokens: Sequence[int]  # grows as the engine appends output tokens
    hasher: SequenceHasher
    hashes: list[int] = field(default_factory=list)
    # The same hashes as native u64s: a run of them goes on the wire as one copy, never
    # converted hash by hash again (a 32K-token prompt is 2048 hashes).
    packed: array[int] = field(default_factory=lambda: array("Q"))
    block_ids: list[int] = field(default_factory=list)
    # Multi-group engines: groups 1..'s engine block ids and kvbm hashes (group_hash).
    group_ids: list[list[int]] = field(default_factory=list)
    group_hashes: list[list[int]] = field(default_factory=list)
    horizon: int = 0  # tokens computed once the last scheduled step ran (sliding-window frees)
    # In-flight store op -> the horizon at which the engine frees its oldest sliding-window block.
    window_free_at: dict[int, int] = field(default_factory=dict)
    stored: int = -1  # full blocks already offered for storing; -1 until first scheduled
    match: _Match | None = None
    gen: int = 0  # bumped on preemption: replies planned for older block ids are void
    loading: bool = False  # a pin posted or a disk staging in progress
    posted_stores: int = 0  # store allocations without a reply yet
    inflight: set[int] = field(default_factory=set)  # store ops not yet done on every rank
    finished: bool = False
    store_wait: float | None = None  # since when its lookups find the object store being asked


@dataclass
class _Pin:
    """A posted PrepareLoad."""

    st: _Req
    gen: int
    engine: list[int]  # every engine block the engine treats as loaded
    blocks: TierBlocks  # where the lookup found them
    whole: bool = False  # several KV cache groups: fewer slots than blocks fails the whole load


@dataclass
class _Staging:
    op: LoadOp
    st: _Req
    since: float
    blocks: TierBlocks


@dataclass
class _StoreAlloc:
    """A posted AllocateStore for blocks ``first..`` of a request (engine blocks at post time)."""

    st: _Req
    gen: int
    blocks: list[int]


@dataclass
class _Poll:
    op_ids: list[int]


@dataclass
class _WindowStore:
    """A run of one sliding-window group's blocks to store in this step's plan."""

    st: _Req
    blocks: list[int]  # engine blocks
    hashes: list[int]  # their kvbm hashes (group_hash)
    parent: int
    free_at: int  # tokens computed at which the engine frees the run's first block


_Posted = _Pin | _StoreAlloc | _Poll | None  # None: fire and forget (ReleaseOp)


class Planner:
    """Scheduler-side state of one engine. Not thread-safe (the engine's scheduler thread owns it).

    ``replica``: a local index replica kept current elsewhere (IndexFollower); lookups use it
    once it holds a snapshot. ``free_blocks``: free engine blocks, for engines that admit a
    request only if its whole sequence fits (lookups that cannot be admitted are skipped).
    ``store_acks``: False for engines whose workers report only per-request completion
    (TensorRT-LLM's ``get_finished``), never per store op: ``finished`` then keeps the blocks
    of every request that had a store op sent, and the workers report it once their own
    stores of it are done. ``windows``: one per KV cache group, the sliding window in tokens
    or ``None`` for full attention (group 0 must be full attention).
    """

    def __init__(self, block_size: int, world_size: int, client: LeaderClient, *,
                 replica: IndexReplica | None = None, link: AsyncLink | None = None,
                 free_blocks: Callable[[], int] | None = None, store_acks: bool = True,
                 windows: Sequence[int | None] = (None,)) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {world_size}")
        self.block_size = block_size
        self.world_size = world_size
        self.client = client
        self.replica = replica
        self.link = link or AsyncLink(client.endpoint, timeout_s=max(5.0, 5 * client.timeout_s))
        self.free_blocks = free_blocks
        self.store_acks = store_acks
        if not windows or windows[0] is not None:
            raise ValueError(f"KV cache group 0 must be full attention, got windows {list(windows)}")
        self.windows = list(windows)
        self.max_model_len = 1 << 62
        self.counters = ConnectorCounters()
        self._reqs: dict[str, _Req] = {}
        self._posted: dict[int, _Posted] = {}  # link request id -> what it was for
        # Requests and lookup reports queued since the last step: sent in one burst per step
        # (each socket send wakes the I/O thread and releases the GIL, which on a busy host
        # costs the scheduler thread far more than the send itself).
        self._outbox: list[tuple[m.Message, _Posted]] = []
        self._reports: list[m.LookupReport] = []
        self._ready_loads: list[LoadOp] = []  # to emit in the next plan
        self._staging: dict[int, _Staging] = {}  # op id -> load waiting for disk staging
        self._polling = False
        self._store_owner: dict[int, _Req] = {}  # store op id -> its request
        self._store_acks: dict[int, int] = {}  # store op id -> ranks that reported it done
        self._delayed: list[str] = []  # delayed frees to announce to the workers
        self._finishing: dict[str, _Req] = {}  # finished, store allocations still posted
        self._awaiting_free: set[str] = set()  # delayed frees not yet reported done
        self._checked_leader = False
        self._disabled = False

    # -- helpers -------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when the leader serves this engine (block sizes agree)."""
        if self._disabled or not self.client.is_ready():
            return False
        if not self._checked_leader:
            self._checked_leader = True
            st = self.client.status
            if st is not None and st.block_size and st.block_size != self.block_size:
                log.error("kvbm: the leader's block size %d differs from the engine's %d; kvbm disabled",
                          st.block_size, self.block_size)
                self._disabled = True
                return False
        return True

    def _hashes(self, st: _Req, n_blocks: int) -> list[int]:
        """The request's hashes, extended to at least ``n_blocks`` full blocks if known."""
        have = len(st.hashes)
        if have < n_blocks:
            bs = self.block_size
            new = st.hasher.extend(st.tokens[have * bs : n_blocks * bs])
            st.hashes += new
            st.packed.extend(new)
        return st.hashes

    def _group_hashes(self, st: _Req, g: int, first: int, end: int) -> list[int]:
        """Group ``g``'s kvbm hashes of blocks ``first..end`` (known blocks only)."""
        if g == 0:
            return self._hashes(st, end)[first:end]
        have = st.group_hashes[g - 1]
        base = self._hashes(st, end)
        have += [group_hash(h, g) for h in base[len(have) : end]]
        return have[first:end]

    @staticmethod
    def _wire(st: _Req, first: int, end: int | None = None) -> np.ndarray:
        """Hashes ``first..end`` of a request as a uint64 array (a copy: the request's buffer grows)."""
        return np.frombuffer(st.packed, np.uint64)[first:end].copy()

    def _tokens(self, st: _Req, first: int, end: int) -> bytes:
        """The token ids of blocks ``first..end`` (u32 LE) for the leader's KV events; none for a
        salted or LoRA request: a router keys a block by its tokens alone, so it would offer it to
        requests that cannot use it."""
        if st.hasher.salt_hash != EMPTY_SALT_HASH:
            return b""
        bs = self.block_size
        return np.asarray(st.tokens[first * bs : end * bs], "<u4").tobytes()

    def _post(self, msgs: Sequence[tuple[m.Message, _Posted]]) -> None:
        """Queue requests for the leader; :meth:`_flush` sends them, once per step."""
        self._outbox += msgs

    def _send(self, msgs: Sequence[tuple[m.Message, _Posted]]) -> None:
        for rid, (_, what) in zip(self.link.post([msg for msg, _ in msgs]), msgs):
            self._posted[rid] = what

    def _flush(self) -> None:
        """Send what was queued since the last step, in order, in one burst."""
        reports, self._reports = self._reports, []
        for report in reports:  # first: a reply to what follows means the leader counted them
            self.link.notify(report)
        msgs, self._outbox = self._outbox, []
        if msgs:
            self._send(msgs)

    def _release(self, op_id: int) -> None:
        if op_id:  # at once: an engine may not step again soon, and the op pins leader blocks
            self._send([(m.ReleaseOp(op_id), None)])

    # -- requests ------------------------------------------------------------------------
    def add(self, req_id: str, tokens: Sequence[int], salt: int) -> None:
        """Track a request; ``tokens`` is the engine's live token list (prompt, then outputs)."""
        if req_id not in self._reqs:
            groups = len(self.windows) - 1
            self._reqs[req_id] = _Req(req_id, tokens, SequenceHasher(self.block_size, salt),
                                      group_ids=[[] for _ in range(groups)], group_hashes=[[] for _ in range(groups)])

    def tracked(self, req_id: str) -> bool:
        return req_id in self._reqs

    def block_hashes(self, req_id: str, n_blocks: int) -> list[int]:
        """kvbm's hashes of the request's first ``n_blocks`` full blocks (fewer if not known)."""
        return self._hashes(self._reqs[req_id], n_blocks)[:n_blocks]

    def lookup(self, req_id: str, num_computed_tokens: int) -> int:
        """External hit tokens past ``num_computed_tokens`` (the engine's own hit); 0 if none."""
        self._drop_grant(req_id)
        st = self._reqs.get(req_id)
        if st is None:
            return 0
        waiting_since, st.store_wait = st.store_wait, None  # set again below if still waiting
        if not self.ready():
            return 0
        bs = self.block_size
        num_tokens = len(st.tokens)
        if self.free_blocks is not None and self._cannot_fit(num_tokens, num_computed_tokens):
            return 0  # the engine cannot admit it this step anyway: spare the lookup
        hashes = self._hashes(st, num_tokens // bs)
        start = num_computed_tokens // bs
        st.match = None
        if start >= len(hashes):
            return 0
        rest = hashes[start:]
        found = self._local_match(rest)
        if found is None:
            reply = self.client.lookup(self._wire(st, start), hashes[start - 1] if start else 0)
            found = TierBlocks(reply.host, reply.disk, reply.object)
            if reply.pending:
                st.store_wait = waiting_since or time.monotonic()
            self.counters.remote_lookups += 1
        else:  # the leader's hit-rate metrics count every lookup, also those it did not serve
            # (the replica holds the local tiers only: no G4 count to report)
            self._reports.append(m.LookupReport(len(rest), found.host, found.disk))  # sent with the step's burst
        self.counters.lookup_tokens += num_tokens - start * bs
        if found.total and (start + found.total) * bs >= num_tokens:
            # The whole sequence matched: hold back one block (the farthest tier's) so the
            # engine computes a token.
            found = found.first(found.total - 1)
        if found.total and len(self.windows) > 1:
            found = found.first(self._groups_cover(st, start, start + found.total) - start)
        if found.total == 0:
            return 0
        st.match = _Match(start, found)
        return found.total * bs

    def _groups_cover(self, st: _Req, start: int, end: int) -> int:
        """The farthest ``n <= end`` (blocks) such that every KV cache group holds what a hit of
        blocks ``start..n`` needs (group 0's blocks ``start..end`` are known to be held):
        shrinks ``n`` until each group's run of needed blocks is held whole."""
        n = end
        changed = True
        while changed and n > start:
            changed = False
            for g, window in enumerate(self.windows[1:], 1):
                first = max(start, first_in_window(n, window, self.block_size))
                if first >= n:
                    continue
                held = self._held(self._group_hashes(st, g, first, n))
                if held < n - first:
                    # Full attention: the hit ends at the first missing block. Sliding window:
                    # a shorter hit's window ends before the missing block.
                    n, changed = first + held, True
                    if n <= start:
                        break
        return max(n, start)

    def _held(self, hashes: list[int]) -> int:
        """How many of ``hashes`` (a run) kvbm holds from the first on, in any tier."""
        found = self._local_match(hashes)
        if found is not None:
            return found.total
        reply = self.client.lookup(np.asarray(hashes, np.uint64))
        self.counters.remote_lookups += 1
        return reply.host + reply.disk + reply.object

    def _local_match(self, hashes: list[int]) -> TierBlocks | None:
        """The replica's answer, once it holds at least the index position a leader reply to
        this planner reported (after a Match, the stats of an idle leader, a reset): a lookup
        never answers from an index older than one the planner already saw. None: ask the leader."""
        rep = self.replica
        if rep is None or not rep.synced:
            return None
        seen = self.client.index_seq
        if rep.seq < seen:
            self.counters.index_waits += 1
            if not rep.catch_up(seen, self.client.timeout_s):
                return None
        found = rep.match(hashes)
        return None if found is None else TierBlocks(*found)

    def not_yet(self, req_id: str) -> bool:
        """True when the request's last lookup found the leader asking the object store about the
        blocks past its match, for less than :data:`OBJECT_LOOKUP_WAIT_S` so far: an engine that
        can ask again later (vLLM: ``None`` from ``get_num_new_matched_tokens``) should, and then
        sees what the store holds. Lookups answered by the index replica never wait."""
        st = self._reqs.get(req_id)
        return st is not None and st.store_wait is not None and time.monotonic() - st.store_wait < OBJECT_LOOKUP_WAIT_S

    def lookup_pinned(self, req_id: str, num_computed_tokens: int, timeout_s: float) -> int:
        """Like :meth:`lookup`, but the answer is only what kvbm pinned (and staged from disk)
        before answering, so loading it cannot fail later. For engines with no load-error path
        (TensorRT-LLM): one leader round trip per hit, plus the disk staging, on the caller's
        thread. The grant is used by :meth:`load_after_alloc` or released by :meth:`finished`.
        """
        return self.pin_match(req_id, timeout_s) if self.lookup(req_id, num_computed_tokens) else 0

    def match_in_host(self, req_id: str) -> bool:
        """The request's last match lies wholly in the host pool (G2): loading it is a memcpy."""
        st = self._reqs.get(req_id)
        return st is not None and st.match is not None and st.match.blocks.host == st.match.blocks.total > 0

    def pin_match(self, req_id: str, timeout_s: float) -> int:
        """Pin (and stage from disk) the request's last match now: the tokens of it kvbm holds
        for the load, 0 if none (see :meth:`lookup_pinned`)."""
        st = self._reqs.get(req_id)
        if st is None or st.match is None:
            return 0
        mt = st.match
        end = mt.start + mt.blocks.total
        grant = self.client.prepare_load(self._wire(st, mt.start, end), self._tokens(st, mt.start, end))
        self.counters.remote_pins += 1
        if grant.op_id and not grant.ready and not self._staged(grant.op_id, timeout_s):
            grant = LoadGrantInfo(0, [], False)
        k = len(grant.slots) if grant.op_id else 0
        self.counters.pin_shortfall_blocks += mt.blocks.total - k
        if k == 0:
            st.match = None
            return 0
        mt.blocks = mt.blocks.first(k)
        mt.grant = grant
        return k * self.block_size

    def _staged(self, op_id: int, timeout_s: float) -> bool:
        """Wait until the leader staged load ``op_id`` from disk; False (op released) if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready, failed = self.client.poll_loads([op_id])
            if op_id in ready:
                return True
            if op_id in failed or time.monotonic() > deadline:
                if op_id not in failed:
                    self.client.release(op_id)
                self.counters.staging_failures += 1
                return False
            time.sleep(0.0005)

    def _drop_grant(self, req_id: str) -> None:
        st = self._reqs.get(req_id)
        if st is not None and st.match is not None and st.match.grant is not None:
            self._release(st.match.grant.op_id)
            st.match.grant = None

    def _cannot_fit(self, num_tokens: int, num_computed_tokens: int) -> bool:
        """True when the engine pool cannot hold the whole sequence: a lower bound of the
        blocks the engine asks for (the sequence minus every block the local hit may cover)."""
        assert self.free_blocks is not None
        bs = self.block_size
        need = -(-min(num_tokens, self.max_model_len) // bs) - (num_computed_tokens // bs + 1)
        return need > self.free_blocks()

    def hit_sources(self, req_id: str, num_external_tokens: int) -> dict[Tier, int]:
        """Tokens of the last match per tier (host first: loads take G2 blocks first)."""
        st = self._reqs.get(req_id)
        if st is None or st.match is None or num_external_tokens == 0:
            return {}
        bs = self.block_size
        blocks = st.match.blocks.first(-(-num_external_tokens // bs))
        out, left = {}, num_external_tokens
        for tier, n in ((Tier.HOST, blocks.host), (Tier.DISK, blocks.disk), (Tier.OBJECT, blocks.object)):
            out[tier] = min(n * bs, left)
            left -= out[tier]
        return {t: n for t, n in out.items() if n}

    def load_after_alloc(self, req_id: str, engine_blocks: Sequence[int], num_external_tokens: int,
                         group_blocks: Sequence[Sequence[int]] = ()) -> None:
        """The engine allocated ``engine_blocks`` (the request's whole list; ``group_blocks``:
        groups 1..'s) and counts ``num_external_tokens`` past the lookup's start as loaded:
        pin them (posted)."""
        if num_external_tokens == 0:
            return
        if len(self.windows) > 1:
            self._load_groups(req_id, engine_blocks, num_external_tokens, group_blocks)
            return
        st = self._reqs.get(req_id)
        bs = self.block_size
        mt = st.match if st is not None else None
        start = mt.start if mt is not None else 0
        # Every engine block the engine now treats as loaded; a partial last block (the engine
        # trimmed the hit) cannot be filled by whole-block loads: reported failed, recomputed.
        engine = list(engine_blocks[start : start + -(-num_external_tokens // bs)])
        n = num_external_tokens // bs
        if st is None or mt is None or n > mt.blocks.total:
            log.error("kvbm: the engine allocated %d external tokens for request %s that kvbm did not offer; "
                      "they will be recomputed", num_external_tokens, req_id)
            self._emit_load(LoadOp(req_id, 0, [], [], engine), TierBlocks())
            return
        self.counters.hits(mt.blocks.first(n), bs)
        if mt.grant is not None:  # a firm lookup: the blocks are pinned (and staged) already
            grant, mt.grant = mt.grant, None
            op = LoadOp(req_id, grant.op_id, grant.slots[:n], engine[:n], engine[n:], sync=True)
            self._emit_load(op, mt.blocks.first(n))
            return
        st.loading = True
        self._post([(m.PrepareLoad(m.pack_hashes(self._wire(st, mt.start, mt.start + n)),
                                   self._tokens(st, mt.start, mt.start + n)),
                     _Pin(st, st.gen, engine, mt.blocks))])

    def _load_groups(self, req_id: str, engine_blocks: Sequence[int], num_external_tokens: int,
                     group_blocks: Sequence[Sequence[int]]) -> None:
        """:meth:`load_after_alloc` of a multi-group engine: one pin of every group's needed
        blocks (group 0's first, then each group's window); all of them or none are loaded."""
        st = self._reqs.get(req_id)
        bs = self.block_size
        mt = st.match if st is not None else None
        start = mt.start if mt is not None else 0
        n = num_external_tokens // bs
        end = start + -(-num_external_tokens // bs)
        lists = [engine_blocks, *group_blocks]
        # Every engine block the engine now treats as loaded, in every group (none where the
        # engine left a group's block out of the window: a negative id).
        promised = [b for ids, window in zip(lists, self.windows)
                    for b in ids[max(start, first_in_window(end, window, bs)) : end] if b >= 0]
        if st is None or mt is None or n > mt.blocks.total or n * bs != num_external_tokens \
                or len(lists) != len(self.windows):
            log.error("kvbm: the engine allocated %d external tokens for request %s that kvbm cannot load "
                      "into every KV cache group; they will be recomputed", num_external_tokens, req_id)
            self._emit_load(LoadOp(req_id, 0, [], [], promised), TierBlocks())
            return
        hashes: list[int] = []
        engine: list[int] = []
        for g, (ids, window) in enumerate(zip(lists, self.windows)):
            first = max(start, first_in_window(end, window, bs))
            hashes += self._group_hashes(st, g, first, end)
            engine += ids[first:end]
        if len(engine) != len(hashes) or min(engine, default=0) < 0:
            log.error("kvbm: request %s lacks engine blocks for its external tokens in some KV cache group; "
                      "they will be recomputed", req_id)
            self._emit_load(LoadOp(req_id, 0, [], [], promised), TierBlocks())
            return
        self.counters.hits(mt.blocks.first(n), bs)
        st.loading = True
        self._post([(m.PrepareLoad(m.pack_hashes(np.asarray(hashes, np.uint64))),
                     _Pin(st, st.gen, engine, mt.blocks.first(n), whole=True))])

    def _emit_load(self, op: LoadOp, blocks: TierBlocks) -> None:
        if op.op_id:
            self.counters.onboarded(blocks)
        self.counters.load_error_blocks += len(op.failed_blocks)
        self._ready_loads.append(op)

    # -- replies -------------------------------------------------------------------------
    def _on_reply(self, r: Reply, plan: StepPlan) -> None:
        if r.late:
            # Its owner gave up when it expired; an op the leader granted must not leak.
            if isinstance(r.message, (m.LoadGrant, m.StoreGrant)):
                self._release(r.message.op_id)
            return
        what = self._posted.pop(r.request_id, None)
        if isinstance(what, _Pin):
            self._on_pin(what, r)
        elif isinstance(what, _StoreAlloc):
            self._on_store_alloc(what, r, plan)
        elif isinstance(what, _Poll):
            self._on_poll(what, r)

    def _on_pin(self, pin: _Pin, r: Reply) -> None:
        st = pin.st
        grant = r.message if isinstance(r.message, m.LoadGrant) else None
        if grant is None and r.error:
            log.warning("kvbm: pinning the blocks of request %s failed (%s); recomputing them", st.req_id, r.error)
        if st.finished:
            if grant is not None:
                self._release(grant.op_id)  # aborted meanwhile; its empty load went out already
            return
        st.loading = False
        slots = m.unpack_slots(grant.slots).tolist() if grant is not None else []
        op_id = grant.op_id if grant is not None else 0
        k = len(slots)
        # Fewer blocks than the lookup promised (evicted since, or a stale replica entry).
        self.counters.pin_shortfall_blocks += len(pin.engine) - k
        if pin.whole and k < len(pin.engine):
            if op_id:
                self._release(op_id)  # a group's blocks are missing: its KV would be left unwritten
            slots, op_id, k = [], 0, 0
        op = LoadOp(st.req_id, op_id, slots, pin.engine[:k], pin.engine[k:])
        blocks = pin.blocks.first(k) if not pin.whole else (pin.blocks if k else TierBlocks())
        if op_id and grant is not None and not grant.ready:
            st.loading = True
            self._staging[op_id] = _Staging(op, st, time.monotonic(), blocks)
            return
        if not op_id:
            op.slots, op.blocks, op.failed_blocks = [], [], pin.engine
        self._emit_load(op, blocks)

    def _on_poll(self, poll: _Poll, r: Reply) -> None:
        self._polling = False
        reply = r.message if isinstance(r.message, m.LoadPoll) else None
        ready = set(reply.ready) if reply is not None else set()
        failed = set(reply.failed) if reply is not None else set(poll.op_ids)
        now = time.monotonic()
        for op_id in poll.op_ids:
            p = self._staging.get(op_id)
            if p is None:
                continue
            timed_out = op_id not in ready and now - p.since > STAGING_TIMEOUT_S
            if op_id in failed or timed_out:
                if timed_out and op_id not in failed:
                    log.warning("kvbm: disk staging of load op %d took over %.0f s; recomputing",
                                op_id, STAGING_TIMEOUT_S)
                    self._release(op_id)
                p.op.failed_blocks = p.op.blocks + p.op.failed_blocks
                p.op.op_id, p.op.slots, p.op.blocks = 0, [], []
                self.counters.staging_failures += 1
            elif op_id not in ready:
                continue
            del self._staging[op_id]
            p.st.loading = False
            self._emit_load(p.op, p.blocks)

    def _on_store_alloc(self, alloc: _StoreAlloc, r: Reply, plan: StepPlan) -> None:
        st = alloc.st
        st.posted_stores -= 1
        grant = r.message if isinstance(r.message, m.StoreGrant) else None
        if grant is None or not grant.op_id:
            return
        if st.gen != alloc.gen:
            self._release(grant.op_id)  # preempted since: its blocks may hold other data now
            return
        slots = m.unpack_slots(grant.slots).tolist()
        pairs = [(alloc.blocks[i], s) for i, s in enumerate(slots) if s >= 0]
        plan.stores.append(StoreOp(st.req_id, grant.op_id, [b for b, _ in pairs], [s for _, s in pairs]))
        st.inflight.add(grant.op_id)
        self._store_owner[grant.op_id] = st
        self.counters.offload_blocks += len(pairs)

    # -- per step ------------------------------------------------------------------------
    def step(self, scheduled: Sequence[ScheduledRequest], preempted: Sequence[str] = (), *,
             wait_s: float = 0.0) -> StepPlan:
        """This step's plan; posts the store allocations for the blocks this step computes.

        ``wait_s`` > 0 waits up to that long for the replies to its pins (engines that run steps
        synchronously; vLLM's scheduler in a step that computes nothing); 0 waits for nothing.
        """
        plan = StepPlan()
        # Finished requests whose last store op went out in an earlier plan: the workers
        # registered it before they see the delayed free.
        for req_id in [r for r, st in self._finishing.items() if st.posted_stores == 0]:
            del self._finishing[req_id]
            plan.delayed_free.append(req_id)
        for req_id in preempted:
            plan.preempted.append(req_id)
            st = self._reqs.get(req_id)
            if st is not None:
                # Its blocks went back to the pool; the workers finish the stores still
                # reading them before this step's forward pass; posted ones are released.
                st.block_ids, st.stored, st.inflight, st.gen = [], -1, set(), st.gen + 1
                st.group_ids = [[] for _ in st.group_ids]
                st.window_free_at.clear()
        if any(w is not None for w in self.windows):
            self._advance_windows(scheduled, plan)
        if wait_s > 0:
            self._flush()  # what the engine queued since its last step: its replies may come now
        deadline = time.monotonic() + wait_s
        while True:
            for reply in self.link.drain(max(deadline - time.monotonic(), 0.0)):
                self._on_reply(reply, plan)
            # Another reply (a store allocation's) may come first: a pin still out is waited for.
            if not any(isinstance(w, _Pin) for w in self._posted.values()) or time.monotonic() >= deadline:
                break
        self._check_staging()
        plan.loads += self._ready_loads
        plan.delayed_free += self._delayed
        self._ready_loads, self._delayed = [], []
        allocs: list[tuple[m.Message, _Posted]] = []
        windows: list[_WindowStore] = []
        ready = self.ready() if scheduled else False
        for s in scheduled:
            st = self._reqs.get(s.req_id)
            if st is None:
                continue
            if s.replace_blocks:
                st.block_ids = list(s.new_block_ids or ())
                st.stored = s.num_computed_tokens // self.block_size
            elif s.new_block_ids:
                st.block_ids += s.new_block_ids
            for ids, new in zip(st.group_ids, s.group_block_ids):
                if s.replace_blocks:
                    ids[:] = new or ()
                elif new:
                    ids += new
            alloc = self._plan_store(st, s.num_computed_tokens + s.num_scheduled_tokens, windows)
            for posted in alloc:
                if ready:
                    allocs.append(posted)
                    st.posted_stores += 1
        if windows and ready:
            self._store_windows(windows, plan)
        if allocs:
            self._post(allocs)
        self._flush()
        return plan

    def _plan_store(self, st: _Req, computed_after: int,
                    windows: list[_WindowStore]) -> list[tuple[m.Message, _Posted]]:
        """Allocations for the full blocks this step completes (only those whose tokens are
        known), one per full-attention KV cache group; a sliding-window group's blocks go to
        ``windows`` (allocated before this step's plan goes out, see :meth:`_store_windows`)."""
        bs = self.block_size
        n_full = min(computed_after, len(st.tokens), len(st.block_ids) * bs) // bs
        first = st.stored
        if n_full <= first or first < 0:
            return []
        st.stored = n_full
        hashes = self._hashes(st, n_full)
        msg = m.AllocateStore(m.pack_hashes(self._wire(st, first, n_full)), hashes[first - 1] if first else 0,
                              tokens=self._tokens(st, first, n_full))
        out: list[tuple[m.Message, _Posted]] = [(msg, _StoreAlloc(st, st.gen, st.block_ids[first:n_full]))]
        for g, ids in enumerate(st.group_ids, 1):
            blocks = ids[first:n_full]
            if len(blocks) < n_full - first or min(blocks) < 0:
                continue  # a block the engine does not hold (its null block): this step's run is not stored
            gh = self._group_hashes(st, g, max(first - 1, 0), n_full)
            chain, parent = (gh[1:], gh[0]) if first else (gh, 0)
            window = self.windows[g]
            if window is None:
                out.append((m.AllocateStore(m.pack_hashes(np.asarray(chain, np.uint64)), parent),
                            _StoreAlloc(st, st.gen, blocks)))
            else:
                windows.append(_WindowStore(st, blocks, chain, parent, (first + 1) * bs + window - 1))
        return out

    def _store_windows(self, windows: list[_WindowStore], plan: StepPlan) -> None:
        """Store sliding-window blocks in this step's plan, copied right after the forward pass
        that computes them: the engine frees a sliding-window block once the window slid past
        it, before a posted allocation's reply would come back (one leader round trip per step
        that completes such blocks). A copy still running when the engine may have freed its
        block is waited for before the next forward pass (:meth:`_advance_windows`)."""
        grants = self.client.allocate_stores([(np.asarray(w.hashes, np.uint64), w.parent) for w in windows])
        for w, grant in zip(windows, grants):
            if not grant.op_id:
                continue
            pairs = [(w.blocks[i], s) for i, s in enumerate(grant.slots) if s >= 0]
            plan.stores.append(StoreOp(w.st.req_id, grant.op_id, [b for b, _ in pairs], [s for _, s in pairs]))
            w.st.inflight.add(grant.op_id)
            w.st.window_free_at[grant.op_id] = w.free_at
            self._store_owner[grant.op_id] = w.st
            self.counters.offload_blocks += len(pairs)

    def _advance_windows(self, scheduled: Sequence[ScheduledRequest], plan: StepPlan) -> None:
        """Record how far each scheduled request is computed once this step ran (the engine
        frees sliding-window blocks behind it while scheduling the step) and have the workers
        finish, before this step's forward pass, the stores that read a block it may have freed."""
        for s in scheduled:
            st = self._reqs.get(s.req_id)
            if st is not None:
                st.horizon = max(st.horizon, s.num_computed_tokens + s.num_scheduled_tokens)
        # Also requests not scheduled: the engine may have tried to, freeing their blocks.
        for st in self._reqs.values():
            if st.window_free_at and min(st.window_free_at.values()) <= st.horizon:
                plan.preempted.append(st.req_id)

    def _check_staging(self) -> None:
        """Poll the loads being staged from disk (one poll in flight at a time)."""
        if self._staging and not self._polling:
            self._polling = True
            self._post([(m.PollLoads(list(self._staging)), _Poll(list(self._staging)))])

    def loads_pending(self) -> bool:
        """A pin or a staging poll is queued or out: its reply may complete a load op."""
        return any(isinstance(w, (_Pin, _Poll)) for w in [*self._posted.values(), *(w for _, w in self._outbox)])

    def busy(self) -> bool:
        """Replies or disk staging still outstanding: the engine must keep stepping (a later
        step emits their ops, or releases what an aborted request was granted)."""
        return bool(self._posted or self._outbox or self._staging)

    def settle(self, timeout_s: float) -> StepPlan:
        """Steps with no new work until nothing is outstanding (synchronous engines)."""
        plan = StepPlan()
        deadline = time.monotonic() + timeout_s
        while True:
            plan.extend(self.step((), wait_s=0.05))
            if not self.busy() or time.monotonic() > deadline:
                return plan

    # -- completions ---------------------------------------------------------------------
    def stores_done(self, acks: dict[int, int]) -> None:
        """Store op id -> ranks that report it done (an op counts once every rank did)."""
        for op_id, n in acks.items():
            total = self._store_acks.get(op_id, 0) + n
            if total < self.world_size:
                self._store_acks[op_id] = total
                continue
            self._store_acks.pop(op_id, None)
            st = self._store_owner.pop(op_id, None)
            if st is not None:
                st.inflight.discard(op_id)
                st.window_free_at.pop(op_id, None)

    def blocks_freed(self, req_ids: Sequence[str]) -> None:
        """The workers reported these delayed frees done."""
        self._awaiting_free.difference_update(req_ids)

    def finished(self, req_id: str) -> bool:
        """The request finished or was aborted; True: keep its engine blocks until the workers
        report it (a store reads from them, or will once its allocation comes back)."""
        self._drop_grant(req_id)
        st = self._reqs.pop(req_id, None)
        if st is None:
            return False
        st.finished = True
        if st.loading:
            # Aborted while its blocks were pinned or staged: give the op up and let the
            # workers report the request as received, so the engine frees its blocks.
            for op_id in [op for op, p in self._staging.items() if p.st is st]:
                del self._staging[op_id]
                self._release(op_id)
            self._ready_loads.append(LoadOp(req_id, 0, [], [], []))
        if not self.store_acks:
            # Allocations still posted are released when they come back (the workers may
            # report the request before a later plan could carry their store ops).
            st.gen += 1
            for op_id in st.inflight:
                self._store_owner.pop(op_id, None)
            return bool(st.inflight)
        if st.posted_stores:
            self._finishing[req_id] = st
            self._awaiting_free.add(req_id)
            return True
        if st.inflight:
            self._delayed.append(req_id)
            self._awaiting_free.add(req_id)
            return True
        return False

    def has_pending_frees(self) -> bool:
        """Finished requests whose blocks come back once their stores finish (soon)."""
        return bool(self._awaiting_free)

    def take_counters(self) -> ConnectorCounters:
        """The counters since the last call."""
        out, self.counters = self.counters, ConnectorCounters()
        return out

    def reset_cache(self) -> bool:
        """Drop every unpinned block kvbm holds. Lookups after it never claim a dropped block:
        the leader's reply carries its index position after the clear, which the replica
        reaches before it answers again (see :meth:`_local_match`)."""
        return self.client.reset_cache()

    def take_events(self) -> list[dict[str, Any]]:
        """The leader's block events since the last call, as vLLM KV-event maps
        (:func:`kvbm.leader.events.wire_events`: the leader's own event stream, stored blocks
        with their token ids where the leader has them)."""
        reply = self.client.take_events()
        if reply is None or not reply.kinds:
            return []
        hashes = m.unpack_hashes(reply.hashes)
        parents = m.unpack_hashes(reply.parents)
        events = [BlockEvent(m.BlockEventKind(kind), Tier(tier), h, p or None)
                  for kind, tier, h, p in zip(reply.kinds, reply.tiers, hashes, parents)]
        step = 4 * self.block_size
        tokened = [h for h, flag in zip(hashes, reply.tokened) if flag]
        tokens = {h: reply.tokens[i * step : (i + 1) * step] for i, h in enumerate(tokened)}
        return wire_events(events, self.block_size, lambda h: tokens.get(h, b""))

    def shutdown(self) -> None:
        """Release every op still pending and close the connections."""
        for op_id in list(self._staging):
            self.client.release(op_id)
        self._staging.clear()
        self._flush()
        self.link.close()
        self.client.close()
