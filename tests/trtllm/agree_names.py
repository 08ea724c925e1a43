"""Every rank's instance name through each group kvbm's TensorRT-LLM connector can agree over,
started by ``mpirun -n 2 python -m mpi4py agree_names.py RUN_DIR RESULT_JSON`` (see
test_trtllm_mpi.py). Each rank writes ``RESULT_JSON.<rank>``: the names it got, by group."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "stand_in"))

from tensorrt_llm._utils import mpi_broadcast, mpi_rank  # noqa: E402
from trt_executor import llm_args  # noqa: E402

from kvbm.config import load_config  # noqa: E402
from kvbm.trtllm_integration.connector.settings import agree_instance_name  # noqa: E402


def hidden(*modules: str) -> dict[str, Any]:
    """Make ``modules`` unavailable (an import raises, a lookup finds None); returns the saved."""
    saved = {m: sys.modules.get(m) for m in modules}
    for m in modules:
        sys.modules[m] = None  # type: ignore[assignment]
    return saved


def restore(saved: dict[str, Any]) -> None:
    for m, mod in saved.items():
        if mod is None:
            sys.modules.pop(m, None)
        else:
            sys.modules[m] = mod


def main() -> None:
    run_dir, result = sys.argv[1], sys.argv[2]
    rank = mpi_rank()
    env = {"DYN_KVBM_RUN_DIR": run_dir, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16"}
    config = load_config(env)
    out: dict[str, Any] = {"pid": os.getpid()}

    # TensorRT-LLM's own mpi_broadcast; rank 0's two roles share one engine's llm_args and one
    # collective (rank 1 asks once, as it builds a worker only).
    engine = llm_args(16, 2, rank)
    out["trtllm"] = agree_instance_name(engine, config)
    out["trtllm_again"] = agree_instance_name(engine, config) if rank == 0 else out["trtllm"]
    out["trtllm_next_engine"] = agree_instance_name(llm_args(16, 2, rank), config)

    saved = hidden("tensorrt_llm._utils")
    out["mpi4py"] = agree_instance_name(llm_args(16, 2, rank), config)

    import torch.distributed as dist

    saved.update(hidden("mpi4py.MPI"))
    dist.init_process_group("gloo", init_method=f"file://{run_dir}/torch-store", rank=rank, world_size=2)
    try:
        out["torch"] = agree_instance_name(llm_args(16, 2, rank), config)
    finally:
        dist.destroy_process_group()
        restore(saved)

    endpoint = f"ipc://{run_dir}/given.sock"
    out["endpoint"] = agree_instance_name(llm_args(16, 2, rank), load_config(dict(env, DYN_KVBM_LEADER_ENDPOINT=endpoint)))
    mpi_broadcast(None, root=0)  # the collectives above all matched: this one still pairs up
    with open(f"{result}.{rank}", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
