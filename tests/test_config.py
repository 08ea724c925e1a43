"""kvbm.config and the `kvbm --version` / `kvbm config` commands."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm import __version__
from kvbm.cli import main
from kvbm.config import (
    NO_EFFECT,
    VARIABLES,
    ConfigError,
    KvbmConfig,
    load_config,
    markdown_table,
    parse_bool,
    parse_endpoint,
    parse_int,
    parse_number,
)

REPO = Path(__file__).resolve().parents[1]
CPU = {"DYN_KVBM_CPU_CACHE_GB": "1"}  # the smallest valid environment
UID = os.getuid()
LONG_IPC = "ipc:///" + "s" * 120

# One valid raw value per variable and the field value it must give.
VALID: dict[str, tuple[str, Any]] = {
    "DYN_KVBM_CPU_CACHE_GB": ("0.5", 0.5),
    "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": ("1024", 1024),
    "DYN_KVBM_DISK_CACHE_GB": ("2", 2.0),
    "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": ("+8192", 8192),
    "DYN_KVBM_DISK_CACHE_DIR": ("/tmp", "/tmp"),
    "DYN_KVBM_DISK_ZEROFILL_FALLBACK": ("TRUE", True),
    "DYN_KVBM_DISK_CACHE_PERSIST": ("yes", True),
    "DYN_KVBM_DISK_DISABLE_O_DIRECT": ("yes", True),
    "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": ("1", True),
    "DYN_KVBM_INDEX_REPLICA": ("no", False),
    "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": ("1e3", 1000.0),
    "DYN_KVBM_LEADER_GRACE_SECS": ("60", 60.0),
    "DYN_KVBM_METRICS": (" true ", True),
    "DYN_KVBM_METRICS_PORT": ("65535", 65535),
    "DYN_KVBM_LEADER_ENDPOINT": ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
    "DYN_KVBM_LEADER_ZMQ_HOST": ("localhost", "localhost"),
    "DYN_KVBM_LEADER_ZMQ_PUB_PORT": ("6000", 6000),
    "DYN_KVBM_ALLOW_NON_LOOPBACK": ("No", False),
    "DYN_KVBM_RUN_DIR": ("/run/user/1000/kvbm", "/run/user/1000/kvbm"),
    "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": ("1", 1),
    "DYN_KVBM_KV_EVENTS_ENDPOINT": ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5557"),
    "DYN_KVBM_DISK_BOUNCE_BLOCKS": ("8", 8),
    "DYN_KVBM_CACHE_STATS_MAX_REQUESTS": ("10", 10),
    "DYN_KVBM_HEARTBEAT_INTERVAL_SECS": (".1", 0.1),
    "DYN_KVBM_LIVENESS_TIMEOUT_SECS": ("3", 3.0),
    "DYN_KVBM_LOG_LEVEL": ("debug", "DEBUG"),
    "DYN_KVBM_OBJECT_ENABLED": ("1", True),
    "DYN_KVBM_OBJECT_BUCKET": ("kv-{worker_id}", "kv-{worker_id}"),
    "DYN_KVBM_OBJECT_ENDPOINT": ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
    "DYN_KVBM_OBJECT_REGION": ("EU-West-1", "eu-west-1"),
    "DYN_KVBM_OBJECT_ACCESS_KEY": ("AKIAEXAMPLE", "AKIAEXAMPLE"),
    "DYN_KVBM_OBJECT_SECRET_KEY": ("s3cr3t/Key+x", "s3cr3t/Key+x"),
    "DYN_KVBM_OBJECT_NUM_BLOCKS": ("5000", 5000),
    "DYN_KVBM_OBJECT_WRITE_THROUGH": ("true", True),
    "DYN_KVBM_OBJECT_TRANSPORT": ("NIXL", "nixl"),
    "DYN_KVBM_BLOCK_FORMAT": ("Heads", "heads"),
    "DYN_KVBM_HOST_LOADS": ("Sync", "sync"),
}

_NUM_BAD = ["ten", "nan", "NaN", "inf", "-inf", "1e999", "", "   ", "1_0", "0x10", "4GB", "1,5"]
_INT_BAD = ["4.0", "1e3", "abc", "", " ", "0x10", "1_000", "99999999999999999999999"]
_BOOL_BAD = ["maybe", "", " ", "2", "on", "off", "tru", "y", "-1"]
_PORT_BAD = _INT_BAD + ["0", "70000", "-1", "65536"]
_COUNT_BAD = _INT_BAD + ["0", "-3"]
_ENDPOINT_BAD = [
    "", "localhost:5555", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000",
    "tcp://:5555", "tcp://127.0.0.1:port", "ipc://", "ipc://relative/path", "udp://127.0.0.1:5",
    "tcp://[notipv6]:5", "tcp://bad host:5", "tcp://::1:5555", LONG_IPC,
]
# Dynamo variables accepted without effect (NO_EFFECT): one valid raw value each, the checked
# ones with their bad forms; the rest take any value.
NO_EFFECT_VALID: dict[str, str] = {
    "DYN_KVBM_LEADER_ZMQ_ACK_PORT": "6001",
    "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "64",
    "DYN_KVBM_DISK_ALLOCATOR_TYPE": "Open-Direct",
    "DYN_KVBM_DISABLE_WRITE_COMBINED": "1",
    "DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE": "passthrough",
    "DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR": "on",
    "DYN_KVBM_TRTLLM_ZMQ_PORT": "20081",
    "DYN_KVBM_NCCL_MAX_CTAS": "8",
    "DYN_KVBM_NCCL_MLA_MODE": "true",
    "DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS": "5",
    "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": "35",
    "DYN_KVBM_ENABLE_RECORD": "1",
    "DYN_KVBM_ENABLE_NUMA": "1",
    "DYN_KVBM_HOST_MEMORY_PROVIDER": "mymod:factory",
    "DYN_KVBM_MANAGER_NAMESPACE": "ns",
    "DYN_KVBM_G2_CAPACITY_BYTES": "107374182400",
    "DYN_KVBM_G4_TRANSFER_TIMEOUT_SECS": "30",
    "DYN_KVBM_G4_DRAIN_QUEUE_CAP": "512",
    "DYN_KVBM_NIXL_BACKEND_": "true",
}
NO_EFFECT_BAD: dict[str, list[str]] = {
    "DYN_KVBM_LEADER_ZMQ_ACK_PORT": _PORT_BAD,
    "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": _COUNT_BAD,
    "DYN_KVBM_TRANSFER_BATCH_SIZE": _COUNT_BAD,
    "DYN_KVBM_DISK_ALLOCATOR_TYPE": ["", "fast", "open_direct"],
    "DYN_KVBM_DISABLE_WRITE_COMBINED": _BOOL_BAD,
    "DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE": ["", "dedupe", "none"],
    "DYN_KVBM_TRTLLM_ZMQ_PORT": _PORT_BAD,
    "DYN_KVBM_NCCL_MAX_CTAS": _COUNT_BAD,
    "DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS": _NUM_BAD + ["0", "-5"],
    "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": _INT_BAD + ["-1", "101"],
    "DYN_KVBM_G2_CAPACITY_BYTES": _INT_BAD + ["-1"],
    "DYN_KVBM_G4_TRANSFER_TIMEOUT_SECS": _NUM_BAD + ["0"],
    "DYN_KVBM_G4_DRAIN_QUEUE_CAP": _COUNT_BAD,
}
# Every bad form of every variable. Each must raise one ConfigError naming both.
BAD: dict[str, list[str]] = {
    "DYN_KVBM_CPU_CACHE_GB": _NUM_BAD + ["-1", "-0.5"],
    "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": _INT_BAD + ["-1"],
    "DYN_KVBM_DISK_CACHE_GB": _NUM_BAD + ["-1"],
    "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": _INT_BAD + ["-1"],
    "DYN_KVBM_DISK_CACHE_DIR": ["", "  ", "/tmp/\0x"],
    "DYN_KVBM_DISK_ZEROFILL_FALLBACK": _BOOL_BAD,
    "DYN_KVBM_DISK_CACHE_PERSIST": _BOOL_BAD,
    "DYN_KVBM_INDEX_REPLICA": _BOOL_BAD,
    "DYN_KVBM_DISK_DISABLE_O_DIRECT": _BOOL_BAD,
    "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": _BOOL_BAD,
    # Past one day: zmq's int milliseconds overflowed at 2200000, time stamps at 1e10.
    "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": _NUM_BAD + ["0", "-5", "86400.5", "2200000",
                                                            "1e10", "1e30"],
    "DYN_KVBM_LEADER_GRACE_SECS": _NUM_BAD + ["-1", "86400.5", "1e30"],
    "DYN_KVBM_METRICS": _BOOL_BAD,
    "DYN_KVBM_METRICS_PORT": _PORT_BAD,
    "DYN_KVBM_LEADER_ENDPOINT": _ENDPOINT_BAD + ["tcp://10.0.0.1:5555", "tcp://*:5555"],
    "DYN_KVBM_LEADER_ZMQ_HOST": ["", "bad host", "-lead", "a..b", "0.0.0.0", "10.1.2.3"],
    "DYN_KVBM_LEADER_ZMQ_PUB_PORT": _PORT_BAD,
    "DYN_KVBM_ALLOW_NON_LOOPBACK": _BOOL_BAD,
    "DYN_KVBM_RUN_DIR": ["", "relative/dir", "/" + "d" * 100],
    "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": _COUNT_BAD,
    "DYN_KVBM_KV_EVENTS_ENDPOINT": _ENDPOINT_BAD + ["tcp://8.8.8.8:5557", "tcp://*:5557"],
    "DYN_KVBM_DISK_BOUNCE_BLOCKS": _COUNT_BAD,
    "DYN_KVBM_CACHE_STATS_MAX_REQUESTS": _COUNT_BAD,
    "DYN_KVBM_HEARTBEAT_INTERVAL_SECS": _NUM_BAD + ["0", "-0.25"],
    "DYN_KVBM_LIVENESS_TIMEOUT_SECS": _NUM_BAD + ["0", "0.1"],  # 0.1 < heartbeat 0.25
    "DYN_KVBM_LOG_LEVEL": ["", "verbose", "warn", "TRACE", "10"],
    "DYN_KVBM_OBJECT_ENABLED": _BOOL_BAD,
    "DYN_KVBM_OBJECT_BUCKET": ["", "ab", "Upper", "under_score", "-start", "end-", "a" * 64, "my bucket"],
    "DYN_KVBM_OBJECT_ENDPOINT": ["", "127.0.0.1:9000", "ftp://host:21", "http://", "http://host:0",
                                 "http://host:99999", "http://host:9000/path", "http://bad host:9"],
    "DYN_KVBM_OBJECT_REGION": ["", "us east", "us_east_1", "-x"],
    "DYN_KVBM_OBJECT_ACCESS_KEY": ["", " ", "has space"],
    "DYN_KVBM_OBJECT_SECRET_KEY": ["", "has space"],
    "DYN_KVBM_OBJECT_NUM_BLOCKS": _COUNT_BAD,
    "DYN_KVBM_OBJECT_WRITE_THROUGH": _BOOL_BAD,
    "DYN_KVBM_OBJECT_TRANSPORT": ["", "boto3", "obj"],
    "DYN_KVBM_BLOCK_FORMAT": ["", "canonical", "tp"],
    "DYN_KVBM_HOST_LOADS": ["", "layerwise", "true"],
}


def _error(env: Mapping[str, str], **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(env, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_tables_cover_every_variable() -> None:
    names = [v.name for v in VARIABLES]
    assert sorted(VALID) == sorted(names) == sorted(BAD)
    assert len(set(names)) == len(names)
    assert {v.field for v in VARIABLES} == {
        f.name for f in dataclasses.fields(KvbmConfig) if f.name not in ("sources", "no_effect")
    }
    no_effect = [n for e in NO_EFFECT for n in e.names]
    assert sorted(NO_EFFECT_VALID) == sorted(e.name for e in NO_EFFECT)
    assert set(NO_EFFECT_BAD) <= set(no_effect) and len(set(no_effect)) == len(no_effect)
    assert not set(no_effect) & {n for v in VARIABLES for n in v.names}  # one mechanism per name


# -- valid values ----------------------------------------------------------


@pytest.mark.parametrize("var", VARIABLES, ids=lambda v: v.name)
def test_each_variable_valid(var: Any) -> None:
    raw, expected = VALID[var.name]
    cfg = load_config({**CPU, var.name: raw})
    assert getattr(cfg, var.field) == expected
    assert cfg.sources[var.field] == f"env {var.name}"
    assert load_config(cfg.to_env()) == cfg


def test_all_variables_together_round_trip() -> None:
    env = {name: raw for name, (raw, _) in VALID.items()}
    env["DYN_KVBM_LEADER_ENDPOINT"] = "tcp://localhost:6000"  # agrees with ZMQ host/port
    cfg = load_config(env)
    assert cfg.leader_endpoint == "tcp://localhost:6000"
    again = load_config(cfg.to_env())
    assert again == cfg
    assert again.to_env() == cfg.to_env()


def test_defaults() -> None:
    cfg = load_config({}, require_tier=False)
    assert cfg == KvbmConfig()
    assert cfg.cpu_cache_gb is None and cfg.disk_cache_gb is None
    assert cfg.disk_cache_dir == "/tmp/"
    assert cfg.init_timeout_s == 120.0
    assert cfg.metrics_port == 6880 and not cfg.metrics_enabled
    assert cfg.leader_endpoint is None and cfg.leader_zmq_pub_port == 56001
    assert cfg.run_dir == f"/tmp/kvbm-{UID}" == KvbmConfig().run_dir
    assert cfg.max_concurrent_transfers == 4
    assert cfg.object_write_through  # Dynamo's default: a prefix one instance computed is in G4 for all
    assert cfg.no_effect == {}
    assert cfg.log_level == "INFO"
    assert {src for _, _, src in cfg.describe()} == {"default"}
    assert not cfg.has_cpu_tier and not cfg.has_disk_tier


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DYN_KVBM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "3")
    assert load_config().cpu_cache_gb == 3.0


def test_surrounding_blanks_and_case() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_METRICS": " Yes ", "DYN_KVBM_METRICS_PORT": " 80 ",
                       "DYN_KVBM_LOG_LEVEL": "Warning"})
    assert (cfg.metrics_enabled, cfg.metrics_port, cfg.log_level) == (True, 80, "WARNING")


# -- bad values ------------------------------------------------------------

BAD_CASES = [(name, raw) for name, raws in {**BAD, **NO_EFFECT_BAD}.items() for raw in raws]


@pytest.mark.parametrize(("name", "raw"), BAD_CASES, ids=[f"{n}={r!r}" for n, r in BAD_CASES])
def test_each_bad_value(name: str, raw: str) -> None:
    msg = _error({**CPU, name: raw})
    shown = "<hidden>" if name == "DYN_KVBM_OBJECT_SECRET_KEY" else repr(raw)  # a secret is never echoed
    assert msg.startswith(f"{name}={shown}: expected ")
    if not raw.strip():
        assert "empty value is not accepted" in msg


def test_message_format_matches_issue() -> None:
    assert _error({"DYN_KVBM_CPU_CACHE_GB": "ten"}) == (
        "DYN_KVBM_CPU_CACHE_GB='ten': expected a number of gigabytes >= 0 (e.g. 4 or 0.5)"
    )


@pytest.mark.parametrize("name", ["DYN_KVBM_DISK_DISABLE_O_DIRECT",
                                  "DYN_KVBM_DISK_ZEROFILL_FALLBACK"])
def test_presence_flags_empty_is_error_with_hint(name: str) -> None:
    msg = _error({**CPU, name: ""})
    assert msg.startswith(f"{name}='': expected a boolean")
    assert "Dynamo treats a set-but-empty variable as on" in msg


def test_first_bad_variable_in_table_order_wins() -> None:
    msg = _error({"DYN_KVBM_LOG_LEVEL": "x", "DYN_KVBM_CPU_CACHE_GB": "y"})
    assert msg.startswith("DYN_KVBM_CPU_CACHE_GB='y'")


# -- tiers -----------------------------------------------------------------


def test_require_tier() -> None:
    msg = _error({})
    assert msg.startswith("no cache tier configured: set DYN_KVBM_CPU_CACHE_GB")
    assert "DYN_KVBM_DISK_CACHE_GB" in msg
    assert "no cache tier" in _error({"DYN_KVBM_CPU_CACHE_GB": "0",
                                      "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "0"})
    load_config({}, require_tier=False).describe()  # no tier is fine for `kvbm config`
    with pytest.raises(ConfigError, match="no cache tier"):
        KvbmConfig().require_tier()


def test_tier_sizes() -> None:
    cfg = load_config({"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_GB": "0.5"})
    assert cfg.has_cpu_tier and cfg.has_disk_tier
    assert cfg.host_blocks(3) == 333_333_333  # decimal GB, floor
    assert cfg.disk_blocks(4096) == 500_000_000 // 4096
    cfg = cfg.replace(cpu_cache_num_blocks=7)
    assert cfg.host_blocks(3) == 7  # override wins over GB
    only = load_config({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "5"})
    assert only.has_cpu_tier and not only.has_disk_tier
    assert only.host_blocks(1 << 20) == 5 and only.disk_blocks(1 << 20) == 0
    disk_only = load_config({"DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "9"})
    assert not disk_only.has_cpu_tier and disk_only.has_disk_tier
    assert disk_only.host_blocks(4096) == 0 and disk_only.disk_blocks(4096) == 9
    with pytest.raises(ValueError):
        cfg.host_blocks(0)


def test_disk_dir_checked_only_with_disk_tier(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert load_config({**CPU, "DYN_KVBM_DISK_CACHE_DIR": missing}).disk_cache_dir == missing
    env = {"DYN_KVBM_DISK_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_DIR": missing}
    assert _error(env) == (
        f"DYN_KVBM_DISK_CACHE_DIR={missing!r}: expected an existing, writable directory"
    )
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "existing, writable directory" in _error({**env, "DYN_KVBM_DISK_CACHE_DIR": str(afile)})
    ok = load_config({**env, "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)})
    assert ok.disk_cache_dir == str(tmp_path)


def test_relative_disk_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    cfg = load_config({"DYN_KVBM_DISK_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_DIR": "cache"})
    assert cfg.disk_cache_dir == str(tmp_path / "cache")


# -- aliases ---------------------------------------------------------------


def test_transfer_batch_alias() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_TRANSFER_BATCH_SIZE": "8"})
    assert cfg.no_effect == {"DYN_KVBM_TRANSFER_BATCH_SIZE": "8"}
    assert load_config(cfg.to_env()) == cfg and "DYN_KVBM_TRANSFER_BATCH_SIZE" not in cfg.to_env()
    both = {**CPU, "DYN_KVBM_TRANSFER_BATCH_SIZE": "8", "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "08"}
    assert len(load_config(both).no_effect) == 2  # equal values are fine
    msg = _error({**both, "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "16"})
    assert msg.startswith("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE='16' and "
                          "DYN_KVBM_TRANSFER_BATCH_SIZE='8': expected equal values")
    bad_alias = _error({**CPU, "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "0"})
    assert bad_alias.startswith("DYN_KVBM_MAX_TRANSFER_BATCH_SIZE='0': expected")


# -- leader address ----------------------------------------------------------


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:1", "tcp://127.3.4.5:5555", "tcp://localhost:5555", "tcp://LOCALHOST:9",
    "tcp://[::1]:5555", "ipc:///tmp/kvbm-0/leader.sock", "ipc://@kvbm-abstract",
])
def test_loopback_endpoints_accepted(endpoint: str) -> None:
    assert load_config({**CPU, "DYN_KVBM_LEADER_ENDPOINT": endpoint}).leader_endpoint == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://10.0.0.1:5555", "tcp://*:5555",
                                      "tcp://0.0.0.0:5555", "tcp://leader.example:5555",
                                      "tcp://[2001:db8::1]:5555"])
def test_non_loopback_needs_allow_flag(endpoint: str) -> None:
    env = {**CPU, "DYN_KVBM_LEADER_ENDPOINT": endpoint}
    msg = _error(env)
    assert msg.startswith(f"DYN_KVBM_LEADER_ENDPOINT={endpoint!r}: expected a loopback address")
    assert "DYN_KVBM_ALLOW_NON_LOOPBACK=1" in msg
    cfg = load_config({**env, "DYN_KVBM_ALLOW_NON_LOOPBACK": "1"})
    assert cfg.leader_endpoint == endpoint
    assert load_config(cfg.to_env()) == cfg


def test_dynamo_zmq_host_and_port() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_HOST": "127.0.0.1"})
    assert cfg.leader_endpoint == "tcp://127.0.0.1:56001"
    assert cfg.sources["leader_endpoint"] == "env DYN_KVBM_LEADER_ZMQ_HOST"
    cfg = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_PUB_PORT": "56001"})  # explicit default
    assert cfg.leader_endpoint == "tcp://127.0.0.1:56001"
    assert load_config(cfg.to_env()) == cfg
    cfg = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_HOST": "::1",
                       "DYN_KVBM_LEADER_ZMQ_PUB_PORT": "7000"})
    assert cfg.leader_endpoint == "tcp://[::1]:7000"
    assert load_config(cfg.to_env()) == cfg
    ack = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_ACK_PORT": "56002"})
    assert ack.leader_endpoint is None and ack.no_effect == {"DYN_KVBM_LEADER_ZMQ_ACK_PORT": "56002"}
    msg = _error({**CPU, "DYN_KVBM_LEADER_ZMQ_HOST": "10.0.0.2"})
    assert msg.startswith("DYN_KVBM_LEADER_ZMQ_HOST='10.0.0.2': expected a loopback address")
    allowed = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_HOST": "10.0.0.2",
                           "DYN_KVBM_ALLOW_NON_LOOPBACK": "true"})
    assert allowed.leader_endpoint == "tcp://10.0.0.2:56001"


def test_leader_endpoint_conflicts_with_zmq_variables() -> None:
    agree = {**CPU, "DYN_KVBM_LEADER_ENDPOINT": "tcp://127.0.0.1:7000",
             "DYN_KVBM_LEADER_ZMQ_PUB_PORT": "7000"}
    assert load_config(agree).leader_endpoint == "tcp://127.0.0.1:7000"
    msg = _error({**agree, "DYN_KVBM_LEADER_ZMQ_PUB_PORT": "7001"})
    assert msg.startswith("DYN_KVBM_LEADER_ENDPOINT='tcp://127.0.0.1:7000': disagrees with "
                          "DYN_KVBM_LEADER_ZMQ_PUB_PORT='7001'")
    msg = _error({**CPU, "DYN_KVBM_LEADER_ENDPOINT": "ipc:///tmp/x.sock",
                  "DYN_KVBM_LEADER_ZMQ_HOST": "127.0.0.1"})
    assert "disagrees with DYN_KVBM_LEADER_ZMQ_HOST='127.0.0.1'" in msg


def test_parse_endpoint() -> None:
    assert parse_endpoint("tcp://[::1]:5").host == "::1"
    assert parse_endpoint("tcp://h:80").port == 80
    assert parse_endpoint("ipc:///a/b").path == "/a/b"
    assert parse_endpoint("ipc:///a").is_loopback
    assert not parse_endpoint("tcp://*:1").is_loopback
    with pytest.raises(ValueError):
        parse_endpoint(LONG_IPC)


def test_liveness_must_exceed_heartbeat() -> None:
    msg = _error({**CPU, "DYN_KVBM_HEARTBEAT_INTERVAL_SECS": "2",
                  "DYN_KVBM_LIVENESS_TIMEOUT_SECS": "2"})
    assert msg == ("DYN_KVBM_LIVENESS_TIMEOUT_SECS='2.0': expected more than "
                   "DYN_KVBM_HEARTBEAT_INTERVAL_SECS (2.0)")


@pytest.mark.parametrize("endpoint", ["tcp://8.8.8.8:5557", "tcp://*:5557", "tcp://0.0.0.0:5557"])
def test_kv_events_endpoint_non_loopback_needs_allow_flag(endpoint: str) -> None:
    # It used to pass `kvbm config` and then be switched off silently in the leader.
    env = {**CPU, "DYN_KVBM_KV_EVENTS_ENDPOINT": endpoint}
    msg = _error(env)
    assert msg.startswith(f"DYN_KVBM_KV_EVENTS_ENDPOINT={endpoint!r}: expected a loopback address")
    assert "KV events socket" in msg and "DYN_KVBM_ALLOW_NON_LOOPBACK=1" in msg
    cfg = load_config({**env, "DYN_KVBM_ALLOW_NON_LOOPBACK": "1"})
    assert cfg.kv_events_endpoint == endpoint
    assert load_config(cfg.to_env()) == cfg


def test_init_timeout_range_message() -> None:
    msg = _error({**CPU, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "2200000"})
    assert msg == ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS='2200000': expected a number of "
                   "seconds in (0, 86400] (e.g. 120 or 1800)")
    assert load_config({**CPU, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "86400"}).init_timeout_s == 86400


# -- unknown variables -------------------------------------------------------


@pytest.mark.parametrize("entry", NO_EFFECT, ids=lambda e: e.name)
def test_each_no_effect_variable_is_accepted_warned_and_shown(entry: Any, caplog: pytest.LogCaptureFixture) -> None:
    name = entry.name + "UCX" if entry.prefix else entry.name
    raw = NO_EFFECT_VALID[entry.name]
    with caplog.at_level(logging.WARNING, logger="kvbm.config"):
        cfg = load_config({**CPU, name: raw})
    assert cfg == load_config(CPU)  # no effect on the configuration
    assert cfg.no_effect == {name: raw}
    assert (name, raw, f"env {name}, no effect in kvbm") in cfg.describe()
    assert f"no effect in kvbm, ignored: {name} (docs/defaults.md says why)" in caplog.text
    assert "unknown" not in caplog.text
    row = next(line for line in markdown_table().splitlines() if line.startswith(f"| `{entry.name}"))
    assert row.endswith(f"| {entry.accepts} | {entry.why} |") and entry.why


def test_dynamo_1_6_variables_are_known(caplog: pytest.LogCaptureFixture) -> None:
    env = {**CPU, "DYN_KVBM_DISK_ALLOCATOR_TYPE": "default", "DYN_KVBM_DISABLE_WRITE_COMBINED": "0",
           "DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE": "DEDUP", "DYN_KVBM_NCCL_MAX_CTAS": "16"}
    with caplog.at_level(logging.WARNING, logger="kvbm.config"):
        cfg = load_config(env)
    assert caplog.text.count("\n") == 1  # one line, listing them all
    assert ("no effect in kvbm, ignored: DYN_KVBM_DISABLE_WRITE_COMBINED, DYN_KVBM_DISK_ALLOCATOR_TYPE, "
            "DYN_KVBM_KV_EVENTS_CONSOLIDATOR_MODE, DYN_KVBM_NCCL_MAX_CTAS") in caplog.text
    assert sorted(cfg.no_effect) == sorted(n for n in env if n != "DYN_KVBM_CPU_CACHE_GB")


def test_unknown_variables_warn(caplog: pytest.LogCaptureFixture) -> None:
    env = {**CPU, "DYN_KVBM_CPU_CACH_GB": "2", "DYN_KVBM_ENABLE_NUMA": "1",
           "DYN_KVBM_NIXL_BACKEND_UCX": "true", "DYN_KVBM_ZZZ": "1", "OTHER": "x"}
    with caplog.at_level(logging.WARNING, logger="kvbm.config"):
        cfg = load_config(env)
    assert cfg.cpu_cache_gb == 1.0
    text = caplog.text
    assert "unknown DYN_KVBM_* variables, ignored: DYN_KVBM_CPU_CACH_GB (did you mean DYN_KVBM_CPU_CACHE_GB?), " \
        "DYN_KVBM_ZZZ" in text
    assert "OTHER" not in text
    assert "no effect in kvbm, ignored: DYN_KVBM_ENABLE_NUMA, DYN_KVBM_NIXL_BACKEND_UCX" in text


# -- the object itself -------------------------------------------------------


def test_sources_and_describe() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_METRICS": "1"})
    rows = cfg.describe()
    assert [r[0] for r in rows] == [v.name for v in VARIABLES]
    by_name = {name: (value, src) for name, value, src in rows}
    assert by_name["DYN_KVBM_CPU_CACHE_GB"] == ("1.0", "env DYN_KVBM_CPU_CACHE_GB")
    assert by_name["DYN_KVBM_METRICS"] == ("true", "env DYN_KVBM_METRICS")
    assert by_name["DYN_KVBM_DISK_CACHE_GB"] == ("(unset)", "default")
    assert by_name["DYN_KVBM_METRICS_PORT"] == ("6880", "default")
    assert dict(cfg.sources) == {"cpu_cache_gb": "env DYN_KVBM_CPU_CACHE_GB",
                                 "metrics_enabled": "env DYN_KVBM_METRICS"}
    direct = KvbmConfig(cpu_cache_gb=2.0, metrics_port=6880)
    assert direct.source_of("cpu_cache_gb") == "constructor"
    assert direct.source_of("metrics_port") == "default"


def test_replace_marks_override_and_validates() -> None:
    cfg = load_config(CPU)
    new = cfg.replace(metrics_port=9000, cpu_cache_gb=2)
    assert new.metrics_port == 9000 and cfg.metrics_port == 6880
    assert new.sources["metrics_port"] == "override"
    assert new.sources["cpu_cache_gb"] == "override"
    assert new.describe()[0] == ("DYN_KVBM_CPU_CACHE_GB", "2", "override")
    assert load_config(new.to_env()) == new
    with pytest.raises(ConfigError, match=r"^DYN_KVBM_METRICS_PORT='0': expected a port"):
        cfg.replace(metrics_port=0)
    with pytest.raises(TypeError):
        cfg.replace(sources={})


def test_replace_rederives_zmq_endpoint() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_LEADER_ZMQ_PUB_PORT": "7000"})
    moved = cfg.replace(leader_zmq_pub_port=7100)
    assert moved.leader_endpoint == "tcp://127.0.0.1:7100"
    assert load_config(moved.to_env()) == moved
    pinned = load_config({**CPU, "DYN_KVBM_LEADER_ENDPOINT": "ipc:///tmp/l.sock"})
    with pytest.raises(ConfigError, match="disagrees"):
        pinned.replace(leader_zmq_pub_port=7100)


@pytest.mark.parametrize(("field", "value"), [
    ("cpu_cache_gb", -1.0), ("cpu_cache_gb", math.nan), ("cpu_cache_gb", "4"),
    ("metrics_enabled", 1), ("metrics_port", True), ("metrics_port", 70000),
    ("max_concurrent_transfers", 0), ("log_level", "info"), ("run_dir", "rel"),
    ("leader_endpoint", "tcp://nowhere"), ("leader_endpoint", "tcp://10.0.0.1:5"),
    ("init_timeout_s", 0.0), ("disk_cache_dir", ""), ("leader_zmq_host", "a b"),
])
def test_direct_construction_is_validated(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        KvbmConfig(**{field: value})
    name = next(v.name for v in VARIABLES if v.field == field)
    assert str(info.value).startswith(f"{name}=")


def test_direct_zmq_fields_derive_endpoint() -> None:
    cfg = KvbmConfig(cpu_cache_gb=1.0, leader_zmq_pub_port=7000)
    assert cfg.leader_endpoint == "tcp://127.0.0.1:7000"
    assert load_config(cfg.to_env()) == cfg


def test_frozen_and_hashable() -> None:
    cfg = load_config(CPU)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpu_cache_gb = 2.0  # type: ignore[misc]
    assert hash(cfg) == hash(load_config(CPU))


def test_markdown_table() -> None:
    table = markdown_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    assert len(lines) == 2 + len(VARIABLES) + 5 + len(NO_EFFECT)
    assert lines[2 + len(VARIABLES) + 3] == "| Variable | Accepted | Why it has no effect in kvbm |"
    assert "| `DYN_KVBM_MAX_TRANSFER_BATCH_SIZE` (alias `DYN_KVBM_TRANSFER_BATCH_SIZE`) | a whole number" in table
    assert "| `DYN_KVBM_NIXL_BACKEND_*` | any value |" in table
    assert "| `DYN_KVBM_OBJECT_WRITE_THROUGH` | `true` |" in table
    assert "| `DYN_KVBM_RUN_DIR` | `/tmp/kvbm-<uid>` |" in table
    assert "| `DYN_KVBM_CPU_CACHE_GB` | `unset` |" in table


# -- property tests ----------------------------------------------------------

_BOOL_WORDS = ["true", "false", "1", "0", "yes", "no"]


@given(st.sampled_from(_BOOL_WORDS), st.data())
def test_bool_any_case(word: str, data: st.DataObject) -> None:
    cased = "".join(c.upper() if data.draw(st.booleans()) else c for c in word)
    assert parse_bool(f" {cased}\t") is (word in ("true", "1", "yes"))


@given(st.text(max_size=8))
def test_bool_rejects_everything_else(text: str) -> None:
    if text.strip().lower() in _BOOL_WORDS:
        return
    with pytest.raises(ValueError):
        parse_bool(text)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_number_round_trips_repr(x: float) -> None:
    assert parse_number(repr(x)) == x


@given(st.text(alphabet="0123456789+-.eE_xnaifINF ", max_size=10))
def test_number_is_finite_or_rejected(text: str) -> None:
    try:
        value = parse_number(text)
    except ValueError:
        return
    assert math.isfinite(value) and value == float(text)
    assert "_" not in text


@given(st.integers())
def test_int_round_trips(n: int) -> None:
    assert parse_int(str(n)) == n
    with pytest.raises(ValueError):
        parse_int(f"{n}.0")


@settings(max_examples=50)
@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False),
       st.integers(min_value=1, max_value=65535))
def test_config_round_trip_property(gb: float, port: int) -> None:
    cfg = load_config({"DYN_KVBM_CPU_CACHE_GB": repr(gb), "DYN_KVBM_METRICS_PORT": str(port)},
                      require_tier=False)
    assert cfg.cpu_cache_gb == gb and cfg.metrics_port == port
    assert load_config(cfg.to_env(), require_tier=False) == cfg


# -- import weight -----------------------------------------------------------


def test_config_and_cli_import_stdlib_only() -> None:
    code = ("import sys, kvbm.config, kvbm.cli; "
            "heavy = {'numpy', 'zmq', 'msgpack', 'torch', 'pydantic'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- CLI -----------------------------------------------------------------------


def _run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    return subprocess.run([sys.executable, "-m", "kvbm", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_cli_version() -> None:
    out = _run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"kvbm {__version__}" == "kvbm 0.1.0"


def test_cli_config_table() -> None:
    out = _run_cli("config", env={"DYN_KVBM_CPU_CACHE_GB": "4",
                                  "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "8"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["VARIABLE", "VALUE", "SOURCE"]
    assert len(lines) == 1 + len(VARIABLES) + 1  # the variable with no effect; tier configured: no note
    col = lines[0].index("VALUE")
    src = lines[0].index("SOURCE")
    rows = {line.split()[0]: line for line in lines[1:]}
    gb = rows["DYN_KVBM_CPU_CACHE_GB"]
    assert gb[col:].split()[0] == "4.0" and gb[src:] == "env DYN_KVBM_CPU_CACHE_GB"
    batch = rows["DYN_KVBM_MAX_TRANSFER_BATCH_SIZE"]
    assert batch[col:].split()[0] == "8" and batch[src:] == "env DYN_KVBM_MAX_TRANSFER_BATCH_SIZE, no effect in kvbm"
    assert lines[-1] == batch  # after every variable kvbm uses
    assert rows["DYN_KVBM_METRICS_PORT"][src:] == "default"


def test_cli_config_without_tier_prints_note() -> None:
    out = _run_cli("config")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("note: no cache tier configured")


def test_cli_config_error_exits_2() -> None:
    out = _run_cli("config", env={"DYN_KVBM_CPU_CACHE_GB": "ten"})
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip() == ("kvbm: error: DYN_KVBM_CPU_CACHE_GB='ten': expected a number "
                                  "of gigabytes >= 0 (e.g. 4 or 0.5)")


def test_cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("DYN_KVBM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", "0")
    assert main(["config"]) == 2
    assert "kvbm: error: DYN_KVBM_METRICS_PORT='0'" in capsys.readouterr().err
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()
    assert main([]) == 2  # no command: help on stderr
    assert "usage: kvbm" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "kvbm 0.1.0"


def test_object_secret_key_is_never_shown() -> None:
    assert "hunter 2" not in _error({**CPU, "DYN_KVBM_OBJECT_SECRET_KEY": "hunter 2"})
    cfg = load_config({**CPU, "DYN_KVBM_OBJECT_ACCESS_KEY": "AK", "DYN_KVBM_OBJECT_SECRET_KEY": "topsecret"})
    rows = {name: value for name, value, _ in cfg.describe()}
    assert rows["DYN_KVBM_OBJECT_SECRET_KEY"] == "<hidden>" and rows["DYN_KVBM_OBJECT_ACCESS_KEY"] == "AK"
    assert load_config(cfg.to_env()) == cfg


def test_object_bucket_worker_id() -> None:
    cfg = load_config({**CPU, "DYN_KVBM_OBJECT_BUCKET": "kv-{worker_id}"})
    assert cfg.object_bucket_for("Engine-1") == "kv-engine-1"
    assert load_config(CPU).object_bucket_for("x") == "dynamo-kv-cache"
    with pytest.raises(ConfigError, match=r"^DYN_KVBM_OBJECT_BUCKET='kv-\{worker_id\}': expected a valid bucket"):
        cfg.object_bucket_for("bad_name")
