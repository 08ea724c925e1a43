"""What ``kvbm demo`` prints: the progress line, the G4 header line and the summary tables of
the simulated and of the real engine."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from kvbm.config import KvbmConfig
from kvbm.ipc.stats import DiskCounters, LeaderStats, ObjectTierStats
from kvbm.testing.sim.engine import SimStats

if TYPE_CHECKING:
    from kvbm.testing.cpu_engine import Completion


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, indented: a summary table."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def _rate_mb(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f} MB/s" if seconds > 0 else "-"


def progress_line(st: SimStats, total: int, started: float) -> str:
    """The simulated engine's progress: requests served, hit rate, tokens per tier, bytes moved."""
    moved = st.bytes_loaded + st.bytes_stored
    return (f"\r[{st.requests:4d}/{total}] hit rate {st.hit_rate:6.1%}  "
            f"G2 {st.tokens_from_host:7d} tok  G3 {st.tokens_from_disk:6d} tok  "
            f"moved {_gb(moved)}  mismatches {st.mismatches}  {time.monotonic() - started:5.1f} s")


def object_tier_line(cfg: KvbmConfig, instance: str = "{worker_id}") -> str:
    """The demo's G4 header line: bucket, endpoint and how blocks get there."""
    how = "every block" if cfg.object_write_through else "blocks seen twice"
    bucket = cfg.object_bucket.replace("{worker_id}", instance)
    return f"object store (G4): bucket {bucket} at {cfg.object_endpoint or 'AWS S3 ' + cfg.object_region}, {how}"


def sim_summary(st: SimStats, leader: LeaderStats, seconds: float, ranks: int) -> str:
    """The demo's summary table for the simulated engine."""
    c = leader.counters
    disk = leader.disk_tier.counters if leader.disk_tier is not None else DiskCounters()
    rows = [
        ("requests", f"{st.requests}"),
        ("prompt tokens", f"{st.prompt_tokens}"),
        ("tokens from engine prefix cache (G1)", f"{st.tokens_local}"),
        ("tokens served from host pool (G2)", f"{st.tokens_from_host}"),
        ("tokens served from disk (G3)", f"{st.tokens_from_disk}"),
        ("tokens recomputed", f"{st.tokens_computed}"),
        ("external hit rate", f"{st.hit_rate:.1%}"),
        ("blocks offloaded G1->G2", f"{c.blocks_stored}"),
        ("blocks offloaded G2->G3", f"{disk.offloaded_blocks}"),
        ("blocks onboarded G2->G1", f"{st.blocks_loaded}"),
        ("blocks staged G3->G2", f"{disk.onboarded_blocks}"),
        ("host evictions / disk evictions", f"{c.host_evictions} / {c.disk_evictions}"),
        ("G1->G2 store copies", f"{_gb(st.bytes_stored)} at {_rate(st.bytes_stored, st.store_seconds)}"),
        ("G2->G1 load copies", f"{_gb(st.bytes_loaded)} at {_rate(st.bytes_loaded, st.load_seconds)}"),
        ("G2->G3 disk writes", f"{_gb(disk.bytes_written)} at {_rate(disk.bytes_written, disk.write_seconds)} per thread"),
        ("G3->G2 disk reads", f"{_gb(disk.bytes_read)} at {_rate(disk.bytes_read, disk.read_seconds)} per thread"),
        ("checksum failures (dropped, never served)", f"{disk.checksum_failures}"),
        *(_object_rows(leader.object_tier, st.tokens_from_object) if leader.object_tier is not None else []),
        ("bytes verified against the oracle", f"{_gb(st.bytes_loaded)} in {st.blocks_loaded} blocks x {ranks} ranks"),
        ("oracle mismatches (must be 0)", f"{st.mismatches}"),
        ("wall time", f"{seconds:.1f} s"),
    ]
    if leader.block_bytes:
        rows.insert(0, ("block size in the host pool", f"{leader.block_bytes} B"))
    return table(rows)


def _object_rows(tier: ObjectTierStats, tokens: int) -> list[tuple[str, str]]:
    """Summary rows of the object tier (G4)."""
    oc = tier.counters
    return [
        ("object tier (G4)", "on" if tier.enabled else "off (the leader's log says why)"),
        ("tokens served from the object store (G4)", f"{tokens}"),
        ("blocks put G2->G4 / staged G4->G2", f"{oc.offloaded_blocks} / {oc.onboarded_blocks}"),
        ("G2->G4 puts", f"{_gb(oc.bytes_written)} at {_rate_mb(oc.bytes_written, oc.write_seconds)} per thread"),
        ("G4->G2 gets", f"{_gb(oc.bytes_read)} at {_rate_mb(oc.bytes_read, oc.read_seconds)} per thread"),
        ("G4 put / get failures", f"{oc.write_failures} / {oc.read_failures}"),
    ]


def vllm_summary(base: list[list[Completion]], kv: list[list[Completion]], leader: LeaderStats, identical: bool,
                 seconds: float, block_tokens: int) -> str:
    """The demo's summary table for the real engine (``base`` / ``kv``: completions by turn;
    ``block_tokens``: the engine's block size)."""
    flat_b = [c for turn in base for c in turn]
    flat_k = [c for turn in kv for c in turn]
    prompt = sum(c.prompt_len for c in flat_k)
    engine_hits = sum(c.cached_tokens for c in flat_b)  # the same engine pool without kvbm
    cached = sum(c.cached_tokens for c in flat_k)
    c = leader.counters
    obj = c.blocks_loaded_from_object * block_tokens
    disk = c.blocks_loaded_from_disk * block_tokens
    host = c.blocks_loaded * block_tokens - disk - obj
    ttft_b = statistics.mean(c.ttft_s for c in flat_b)
    ttft_k = statistics.mean(c.ttft_s for c in flat_k)
    rows = [
        ("requests", f"{len(flat_k)}"),
        ("prompt tokens", f"{prompt}"),
        ("tokens from engine prefix cache (G1)", f"{cached - host - disk - obj}"),
        ("tokens served from host pool (G2)", f"{host}"),
        ("tokens served from disk (G3)", f"{disk}"),
        *([("tokens served from the object store (G4)", f"{obj}")] if leader.object_tier is not None else []),
        ("tokens recomputed", f"{prompt - cached}"),
        ("external hit rate", f"{(host + disk + obj) / max(1, prompt):.1%}"),
        ("tokens recomputed without kvbm", f"{prompt - engine_hits}"),
        ("blocks offloaded G1->G2", f"{c.blocks_stored}"),
        ("blocks offloaded G2->G3", f"{leader.disk_tier.counters.offloaded_blocks if leader.disk_tier else 0}"),
        ("blocks onboarded to the engine", f"{c.blocks_loaded}"),
        ("mean time to first token without kvbm", f"{ttft_b * 1e3:.0f} ms"),
        ("mean time to first token with kvbm", f"{ttft_k * 1e3:.0f} ms ({ttft_b / ttft_k:.2f}x faster)"),
        ("greedy tokens identical with and without kvbm", "yes" if identical else "NO"),
        ("wall time (both engines)", f"{seconds:.1f} s"),
    ]
    return table(rows)
