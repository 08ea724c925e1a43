"""The pools' sizes for a block size, and their check against the machine before anything is allocated.

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


def pool_blocks(config: KvbmConfig, block_bytes: int) -> tuple[int, int]:
    """(host, disk) pool sizes in blocks of ``block_bytes``; ValueError if the cache holds none."""
    host_blocks = config.host_blocks(block_bytes)
    disk_blocks = config.disk_blocks(block_bytes) if config.has_disk_tier else 0
    if host_blocks > 0:
        return host_blocks, disk_blocks
    if disk_blocks <= 0:
        raise ValueError(f"the configured cache holds no block of {block_bytes} bytes; raise DYN_KVBM_CPU_CACHE_GB "
                         "or DYN_KVBM_DISK_CACHE_GB")
    return config.disk_bounce_blocks, disk_blocks  # disk-only: a small bounce pool for staging
