"""A simulated inference engine around a real leader and real rank processes.

The scheduler side (this module) keeps the engine's own prefix cache over a small G1 block
pool, asks the leader for external hits past the local ones, and issues load and store ops
exactly as an engine connector does; the rank processes (kvbm.sim.rank) hold the KV tensors,
copy through the shared host pool and check every loaded byte against the oracle.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import msgpack
import zmq

from kvbm.config import KvbmConfig
from kvbm.hashing import EMPTY_SALT_HASH, sequence_hashes
from kvbm.ipc.transport import ensure_private_dir, instance_endpoint
from kvbm.leader.client import LeaderClient
from kvbm.leader.spawn import LeaderProcess, spawn_leader
from kvbm.sim.rank import SimModel


class SimError(RuntimeError):
    pass


class RankDied(SimError):
    """A rank process exited while the engine needed it (the message names the rank)."""


class LeaderDied(SimError):
    """The leader process this engine spawned exited (the message says how)."""


LIVENESS_POLL_S = 0.2  # how often a wait on the ranks checks that they are still alive


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
    tokens_computed: int = 0
    blocks_loaded: int = 0  # per logical block (all ranks' slices)
    blocks_stored: int = 0
    bytes_loaded: int = 0  # all ranks together
    bytes_stored: int = 0
    load_seconds: float = 0.0  # wall time of the load phases
    store_seconds: float = 0.0
    mismatches: int = 0  # loaded blocks whose bytes differ from the oracle (must be 0)
    load_failures: int = 0  # load ops a rank reported failed (recomputed)
    staging_failures: int = 0  # loads the leader could not stage from disk (recomputed)
    store_failures: int = 0

    @property
    def hit_rate(self) -> float:
        ext = self.tokens_from_host + self.tokens_from_disk
        return ext / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class _Plan:
    hashes: list[int]
    num_tokens: int
    blocks: list[int]  # engine block per block of the request (full and partial)
    n_local: int
    host: int = 0
    disk: int = 0
    load_op: int = 0
    load_slots: list[int] = field(default_factory=list)
    load_ready: bool = True


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


class SimEngine:
    """Leader + ``world_size`` rank processes + this scheduler. Use as a context manager."""

    def __init__(self, config: KvbmConfig, *, world_size: int = 2, model: SimModel | None = None,
                 instance: str | None = None, seed: int = 0, init_timeout_s: float | None = None) -> None:
        self.config = config
        self.world_size = world_size
        self.model = model or SimModel()
        self.instance = instance or f"sim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.seed = seed
        self.init_timeout_s = init_timeout_s if init_timeout_s is not None else config.init_timeout_s
        self.stats = SimStats()
        self.g1 = G1Cache(self.model.num_gpu_blocks)
        self.leader: LeaderProcess | None = None
        self.client: LeaderClient | None = None
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
            cmd = [sys.executable, "-m", "kvbm.sim.rank", "--control", self._ctl_endpoint,
                   "--leader", self.endpoint, "--rank", str(r), "--world", str(self.world_size),
                   "--model", model_hex, "--init-timeout", str(self.init_timeout_s), "--seed", str(self.seed)]
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
            raise SimError("; ".join(errors))
        assert self.client is not None
        deadline = time.monotonic() + 5
        while not self.client.is_ready():
            if time.monotonic() > deadline:
                raise SimError(f"leader not ready: {self.client.status}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop_ranks()
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

    def _plan(self, tokens: list[int], salt_hash: int) -> _Plan | None:
        bs = self.model.block_size
        hashes = sequence_hashes(tokens, bs, salt_hash)
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
            return None
        plan = _Plan(hashes, len(tokens), local + new, len(local))
        assert self.client is not None
        host, disk = self.client.match(hashes[plan.n_local:])
        if plan.n_local + host + disk == len(hashes) and len(tokens) == len(hashes) * bs and host + disk:
            # Whole prompt matched: hold back the last block so one token is computed.
            if disk:
                disk -= 1
            else:
                host -= 1
        if host + disk:
            grant = self.client.prepare_load(hashes[plan.n_local:plan.n_local + host + disk])
            plan.load_op, plan.load_slots, plan.load_ready = grant.op_id, grant.slots, grant.ready
            n = len(grant.slots)
            plan.host, plan.disk = min(host, n), max(0, n - host)
        return plan

    def _execute(self, plans: list[_Plan]) -> None:
        assert self.client is not None
        st = self.stats
        waiting = [p.load_op for p in plans if p.load_op and not p.load_ready]
        deadline = time.monotonic() + 30
        failed: set[int] = set()
        while waiting:
            ready, bad = self.client.poll_loads(waiting)
            failed.update(bad)
            waiting = [op for op in waiting if op not in ready and op not in bad]
            if waiting and time.monotonic() > deadline:
                failed.update(waiting)
                for op in waiting:
                    self.client.release(op)
                break
            if waiting:
                time.sleep(0.001)
        # Plain lists: they travel to the ranks as msgpack.
        loads: list[list[Any]] = []
        compute: list[list[Any]] = []
        stores: list[list[Any]] = []
        store_plans: list[tuple[_Plan, int, list[int], list[int]]] = []
        for p in plans:
            if p.load_op in failed:
                st.staging_failures += 1
                p.load_slots, p.host, p.disk = [], 0, 0
            n_loaded = len(p.load_slots)
            if n_loaded:
                lb = p.blocks[p.n_local:p.n_local + n_loaded]
                loads.append([p.load_op, p.load_slots, lb, p.hashes[p.n_local:p.n_local + n_loaded]])
            first = p.n_local + n_loaded
            for i in range(first, len(p.blocks)):
                h = p.hashes[i] if i < len(p.hashes) else (p.hashes[-1] if p.hashes else 0) ^ 0x7A11
                compute.append([p.blocks[i], h])
            to_store = p.hashes[first:]
            if to_store:
                grant = self.client.allocate_store(to_store, p.hashes[first - 1] if first else 0)
                pairs = [(p.blocks[first + i], s) for i, s in enumerate(grant.slots) if s >= 0]
                if grant.op_id and pairs:
                    stores.append([grant.op_id, [b for b, _ in pairs], [s for _, s in pairs]])
            bs = self.model.block_size
            st.requests += 1
            st.prompt_tokens += p.num_tokens
            st.tokens_local += p.n_local * bs
            st.tokens_from_host += p.host * bs
            st.tokens_from_disk += p.disk * bs
            st.tokens_computed += p.num_tokens - (p.n_local + n_loaded) * bs
        results = self._broadcast({"cmd": "step", "loads": loads, "compute": compute, "stores": stores}, 120)
        bad_loads: set[int] = set()
        for r in results:
            st.mismatches += r["mismatches"]
            bad_loads.update(r["load_failures"])
            st.store_failures += len(r["store_failures"])
            st.bytes_loaded += r["loaded_blocks"] * self.model.slice_bytes
            st.bytes_stored += r["stored_blocks"] * self.model.slice_bytes
        st.load_seconds += max((r["load_seconds"] for r in results), default=0.0)
        st.store_seconds += max((r["store_seconds"] for r in results), default=0.0)
        st.blocks_loaded += sum(len(op[2]) for op in loads if op[0] not in bad_loads)
        st.blocks_stored += sum(len(op[1]) for op in stores)
        if bad_loads:
            # The engine recomputes blocks whose load failed.
            st.load_failures += len(bad_loads)
            redo = [[b, h] for op in loads if op[0] in bad_loads for b, h in zip(op[2], op[3])]
            self._broadcast({"cmd": "step", "compute": redo}, 60)
        for p in plans:
            self.g1.release(p.blocks, p.hashes)

    def quiesce(self, timeout_s: float = 10.0) -> dict[str, float]:
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
                return self.client.wait_idle(min(1.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise SimError(f"leader still has work in flight after {timeout_s:g} s: "
                                   f"{self.client.stats()}") from None

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
