"""KV events: vLLM's wire format, grouping, and a real leader publishing to a ZMQ SUB client."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from kvbm.config import ConfigError
from kvbm.leader.events import KvEventPublisher, decode_batch, encode_batch, start_leader_events, wire_events
from kvbm.hashing import sequence_hashes
from kvbm.ipc.messages import BlockEventKind, unpack_hashes
from kvbm.ipc.stats import LeaderStats
from kvbm.leader.registry import BlockEvent, Tier
from kvbm.testing.sim.engine import SimEngine, chat_workload
from kvbm.testing.sim.rank import SimModel

HOST, DISK = Tier.HOST, Tier.DISK
BLOCK_SIZE = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stored(tier: Tier, h: int, parent: int | None) -> BlockEvent:
    return BlockEvent(BlockEventKind.STORED, tier, h, parent)


def _removed(tier: Tier, h: int) -> BlockEvent:
    return BlockEvent(BlockEventKind.REMOVED, tier, h, None)


def _cleared(tier: Tier) -> BlockEvent:
    return BlockEvent(BlockEventKind.CLEARED, tier, 0, None)


# ---------------------------------------------------------------------------------------------
# format


def test_stored_events_carry_each_blocks_tokens_and_never_mix_unknown_ones() -> None:
    import numpy as np

    tokens = {1: list(range(16)), 2: list(range(16, 32)), 4: [2**32 - 1] * 16}  # 3: not told
    evs = [_stored(HOST, 1, None), _stored(HOST, 2, 1), _stored(HOST, 3, 2), _stored(HOST, 4, 3)]
    _, events, _ = decode_batch(encode_batch(0.0, wire_events(
        evs, BLOCK_SIZE, lambda h: np.asarray(tokens.get(h, []), "<u4").tobytes())))
    assert [(e["block_hashes"], e["parent_block_hash"], e["token_ids"]) for e in events] == [
        ([1, 2], None, tokens[1] + tokens[2]),
        ([3], 2, []),  # a router without tokens ignores it; the run splits around it
        ([4], 3, tokens[4]),
    ]


def test_chained_stores_group_and_tiers_split() -> None:
    evs = [
        _removed(HOST, 7), _removed(HOST, 8),  # evictions made room for the store
        _stored(HOST, 1, None), _stored(HOST, 2, 1), _stored(HOST, 3, 2),
        _stored(HOST, 10, 99),  # another request: does not chain
        _stored(DISK, 1, None),
        _removed(DISK, 5),
        _cleared(HOST), _cleared(DISK),  # a reset clears both tiers: one AllBlocksCleared
    ]
    ts, events, dp = decode_batch(encode_batch(123.5, wire_events(evs, BLOCK_SIZE)))
    assert (ts, dp) == (123.5, 0)
    assert events == [
        {"type": "BlockRemoved", "block_hashes": [7, 8], "medium": "CPU"},
        {"type": "BlockStored", "block_hashes": [1, 2, 3], "parent_block_hash": None, "token_ids": [],
         "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None},
        {"type": "BlockStored", "block_hashes": [10], "parent_block_hash": 99, "token_ids": [],
         "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None},
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [],
         "block_size": 16, "lora_id": None, "medium": DISK.medium, "lora_name": None},
        {"type": "BlockRemoved", "block_hashes": [5], "medium": DISK.medium},
        {"type": "AllBlocksCleared"},
    ]


def test_full_64_bit_hashes_survive() -> None:
    big = (1 << 64) - 1
    _, events, _ = decode_batch(encode_batch(0.0, wire_events([_stored(HOST, big, (1 << 63) + 5)], 32)))
    assert events[0]["block_hashes"] == [big] and events[0]["parent_block_hash"] == (1 << 63) + 5


def test_publisher_frames_topic_seq_payload() -> None:
    ctx: zmq.Context = zmq.Context.instance()
    pub = KvEventPublisher("tcp://127.0.0.1:0", lambda: BLOCK_SIZE, topic="kv", clock=lambda: 42.0)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    try:
        # PUB drops what it sends before the subscription arrives: publish until one gets through.
        deadline = time.monotonic() + 5
        while not sub.poll(20):
            assert time.monotonic() < deadline, "no batch arrived"
            pub.on_events([_stored(HOST, 1, None)])
        frames = sub.recv_multipart()
        first = int.from_bytes(frames[1], "big")
        pub.on_events([])  # nothing to say: nothing sent
        pub.on_events([_removed(HOST, 1)])
        topic, seq, payload = sub.recv_multipart() if sub.poll(2000) else pytest.fail("no second batch")
        assert topic == b"kv" and len(seq) == 8 and int.from_bytes(seq, "big") == first + 1
        assert decode_batch(payload) == (42.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "CPU"}], 0)
        assert pub.batches_sent == first + 2
    finally:
        sub.close(0)
        pub.close()


def test_non_loopback_endpoint_is_refused_by_the_configuration(make_config) -> None:
    """It used to pass `kvbm config` and then be switched off in the leader (hardening item 8)."""
    port = _free_port()
    with pytest.raises(ConfigError, match=f"^DYN_KVBM_KV_EVENTS_ENDPOINT='tcp://0.0.0.0:{port}': expected a "
                                          "loopback address .* set DYN_KVBM_ALLOW_NON_LOOPBACK=1"):
        make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_KV_EVENTS_ENDPOINT=f"tcp://0.0.0.0:{port}")


def test_unbindable_endpoint_is_one_error_and_no_publisher(make_config, caplog) -> None:
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_KV_EVENTS_ENDPOINT=endpoint)
    busy = zmq.Context.instance().socket(zmq.PUB)
    busy.bind(endpoint)  # someone else publishes there already
    try:
        server = SimpleNamespace(core=SimpleNamespace(observers=[], block_size=lambda: 16,
                                                   events=SimpleNamespace(token_ids=lambda h: b"")))
        with caplog.at_level(logging.ERROR, logger="kvbm.leader.events"):
            assert start_leader_events(server, cfg) is None  # type: ignore[arg-type]
        assert server.core.observers == []
        [msg] = [r.getMessage() for r in caplog.records]
        assert msg.startswith(f"KV events off: cannot publish on DYN_KVBM_KV_EVENTS_ENDPOINT={endpoint}: ")
        assert "Address already in use" in msg
    finally:
        busy.close(0)


# ---------------------------------------------------------------------------------------------
# a real leader, ranks and disk tier, and a SUB client


@dataclass
class Capture:
    frames: list[list[bytes]]  # [topic, seq, payload] per batch, in order
    expected: list[tuple[Any, ...]]  # the leader's own event log (TakeEvents), flattened
    stats: LeaderStats
    prompts: list[list[int]]
    cleared_frames: list[list[bytes]]  # after reset_cache


def _flatten(batches: list[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for events in batches:
        for e in events:
            if e["type"] == "AllBlocksCleared":
                out.append(("cleared",))
            else:
                kind = "stored" if e["type"] == "BlockStored" else "removed"
                out.extend((kind, e["medium"], h) for h in e["block_hashes"])
    return out


def _recv_until(sub: zmq.Socket, frames: list[list[bytes]], n_events: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_flatten([decode_batch(f[2])[1] for f in frames])) < n_events:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sub.poll(int(remaining * 1000)):
            break
        frames.append(sub.recv_multipart())


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Capture:
    from kvbm.config import load_config

    tmp = tmp_path_factory.mktemp("events")
    port = _free_port()
    cfg = load_config({
        "DYN_KVBM_RUN_DIR": str(tmp / "run"),
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "40",  # smaller than the working set: evictions
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "60",
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp),
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
        "DYN_KVBM_KV_EVENTS_ENDPOINT": f"tcp://127.0.0.1:{port}",
    })
    sub: zmq.Socket = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # Connected before the leader binds: zmq retries, and is subscribed long before the first
    # event (the ranks' init sync comes first). seq starting at 0 proves nothing was missed.
    sub.connect(f"tcp://127.0.0.1:{port}")
    model = SimModel(num_layers=2, kv_heads=1, head_dim=32, num_gpu_blocks=40)
    prompts = list(chat_workload(6, 3, system_tokens=64, turn_tokens=40, seed=3))
    frames: list[list[bytes]] = []
    try:
        with SimEngine(cfg, world_size=2, model=model) as sim:
            sim.run(prompts)
            sim.reset_engine_cache()
            sim.run(prompts)
            assert sim.stats.mismatches == 0 and sim.stats.tokens_from_disk > 0
            stats = sim.quiesce()
            assert sim.client is not None
            reply = sim.client.take_events()
            assert reply is not None
            expected: list[tuple[Any, ...]] = []
            for kind, tier, h in zip(reply.kinds, reply.tiers, unpack_hashes(reply.hashes)):
                if kind == 2:
                    expected.append(("cleared",))
                else:
                    expected.append(("stored" if kind == 0 else "removed", Tier(tier).medium, h))
            _recv_until(sub, frames, len(expected))
            assert sim.client.reset_cache()
            cleared: list[list[bytes]] = []
            _recv_until(sub, cleared, 1)
    finally:
        sub.close(0)
    return Capture(frames, expected, stats, prompts, cleared)


@pytest.mark.slow  # leader and rank processes (the capture fixture)
def test_sub_client_sees_exactly_the_leaders_events(capture: Capture) -> None:
    seqs = [int.from_bytes(f[1], "big") for f in capture.frames]
    assert seqs == list(range(len(seqs)))  # from 0, no gap: nothing lost
    assert all(f[0] == b"" for f in capture.frames)
    batches = [decode_batch(f[2]) for f in capture.frames]
    assert all(dp == 0 and ts > 1e9 for ts, _, dp in batches)
    got = _flatten([events for _, events, _ in batches])
    assert got == capture.expected
    # Grouping at work: fewer BlockStored maps than stored blocks.
    n_stored_maps = sum(e["type"] == "BlockStored" for _, evs, _ in batches for e in evs)
    assert n_stored_maps < sum(1 for g in got if g[0] == "stored")


@pytest.mark.slow  # leader and rank processes (the capture fixture)
def test_events_account_for_every_store_eviction_and_offload(capture: Capture) -> None:
    got = _flatten([decode_batch(f[2])[1] for f in capture.frames])
    s = capture.stats

    def count(kind: str, medium: str) -> int:
        return sum(1 for g in got if g[0] == kind and g[1] == medium)

    # G2 registrations: stores from the engine plus blocks staged back from disk.
    assert count("stored", "CPU") == s.counters.blocks_stored + s.disk_tier.counters.onboarded_blocks
    assert count("removed", "CPU") == s.counters.host_evictions > 0
    assert count("stored", DISK.medium) == s.disk_tier.counters.offloaded_blocks > 0
    assert count("removed", DISK.medium) == s.counters.disk_evictions
    # What a router would hold now is what the leader holds.
    for medium, pool in (("CPU", s.host), (DISK.medium, s.disk)):
        held: set[int] = set()
        for g in got:
            if g[1] == medium:
                (held.add if g[0] == "stored" else held.discard)(g[2])
        assert len(held) == pool.registered


def _stored_chains(capture: Capture) -> tuple[dict[int, int | None], list[list[int | None]]]:
    parent_of: dict[int, int | None] = {}
    tokens_of: dict[int, list[int]] = {}
    for p in capture.prompts:
        hs = sequence_hashes(p, BLOCK_SIZE)
        parent_of.update(zip(hs, [None, *hs[:-1]]))
        tokens_of.update((h, list(p[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])) for i, h in enumerate(hs))
    chains = []
    for f in capture.frames:
        for e in decode_batch(f[2])[1]:
            if e["type"] == "BlockStored":
                assert e["block_size"] == BLOCK_SIZE and e["lora_id"] is None
                # Every block's own tokens, in order: what a router hashes to index it (G2 stores,
                # G3 offloads and blocks staged back from G3 alike).
                assert e["token_ids"] == [t for h in e["block_hashes"] for t in tokens_of[h]]
                chains.append([e["parent_block_hash"], *e["block_hashes"]])
    return parent_of, chains


@pytest.mark.slow  # leader and rank processes (the capture fixture)
def test_stored_events_chain_like_the_prompts(capture: Capture) -> None:
    parent_of, chains = _stored_chains(capture)
    for chain in chains:
        assert all(h in parent_of for h in chain[1:])
        if chain[0] is not None:
            assert parent_of[chain[1]] == chain[0]  # type: ignore[index]
        for parent, h in zip(chain[1:], chain[2:]):
            assert parent_of[h] == parent  # type: ignore[index]


@pytest.mark.slow  # leader and rank processes (the capture fixture)
def test_stored_events_name_the_parent_of_every_non_root_block(capture: Capture) -> None:
    parent_of, chains = _stored_chains(capture)
    assert all(parent_of[chain[1]] == chain[0] for chain in chains)  # type: ignore[index]


@pytest.mark.slow  # leader and rank processes (the capture fixture)
def test_reset_cache_publishes_one_all_blocks_cleared(capture: Capture) -> None:
    assert len(capture.cleared_frames) == 1
    last_seq = int.from_bytes(capture.frames[-1][1], "big")
    assert int.from_bytes(capture.cleared_frames[0][1], "big") == last_seq + 1
    assert decode_batch(capture.cleared_frames[0][2])[1] == [{"type": "AllBlocksCleared"}]


@pytest.mark.slow  # leader and rank processes (the capture fixture)
@pytest.mark.vllm
def test_vllm_decodes_the_stream_and_reencodes_identical_bytes(capture: Capture) -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    import msgspec

    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    encoder = msgspec.msgpack.Encoder()
    for f in [*capture.frames, *capture.cleared_frames]:
        batch = decoder.decode(f[2])
        assert batch.data_parallel_rank == 0
        assert encoder.encode(batch) == f[2]  # byte for byte what vLLM's publisher sends
        for e in batch.events:
            assert isinstance(e, (kv_events.BlockStored, kv_events.BlockRemoved, kv_events.AllBlocksCleared))
            if not isinstance(e, kv_events.AllBlocksCleared):
                assert e.medium in ("CPU", DISK.medium)
