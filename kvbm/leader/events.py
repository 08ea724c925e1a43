"""KV-cache events from the leader, in vLLM's KV-event wire format, on a ZMQ PUB socket.

KV-aware routers (vLLM's, Dynamo's, llm-d's) track which blocks each worker holds from a stream of
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events. The leader publishes those of its
host (G2, medium ``"CPU"``), disk (G3, ``"STORAGE"``) and object (G4, ``"EXTERNAL"``: the objects
this leader knows in the store) tiers (:attr:`kvbm.leader.registry.Tier.medium`), so such a router
consumes them unchanged, the same way as vLLM's ``ZmqEventPublisher`` output:

* one multipart message per batch: ``[topic, seq, payload]``, ``seq`` an 8-byte big-endian counter
  from 0 (a gap tells a subscriber it missed batches; there is no replay socket);
* ``payload`` is the msgpack of vLLM's ``KVEventBatch`` (``msgspec`` struct, ``array_like``):
  ``[ts, [event, ...], data_parallel_rank]``; each event a map tagged with its ``"type"`` and its
  fields in declaration order, defaulted trailing fields omitted (``omit_defaults``). The bytes are
  identical to ``msgspec.msgpack.encode(KVEventBatch(...))`` of vllm 0.33 (tested), produced with
  plain msgpack so that neither vllm nor msgspec is needed here.

``token_ids`` are the blocks' tokens: the engine's store allocations carry them
(:class:`kvbm.ipc.messages.AllocateStore`) and the leader keeps them while some tier holds the
block, because Dynamo's indexer keys a block by the hash of its tokens and drops a store without
them. A block of a request with a cache salt or a LoRA adapter goes out without tokens (so a
router that needs them ignores it): kvbm's engine side knows only the combined salt hash, and a
router keying it by its tokens alone would offer it to requests that cannot use it. The same for
blocks the leader was never told the tokens of (stored by a client that does not send them).
``lora_id`` / ``lora_name`` are None. ``block_hashes`` are kvbm's 64-bit sequence hashes
(Dynamo's scheme), as ints. Consecutive stores that chain (each block's parent is the previous
block) travel as one ``BlockStored``, as vLLM sends them.

A tier clear (cache reset, or the disk tier switched off after an I/O error) is sent as one
``AllBlocksCleared``, which has no medium: a subscriber forgets every block of this publisher,
also those still in the other tier. That under-reports (a router misses some hits), never
over-reports.

Off by default; ``DYN_KVBM_KV_EVENTS_ENDPOINT`` names the address the leader binds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zmq

from kvbm.ipc.messages import BlockEventKind
from kvbm.leader.registry import BlockEvent

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.leader.server import LeaderServer

__all__ = ["KvEventPublisher", "wire_events", "encode_batch", "decode_batch", "start_leader_events"]

log = logging.getLogger(__name__)

DEFAULT_HWM = 100_000  # batches queued per subscriber before PUB drops (vLLM's default)
# vLLM event structs with 16 or more fields counting the "type" tag (BlockStored: 15 + tag).
_WIDE_MAP_EVENTS = frozenset({"BlockStored"})


def _no_tokens(seq_hash: int) -> bytes:
    return b""


def wire_events(events: Sequence[BlockEvent], block_size: int,
                token_ids: Callable[[int], bytes] = _no_tokens) -> list[dict[str, Any]]:
    """Turn registry events into vLLM event maps (``"type"`` first, fields in vLLM's order).

    ``token_ids(hash)``: a block's token ids as u32 little-endian bytes, empty when unknown.
    Runs of chained stores of one tier become one ``BlockStored`` (its ``token_ids`` every block's
    tokens in order, so a run never mixes blocks with and without them), runs of removals of one
    tier one ``BlockRemoved``, runs of clears one ``AllBlocksCleared``; order is kept.
    """
    out: list[dict[str, Any]] = []
    prev: BlockEvent | None = None
    prev_kind: BlockEventKind | None = None
    prev_tokens = b""
    for e in events:
        kind = e.kind
        if kind is BlockEventKind.STORED:
            tokens = token_ids(e.seq_hash)
            if (prev is not None and prev_kind is kind and prev.tier is e.tier and e.parent_hash == prev.seq_hash
                    and bool(tokens) == bool(prev_tokens)):
                out[-1]["block_hashes"].append(e.seq_hash)
                out[-1]["token_ids"] += np.frombuffer(tokens, "<u4").tolist()
            else:
                out.append({
                    "type": "BlockStored",
                    "block_hashes": [e.seq_hash],
                    "parent_block_hash": e.parent_hash,
                    "token_ids": np.frombuffer(tokens, "<u4").tolist(),
                    "block_size": block_size,
                    "lora_id": None,
                    "medium": e.tier.medium,
                    "lora_name": None,
                })
            prev_tokens = tokens
        elif kind is BlockEventKind.REMOVED:
            if prev is not None and prev_kind is kind and prev.tier is e.tier:
                out[-1]["block_hashes"].append(e.seq_hash)
            else:
                out.append({"type": "BlockRemoved", "block_hashes": [e.seq_hash], "medium": e.tier.medium})
        elif prev_kind is not BlockEventKind.CLEARED:
            out.append({"type": "AllBlocksCleared"})
        prev, prev_kind = e, kind
    return out


def encode_batch(ts: float, events: list[dict[str, Any]], data_parallel_rank: int = 0) -> bytes:
    """The msgpack bytes of a vLLM ``KVEventBatch`` (what ``ZmqEventPublisher`` sends)."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_array_header(3), packer.pack(float(ts)), packer.pack_array_header(len(events))]
    for ev in events:
        body = packer.pack(ev)
        if ev["type"] in _WIDE_MAP_EVENTS:
            # msgspec gives structs of 16+ fields (tag included) a map16 header even when fewer
            # are present: the same here, so that the bytes are identical.
            body = b"\xde" + len(ev).to_bytes(2, "big") + body[1:]
        parts.append(body)
    parts.append(packer.pack(data_parallel_rank))
    return b"".join(parts)


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """Decode a ``KVEventBatch`` payload with plain msgpack: (ts, event maps, dp rank)."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(batch, list) or len(batch) not in (2, 3) or not isinstance(batch[1], list):
        raise ValueError("not a KVEventBatch")
    return float(batch[0]), batch[1], batch[2] if len(batch) == 3 else None


class KvEventPublisher:
    """Publishes the leader's block events; a :class:`kvbm.leader.observers.LeaderObserver`.

    Called on the leader's loop thread. Sending never blocks it: a PUB socket drops batches for a
    subscriber that is ``hwm`` batches behind, and a send error is logged once and counted.
    """

    def __init__(
        self,
        endpoint: str,
        block_size: Callable[[], int],
        *,
        token_ids: Callable[[int], bytes] = _no_tokens,
        topic: str = "",
        data_parallel_rank: int = 0,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Bind a PUB socket on ``endpoint``; ``block_size()`` gives the engine's tokens per block."""
        self._block_size = block_size
        self._token_ids = token_ids
        self._topic = topic.encode()
        self._dp_rank = data_parallel_rank
        self._clock = clock
        self._seq = 0
        self.send_errors = 0
        self._sock = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.set_hwm(hwm)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._sock.close(0)
            raise
        # The bound address (tcp port 0 resolves to the real port).
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def batches_sent(self) -> int:
        """Batches published so far (the next batch's sequence number)."""
        return self._seq

    def on_match(self, queried: int, host: int, disk: int, block_size: int, obj: int = 0) -> None:
        """Lookups carry no events."""

    def on_transfer(self, direction: str, blocks: int, nbytes: int, seconds: float) -> None:
        """Transfers carry no events (the registry changes they cause do)."""

    def on_events(self, events: list[BlockEvent]) -> None:
        """Publish one batch holding ``events``."""
        if not events or self._sock.closed:
            return
        payload = encode_batch(self._clock(), wire_events(events, self._block_size(), self._token_ids),
                               self._dp_rank)
        self.publish(payload)

    def publish(self, payload: bytes) -> None:
        """Send an encoded batch with the next sequence number."""
        try:
            self._sock.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.send_errors += 1
            if self.send_errors == 1:
                log.error("KV events: cannot publish on %s: %s (further errors are counted, not logged)",
                          self.endpoint, e)
            return
        self._seq += 1

    def close(self) -> None:
        """Close the socket (pending batches are dropped: subscribers resync from the gap)."""
        self._sock.close(0)


def start_leader_events(server: LeaderServer, config: KvbmConfig) -> KvEventPublisher | None:
    """Publish a leader's block events on ``DYN_KVBM_KV_EVENTS_ENDPOINT``.

    A refused (non-loopback without ``DYN_KVBM_ALLOW_NON_LOOPBACK``) or unbindable endpoint is one
    error line and None: the cache works on without events.
    """
    from kvbm.ipc.transport import check_bind_endpoint

    endpoint = config.kv_events_endpoint
    if not endpoint:
        return None

    try:
        check_bind_endpoint(endpoint, config.allow_non_loopback)
        # Events flow only once every rank has registered its layout (they all agree).
        pub = KvEventPublisher(endpoint, server.core.block_size, token_ids=server.core.events.token_ids)
    except (PermissionError, zmq.ZMQError) as e:
        log.error("KV events off: cannot publish on DYN_KVBM_KV_EVENTS_ENDPOINT=%s: %s", endpoint, e)
        return None
    log.info("KV events published on %s", pub.endpoint)
    server.core.observers.append(pub)
    return pub
