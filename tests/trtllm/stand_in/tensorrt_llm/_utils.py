"""Mirrors the MPI helpers of tensorrt_llm/_utils.py, NVIDIA/TensorRT-LLM @ 5a06f334f04fb515ff79f73b7f0f7726ad757361:
``mpi_comm``, ``mpi_rank``, ``global_mpi_size``, ``mpi_broadcast`` (``bcast`` of a pickled object
from ``root``, the object itself in a one-rank session) and ``mpi_allgather``.

TensorRT-LLM always links MPI; the stand-in initialises it (mpi4py) only in processes an MPI
launcher started, so the single-process tests stay MPI-free.
"""

from __future__ import annotations

import os
from typing import Any


def _launched_by_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMIX_RANK" in os.environ


def mpi_comm() -> Any:
    """The engine's communicator (COMM_WORLD: the stand-in has no MPI session splitting)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def mpi_rank() -> int:
    return int(mpi_comm().Get_rank()) if _launched_by_mpi() else 0


def global_mpi_size() -> int:
    return int(mpi_comm().Get_size()) if _launched_by_mpi() else 1


def mpi_broadcast(obj: Any, root: int = 0) -> Any:
    return mpi_comm().bcast(obj, root) if global_mpi_size() > 1 else obj


def mpi_allgather(obj: Any) -> list[Any]:
    return list(mpi_comm().allgather(obj)) if global_mpi_size() > 1 else [obj]
