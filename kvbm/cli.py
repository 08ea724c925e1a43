"""The ``kvbm`` command: ``kvbm --version``, ``kvbm config`` and the subcommands
listed in :data:`COMMANDS`.

Adding a subcommand: write ``register(subparsers)`` in a light module (heavy
imports go inside the handler), have it call ``subparsers.add_parser(...)``
and ``set_defaults(handler=fn)`` where ``fn(args) -> int`` returns the exit
status, then add ``"module:function"`` to :data:`COMMANDS`. A
:class:`~kvbm.config.ConfigError` raised by any handler is printed as
``kvbm: error: <message>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeAlias

from kvbm import __version__
from kvbm.config import ConfigError, load_config, markdown_table

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]

# Registrars of the subcommands, "module:function", in help order.
COMMANDS: tuple[str, ...] = (
    "kvbm.cli:register_config",
    "kvbm.leader.process:register",
    "kvbm.leader.consolidator:register",
    "kvbm.demo.dispatch:register",
    "kvbm.bench.report:register",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="kvbm",
        description="KV-cache block manager for LLM inference engines "
        "(configured by DYN_KVBM_* environment variables).",
    )
    parser.add_argument("--version", action="version", version=f"kvbm {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for spec in COMMANDS:
        module_name, _, func_name = spec.partition(":")
        register: Callable[[Subparsers], None] = getattr(
            importlib.import_module(module_name), func_name
        )
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvbm`` command; returns the exit status."""
    # Warnings (e.g. unknown DYN_KVBM_* variables) go to stderr, prefixed.
    logging.basicConfig(format="kvbm: %(levelname)s: %(message)s", level=logging.WARNING)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"kvbm: error: {exc}", file=sys.stderr)
        return 2


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces (first row = header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


# -- kvbm config -----------------------------------------------------------


def register_config(subparsers: Subparsers) -> None:
    """``kvbm config``: the effective configuration and where each value came from."""
    parser = subparsers.add_parser(
        "config",
        help="print the effective configuration and where each value came from",
        description="Print every DYN_KVBM_* setting, its effective value and its source "
        "(env VARIABLE, default). Exits 2 on an invalid value.",
    )
    parser.add_argument(
        "--markdown", action="store_true",
        help="print the table of variables (default, meaning) as Markdown instead",
    )
    parser.set_defaults(handler=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    cfg = load_config(require_tier=False)
    print(format_table([("VARIABLE", "VALUE", "SOURCE"), *cfg.describe()]))
    try:
        cfg.require_tier()
    except ConfigError as exc:
        print(f"note: {exc}")
    return 0
