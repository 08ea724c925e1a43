"""Capacity check of the configured cache against the machine, before anything is allocated.

A tier bigger than its storage (``DYN_KVBM_CPU_CACHE_GB`` beyond /dev/shm,
``DYN_KVBM_DISK_CACHE_GB`` beyond the disk) is refused with one line naming the variable, the
size asked for and the space there is, before the segment, the disk file or the registry's
per-block state exist.
"""

from __future__ import annotations

from kvbm.config import KvbmConfig
from kvbm.ipc.shm import check_host_pool_space


def check_cache_space(config: KvbmConfig, block_bytes: int) -> None:
    """Raise ShmError or DiskError (one line) if a configured tier cannot fit its storage."""
    check_host_pool_space(config.host_size(block_bytes))
    if config.has_disk_tier:
        from kvbm.leader.disk import check_disk_space  # disk machinery only when configured

        check_disk_space(config.disk_cache_dir, config.disk_size(block_bytes))
