"""A simulated TP rank process: an engine KV cache in vLLM's layout plus the engine-neutral worker side
(:class:`kvbm.connector.worker.WorkerOps`, a real rank agent underneath).

Driven by the simulated scheduler (kvbm.testing.sim.engine) over a private ZMQ socket with batched
step commands; the rank fills computed blocks from the oracle, runs loads and stores through
its agent (real shared memory, real acks to the leader) and checks every loaded byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import msgpack
import numpy as np
import zmq

from kvbm.config import KvbmConfig
from kvbm.connector.ops import LoadOp, StoreOp
from kvbm.connector.worker import LoadDone, StoreDone, WorkerOps
from kvbm.ipc.block_format import HeadSplit, kv_head_range
from kvbm.testing.sim.oracle import Oracle
from kvbm.worker.agent import RankIdentity
from kvbm.worker.layout import EngineKV, page_aligned_empty

log = logging.getLogger("kvbm.testing.sim.rank")


@dataclass(frozen=True)
class SimModel:
    """Shape of the simulated model's KV cache (per rank)."""

    num_layers: int = 4
    kv_heads: int = 2  # per rank
    head_dim: int = 64
    block_size: int = 16
    num_gpu_blocks: int = 64
    dtype: str = "float16"
    layout: str = "kv_first"  # or "block_first"
    # MLA: one latent vector of head_dim per token ([num_blocks, block_size, head_dim], kv_heads
    # unused), the same on every rank; the ranks register it as replicated.
    mla: bool = False
    # The model's KV heads, split over the ranks as the engines split them (kv_head_range; each
    # rank's kv_heads is then its share) and registered by head: the TP-independent heads
    # format. 0: every rank holds kv_heads heads of its own, in a slice of its own.
    model_kv_heads: int = 0

    def for_rank(self, world: int, rank: int) -> "SimModel":
        """The shape of ``rank``'s KV cache in a world of ``world`` ranks."""
        if not self.model_kv_heads:
            return self
        return dataclasses.replace(self, kv_heads=kv_head_range(self.model_kv_heads, world, rank)[1])

    def head_split(self, world: int, rank: int) -> HeadSplit | None:
        """The heads ``rank`` registers (None: a slice of its own, or MLA's replicated latent)."""
        if not self.model_kv_heads or self.mla:
            return None
        first, count = kv_head_range(self.model_kv_heads, world, rank)
        return HeadSplit(self.model_kv_heads, first, count, self.head_dim * np.dtype(self.dtype).itemsize)

    def tensor_shape(self) -> tuple[int, ...]:
        if self.mla:
            return (self.num_gpu_blocks, self.block_size, self.head_dim)
        inner = (self.block_size, self.kv_heads, self.head_dim)
        if self.layout == "kv_first":
            return (2, self.num_gpu_blocks) + inner
        return (self.num_gpu_blocks, 2) + inner

    @property
    def slice_bytes(self) -> int:
        per_token = self.head_dim if self.mla else 2 * self.kv_heads * self.head_dim
        return self.num_layers * self.block_size * per_token * np.dtype(self.dtype).itemsize


def make_kv(model: SimModel) -> tuple[list[np.ndarray], EngineKV]:
    # Page-aligned like the host pool's slots: NumPy's default offset makes loads ~3x slower (4K aliasing).
    tensors = [page_aligned_empty(model.tensor_shape(), model.dtype) for _ in range(model.num_layers)]
    for t in tensors:
        t.fill(0)
    return tensors, EngineKV.from_layers(tensors, num_blocks=model.num_gpu_blocks)


def _wait(ops: WorkerOps, in_flight: Callable[[], int], timeout_s: float) -> dict[int, bool]:
    """op id -> ok of the ops that finished before ``in_flight()`` dropped to 0 or the timeout."""
    done: dict[int, bool] = {}

    def collect(finished: list[LoadDone | StoreDone]) -> None:
        done.update((f.op.op_id, f.ok) for f in finished)

    ops.wait(lambda: not in_flight(), collect, timeout_s=timeout_s, warn_every_s=timeout_s, what="copies")
    return done


def serve(control: str, leader: str, rank: int, world: int, model: SimModel, fingerprint: str,
          init_timeout_s: float, seed: int, block_format: str = "auto") -> int:
    heads = model.head_split(world, rank)
    _tensors, kv = make_kv(model.for_rank(world, rank))
    # MLA: every rank computes the same latent KV, so every rank's oracle is rank 0's; heads
    # split over the ranks: each head's bytes are the same whichever rank (and TP size) holds it.
    oracle = Oracle(kv, 0 if model.mla else rank, seed, heads)
    # The engine-neutral worker side, as every engine adapter uses it (the view is made here
    # already: the oracle checks bytes through it).
    ops = WorkerOps(rank)
    ops.attach(kv, lambda _cls: kv, endpoint=leader,
               identity=RankIdentity(rank, world, model.block_size, fingerprint, model.mla, heads),
               config=dataclasses.replace(KvbmConfig(), init_timeout_s=init_timeout_s, block_format=block_format),
               what="the simulated KV")
    agent = ops.agent
    assert agent is not None
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(control)
    sock.send(msgpack.packb({"cmd": "hello", "rank": rank, "pid": os.getpid()}))
    parent = os.getppid()
    try:
        while True:
            while not sock.poll(1000):
                if os.getppid() != parent:
                    return 1  # the simulated scheduler died: do not linger
            req = msgpack.unpackb(sock.recv())
            cmd = req["cmd"]
            if cmd == "stop":
                sock.send(msgpack.packb({"ok": True}))
                return 0
            if cmd == "wait_ready":
                ok = agent.wait_ready(req["timeout"])
                sock.send(msgpack.packb({"ready": ok, "error": agent.error or ""}))
            elif cmd == "step":
                sock.send(msgpack.packb(asdict(run_step(ops, oracle, req))))
            else:
                sock.send(msgpack.packb({"error": f"unknown command {cmd}"}))
    finally:
        ops.shutdown()
        sock.close()


@dataclass
class StepResult:
    loaded_blocks: int = 0
    load_failures: list[int] | None = None  # op ids whose copy failed on this rank
    mismatches: int = 0  # loaded blocks whose bytes differ from the oracle
    stored_blocks: int = 0
    store_failures: list[int] | None = None
    load_seconds: float = 0.0
    store_seconds: float = 0.0


def run_step(ops: WorkerOps, oracle: Oracle, req: dict) -> StepResult:
    """Loads (then verify), compute, stores, in that order, like one engine step."""
    res = StepResult(load_failures=[], store_failures=[])
    loads = req.get("loads", [])  # [op_id, slots, blocks, hashes]
    for _op, _slots, blocks, _hashes in loads:
        for b in blocks:
            oracle.scramble(b)  # a load that silently does nothing must not pass
    t0 = time.perf_counter()
    for op_id, slots, blocks, _hashes in loads:
        ops.submit_load(LoadOp("", op_id, slots, blocks))
    done = _wait(ops, lambda: ops.loads_in_flight, 30.0)
    ops.forget_loads()  # any still running are failures of this step
    res.load_seconds = time.perf_counter() - t0
    for op_id, _slots, blocks, hashes in loads:
        if not done.get(op_id, False):
            res.load_failures.append(op_id)  # type: ignore[union-attr]
            continue
        res.loaded_blocks += len(blocks)
        res.mismatches += sum(not oracle.check(b, h) for b, h in zip(blocks, hashes))
    for block, seq_hash in req.get("compute", []):
        oracle.fill(block, seq_hash)
    stores = req.get("stores", [])  # [op_id, blocks, slots]
    t0 = time.perf_counter()
    for op_id, blocks, slots in stores:
        ops.submit_store(StoreOp("", op_id, blocks, slots))
    done = _wait(ops, lambda: ops.stores_in_flight, 30.0)
    ops.forget_stores()
    res.store_seconds = time.perf_counter() - t0
    for op_id, blocks, _slots in stores:
        if not done.get(op_id, False):
            res.store_failures.append(op_id)  # type: ignore[union-attr]
        else:
            res.stored_blocks += len(blocks)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbm.testing.sim.rank")
    p.add_argument("--control", required=True)
    p.add_argument("--leader", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--model", required=True, help="msgpack-hex SimModel fields")
    p.add_argument("--fingerprint", default="sim")
    p.add_argument("--init-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-format", default="auto", help="DYN_KVBM_BLOCK_FORMAT of the engine")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KVBM_SIM_LOG", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s rank{a.rank} %(levelname)s %(message)s")
    model = SimModel(**msgpack.unpackb(bytes.fromhex(a.model)))
    try:
        return serve(a.control, a.leader, a.rank, a.world, model, a.fingerprint, a.init_timeout, a.seed,
                     a.block_format)
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group: the scheduler reports it, the rank just exits.
        return 130


if __name__ == "__main__":
    sys.exit(main())
