"""Sizes beyond the machine, absurd values and crash leftovers (hardening items 1, 2, 5, 6).

Real processes, shared memory and files: a cache far bigger than /dev/shm or the disk is
refused in one line naming the variable before anything is allocated; a killed leader's disk
file is removed by the next leader's start-up sweep and a clean stop removes its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbm.config import TierSize, format_bytes
from kvbm.leader.disk import disk_file_path
from kvbm.leader.registry import Tier, TierPool
from kvbm.testing.sim.engine import SimEngine, SimError
from kvbm.testing.sim.rank import SimModel

MODEL = SimModel(num_layers=1, num_gpu_blocks=16)


def test_format_bytes_is_human() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(25.28e9) == "25.3 GB"
    assert format_bytes(100_000e9) == "100.0 TB"
    assert format_bytes(1e39) == "1.0e+30 GB"


def test_tier_size_refusal_names_variable_value_and_accepted() -> None:
    by_gb = TierSize("DYN_KVBM_CPU_CACHE_GB", "1e+30", 10**34, 131072)
    assert by_gb.too_big("host pool", "/dev/shm", 25_300_000_000) == (
        "DYN_KVBM_CPU_CACHE_GB=1e+30 asks for 1.3e+30 GB of host pool; /dev/shm has 25.3 GB free; "
        "accepted: at most 25.3 GB")
    by_blocks = TierSize("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "9000000", 9_000_000, 1 << 20)
    assert by_blocks.too_big("disk cache", "/mnt", 10 << 30).endswith(
        "accepted: at most 10240 blocks of 1048576 B")


def test_registry_of_a_huge_tier_costs_no_memory_up_front() -> None:
    """40M slots (10,000 GB of 250 kB blocks) used to cost ~3.5 GB of leader memory in lists."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    pool = TierPool(Tier.DISK, 40_000_000)
    assert rss() - before < 50e6
    slots = pool.allocate([1, 2, 3], [None, 1, 2])
    pool.commit([s for s in slots if s is not None])
    assert pool.num_free == 40_000_000 - 3 and pool.lookup(3) == 2 and pool.parent_of(2) == 2


@pytest.mark.slow  # leader and rank processes
@pytest.mark.parametrize(("var", "value", "shown", "asked"), [
    ("DYN_KVBM_DISK_CACHE_GB", "1e30", "1e+30", "1.0e+30 GB of disk cache"),
    ("DYN_KVBM_DISK_CACHE_GB", "100000", "100000.0", "100.0 TB of disk cache"),
    ("DYN_KVBM_CPU_CACHE_GB", "1e30", "1e+30", "1.0e+30 GB of host pool"),
])
def test_cache_beyond_the_machine_is_refused_at_once_in_one_line(
        make_config, tmp_path: Path, var: str, value: str, shown: str, asked: str) -> None:
    (tmp_path / "disk").mkdir()
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "16", "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path / "disk")}
    if var == "DYN_KVBM_CPU_CACHE_GB":
        del env["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"]
    cfg = make_config(**env, **{var: value})
    t0 = time.monotonic()
    with pytest.raises(SimError) as info:
        with SimEngine(cfg, world_size=2, model=MODEL):
            pass
    msg = str(info.value)
    assert time.monotonic() - t0 < 15  # not the 20 s init timeout
    assert "\n" not in msg and msg.count(f"{var}={shown} asks for {asked};") == 1, msg
    assert "free; accepted: at most" in msg and msg.startswith("rank 0,1/2: ")
    assert "did not complete within" not in msg
    assert os.listdir(tmp_path / "disk") == []


@pytest.mark.slow  # a kvbm demo process
def test_demo_with_an_absurd_host_pool_prints_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_KVBM_", "KVBM_SIM_LOG"))}
    env["DYN_KVBM_CPU_CACHE_GB"] = "1e30"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "kvbm", "demo", "--conversations", "1", "--turns", "1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in out.stderr and "did not complete within" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kvbm demo: error: ") and lines[0].count("asks for") == 1
    assert "DYN_KVBM_CPU_CACHE_GB=1e+30 asks for 1.0e+30 GB of host pool; /dev/shm has " in lines[0]


@pytest.mark.slow  # leader and rank processes
def test_longest_init_timeout_works_end_to_end(make_config) -> None:
    """86400 s (the accepted maximum) reaches every poll and deadline in leader and ranks."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="86400")
    with SimEngine(cfg, world_size=1, model=MODEL) as sim:
        sim.run([list(range(1, 66))])
        assert sim.stats.mismatches == 0


@pytest.mark.slow  # leader and rank processes
def test_killed_leader_disk_file_is_swept_and_a_clean_stop_removes_its_own(make_config, tmp_path: Path) -> None:
    disk_dir = tmp_path / "disk"
    disk_dir.mkdir()
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="32",
                      DYN_KVBM_DISK_CACHE_DIR=str(disk_dir))
    with SimEngine(cfg, world_size=1, model=MODEL) as first:
        dead_file = disk_file_path(str(disk_dir), first.instance)
        assert os.path.isfile(dead_file)
        assert first.leader is not None and first.leader.popen is not None
        os.kill(first.leader.popen.pid, signal.SIGKILL)
        first.leader.popen.wait(10)
    assert os.path.isfile(dead_file)  # kill -9: nothing ran to remove it
    # Another user's file of our naming and an unrelated file stay.
    other = disk_dir / "kvbm-someone-else-disk.bin"
    other.write_bytes(b"x")
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
    (disk_dir / "notes.bin").write_bytes(b"y")
    with SimEngine(cfg, world_size=1, model=MODEL) as second:
        assert not os.path.exists(dead_file)  # the second leader's start-up sweep
        live_file = disk_file_path(str(disk_dir), second.instance)
        assert os.path.isfile(live_file)
    assert not os.path.exists(live_file)  # a clean stop removes the leader's own file
    left = sorted(os.listdir(disk_dir))
    assert left == (["kvbm-someone-else-disk.bin", "notes.bin"] if os.geteuid() == 0 else ["notes.bin"])


@pytest.mark.slow  # leader and rank processes
@pytest.mark.parametrize("block_size", [24, 48])
def test_block_size_not_a_power_of_two_serves_byte_exact(make_config, block_size: int) -> None:
    """Dynamo compat (item 12): engines use block sizes such as 24; kvbm serves them."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64")
    model = SimModel(num_layers=1, block_size=block_size, num_gpu_blocks=16)
    with SimEngine(cfg, world_size=2, model=model) as sim:
        prompt = list(range(1, 4 * block_size + 3))
        sim.run([prompt])
        sim.quiesce()
        sim.reset_engine_cache()
        sim.run([prompt])
        assert sim.stats.tokens_from_host == 4 * block_size
        assert sim.stats.mismatches == 0 and sim.stats.blocks_loaded == 4
