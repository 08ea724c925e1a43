"""A simulated inference engine around a real leader and real rank processes.

The scheduler side (this module) keeps the engine's own prefix cache over a small G1 block
pool and drives the production scheduler-side planner (kvbm.connector.planner) that the vLLM
connector uses: lookups past the local hits, hold-back, load and store plans; the rank processes (kvbm.testing.sim.rank) hold the KV tensors,
copy through the shared host pool and check every loaded byte against the oracle.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import msgpack
import zmq

from kvbm.config import KvbmConfig
from kvbm.ipc.stats import LeaderStats
from kvbm.connector.index import IndexFollower, follower_for
from kvbm.connector.planner import Planner, ScheduledRequest
from kvbm.connector.ops import StepPlan
from kvbm.hashing import EMPTY_SALT_HASH
from kvbm.ipc.transport import ensure_private_dir, instance_endpoint
from kvbm.leader.client import LeaderClient
from kvbm.leader.spawn import LeaderProcess, spawn_leader
from kvbm.testing.sim.rank import SimModel


# Longest wait for the leader's replies within one simulated step.
STEP_TIMEOUT_S = 30.0


class SimError(RuntimeError):
    pass


class RankDied(SimError):
    """A rank process exited while the engine needed it (the message names the rank)."""


class LeaderDied(SimError):
    """The leader process this engine spawned exited (the message says how)."""


LIVENESS_POLL_S = 0.2  # how often a wait on the ranks checks that they are still alive
OBJECT_LOOKUP_POLL_S = 0.005  # how often a request waiting for the object store asks again (a vLLM step)


def exit_reason(returncode: int) -> str:
    """'killed by SIGKILL' or 'exit code 1' for a child's return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class SimStats:
    requests: int = 0
    prompt_tokens: int = 0
    tokens_local: int = 0  # engine (G1) prefix-cache hits
    tokens_from_host: int = 0  # loaded from G2
    tokens_from_disk: int = 0  # loaded from G3 (staged through G2)
    tokens_from_object: int = 0  # loaded from G4, the object store (staged through G2)
    tokens_computed: int = 0
    blocks_loaded: int = 0  # per logical block (all ranks' slices)
    blocks_stored: int = 0
    bytes_loaded: int = 0  # all ranks together
    bytes_stored: int = 0
    load_seconds: float = 0.0  # wall time of the load phases
    store_seconds: float = 0.0
    mismatches: int = 0  # loaded blocks whose bytes differ from the oracle (must be 0)
    load_failures: int = 0  # load ops a rank reported failed (recomputed)
    staging_failures: int = 0  # loads the leader could not stage from G3 / G4 (recomputed)
    store_failures: int = 0

    @property
    def hit_rate(self) -> float:
        ext = self.tokens_from_host + self.tokens_from_disk + self.tokens_from_object
        return ext / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class _Plan:
    req_id: str
    hashes: list[int]
    num_tokens: int
    blocks: list[int]  # engine block per block of the request (full and partial)
    n_local: int


class G1Cache:
    """The engine's own block pool with a prefix cache (LRU over unreferenced blocks)."""

    def __init__(self, num_blocks: int) -> None:
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.index: dict[int, int] = {}  # seq hash -> block
        self.hash_of: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced blocks
        self.refs: dict[int, int] = {}

    def acquire_cached(self, h: int) -> int | None:
        b = self.index.get(h)
        if b is None:
            return None
        self.lru.pop(b, None)
        self.refs[b] = self.refs.get(b, 0) + 1
        return b

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free) + len(self.lru):
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.lru.popitem(last=False)
                del self.index[self.hash_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int], hashes: list[int]) -> None:
        """Drop references; full blocks stay cached under their hash."""
        for i, b in enumerate(blocks):
            self.refs[b] -= 1
            if i < len(hashes) and self.index.get(hashes[i], b) == b and (b in self.hash_of or hashes[i] not in self.index):
                self.index[hashes[i]] = b
                self.hash_of[b] = hashes[i]
            if self.refs[b] == 0:
                del self.refs[b]
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    def clear(self) -> None:
        """Forget every cached block (like vLLM's reset_prefix_cache)."""
        for b in list(self.lru):
            del self.index[self.hash_of.pop(b)]
            self.free.append(b)
        self.lru.clear()


_RANK_PREFIX = re.compile(r"rank (\d+)/(\d+): (.*)", re.S)


def merge_rank_errors(errors: list[str]) -> str:
    """Ranks' errors with each distinct reason once: ``rank 0,1/2: reason``."""
    by_reason: dict[str, list[str]] = {}
    for e in errors:
        m = _RANK_PREFIX.fullmatch(e)
        key, rank = (f"/{m[2]}: {m[3]}", m[1]) if m else (e, "")
        by_reason.setdefault(key, []).append(rank)
    return "; ".join(f"rank {','.join(ranks)}{key}" if ranks[0] else key
                     for key, ranks in by_reason.items())


class SimEngine:
    """Leader + ``world_size`` rank processes + this scheduler. Use as a context manager."""

    def __init__(self, config: KvbmConfig, *, world_size: int = 2, model: SimModel | None = None,
                 instance: str | None = None, seed: int = 0, init_timeout_s: float | None = None,
                 await_object_lookups: bool = False) -> None:
        """``await_object_lookups``: while the leader is asking the object store about a request's
        blocks (:meth:`Planner.not_yet`), ask again until it answered, as vLLM's scheduler does a
        step later, and count that wait in the request's time; off, the request goes with what
        the leader knew at once (what G4 holds is found from the next request on)."""
        self.config = config
        self.await_object_lookups = await_object_lookups
        self.world_size = world_size
        self.model = model or SimModel()
        self.instance = instance or f"sim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.seed = seed
        self.init_timeout_s = init_timeout_s if init_timeout_s is not None else config.init_timeout_s
        self.stats = SimStats()
        self.g1 = G1Cache(self.model.num_gpu_blocks)
        self.leader: LeaderProcess | None = None
        self.client: LeaderClient | None = None
        self._planner: Planner | None = None
        self._follower: IndexFollower | None = None
        self._req_ids = itertools.count(1)
        self.ranks: list[subprocess.Popen[bytes]] = []
        self._ctl: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._ctl.setsockopt(zmq.LINGER, 0)
        ensure_private_dir(config.run_dir)
        self._ctl_endpoint = instance_endpoint(config.run_dir, self.instance + "-ctl")
        self._ctl.bind(self._ctl_endpoint)
        self._rank_ids: dict[int, bytes] = {}
        self._rank_pids: dict[int, int] = {}
        self.endpoint = config.leader_endpoint or instance_endpoint(config.run_dir, self.instance)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, spawn_leader_first: bool = True, ranks: list[int] | None = None) -> None:
        if spawn_leader_first:
            self.start_leader()
        self.start_ranks(ranks)
        if not spawn_leader_first:
            self.start_leader()

    def start_leader(self) -> None:
        if self.leader is not None:
            self.leader.stop()  # a previous (dead) leader: reap it and drop its log
        self.leader = spawn_leader(self.config, self.instance, endpoint=self.endpoint)
        self.client = LeaderClient(self.endpoint)

    def start_ranks(self, ranks: list[int] | None = None) -> None:
        model_hex = msgpack.packb(asdict(self.model)).hex()
        for r in ranks if ranks is not None else range(self.world_size):
            cmd = [sys.executable, "-m", "kvbm.testing.sim.rank", "--control", self._ctl_endpoint,
                   "--leader", self.endpoint, "--rank", str(r), "--world", str(self.world_size),
                   "--model", model_hex, "--init-timeout", str(self.init_timeout_s), "--seed", str(self.seed),
                   "--block-format", self.config.block_format]
            self.ranks.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        for _ in ranks if ranks is not None else range(self.world_size):
            self._await_hello()  # all ranks start in parallel

    def _await_hello(self, timeout_s: float = 30.0) -> None:
        if not self._ctl.poll(int(timeout_s * 1000)):
            raise SimError("a rank process did not start")
        ident, raw = self._ctl.recv_multipart()
        hello = msgpack.unpackb(raw)
        self._rank_ids[hello["rank"]] = ident
        self._rank_pids[hello["rank"]] = hello["pid"]

    def _rank_proc(self, rank: int) -> subprocess.Popen[bytes] | None:
        pid = self._rank_pids.get(rank)
        return next((p for p in self.ranks if p.pid == pid), None)

    def dead_rank(self, ranks: Iterable[int] | None = None) -> str | None:
        """'rank R (pid P) died (killed by SIGKILL)' for the first of ``ranks`` (default: all)
        whose process has exited, else None."""
        for r in sorted(self._rank_ids if ranks is None else ranks):
            p = self._rank_proc(r)
            if p is not None and p.poll() is not None:
                return f"rank {r} (pid {p.pid}) died ({exit_reason(p.returncode)})"
        return None

    def _leader_gone(self) -> bool:
        return self.dead_leader() is not None

    def dead_leader(self) -> str | None:
        """'the leader (pid P) died (...)' if the leader this engine spawned has exited, else None."""
        popen = self.leader.popen if self.leader is not None else None
        if popen is None or popen.poll() is None:
            return None
        return f"the leader (pid {popen.pid}) died ({exit_reason(popen.returncode)})"

    def _send_all(self, reqs: dict[int, dict], timeout_s: float) -> dict[int, dict]:
        """Send one request per rank and collect every reply (ranks answer in any order).

        Raises RankDied as soon as a rank that still owes a reply has exited.
        """
        by_ident = {self._rank_ids[r]: r for r in reqs}
        for r, req in reqs.items():
            self._ctl.send_multipart([self._rank_ids[r], msgpack.packb(req)])
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(reqs):
            remaining = deadline - time.monotonic()
            missing = sorted(set(reqs) - set(replies))
            if remaining <= 0:
                raise SimError(f"rank(s) {missing} did not answer within {timeout_s:g} s")
            if not self._ctl.poll(int(min(remaining, LIVENESS_POLL_S) * 1000) + 1):
                dead = self.dead_rank(missing)
                if dead is not None:
                    raise RankDied(dead)
                continue
            ident, raw = self._ctl.recv_multipart()
            if ident in by_ident:
                replies[by_ident[ident]] = msgpack.unpackb(raw)
        return replies

    def _broadcast(self, req: dict, timeout_s: float) -> list[dict]:
        replies = self._send_all({r: req for r in self._rank_ids}, timeout_s)
        return [replies[r] for r in sorted(replies)]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for every rank's init sync; raises SimError with the ranks' own messages."""
        t = timeout_s if timeout_s is not None else self.init_timeout_s + 5
        replies = self._broadcast({"cmd": "wait_ready", "timeout": t}, t + 10)
        errors = [r["error"] for r in replies if not r["ready"]]
        if errors:
            raise SimError(merge_rank_errors(errors))
        assert self.client is not None
        if not self.client.wait_ready(5):
            raise SimError(f"leader not ready: {self.client.status}")

    def stop(self) -> None:
        self._stop_ranks()
        self._close_planner()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.leader is not None:
            self.leader.stop()
            self.leader = None
        self._ctl.close(0)
        try:
            os.unlink(self._ctl_endpoint[len("ipc://"):])
        except FileNotFoundError:
            pass

    def _stop_ranks(self, timeout_s: float = 5.0) -> None:
        """Tell every rank to stop at once and wait for the processes (not for replies: a dead
        or interrupted rank sends none); kill those still running after ``timeout_s``."""
        for r, ident in self._rank_ids.items():
            p = self._rank_proc(r)
            if p is None or p.poll() is None:
                self._ctl.send_multipart([ident, msgpack.packb({"cmd": "stop"})])
        deadline = time.monotonic() + timeout_s
        for p in self.ranks:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ranks.clear()
        self._rank_ids.clear()
        self._rank_pids.clear()

    def __enter__(self) -> "SimEngine":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], salt_hash: int = EMPTY_SALT_HASH) -> None:
        """Serve prompts, as many at once as the G1 pool allows (the rest wait their turn)."""
        pending = list(prompts)
        # Steps run back to back here, with no scheduler pause for the replica to catch up in:
        # what the leader committed before this call is matchable in it, as through a Match.
        self._sync_index(10.0)
        while pending:
            batch, plans = [], []
            while pending:
                plan = self._plan(pending[0], salt_hash)
                if plan is None:
                    break
                batch.append(pending.pop(0))
                plans.append(plan)
            if not plans:
                raise SimError(f"a prompt of {len(pending[0])} tokens does not fit the engine's "
                               f"{self.model.num_gpu_blocks}-block pool")
            self._execute(plans)

    @property
    def planner(self) -> Planner:
        """The production scheduler-side planner, bound to the current leader client."""
        assert self.client is not None
        if self._planner is None or self._planner.client is not self.client:
            self._close_planner()
            # The production hot path: lookups from a local replica of the leader's index.
            self._follower = follower_for(self.config, self.endpoint)
            self._planner = Planner(self.model.block_size, self.world_size, self.client,
                                    replica=self._follower.replica if self._follower is not None else None)
        return self._planner

    def _sync_index(self, timeout_s: float) -> None:
        """Bring the planner's index replica up to the leader's state (no-op without one).

        Not with the leader dead: lookups then go to the leader client, which answers "no
        hits", and serving goes on, as in production."""
        if self._follower is None or self._follower.sync(timeout_s, give_up=self._leader_gone) or self._leader_gone():
            return
        raise SimError(f"the index replica did not catch up with the leader within {timeout_s:g} s")

    def _close_planner(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self._planner is not None:
            self._planner.link.close()
            self._planner = None

    def _plan(self, tokens: list[int], salt_hash: int) -> _Plan | None:
        bs = self.model.block_size
        planner = self.planner
        req_id = f"r{next(self._req_ids)}"
        planner.add(req_id, tokens, salt_hash)
        hashes = planner.block_hashes(req_id, len(tokens) // bs)
        total_blocks = -(-len(tokens) // bs)
        local: list[int] = []
        for h in hashes:
            b = self.g1.acquire_cached(h)
            if b is None:
                break
            local.append(b)
        new = self.g1.allocate(total_blocks - len(local))
        if new is None:
            self.g1.release(local, hashes)
            planner.finished(req_id)
            return None
        plan = _Plan(req_id, hashes, len(tokens), local + new, len(local))
        external = planner.lookup(req_id, plan.n_local * bs)
        while self.await_object_lookups and planner.not_yet(req_id):
            time.sleep(OBJECT_LOOKUP_POLL_S)
            external = planner.lookup(req_id, plan.n_local * bs)
        planner.load_after_alloc(req_id, plan.blocks, external)
        return plan

    def _execute(self, plans: list[_Plan]) -> None:
        """One engine step for ``plans``: loads, then compute, then stores of what was computed.

        The planner posts its leader requests without waiting; this synchronous engine settles
        them (waits for the replies) where an asynchronous one would take them a step later.
        """
        planner = self.planner
        st = self.stats
        bs = self.model.block_size
        load_ops = {op.req_id: op for op in self._settle().loads}
        # Plain lists: they travel to the ranks as msgpack.
        loads: list[list[Any]] = []
        compute: list[list[Any]] = []
        scheduled: list[ScheduledRequest] = []
        for p in plans:
            op = load_ops.get(p.req_id)
            n_loaded = len(op.slots) if op is not None else 0
            if n_loaded:
                assert op is not None
                loads.append([op.op_id, op.slots, op.blocks, p.hashes[p.n_local:p.n_local + n_loaded]])
            first = p.n_local + n_loaded
            for i in range(first, len(p.blocks)):
                h = p.hashes[i] if i < len(p.hashes) else (p.hashes[-1] if p.hashes else 0) ^ 0x7A11
                compute.append([p.blocks[i], h])
            scheduled.append(ScheduledRequest(p.req_id, first * bs, p.num_tokens - first * bs, p.blocks, True))
            st.requests += 1
            st.prompt_tokens += p.num_tokens
            st.tokens_local += p.n_local * bs
            st.tokens_computed += p.num_tokens - first * bs
        step = planner.step(scheduled)
        step.extend(self._settle())
        counters = planner.take_counters()
        st.tokens_from_host += counters.onboard_host_blocks * bs
        st.tokens_from_disk += counters.onboard_disk_blocks * bs
        st.tokens_from_object += counters.onboard_object_blocks * bs
        st.staging_failures += counters.staging_failures
        stores: list[list[Any]] = [[op.op_id, op.blocks, op.slots] for op in step.stores if op.blocks]
        results = self._broadcast({"cmd": "step", "loads": loads, "compute": compute, "stores": stores}, 120)
        bad_loads: set[int] = set()
        for rank, r in enumerate(results):
            st.mismatches += r["mismatches"]
            bad_loads.update(r["load_failures"])
            st.store_failures += len(r["store_failures"])
            slice_bytes = self.model.for_rank(self.world_size, rank).slice_bytes
            st.bytes_loaded += r["loaded_blocks"] * slice_bytes
            st.bytes_stored += r["stored_blocks"] * slice_bytes
        st.load_seconds += max((r["load_seconds"] for r in results), default=0.0)
        st.store_seconds += max((r["store_seconds"] for r in results), default=0.0)
        st.blocks_loaded += sum(len(op[2]) for op in loads if op[0] not in bad_loads)
        st.blocks_stored += sum(len(op[1]) for op in stores)
        if bad_loads:
            # The engine recomputes blocks whose load failed.
            st.load_failures += len(bad_loads)
            redo = [[b, h] for op in loads if op[0] in bad_loads for b, h in zip(op[2], op[3])]
            self._broadcast({"cmd": "step", "compute": redo}, 60)
        planner.stores_done({op.op_id: self.world_size for op in step.stores})
        for p in plans:
            planner.finished(p.req_id)
            self.g1.release(p.blocks, p.hashes)

    def _settle(self) -> StepPlan:
        """The planner's replies, waited for as a synchronous engine does; LeaderDied as soon as
        the leader this engine spawned has exited (not the replies' timeouts later)."""
        plan = StepPlan()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            plan.extend(self.planner.settle(LIVENESS_POLL_S))
            if not self.planner.busy() or time.monotonic() > deadline:
                return plan
            dead = self.dead_leader()
            if dead is not None:
                raise LeaderDied(dead)

    def quiesce(self, timeout_s: float = 10.0) -> LeaderStats:
        """Wait until the leader has applied every rank ack (no op in flight); returns its stats.

        Raises LeaderDied at once if the leader this engine spawned has exited.
        """
        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.dead_leader()
            if dead is not None:
                raise LeaderDied(dead)
            try:
                stats = self.client.wait_idle(min(1.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise SimError(f"leader still has work in flight after {timeout_s:g} s: "
                                   f"{self.client.stats()}") from None
                continue
            # Settled means matchable here too: the leader's stats carry its index position,
            # which the planner's replica reaches before its next lookup.
            return stats

    def reset_engine_cache(self) -> None:
        """Drop the engine's own prefix cache so the next requests must come from kvbm."""
        self.g1.clear()


def chat_workload(num_conversations: int, turns: int, *, system_tokens: int = 256, turn_tokens: int = 96,
                  num_system_prompts: int = 4, seed: int = 0) -> Iterator[list[int]]:
    """Multi-turn chats: each request is the whole conversation so far (shared system prompts)."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 50_000) for _ in range(system_tokens)] for _ in range(num_system_prompts)]
    convs = [list(systems[i % num_system_prompts]) for i in range(num_conversations)]
    remaining = [turns] * num_conversations
    while any(remaining):
        i = rng.choice([k for k, r in enumerate(remaining) if r])
        convs[i].extend(rng.randrange(1, 50_000) for _ in range(turn_tokens))
        remaining[i] -= 1
        yield list(convs[i])


ProgressFn = Callable[[SimStats], None]
