"""``kvbm demo``: its flags, and the dispatch to the simulated engine (:mod:`kvbm.demo.sim`) or
to a real vLLM engine on CPU (:mod:`kvbm.demo.vllm`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kvbm.demo import sim, vllm

MAX_RANKS = 64  # one process each


def _int_in_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]; the error names the value and the range."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: {accepted}")
        return value

    return parse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``kvbm demo`` and its flags to the ``kvbm`` command."""
    p = subparsers.add_parser("demo", help="run a simulated engine with kvbm (no GPU needed)",
                              description=sim.__doc__)
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim",
                   help="sim (default): the simulated engine; vllm: a real vLLM engine on CPU (kvbm.demo.vllm)")
    p.add_argument("--model", choices=("tiny", "small"), default="tiny",
                   help="--engine vllm: the seeded random-weight test model, default tiny")
    p.add_argument("--ranks", type=_int_in_range(1, MAX_RANKS), default=2,
                   help=f"tensor-parallel ranks (processes), 1 to {MAX_RANKS}, default 2")
    p.add_argument("--conversations", type=_int_in_range(1), default=None,
                   help="chats, their turns interleaved, default 48 (vllm: 4)")
    p.add_argument("--turns", type=_int_in_range(1), default=None, help="turns per chat, default 6 (vllm: 4)")
    p.add_argument("--gpu-blocks", type=_int_in_range(1), default=96,
                   help="engine (G1) blocks per rank, default 96; must hold the longest conversation")
    p.add_argument("--cpu-blocks", type=_int_in_range(0), default=None,
                   help="host pool (G2) blocks; default 400 unless DYN_KVBM_CPU_CACHE_* is set; 0 = off")
    p.add_argument("--disk-blocks", type=_int_in_range(0), default=None,
                   help="disk tier (G3) blocks; default 3000 unless DYN_KVBM_DISK_CACHE_* is set; 0 = off")
    p.add_argument("--object-store", choices=("env", "local"), default="env",
                   help="object tier (G4): env (default) as DYN_KVBM_OBJECT_* configure it; local: start an S3 "
                        "server on 127.0.0.1 (moto, pip install 'moto[server]') and put every block there")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the chat workload and of the KV oracle, default 0; the same seed gives "
                        "the same figures on every run (all but the times and rates)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The handler of ``kvbm demo``: the exit status of the engine's demo."""
    if args.engine == "vllm" and args.object_store == "local":
        print("kvbm demo: error: --object-store local runs with --engine sim only (the vLLM CPU venv has no "
              "boto3); for --engine vllm set DYN_KVBM_OBJECT_* and pip install boto3 in that venv", file=sys.stderr)
        return 2
    return vllm.run(args) if args.engine == "vllm" else sim.run(args)
