"""Instance names made safe for the file-system names kvbm derives from them.

Its own module (no ZeroMQ, no shared memory) so the socket, segment, lock and log names all
use one rule and the shared-memory pool imports without pyzmq (the GPU check's machine has none).
"""

from __future__ import annotations


def safe_name(instance: str) -> str:
    """``instance`` with every character that is not safe in a file name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in instance)
