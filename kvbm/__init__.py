"""kvbm: a KV-cache block manager for LLM inference engines.

Keeps the KV blocks an engine computed in a pinned host pool in POSIX shared
memory (G2) and on local disk (G3), and loads them back when a later request
shares the prefix. Importing this package is cheap: engines, torch, CuPy and
NIXL are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
