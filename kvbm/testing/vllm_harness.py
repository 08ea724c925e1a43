"""Drive the real vLLM 0.33 scheduler with DynamoConnector on a CPU-only machine.

Used by tests/vllm and by kvbm.bench.vllm_sched; imports vLLM and torch.

The scheduler is vLLM's own (``Scheduler`` or ``AsyncScheduler``) with the connector loaded by
``kv_connector_module_path``; each TP rank is a worker-role connector holding CPU torch KV
tensors, in this process or in its own process (``tp > 1``). A step is what vLLM's model
runner does around a forward pass (engines.md Part B), with the forward pass replaced by the
KV oracle: every block a step completes is filled with bytes derived from its kvbm sequence
hash, and every block a (re)admitted request starts with (engine prefix hits and loads from
kvbm) is checked against the oracle before the forward pass, so a wrong, stale or missing
load is caught. Blocks a load targets are scrambled first, so a load that did nothing fails.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import ForwardContext
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvbm.connector.planner import first_in_window, group_hash
from kvbm.hashing import SequenceHasher, salt_hash
from kvbm.ipc.stats import LeaderStats
from kvbm.testing.sim.oracle import Oracle, mix64
from kvbm.vllm_integration.connector.worker_side import distinct_tensors
from kvbm.worker.layout import EngineKV

MODULE_PATH = "kvbm.vllm_integration.connector"

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 32000, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}


# A DeepSeek-V2 shape (MLA: model_config.use_mla; a 32 + 8 = 40-element latent per token and layer).
TINY_DEEPSEEK = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
    "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": None,
    "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32000,
    "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "first_k_dense_replace": 2, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "torch_dtype": "float16",
}
MLA_LATENT = 40


def write_model_dir(path: str, mla: bool = False) -> str:
    """A model directory with only a config.json: enough for ModelConfig, no weights."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_DEEPSEEK if mla else TINY_LLAMA, f)
    return path


@dataclass
class EngineSpec:
    """One engine's shape. ``connector`` None runs vLLM without a KV connector."""

    model_dir: str
    engine_id: str
    block_size: int = 16
    num_blocks: int = 64
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 128
    max_model_len: int = 4096
    async_scheduling: bool = False
    layout: str = "kv_first"  # or "block_first", or "mla" (model_dir must be an MLA model: TINY_DEEPSEEK)
    connector: str | None = "DynamoConnector"
    module_path: str | None = MODULE_PATH
    extra: dict[str, Any] = field(default_factory=dict)
    kv_events: bool = False
    load_failure_policy: Literal["recompute", "fail"] = "recompute"
    # KV geometry of one rank (the scheduler only sees block counts; the workers' tensors use it)
    num_layers: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    # A hybrid model (vLLM's hybrid KV cache manager): a second KV cache group of ``num_layers``
    # layers next to the full-attention one, "sliding" (``sliding_window`` tokens) or "mamba"
    # (SSM state); the groups' layer i share KV tensor i, as vLLM lays them out.
    hybrid: Literal["sliding", "mamba"] | None = None
    sliding_window: int = 40


def make_vllm_config(spec: EngineSpec, extra: dict[str, Any] | None = None) -> VllmConfig:
    model = ModelConfig(model=spec.model_dir, dtype="float16", seed=42, skip_tokenizer_init=True,
                        max_model_len=spec.max_model_len)
    sched = SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                            max_model_len=spec.max_model_len, enable_chunked_prefill=True,
                            is_encoder_decoder=False, async_scheduling=spec.async_scheduling)
    cache = CacheConfig(block_size=spec.block_size, enable_prefix_caching=True)
    kvt = None
    if spec.connector is not None:
        kvt = KVTransferConfig(kv_connector=spec.connector, kv_role="kv_both", engine_id=spec.engine_id,
                               kv_connector_module_path=spec.module_path,
                               kv_connector_extra_config={**spec.extra, **(extra or {})},
                               kv_load_failure_policy=spec.load_failure_policy)
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="null") if spec.kv_events else None
    vc = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache, kv_transfer_config=kvt,
                    device_config=DeviceConfig("cpu"), kv_events_config=events)
    vc.cache_config.num_gpu_blocks = spec.num_blocks
    return vc


def make_kv_cache_config(spec: EngineSpec) -> KVCacheConfig:
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(spec.num_layers)]
    attn = (MLAAttentionSpec(block_size=spec.block_size, num_kv_heads=1, head_size=MLA_LATENT, dtype=torch.float16)
            if spec.layout == "mla" else
            FullAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.kv_heads, head_size=spec.head_dim,
                              dtype=torch.float16))
    groups = [KVCacheGroupSpec(layers, attn)]
    other = [f"model.layers.{spec.num_layers + i}.mixer" for i in range(spec.num_layers)]
    if spec.hybrid == "sliding":
        groups.append(KVCacheGroupSpec(other, SlidingWindowSpec(
            block_size=spec.block_size, num_kv_heads=spec.kv_heads, head_size=spec.head_dim, dtype=torch.float16,
            sliding_window=spec.sliding_window)))
    elif spec.hybrid == "mamba":
        # One state per block (prefix-cacheable "align" mode), padded to an attention page as
        # vLLM pads every group to one page size.
        groups.append(KVCacheGroupSpec(other, MambaSpec(
            block_size=spec.block_size, shapes=((spec.kv_heads, spec.head_dim),), dtypes=(torch.float16,),
            page_size_padded=attn.page_size_bytes, mamba_cache_mode="align")))
    return KVCacheConfig(num_blocks=spec.num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def make_tensors(spec: EngineSpec) -> dict[str, torch.Tensor]:
    """Every layer's KV tensor; a hybrid model's second group views the first group's tensors."""
    inner = (spec.block_size, spec.kv_heads, spec.head_dim)
    shape: tuple[int, ...] = (2, spec.num_blocks) + inner if spec.layout == "kv_first" else (spec.num_blocks, 2) + inner
    if spec.layout == "mla":  # vLLM's MLA backends: [num_blocks, block_size, latent] per layer
        shape = (spec.num_blocks, spec.block_size, MLA_LATENT)
    groups = make_kv_cache_config(spec).kv_cache_groups
    out = {name: torch.zeros(shape, dtype=torch.float16) for name in groups[0].layer_names}
    for g in groups[1:]:
        out.update({name: t for name, t in zip(g.layer_names, list(out.values()))})
    return out


# -- workers ------------------------------------------------------------------------------

@dataclass
class StepWork:
    """One step for every rank: the connector metadata plus the simulated forward pass."""

    meta: Any
    finished_req_ids: set[str]
    fills: list[tuple[int, int]]  # (engine block, seq hash) written by this step's forward pass
    checks: list[tuple[int, int]]  # (engine block, seq hash) the forward pass will read


@dataclass
class StepResult:
    output: KVConnectorOutput
    mismatches: list[tuple[int, int]]


class RankWorker:
    """A worker-role connector with CPU torch KV tensors and the oracle for its rank."""

    def __init__(self, spec: EngineSpec, rank: int = 0, world: int = 1) -> None:
        extra = {"kvbm_rank": rank, "kvbm_world_size": world} if world > 1 else {}
        self.spec = spec
        self.rank = rank
        vc = make_vllm_config(spec, extra)
        self.connector = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.WORKER,
                                                             kv_cache_config=make_kv_cache_config(spec))
        self.tensors = make_tensors(spec)
        kv = EngineKV.from_layers(distinct_tensors(self.tensors), num_blocks=spec.num_blocks)
        self.connector.register_kv_caches(self.tensors)
        # MLA: the same latent KV on every rank; KV heads the rank registered: each head's bytes,
        # whichever rank (at whichever TP size) holds it.
        worker = getattr(self.connector, "worker", None)  # a DynamoConnector's worker role
        agent = worker.agent if worker is not None else None
        self.oracle = Oracle(kv, 0 if spec.layout == "mla" else rank, heads=agent.ident.heads if agent else None)

    def step(self, work: StepWork) -> StepResult:
        c = self.connector
        c.handle_preemptions(work.meta)
        c.bind_connector_metadata(work.meta)
        for op in getattr(work.meta, "loads", ()):
            for b in op.blocks + op.failed_blocks:
                self.oracle.scramble(b)  # a load that does nothing must not pass the checks
        c.start_load_kv(ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={}))
        bad = [(b, h) for b, h in work.checks if not self.oracle.check(b, h)]
        for b, h in work.fills:
            self.oracle.fill(b, h)
        c.wait_for_save()
        res = c.get_transfer_results(work.finished_req_ids)  # as vLLM's model runner asks
        out = KVConnectorOutput(finished_sending=res.finished_sending or None,
                                finished_recving=res.finished_recving or None, failed_recving=res.failed_recving,
                                invalid_block_ids=c.get_block_ids_with_load_errors(),
                                kv_connector_stats=c.get_kv_connector_stats(),
                                kv_connector_worker_meta=c.build_connector_worker_meta())
        c.clear_connector_metadata()
        return StepResult(out, bad)

    def close(self) -> None:
        self.connector.shutdown()


def _rank_main(pipe: Any, spec: EngineSpec, rank: int, world: int) -> None:
    worker = RankWorker(spec, rank, world)
    pipe.send(("ready", os.getpid()))
    try:
        while True:
            work = pipe.recv()
            if work is None:
                break
            pipe.send(worker.step(work))
    finally:
        worker.close()
        pipe.send(("closed", None))
    # Everything is closed: skip the interpreter's teardown, whose final garbage collection
    # over vLLM's and torch's objects took 20-30 s per rank process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ProcWorker:
    """A RankWorker in its own process (a TP rank of a multi-GPU engine)."""

    def __init__(self, spec: EngineSpec, rank: int, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_rank_main, args=(child, spec, rank, world), daemon=True)
        self.proc.start()
        child.close()  # the child has its copy: if it dies, our end sees EOF instead of waiting
        self.rank = rank
        self._closing = False

    def wait_started(self, timeout_s: float = 120.0) -> int:
        if not self.pipe.poll(timeout_s):
            raise RuntimeError(f"rank {self.rank} process did not start")
        tag, pid = self.pipe.recv()
        assert tag == "ready"
        return int(pid)

    def send(self, work: StepWork) -> None:
        self.pipe.send(work)

    def recv(self) -> StepResult:
        if not self.pipe.poll(120):
            raise RuntimeError(f"rank {self.rank} did not answer")
        return self.pipe.recv()

    def request_close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self.pipe.send(None)
        except OSError:
            pass

    def close(self) -> None:
        self.request_close()
        try:
            if self.pipe.poll(30):
                self.pipe.recv()
        except (EOFError, OSError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# -- the engine ---------------------------------------------------------------------------

def gen_token(req_id: str, pos: int) -> int:
    """The token a request samples at ``pos``: deterministic, so every process agrees."""
    return 1000 + (zlib.crc32(f"{req_id}:{pos}".encode()) % 30000)


@dataclass
class _ReqInfo:
    prompt: list[int]
    hasher: SequenceHasher
    hashes: list[int] = field(default_factory=list)


@dataclass
class RunStats:
    steps: int = 0
    idle_steps: int = 0  # steps whose connector metadata says no token was scheduled
    external_hit_tokens: int = 0
    local_hit_tokens: int = 0
    checked_blocks: int = 0
    prompt_tokens: int = 0
    mismatches: int = 0
    preemptions: int = 0
    mismatch_details: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)  # (step, blocks)
    schedule_seconds: list[float] = field(default_factory=list)
    kv_stats: dict[str, int] = field(default_factory=dict)  # worker side, summed over ranks
    sched_kv_stats: dict[str, int] = field(default_factory=dict)  # as vLLM's scheduler stats report them


class Engine:
    """vLLM's scheduler + ``tp`` worker-role connectors, started and stepped like EngineCore does.

    Start-up is vLLM's order: every worker creates its connector and registers its KV caches,
    then the scheduler is built, whose connector waits until kvbm is ready (or raises
    ``KvbmNotReady``, and the engine is closed again). ``ranks``: the TP ranks whose workers
    start (default all); a rank left out never registers, like a worker that died at start.
    """

    def __init__(self, spec: EngineSpec, *, tp: int = 1, ranks: Sequence[int] | None = None,
                 proc_workers: bool = False, worker_factory: Callable[[EngineSpec], Any] | None = None) -> None:
        init_none_hash(sha256)
        self.spec = spec
        self.bs = spec.block_size
        self.tp = tp
        self.stats = RunStats()
        self.infos: dict[str, _ReqInfo] = {}
        self.workers: list[Any] = []
        self.proc_workers = proc_workers or tp > 1
        self.worker_pids: list[int] = []
        self._pending: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        self._agg = KVOutputAggregator(expected_finished_count=tp)
        self.scheduler: Scheduler | None = None
        self._make_workers(list(range(tp)) if ranks is None else list(ranks), worker_factory)
        try:
            self._make_scheduler()
        except BaseException:
            self.close()
            raise

    def _make_workers(self, ranks: list[int], factory: Callable[[EngineSpec], Any] | None) -> None:
        if factory is not None:
            self.workers = [factory(self.spec)]
            return
        if self.spec.connector is None:
            return
        if self.proc_workers:
            self.workers = [ProcWorker(self.spec, r, self.tp) for r in ranks]
            self.worker_pids = [p.wait_started() for p in self.workers]
        else:
            self.workers = [RankWorker(self.spec, r, self.tp) for r in ranks]

    def _make_scheduler(self) -> None:
        vc = make_vllm_config(self.spec, {"kvbm_world_size": self.tp} if self.tp > 1 else None)
        cls = AsyncScheduler if self.spec.async_scheduling else Scheduler
        self.scheduler = cls(vllm_config=vc, kv_cache_config=make_kv_cache_config(self.spec),
                             structured_output_manager=StructuredOutputManager(vc),
                             block_size=self.bs, log_stats=True)

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None
        return self.scheduler

    @property
    def kvbm(self) -> Any:
        """The scheduler-side KvbmScheduler of the connector."""
        return self.sched.connector.scheduler  # type: ignore[union-attr]

    # -- requests ------------------------------------------------------------------------
    def add(self, req_id: str, prompt: list[int], max_tokens: int = 4, cache_salt: str | None = None) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(req_id, list(prompt), params, None, cache_salt=cache_salt,
                      block_hasher=get_request_block_hasher(self.bs, sha256))
        self.infos[req_id] = _ReqInfo(list(prompt), SequenceHasher(self.bs, salt_hash(cache_salt, None)))
        self.stats.prompt_tokens += len(prompt)
        self.sched.add_request(req)

    def tokens(self, req_id: str) -> list[int]:
        """Every token the request holds now (prompt + outputs)."""
        return list(self.sched.requests[req_id].all_token_ids)

    def _hash(self, req_id: str, i: int) -> int:
        info = self.infos[req_id]
        while len(info.hashes) <= i:
            n = len(info.hashes)
            toks = [info.prompt[p] if p < len(info.prompt) else gen_token(req_id, p)
                    for p in range(n * self.bs, (n + 1) * self.bs)]
            info.hashes += info.hasher.extend(toks)
        return info.hashes[i]

    # -- stepping ------------------------------------------------------------------------
    def _work(self, so: SchedulerOutput) -> StepWork:
        fills: list[tuple[int, int]] = []
        checks: list[tuple[int, int]] = []
        rows = [(nr.req_id, nr.num_computed_tokens, True) for nr in so.scheduled_new_reqs]
        c = so.scheduled_cached_reqs
        rows += [(rid, c.num_computed_tokens[i], rid in c.resumed_req_ids) for i, rid in enumerate(c.req_ids)]
        bs = self.bs
        # Attention groups: (group, sliding window or None); the SSM group is not simulated.
        groups = [(0, None)] + ([(1, self.spec.sliding_window)] if self.spec.hybrid == "sliding" else [])
        for rid, a, admitted in rows:
            b = a + so.num_scheduled_tokens[rid]
            for g, window in groups:
                blocks = self.sched.kv_cache_manager.get_block_ids(rid)[g]
                if admitted:  # the blocks the forward pass reads: a sliding window's only
                    checks += [(blocks[i], group_hash(self._hash(rid, i), g))
                               for i in range(first_in_window(a // bs, window, bs), a // bs)]
                for i in range(a // bs, -(-b // bs)):
                    full = (i + 1) * bs <= b
                    h = group_hash(self._hash(rid, i), g) if full else mix64(zlib.crc32(f"{rid}:{g}:{i}:{b}".encode()))
                    fills.append((blocks[i], h))
        # A request may hit (in vLLM's prefix cache) blocks another request of the same batch
        # computes in this very forward pass; those are written before they are read.
        written = {blk for blk, _ in fills}
        checks = [(blk, h) for blk, h in checks if blk not in written]
        self.stats.checked_blocks += len(checks)
        self.stats.idle_steps += bool(getattr(so.kv_connector_metadata, "idle", False))
        return StepWork(so.kv_connector_metadata, set(so.finished_req_ids), fills, checks)

    def step(self) -> None:
        t0 = time.perf_counter()
        so = self.sched.schedule()
        self.stats.schedule_seconds.append(time.perf_counter() - t0)
        self.stats.steps += 1
        self.stats.preemptions += len(so.preempted_req_ids or ())
        work = self._work(so)
        results: list[StepResult] = []
        if self.proc_workers:
            for w in self.workers:
                w.send(work)
            results = [w.recv() for w in self.workers]
        else:
            results = [w.step(work) for w in self.workers]
        for r in results:
            self.stats.mismatches += len(r.mismatches)
            if r.mismatches:
                self.stats.mismatch_details.append((self.stats.steps, r.mismatches))
            st = r.output.kv_connector_stats
            if st is not None:
                for k, v in st.data.items():
                    self.stats.kv_stats[k] = self.stats.kv_stats.get(k, 0) + v
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.sched.requests[rid]
            sampled.append([] if req.is_prefill_chunk else [gen_token(rid, req.num_computed_tokens)])
        index = {r: i for i, r in enumerate(req_ids)}
        outs: list[ModelRunnerOutput | None] = [
            ModelRunnerOutput(req_ids=req_ids, req_id_to_index=index, sampled_token_ids=sampled,
                              kv_connector_output=r.output) for r in results]
        if results:
            mro = self._agg.aggregate(outs)  # as vLLM merges its workers' outputs
        else:
            mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index=index, sampled_token_ids=sampled)
        assert mro is not None
        self._pending.append((so, mro))
        if not self.spec.async_scheduling or len(self._pending) > 1:
            self._update(*self._pending.popleft())
        if not so.total_num_scheduled_tokens:
            time.sleep(0.001)  # nothing to compute: let the copy threads run (a GPU step takes longer)

    def _update(self, so: SchedulerOutput, mro: ModelRunnerOutput) -> None:
        outputs = self.sched.update_from_output(so, mro)
        for eco in outputs.values():
            ss = eco.scheduler_stats
            if ss is not None and ss.connector_prefix_cache_stats is not None:
                cps = ss.connector_prefix_cache_stats
                self.stats.external_hit_tokens += cps.hits + cps.preempted_hits
            if ss is not None and ss.prefix_cache_stats is not None:
                self.stats.local_hit_tokens += ss.prefix_cache_stats.hits + ss.prefix_cache_stats.preempted_hits
            if ss is not None and ss.kv_connector_stats:
                for k, v in ss.kv_connector_stats.items():
                    if isinstance(v, int):
                        self.stats.sched_kv_stats[k] = self.stats.sched_kv_stats.get(k, 0) + v

    def busy(self) -> bool:
        """Requests or block frees left (applies a late async-mode update once idle)."""
        while self._pending and not self.sched.has_requests():
            self._update(*self._pending.popleft())
        return self.sched.has_requests()

    def run(self, timeout_s: float = 120.0) -> None:
        """Step until every request finished and every block is back."""
        deadline = time.monotonic() + timeout_s
        while self.busy():
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout_s:g} s: {list(self.sched.requests)}")
            self.step()

    def run_chats(self, *, conversations: int, turns: int, system: int = 96, turn_len: int = 40,
                  max_tokens: int = 16, num_systems: int = 3, seed: int = 0,
                  on_step: Callable[["Engine"], None] | None = None, timeout_s: float = 300.0) -> None:
        """Multi-turn chats until all finished: each turn's prompt is the whole conversation so far
        (prompts and outputs), and conversations share ``num_systems`` system prompts."""
        rng = random.Random(seed)
        systems = [[rng.randrange(1, 30000) for _ in range(system)] for _ in range(num_systems)]
        convs: list[dict[str, Any]] = [{"tokens": list(systems[i % num_systems]), "turn": 0, "live": None}
                                       for i in range(conversations)]
        deadline = time.monotonic() + timeout_s
        while True:
            for ci, c in enumerate(convs):
                rid = c["live"]
                if rid is not None and rid not in self.sched.requests:
                    n = len(c["tokens"])  # finished: its outputs join the conversation
                    c["tokens"] += [gen_token(rid, p) for p in range(n, n + max_tokens)]
                    c["live"] = None
                if c["live"] is None and c["turn"] < turns:
                    c["tokens"] += [rng.randrange(1, 30000) for _ in range(turn_len)]
                    new_id = f"s{seed}c{ci}t{c['turn']}"
                    c["live"], c["turn"] = new_id, c["turn"] + 1
                    self.add(new_id, c["tokens"], max_tokens=max_tokens)
            if not self.busy():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"chats not finished within {timeout_s:g} s")
            self.step()
            if on_step is not None:
                on_step(self)

    def step_until(self, cond: Any, timeout_s: float = 30.0) -> None:
        """Step until ``cond()`` holds."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout_s:g} s")
            self.step()

    def assert_empty(self) -> None:
        """vLLM's leak check: no request left, every engine block free and unreferenced."""
        s = self.sched
        assert not s.requests, f"requests left: {list(s.requests)}"
        assert len(s.running) == 0 and len(s.waiting) == 0
        assert not s.finished_recving_kv_req_ids and not s.failed_recving_kv_req_ids
        pool = s.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, "engine blocks leaked"
        assert all(b.ref_cnt == 0 for b in pool.blocks[1:]), "engine block still referenced"

    def store_and_forget(self, req_id: str, prompt: list[int], max_tokens: int = 1) -> LeaderStats:
        """Serve one request to the end, wait until the leader committed its stores, and empty the
        engine's prefix cache: a later request with ``prompt`` can only hit in kvbm. The leader's stats."""
        self.add(req_id, prompt, max_tokens=max_tokens)
        self.run()
        stats = self.quiesce()
        assert self.sched.reset_prefix_cache(), "the engine still holds blocks: its prefix cache was not reset"
        return stats

    def quiesce(self, timeout_s: float = 20.0) -> LeaderStats:
        """Wait until the leader applied every rank's ack and finished its disk and object writes;
        returns its stats."""
        return self.kvbm.client.wait_idle(timeout_s)

    def close(self) -> None:
        if self.scheduler is not None and self.scheduler.connector is not None:
            self.scheduler.connector.shutdown()
        for w in self.workers:
            if isinstance(w, ProcWorker):
                w.request_close()  # all ranks shut down at once
        for w in self.workers:
            w.close()
        self.workers = []
