"""One rank of a TensorRT-LLM TP engine with kvbm's connector, started by ``mpirun`` (see
test_trtllm_mpi.py): ``mpirun -n TP python tp_engine.py SCENARIO RESULT_JSON``.

Every rank brings its connector up as TensorRT-LLM does (trt_executor.start_engine); rank 0
runs the executor loop and the scenario and writes what it saw to RESULT_JSON, the other ranks
follow rank 0's broadcasts. Scenarios:

* ``serve``: rank 1 is slow to register its pool; the first request right after start, then
  the same request again after the engine's own cache is dropped, then a batch with decodes,
  twice;
* ``serve_mla``: an MLA pool (kv_factor 1) on every rank: the first request, then the same
  request again after the engine's own cache is dropped; the leader's host block size;
* ``never_arrives``: the last rank joins the instance name's broadcast but never registers its
  pool (a rank stuck at start), so rank 0's start must fail with KvbmNotReady.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "stand_in"))

from tensorrt_llm._utils import global_mpi_size, mpi_broadcast, mpi_rank  # noqa: E402
from trt_executor import Executor, serve_rank, start_engine  # noqa: E402

from kvbm.connector.bootstrap import KvbmNotReady, owned_leader  # noqa: E402
from kvbm.testing.support import random_prompts  # noqa: E402

BLOCK = 16
VOCAB = 1000  # the stand-in executor's token ids
SLOW_RANK_S = 3.0


def serve(tp: int) -> dict[str, object]:
    ex = Executor(BLOCK, tp=tp, num_blocks=64)
    try:
        assert ex.scheduler.instance is not None and ex.scheduler.planner is not None
        out: dict[str, object] = {"ranks": ex.ranks.call("identity")}
        leader = owned_leader(ex.scheduler.instance.endpoint)
        out["leader_pid"] = leader.popen.pid if leader is not None and leader.popen is not None else None
        first = random_prompts(1, BLOCK * 3 + 2, seed=1, vocab=VOCAB, low=0)[0]
        ex.submit(first)
        t = ex.run()
        out["first"] = {"errors": list(t.errors), "external_tokens": t.external_tokens,
                        "counters": dataclasses.asdict(ex.scheduler.planner.take_counters())}
        ex.drop_engine_cache()
        ex.submit(first)
        t = ex.run()
        out["second"] = {"errors": list(t.errors), "external_tokens": t.external_tokens,
                         "counters": dataclasses.asdict(ex.scheduler.planner.take_counters())}
        batch = random_prompts(4, BLOCK * 3 + 2, seed=6, vocab=VOCAB, low=0)
        for p in batch:
            ex.submit(p, max_tokens=18)  # decodes fill and store another block
        ex.run()
        ex.drop_engine_cache()
        mark = ex.totals.external_tokens
        for p in batch:
            ex.submit(p)
        t = ex.run()
        out["batch"] = {"errors": list(t.errors), "external_tokens": t.external_tokens - mark}
        out["load_failures"] = ex.load_failures()
        return out
    finally:
        ex.close()


def serve_mla(tp: int) -> dict[str, object]:
    ex = Executor(BLOCK, tp=tp, num_blocks=64, kv_factor=1)
    try:
        assert ex.scheduler.planner is not None
        first = random_prompts(1, BLOCK * 3 + 2, seed=3, vocab=VOCAB, low=0)[0]
        ex.submit(first)
        t = ex.run()
        out: dict[str, object] = {"first_errors": list(t.errors)}
        ex.drop_engine_cache()
        ex.submit(first)
        t = ex.run()
        stats = ex.scheduler.planner.client.stats()
        assert stats is not None
        out.update(second_errors=list(t.errors), external_tokens=t.external_tokens, block_bytes=stats.block_bytes,
                   world_size=stats.world_size, load_failures=ex.load_failures(),
                   counters=dataclasses.asdict(ex.scheduler.planner.take_counters()))
        return out
    finally:
        ex.close()


def never_arrives(tp: int) -> dict[str, object]:
    t0 = time.monotonic()
    try:
        Executor(BLOCK, tp=tp)
    except KvbmNotReady as e:
        return {"error": str(e), "elapsed_s": time.monotonic() - t0}
    return {"error": None, "elapsed_s": time.monotonic() - t0}


def main() -> None:
    scenario, result_path = sys.argv[1], sys.argv[2]
    tp, rank = global_mpi_size(), mpi_rank()
    if rank == 0:
        out = {"serve": serve, "serve_mla": serve_mla, "never_arrives": never_arrives}[scenario](tp)
        out["pid"], out["pgid"] = os.getpid(), os.getpgrp()
        with open(result_path, "w") as f:
            json.dump(out, f)
        if scenario == "never_arrives":
            mpi_broadcast("done", root=0)  # lets the stuck rank exit
        return
    if scenario == "serve":
        # A slow rank: rank 0's first request comes right after its start, before this rank
        # registered, unless wait_for_initialization holds the engine back.
        host, _ = start_engine(BLOCK, tp, rank, 64, 0, register_after_s=SLOW_RANK_S)
        serve_rank(host)
        return
    if scenario == "serve_mla":
        host, _ = start_engine(BLOCK, tp, rank, 64, 0, kv_factor=1)
        serve_rank(host)
        return
    # A rank stuck at start: it built its worker (joining the name's broadcast) and never
    # registers its pool; it only waits to be let go once rank 0 gave up.
    from kvbm.trtllm_integration.connector import DynamoKVBMConnectorWorker
    from trt_executor import llm_args

    worker = DynamoKVBMConnectorWorker(llm_args(BLOCK, tp, rank))
    mpi_broadcast(None, root=0)
    worker.shutdown()


if __name__ == "__main__":
    main()
