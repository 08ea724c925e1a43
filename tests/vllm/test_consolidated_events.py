"""The consolidated KV-event stream with the real vLLM 0.33 scheduler: vLLM's own publisher (G1,
and kvbm's events the connector forwards) and the leader's (DYN_KVBM_KV_EVENTS_ENDPOINT) merged by
``kvbm consolidate`` into the one stream Dynamo's indexer process reads. A prompt stays placed
while the engine's prefix cache or kvbm holds it and goes once neither does."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import zmq

pytest.importorskip("vllm")
pytest.importorskip("dynamo.indexer", reason="Dynamo's indexer: pip install ai-dynamo-runtime==1.6.1")

from kvbm.leader.events import decode_batch  # noqa: E402
from kvbm.testing.indexer import Indexer  # noqa: E402
from kvbm.testing.support import free_port, random_prompts  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # a leader, a consolidator and an indexer process

VOCAB = 30_000


def _until(pred: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_prompt_is_placed_while_g1_or_kvbm_holds_it(make_engine, kvbm_env, tmp_path) -> None:
    from vllm.distributed.kv_events import ZmqEventPublisher

    engine_port, kvbm_port, out_port = free_port(), free_port(), free_port()
    kvbm_env(DYN_KVBM_KV_EVENTS_ENDPOINT=f"tcp://127.0.0.1:{kvbm_port}")
    eng = make_engine(kv_events=True)
    publisher = ZmqEventPublisher(0, endpoint=f"tcp://*:{engine_port}")  # vLLM binds only a wildcard address
    eng.sched.kv_event_publisher = publisher
    log = (tmp_path / "consolidate.log").open("wb")
    cons = subprocess.Popen([sys.executable, "-m", "kvbm", "consolidate", "--input", f"tcp://127.0.0.1:{engine_port}",
                             "--input", f"tcp://127.0.0.1:{kvbm_port}", "--publish", f"tcp://127.0.0.1:{out_port}",
                             "--block-size", "16"], stdout=log, stderr=subprocess.STDOUT)
    watch = zmq.Context.instance().socket(zmq.SUB)  # sees what vLLM publishes
    watch.setsockopt(zmq.SUBSCRIBE, b"")
    watch.connect(f"tcp://127.0.0.1:{engine_port}")
    try:
        time.sleep(1.0)  # the consolidator bound its output and subscribed
        with Indexer({"1": f"tcp://127.0.0.1:{out_port}"}, 16, tmp_path / "indexer.log") as idx:
            time.sleep(1.0)
            p = random_prompts(1, 64, seed=21, vocab=VOCAB)[0]

            def placed() -> int:
                return idx.matched(p).get("1", 0)

            def tick(seed: int) -> None:  # one more step: vLLM publishes the events the last one took
                eng.add(f"tick{seed}", random_prompts(1, 8, seed=seed, vocab=VOCAB)[0], max_tokens=1)
                eng.run()

            eng.add("a", p, max_tokens=1)
            eng.run()
            eng.quiesce()
            tick(22)
            assert _until(lambda: placed() == 64), idx.query(p)
            # The engine's prefix cache is emptied (vLLM: AllBlocksCleared, which names no tier);
            # kvbm still holds the prompt, so the consolidated stream keeps it.
            assert eng.sched.reset_prefix_cache()
            tick(23)
            assert _until(lambda: any(e["type"] == "AllBlocksCleared" for e in _drain(watch)))
            time.sleep(1.0)
            assert placed() == 64, idx.query(p)
            # Now kvbm drops it too: gone from every tier, gone from the router.
            assert eng.sched.reset_prefix_cache(reset_connector=True)
            tick(24)
            assert _until(lambda: placed() == 0), idx.query(p)
    finally:
        watch.close(0)
        publisher.shutdown()
        cons.terminate()
        cons.wait(10)
        log.close()
    assert eng.stats.mismatches == 0


def _drain(sock: zmq.Socket) -> list[dict]:
    """Events of the batches waiting on ``sock``."""
    out: list[dict] = []
    while sock.poll(0):
        out += decode_batch(sock.recv_multipart()[-1])[1]
    return out
