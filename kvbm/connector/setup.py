"""Errors shared by the engine adapters."""

from __future__ import annotations


class UnsupportedSetup(RuntimeError):
    """An engine configuration kvbm cannot serve; the message names the setting and its value.
    The adapter then serves without kvbm (or refuses to start, where the engine expects that)."""
