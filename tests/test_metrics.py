"""Prometheus metrics: Dynamo's exact names, hit-rate window, HTTP serving, and a real leader's
counters scraped over HTTP during and after a simulated run with a disk tier."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbm.ipc.stats import (
    DiskCounters,
    DiskTierStats,
    LeaderCounters,
    LeaderState,
    LeaderStats,
    ObjectCounters,
    ObjectTierStats,
    PoolStats,
)
from kvbm.leader.metrics import KvbmMetrics, metrics_host, start_metrics_server
from kvbm.testing.sim.engine import SimEngine, chat_workload
from kvbm.testing.sim.rank import SimModel

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')

DYNAMO_COUNTERS = ("kvbm_matched_tokens", "kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d",
                   "kvbm_offload_blocks_d2d", "kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d")
DYNAMO_GAUGES = ("kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, labels) and the ``# TYPE`` of each family."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            types[name] = typ
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, line
            labels = frozenset(tuple(kv.split("=", 1)) for kv in m.group(2).split(",")) if m.group(2) else frozenset()
            samples[(m.group(1), frozenset((k, v.strip('"')) for k, v in labels))] = float(m.group(3))
    return samples, types


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# ---------------------------------------------------------------------------------------------
# unit


def _idle() -> LeaderStats:
    return LeaderStats(LeaderState.WAITING, LeaderCounters(), ranks_alive=0, world_size=0, ops_in_flight=0)


def test_dynamo_names_exactly_no_total_suffix() -> None:
    stats = LeaderStats(LeaderState.READY, LeaderCounters(blocks_stored=7, blocks_loaded=5, blocks_loaded_from_disk=2),
                        ranks_alive=1, world_size=1, ops_in_flight=0, host=PoolStats(10, 4, 6, 0, 0),
                        disk_tier=DiskTierStats(False, 0, DiskCounters(offloaded_blocks=3)))
    m = KvbmMetrics(lambda: stats)
    m.on_match(4, 2, 1, 16)
    m.on_transfer("d2h", 2, 8192, 0.002)
    text = m.render().decode()
    samples, types = parse(text)
    # Valid exposition for a standard parser too (prometheus_client's, which reads any counter).
    assert {f.name: f.type for f in text_string_to_metric_families(text)}["kvbm_matched_tokens"] == "counter"
    for name in DYNAMO_COUNTERS:
        assert types[name] == "counter" and (name, frozenset()) in samples
    for name in DYNAMO_GAUGES:
        assert types[name] == "gauge"
    assert not any(name.endswith("_total") for name, _ in samples)
    assert v(samples, "kvbm_matched_tokens") == 48 and v(samples, "kvbm_requested_tokens") == 64
    assert v(samples, "kvbm_offload_blocks_d2h") == 7 and v(samples, "kvbm_offload_blocks_h2d") == 3
    assert v(samples, "kvbm_onboard_blocks_h2d") == 3 and v(samples, "kvbm_onboard_blocks_d2d") == 2
    assert v(samples, "kvbm_host_cache_hit_rate") == 0.5 and v(samples, "kvbm_disk_cache_hit_rate") == 0.25
    assert v(samples, "kvbm_transfer_bytes", direction="d2h") == 8192
    assert v(samples, "kvbm_transfer_seconds_bucket", direction="d2h", le="0.001") == 0
    assert v(samples, "kvbm_transfer_seconds_bucket", direction="d2h", le="0.003") == 1
    assert v(samples, "kvbm_transfer_seconds_bucket", direction="d2h", le="+Inf") == 1
    assert v(samples, "kvbm_transfer_seconds_count", direction="h2d") == 0
    assert types["kvbm_transfer_seconds"] == "histogram"
    assert v(samples, "kvbm_pool_capacity_blocks", tier="host") == 10
    assert ("kvbm_pool_capacity_blocks", frozenset({("tier", "disk")})) not in samples  # no disk tier
    assert v(samples, "kvbm_disk_tier_enabled") == 0
    assert v(samples, "kvbm_leader_state", state="ready") == 1 and v(samples, "kvbm_leader_state", state="waiting") == 0


def test_object_tier_metrics_dynamo_names() -> None:
    counters = LeaderCounters(blocks_stored=9, blocks_loaded=6, blocks_loaded_from_disk=1, blocks_loaded_from_object=2)
    oc = ObjectCounters(offloaded_blocks=5, read_failures=3, write_failures=4, checksum_failures=1,
                        offload_skipped_busy=2, lookup_blocks=64, lookup_found=7)
    stats = LeaderStats(LeaderState.READY, counters, ranks_alive=1, world_size=1, ops_in_flight=0,
                        host=PoolStats(10, 4, 6, 0, 0), object=PoolStats(100, 7, 93, 0, 0),
                        object_tier=ObjectTierStats(True, 0, oc))
    m = KvbmMetrics(lambda: stats)
    m.on_match(10, 2, 0, 16, obj=5)
    samples, types = parse(m.render().decode())
    for name in ("kvbm_offload_blocks_d2o", "kvbm_onboard_blocks_o2d", "kvbm_object_read_failures",
                 "kvbm_object_write_failures"):
        assert types[name] == "counter"
    assert types["kvbm_object_cache_hit_rate"] == "gauge"
    assert v(samples, "kvbm_offload_blocks_d2o") == 5 and v(samples, "kvbm_onboard_blocks_o2d") == 2
    assert v(samples, "kvbm_onboard_blocks_h2d") == 3  # loads neither from G3 nor from G4
    assert v(samples, "kvbm_object_cache_hit_rate") == 0.5 and v(samples, "kvbm_host_cache_hit_rate") == 0.2
    assert v(samples, "kvbm_object_read_failures") == 3 and v(samples, "kvbm_object_write_failures") == 4
    assert v(samples, "kvbm_matched_tokens") == 7 * 16
    assert v(samples, "kvbm_object_tier_enabled") == 1 and v(samples, "kvbm_pool_registered_blocks", tier="object") == 7
    assert v(samples, "kvbm_object_offload_skipped", reason="busy") == 2
    assert v(samples, "kvbm_object_lookup_found") == 7


def test_hit_rate_is_a_sliding_window_of_lookups() -> None:
    m = KvbmMetrics(_idle, window=2)
    assert m.hit_rates() == (0.0, 0.0)
    m.on_match(10, 10, 0, 16)
    m.on_match(10, 0, 5, 16)
    assert m.hit_rates() == (0.5, 0.25)
    m.on_match(0, 0, 0, 16)  # queries nothing: not part of the window
    m.on_match(10, 0, 0, 16)  # pushes the first lookup out
    assert m.hit_rates() == (0.0, 0.25)
    assert m.match_requests == 4 and m.matched_tokens == 15 * 16


def test_port_in_use_is_one_clear_error_and_no_server(caplog) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="kvbm.leader.metrics"):
            assert start_metrics_server(KvbmMetrics(_idle), port) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"metrics port {port} is in use; set DYN_KVBM_METRICS_PORT to a free port (kvbm runs on without metrics)"]


def test_loopback_by_default_all_interfaces_only_when_allowed(make_config) -> None:
    assert metrics_host(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")) == "127.0.0.1"
    allowed = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_ALLOW_NON_LOOPBACK="1")
    assert metrics_host(allowed) == "0.0.0.0"
    http = start_metrics_server(KvbmMetrics(_idle), 0)
    assert http is not None
    try:
        assert http.host == "127.0.0.1" and http.port > 0
        samples, _ = scrape(http.url)
        assert v(samples, "kvbm_matched_tokens") == 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{http.port}/other", timeout=5)
        assert err.value.code == 404
    finally:
        http.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does (TIME_WAIT)
        s.bind(("127.0.0.1", http.port))  # the listener is gone


# ---------------------------------------------------------------------------------------------
# a real leader


def _engine_config(make_config, tmp_path, port: int):
    return make_config(
        DYN_KVBM_METRICS="1",
        DYN_KVBM_METRICS_PORT=str(port),
        DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="40",
        DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="60",
        DYN_KVBM_DISK_CACHE_DIR=str(tmp_path),
        DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1",
    )


MODEL = SimModel(num_layers=2, kv_heads=1, head_dim=32, num_gpu_blocks=40)


@pytest.mark.slow  # leader and rank processes
def test_scraped_counters_match_the_run(make_config, tmp_path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    prompts = list(chat_workload(6, 3, system_tokens=64, turn_tokens=40, seed=5))
    with SimEngine(_engine_config(make_config, tmp_path, port), world_size=2, model=MODEL) as sim:
        # Scrape all through the run: every scrape succeeds and no counter goes back.
        during: list[Samples] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def scraper() -> None:
            while not stop.is_set():
                try:
                    during.append(scrape(url)[0])
                except BaseException as e:  # reported below
                    errors.append(e)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=scraper)
        t.start()
        try:
            sim.run(prompts)
            sim.reset_engine_cache()
            sim.run(prompts)  # second pass: hits in G2 and G3
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert len(during) >= 2
        for name in DYNAMO_COUNTERS:
            seq = [s[(name, frozenset())] for s in during]
            assert seq == sorted(seq), name
        assert v(during[-1], "kvbm_offload_blocks_d2h") > 0

        st = sim.stats
        assert st.mismatches == st.load_failures == st.staging_failures == st.store_failures == 0
        leader = sim.quiesce()
        samples, types = scrape(url)

    bs = MODEL.block_size
    assert types["kvbm_matched_tokens"] == "counter"
    # Dynamo's counters, against what the engine did.
    assert v(samples, "kvbm_offload_blocks_d2h") == st.blocks_stored > 0
    assert v(samples, "kvbm_onboard_blocks_h2d") + v(samples, "kvbm_onboard_blocks_d2d") == st.blocks_loaded
    # The tier split is the leader's: the engine guesses it from the lookup, and a block can move
    # between lookup and load (staged into G2 for another request of the batch, or evicted).
    assert v(samples, "kvbm_onboard_blocks_d2d") == leader.counters.blocks_loaded_from_disk > 0
    assert v(samples, "kvbm_onboard_blocks_h2d") > 0 and st.tokens_from_disk > 0
    assert v(samples, "kvbm_offload_blocks_h2d") == leader.disk_tier.counters.offloaded_blocks > 0
    assert v(samples, "kvbm_offload_blocks_d2d") == 0
    # Lookups: the engine loads what was matched except the held-back last block.
    matched = v(samples, "kvbm_matched_tokens")
    assert matched == (leader.counters.match_host_blocks + leader.counters.match_disk_blocks) * bs
    assert st.tokens_from_host + st.tokens_from_disk <= matched
    assert v(samples, "kvbm_requested_tokens") == leader.counters.match_blocks_queried * bs
    assert v(samples, "kvbm_match_requests") == leader.counters.match_requests
    # The window (1000 lookups) holds the whole run.
    assert v(samples, "kvbm_host_cache_hit_rate") == pytest.approx(leader.counters.match_host_blocks / leader.counters.match_blocks_queried)
    assert v(samples, "kvbm_disk_cache_hit_rate") == pytest.approx(leader.counters.match_disk_blocks / leader.counters.match_blocks_queried)
    assert 0 < v(samples, "kvbm_disk_cache_hit_rate") < 1
    # Bytes and latencies per direction.
    block_bytes = leader.block_bytes
    assert v(samples, "kvbm_block_bytes") == block_bytes
    assert v(samples, "kvbm_transfer_bytes", direction="d2h") == st.blocks_stored * block_bytes
    assert v(samples, "kvbm_transfer_bytes", direction="h2d") == st.blocks_loaded * block_bytes
    assert v(samples, "kvbm_transfer_bytes", direction="h2disk") == leader.disk_tier.counters.bytes_written
    assert v(samples, "kvbm_transfer_bytes", direction="disk2h") == leader.disk_tier.counters.bytes_read > 0
    assert v(samples, "kvbm_transfer_seconds_count", direction="d2h") == leader.counters.stores_committed
    assert v(samples, "kvbm_transfer_seconds_count", direction="h2d") == leader.counters.loads_completed
    assert v(samples, "kvbm_transfer_seconds_count", direction="h2disk") == leader.disk_tier.counters.offloaded_blocks
    assert v(samples, "kvbm_transfer_seconds_bucket", direction="h2d", le="+Inf") == leader.counters.loads_completed
    assert v(samples, "kvbm_transfer_seconds_sum", direction="h2d") > 0
    # Pools, evictions, disk tier, liveness, state.
    c = leader.counters
    for tier, pool, evictions in (("host", leader.host, c.host_evictions), ("disk", leader.disk, c.disk_evictions)):
        assert pool is not None
        for what, blocks in (("capacity", pool.capacity), ("registered", pool.registered), ("free", pool.free)):
            assert v(samples, f"kvbm_pool_{what}_blocks", tier=tier) == blocks
        assert v(samples, "kvbm_evicted_blocks", tier=tier) == evictions
    assert v(samples, "kvbm_pool_capacity_blocks", tier="host") == 40
    assert v(samples, "kvbm_pool_capacity_blocks", tier="disk") == 60
    assert v(samples, "kvbm_pool_pinned_blocks", tier="host") == 0
    assert v(samples, "kvbm_evicted_blocks", tier="host") > 0
    assert v(samples, "kvbm_disk_checksum_failures") == v(samples, "kvbm_disk_io_errors") == 0
    assert v(samples, "kvbm_disk_offload_skipped", reason="filter") == 0
    assert v(samples, "kvbm_disk_tier_enabled") == 1
    assert v(samples, "kvbm_ranks_alive") == v(samples, "kvbm_world_size") == 2
    assert v(samples, "kvbm_leader_state", state="ready") == 1
    assert sum(val for (name, _), val in samples.items() if name == "kvbm_leader_state") == 1
    assert v(samples, "kvbm_ops_in_flight") == 0
    assert v(samples, "kvbm_failed_loads") == v(samples, "kvbm_aborted_stores") == 0


@pytest.mark.slow  # leader and rank processes
def test_leader_with_its_metrics_port_taken_serves_on(make_config, tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _engine_config(make_config, tmp_path, port)
        with SimEngine(cfg, world_size=2, model=MODEL) as sim:
            prompts = list(chat_workload(2, 2, system_tokens=64, turn_tokens=40))
            sim.run(prompts)
            sim.reset_engine_cache()
            sim.run(prompts)
            assert sim.stats.tokens_from_host > 0 and sim.stats.mismatches == 0
            assert sim.leader is not None and sim.leader.log_path is not None
            with open(sim.leader.log_path) as f:
                log_text = f.read()
    errors = [line for line in log_text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log_text
    assert errors[0].endswith(f"metrics port {port} is in use; set DYN_KVBM_METRICS_PORT to a free port "
                              "(kvbm runs on without metrics)")
