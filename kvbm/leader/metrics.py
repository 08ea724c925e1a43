"""Prometheus metrics of the leader, served on ``/metrics`` (``DYN_KVBM_METRICS=1``).

Dynamo's KVBM names, so its Grafana dashboard keeps working (reference/kvbm.md §4):

=============================  =======  ==================================================
``kvbm_matched_tokens``        counter  tokens found in G2 or G3 by lookups
``kvbm_offload_blocks_d2h``    counter  blocks stored device -> host (G1 -> G2)
``kvbm_offload_blocks_h2d``    counter  blocks offloaded host -> disk (G2 -> G3)
``kvbm_offload_blocks_d2d``    counter  device -> disk; always 0 (kvbm writes disk from G2)
``kvbm_onboard_blocks_h2d``    counter  blocks loaded host -> device (from G2)
``kvbm_onboard_blocks_d2d``    counter  blocks loaded disk -> device (from G3, staged in G2)
``kvbm_host_cache_hit_rate``   gauge    G2 hit blocks / blocks queried, last N lookups
``kvbm_disk_cache_hit_rate``   gauge    G3 hit blocks / blocks queried, last N lookups
``kvbm_offload_blocks_d2o``    counter  blocks put in the object store (G2 -> G4)
``kvbm_onboard_blocks_o2d``    counter  blocks loaded object store -> device (G4, staged in G2)
``kvbm_object_cache_hit_rate`` gauge    G4 hit blocks / blocks queried, last N lookups
``kvbm_object_read_failures``  counter  G4 gets that failed: missing, corrupt or store errors
``kvbm_object_write_failures`` counter  G4 puts that failed
=============================  =======  ==================================================

N is ``DYN_KVBM_CACHE_STATS_MAX_REQUESTS`` (1000); lookups that query no block are not counted.
Like Dynamo's, counter samples carry no ``_total`` suffix and every ``# TYPE`` line names the
sample itself; that is why the text is rendered here and not by ``prometheus_client``'s
exposition (which writes ``# TYPE kvbm_matched_tokens_total``). The metric objects are
``prometheus_client`` families in a private :class:`~prometheus_client.CollectorRegistry`
(``KvbmMetrics.registry``), so they can also be mounted elsewhere.

kvbm's additions: ``kvbm_requested_tokens`` (lookup tokens, the token hit-rate denominator),
``kvbm_match_requests``, ``kvbm_transfer_bytes{direction}`` and the histogram
``kvbm_transfer_seconds{direction}`` (direction: d2h store, h2d load, h2disk offload, disk2h
staging, h2obj put, obj2h staging), pool occupancy ``kvbm_pool_{capacity,registered,free}_blocks{tier}`` and
``kvbm_pool_{pinned,writing}_blocks{tier="host"}``, ``kvbm_block_bytes``,
``kvbm_evicted_blocks{tier}``, ``kvbm_disk_checksum_failures``, ``kvbm_disk_io_errors``,
``kvbm_disk_offload_skipped{reason}``, ``kvbm_disk_tier_enabled`` (1 on, 0 off or not
configured), ``kvbm_object_tier_enabled``, ``kvbm_object_offload_skipped{reason}``,
``kvbm_object_checksum_failures``, ``kvbm_object_lookup_blocks`` / ``kvbm_object_lookup_found``
(store lookups of hashes past a match, and the blocks they found), ``kvbm_ranks_alive``, ``kvbm_world_size``, ``kvbm_leader_state{state}`` (1 for the
current state), ``kvbm_ops_in_flight``, ``kvbm_failed_loads``, ``kvbm_aborted_stores``,
``kvbm_rejected_messages``.

The server binds 127.0.0.1 (Dynamo binds 0.0.0.0): the leader's sockets are loopback-only unless
``DYN_KVBM_ALLOW_NON_LOOPBACK=1``, which also makes the metrics server bind 0.0.0.0.
"""

from __future__ import annotations

import bisect
import errno
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client.core import CollectorRegistry, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from kvbm.ipc.stats import DiskCounters, LeaderCounters, LeaderState, LeaderStats, ObjectCounters

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.leader.registry import BlockEvent
    from kvbm.leader.server import LeaderServer

__all__ = ["KvbmMetrics", "MetricsServer", "start_metrics_server", "start_leader_metrics", "metrics_host"]

log = logging.getLogger(__name__)

DIRECTIONS = ("d2h", "h2d", "h2disk", "disk2h", "h2obj", "obj2h")
# Transfer latency buckets (s): a one-block memcpy takes microseconds, a large batch or a disk
# read under load up to seconds.
LATENCY_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histogram:
    """Cumulative-on-read histogram of one label set."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip([*map(floatToGoString, self.bounds), "+Inf"], self.counts):
            acc += n
            out.append((bound, float(acc)))
        return out


class KvbmMetrics:
    """Leader metrics: a :class:`kvbm.leader.observers.LeaderObserver` and a Prometheus collector.

    The observer hooks run on the leader's loop thread and keep what only they see (lookups,
    bytes, latencies) under a lock; the rest is read from ``stats()`` (the core's typed
    :class:`~kvbm.leader.core.LeaderStats`) at scrape time, on the HTTP server's thread.
    """

    def __init__(self, stats: Callable[[], LeaderStats], *, window: int = 1000) -> None:
        """``stats()``: the leader's typed stats; ``window``: lookups in the hit-rate gauges."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._stats = stats
        self._lock = threading.Lock()
        self._window: deque[tuple[int, int, int, int]] = deque()
        self._window_len = window
        self._win_queried = self._win_host = self._win_disk = self._win_object = 0
        self.match_requests = 0
        self.requested_tokens = 0
        self.matched_tokens = 0
        self._bytes = dict.fromkeys(DIRECTIONS, 0)
        self._latency = {d: _Histogram(LATENCY_BUCKETS) for d in DIRECTIONS}
        self._last_stats = LeaderStats(LeaderState.WAITING, LeaderCounters(), 0, 0, 0)
        self._onboard_h2d = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- observer hooks (leader thread) -------------------------------------------------
    def on_match(self, queried: int, host: int, disk: int, block_size: int, obj: int = 0) -> None:
        """Count one lookup and slide the hit-rate window."""
        with self._lock:
            self.match_requests += 1
            self.requested_tokens += queried * block_size
            self.matched_tokens += (host + disk + obj) * block_size
            if queried <= 0:
                return
            self._window.append((queried, host, disk, obj))
            self._win_queried += queried
            self._win_host += host
            self._win_disk += disk
            self._win_object += obj
            if len(self._window) > self._window_len:
                q, h, d, o = self._window.popleft()
                self._win_queried -= q
                self._win_host -= h
                self._win_disk -= d
                self._win_object -= o

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        """Count bytes and observe the latency of one finished transfer."""
        with self._lock:
            if direction not in self._bytes:  # a direction this module does not know yet
                self._bytes[direction] = 0
                self._latency[direction] = _Histogram(LATENCY_BUCKETS)
            self._bytes[direction] += nbytes
            self._latency[direction].observe(max(0.0, seconds))

    def on_events(self, events: list[BlockEvent]) -> None:
        """Evictions are counted by the leader itself (read from stats)."""

    # -- reading ------------------------------------------------------------------------
    def hit_rates(self) -> tuple[float, float]:
        """(host, disk) hit rate over the window: hit blocks / blocks queried; 0 when empty."""
        with self._lock:
            q = self._win_queried
            return (self._win_host / q, self._win_disk / q) if q else (0.0, 0.0)

    def object_hit_rate(self) -> float:
        """G4 hit blocks / blocks queried over the window; 0 when empty."""
        with self._lock:
            return self._win_object / self._win_queried if self._win_queried else 0.0

    def _snapshot(self) -> LeaderStats:
        # stats() runs on this (HTTP) thread while the leader mutates its dicts: a "changed size
        # during iteration" is possible, if rare. Retry, then fall back to the last good one.
        for _ in range(3):
            try:
                self._last_stats = self._stats()
                break
            except RuntimeError:
                continue
        return self._last_stats

    def collect(self) -> Iterator[Metric]:
        """Every metric, freshly computed (the Prometheus collector interface)."""
        s = self._snapshot()
        c = s.counters
        dc = s.disk_tier.counters if s.disk_tier is not None else DiskCounters()
        oc = s.object_tier.counters if s.object_tier is not None else ObjectCounters()
        host_rate, disk_rate = self.hit_rates()
        object_rate = self.object_hit_rate()
        with self._lock:
            own = (self.matched_tokens, self.requested_tokens, self.match_requests)
            nbytes = dict(self._bytes)
            latency = {d: (h.buckets(), h.total) for d, h in self._latency.items()}
        # A difference of two counters read while the leader thread updates them could dip below
        # its last value (a false counter reset for Prometheus): never report less than before.
        self._onboard_h2d = max(self._onboard_h2d, float(c.blocks_loaded - c.blocks_loaded_from_disk
                                                         - c.blocks_loaded_from_object))

        yield _counter("kvbm_matched_tokens", "Tokens found in G2, G3 or G4 by lookups", own[0])
        yield _counter("kvbm_offload_blocks_d2h", "Blocks offloaded device to host (G1 -> G2)", c.blocks_stored)
        yield _counter("kvbm_offload_blocks_h2d", "Blocks offloaded host to disk (G2 -> G3)", dc.offloaded_blocks)
        yield _counter("kvbm_offload_blocks_d2d", "Blocks offloaded device to disk directly (always 0: "
                       "kvbm writes disk from G2)", 0.0)
        yield _counter("kvbm_onboard_blocks_h2d", "Blocks onboarded host to device (from G2)", self._onboard_h2d)
        yield _counter("kvbm_onboard_blocks_d2d", "Blocks onboarded disk to device (from G3, staged in G2)",
                       c.blocks_loaded_from_disk)
        yield _gauge("kvbm_host_cache_hit_rate", "G2 hit blocks / blocks queried over the last lookups", host_rate)
        yield _gauge("kvbm_disk_cache_hit_rate", "G3 hit blocks / blocks queried over the last lookups", disk_rate)
        yield _counter("kvbm_offload_blocks_d2o", "Blocks put in the object store (G2 -> G4)", oc.offloaded_blocks)
        yield _counter("kvbm_onboard_blocks_o2d", "Blocks onboarded object store to device (from G4, staged in G2)",
                       c.blocks_loaded_from_object)
        yield _gauge("kvbm_object_cache_hit_rate", "G4 hit blocks / blocks queried over the last lookups",
                     object_rate)
        yield _counter("kvbm_object_read_failures", "G4 gets that failed: missing, corrupt (never loaded) or "
                       "store errors (the engine recomputes)", oc.read_failures)
        yield _counter("kvbm_object_write_failures", "G4 puts that failed (never matchable)", oc.write_failures)

        yield _counter("kvbm_requested_tokens", "Tokens asked about by lookups (token hit rate: "
                       "kvbm_matched_tokens / kvbm_requested_tokens)", own[1])
        yield _counter("kvbm_match_requests", "Lookups served", own[2])
        yield _labelled("counter", "kvbm_transfer_bytes", "Bytes moved, per direction (d2h store, h2d load, "
                        "h2disk offload, disk2h staging)", "direction", nbytes)
        hist = HistogramMetricFamily("kvbm_transfer_seconds", "Transfer latency, per direction",
                                     labels=["direction"])
        for d, (buckets, total) in latency.items():
            hist.add_metric([d], buckets, total)
        yield hist

        pools = {t: p for t, p in (("host", s.host), ("disk", s.disk), ("object", s.object)) if p is not None}
        for what, doc in (("capacity", "Slots of the tier's pool"), ("registered", "Matchable blocks"),
                          ("free", "Slots holding nothing")):
            yield _labelled("gauge", f"kvbm_pool_{what}_blocks", doc, "tier",
                            {t: getattr(p, what) for t, p in pools.items()})
        yield _labelled("gauge", "kvbm_pool_pinned_blocks", "Blocks pinned by loads in flight", "tier",
                        {"host": s.host.pinned} if s.host is not None else {})
        yield _labelled("gauge", "kvbm_pool_writing_blocks", "Slots allocated for stores in flight", "tier",
                        {"host": s.host.writing} if s.host is not None else {})
        yield _gauge("kvbm_block_bytes", "Bytes of one block (all ranks' slices)", s.block_bytes or 0)
        yield _labelled("counter", "kvbm_evicted_blocks", "Blocks evicted, per tier", "tier",
                        {"host": c.host_evictions, "disk": c.disk_evictions, "object": c.object_evictions})
        yield _counter("kvbm_disk_checksum_failures", "Disk blocks that failed their checksum (dropped, never "
                       "loaded)", dc.checksum_failures)
        yield _counter("kvbm_disk_io_errors", "Disk I/O errors (the first one switches the tier off)",
                       dc.io_errors)
        yield _labelled("counter", "kvbm_disk_offload_skipped", "G2 blocks not offloaded to disk: filter "
                        "(not seen twice) or busy (writes backed up)", "reason",
                        {"filter": dc.offload_skipped_filter, "busy": dc.offload_skipped_busy})
        yield _gauge("kvbm_disk_tier_enabled", "1 while the disk tier serves, 0 when off or not configured",
                     float(s.disk_tier is not None and s.disk_tier.enabled))
        yield _gauge("kvbm_object_tier_enabled", "1 while the object tier serves, 0 when off or not configured",
                     float(s.object_tier is not None and s.object_tier.enabled))
        yield _labelled("counter", "kvbm_object_offload_skipped", "G2 blocks not put in the object store: filter "
                        "(not seen twice) or busy (puts backed up)", "reason",
                        {"filter": oc.offload_skipped_filter, "busy": oc.offload_skipped_busy})
        yield _counter("kvbm_object_checksum_failures", "G4 objects corrupt, short or foreign (dropped, never "
                       "loaded)", oc.checksum_failures)
        yield _counter("kvbm_object_lookup_blocks", "Hashes past a match asked of the object store",
                       oc.lookup_blocks)
        yield _counter("kvbm_object_lookup_found", "Blocks store lookups found (put by any instance)",
                       oc.lookup_found)
        yield _gauge("kvbm_ranks_alive", "Worker ranks alive", s.ranks_alive)
        yield _gauge("kvbm_world_size", "Worker ranks expected", s.world_size)
        yield _labelled("gauge", "kvbm_leader_state", "1 for the leader's current state", "state",
                        {st.value: float(st is s.state) for st in LeaderState})
        yield _gauge("kvbm_ops_in_flight", "Load and store operations in flight", s.ops_in_flight)
        yield _counter("kvbm_failed_loads", "Load operations that failed (the engine recomputes)", c.loads_failed)
        yield _counter("kvbm_aborted_stores", "Store operations aborted (never matchable)", c.stores_aborted)
        yield _counter("kvbm_rejected_messages", "Malformed or refused requests", c.rejected_messages)

    def render(self) -> bytes:
        """The Prometheus text format (0.0.4) of every metric, Dynamo's naming (see module doc)."""
        return render(self.registry)


def _counter(name: str, doc: str, value: float) -> Metric:
    m = Metric(name, doc, "counter")  # not CounterMetricFamily: it appends _total
    m.add_sample(name, {}, float(value))
    return m


def _gauge(name: str, doc: str, value: float) -> Metric:
    m = Metric(name, doc, "gauge")
    m.add_sample(name, {}, float(value))
    return m


def _labelled(typ: str, name: str, doc: str, label: str, values: Mapping[str, float]) -> Metric:
    m = Metric(name, doc, typ)
    for key, v in values.items():
        m.add_sample(name, {label: key}, float(v))
    return m


def _escape_label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(registry: CollectorRegistry) -> bytes:
    """Text format 0.0.4 with ``# HELP``/``# TYPE`` naming each family as its samples do."""
    out: list[str] = []
    for metric in registry.collect():
        typ = "untyped" if metric.type == "unknown" else metric.type
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {metric.name} {doc}\n# TYPE {metric.name} {typ}\n")
        for s in metric.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                       else f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode()


class MetricsServer:
    """A running ``/metrics`` HTTP server (daemon thread)."""

    def __init__(self, httpd: ThreadingHTTPServer, host: str) -> None:
        self._httpd = httpd
        self.host = host
        self.port = int(httpd.server_address[1])  # the real one when asked for port 0
        self._thread = threading.Thread(target=httpd.serve_forever, name="kvbm-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics_server(metrics: KvbmMetrics, port: int, host: str = "127.0.0.1") -> MetricsServer | None:
    """Serve ``metrics`` on ``http://host:port/metrics``; port 0 picks a free one.

    A port in use (or any bind error) is one error line and None: the cache works on without
    metrics.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                self.send_error(404, "metrics are at /metrics")
                return
            try:
                body = metrics.render()
            except Exception:  # a bug here must not kill the server thread
                log.exception("rendering metrics failed")
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape would drown the leader's log

    try:
        httpd = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            log.error("metrics port %d is in use; set DYN_KVBM_METRICS_PORT to a free port "
                      "(kvbm runs on without metrics)", port)
        else:
            log.error("cannot serve metrics on %s:%d: %s (kvbm runs on without metrics)", host, port, e)
        return None
    httpd.daemon_threads = True
    return MetricsServer(httpd, host)


def metrics_host(config: KvbmConfig) -> str:
    """The metrics bind address: loopback unless DYN_KVBM_ALLOW_NON_LOOPBACK is set."""
    return "0.0.0.0" if config.allow_non_loopback else "127.0.0.1"


def start_leader_metrics(server: LeaderServer, config: KvbmConfig) -> MetricsServer | None:
    """Attach metrics to a leader and serve them on ``DYN_KVBM_METRICS_PORT``; None if the port fails."""
    metrics = KvbmMetrics(server.core.stats, window=config.cache_stats_max_requests)
    http = start_metrics_server(metrics, config.metrics_port, metrics_host(config))
    if http is None:
        return None
    if http.host == "0.0.0.0":
        log.warning("metrics served on all interfaces, port %d (DYN_KVBM_ALLOW_NON_LOOPBACK is set)", http.port)
    else:
        log.info("metrics at %s", http.url)
    server.core.observers.append(metrics)
    return http
