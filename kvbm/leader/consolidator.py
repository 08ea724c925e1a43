"""One KV-event stream for a router: a block is present while the engine's G1 or any kvbm tier
holds it (what Dynamo's KVBM consolidator gave, ``DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR``).

Inputs are streams in vLLM's ``KVEventBatch`` wire format (:mod:`kvbm.leader.events`): the
engine's own (vLLM's ``--kv-events-config`` publisher: its G1 blocks, medium ``GPU``, and, when
the connector forwards them, kvbm's) and, if kvbm publishes separately, the leader's
(``DYN_KVBM_KV_EVENTS_ENDPOINT``). Output: one stream in the same format whose block hashes are
kvbm's sequence hashes, a ``BlockStored`` when a block first becomes present somewhere (with its
tokens), a ``BlockRemoved`` when the last tier holding it dropped it; ``medium`` is None (the
stream says where a prefix is reusable, not in which tier).

The engine names its G1 blocks by its own hashes (vLLM's: sha256-based); kvbm's hash of a G1
block is computed from its tokens chained after its parent's kvbm hash, so a G1 block whose
parent the consolidator never saw (it started late, or the parent's event was lost) is
skipped, as are blocks the engine hashed with extra keys (a cache salt, a LoRA adapter,
multimodal inputs) and other KV cache groups than the first: kvbm announces those without
tokens itself (see :mod:`kvbm.leader.events`). An ``AllBlocksCleared``, or a gap in a stream's
sequence numbers (batches lost), drops every tier that stream reported: the router
under-reports until the blocks are stored again, never over-reports.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvbm.hashing import continue_sequence
from kvbm.leader.events import KvEventPublisher, decode_batch, encode_batch

log = logging.getLogger(__name__)

G1 = "GPU"  # the engine's tier; events with medium None are the engine's too (vLLM's default)
KVBM_MEDIA = frozenset({"CPU", "STORAGE", "EXTERNAL"})  # kvbm's tiers (kvbm.leader.registry.Tier.medium)


@dataclass
class _Stream:
    """One input: the tiers it reported and the sequence number it should send next."""

    tiers: set[str] = field(default_factory=set)
    next_seq: int | None = None


class Consolidator:
    """The merged presence of every block (socket-free; :func:`serve` runs it on ZMQ streams).

    ``apply(stream, events)`` takes one input batch's event maps and returns the output event
    maps it causes (possibly none).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tiers: dict[int, set[tuple[str, str]]] = {}  # kvbm hash -> {(stream, tier)}
        self._announced: set[int] = set()  # stored on the output, not removed since
        self._g1: dict[int, int] = {}  # engine block hash -> kvbm hash, while G1 holds the block
        self._streams: dict[str, _Stream] = {}
        self.skipped_blocks = 0  # G1 blocks no kvbm hash could be given (unknown parent, extra keys)

    def gap(self, stream: str, seq: int) -> list[dict[str, Any]]:
        """Batch ``seq`` arrived on ``stream``: after a gap (batches lost), its tiers are cleared."""
        st = self._streams.setdefault(stream, _Stream())
        expected, st.next_seq = st.next_seq, seq + 1
        if expected is None or seq == expected:
            return []
        log.warning("KV events of %s: batches %d..%d lost; its blocks are forgotten", stream, expected, seq - 1)
        return self._clear(stream)

    def apply(self, stream: str, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The output events of one input batch's ``events`` (vLLM event maps)."""
        out: list[dict[str, Any]] = []
        for ev in events:
            kind = ev.get("type")
            if kind == "AllBlocksCleared":
                out += self._clear(stream)
                continue
            medium = ev.get("medium")
            parent = ev.get("parent_block_hash")
            if medium in KVBM_MEDIA:
                hashes = [int(h) for h in ev["block_hashes"]]
            elif (medium is None or medium == G1) and ev.get("group_idx") in (None, 0):
                medium = G1
                if kind == "BlockStored":
                    hashes, parent = self._g1_stored(ev)
                else:
                    hashes = [h for h in (self._g1.pop(e, None) for e in ev["block_hashes"]) if h is not None]
            else:
                continue  # another KV cache group, or a tier kvbm does not know
            if kind == "BlockStored":
                out += self._stored(stream, medium, hashes, parent, ev.get("token_ids") or [])
            elif kind == "BlockRemoved":
                out += self._removed(stream, medium, hashes)
        return _coalesce(out)

    def _g1_stored(self, ev: dict[str, Any]) -> tuple[list[int], int | None]:
        """kvbm's hashes of an engine store's blocks (kept for their removal) and of their parent;
        no hashes when kvbm's cannot be had."""
        engine = ev["block_hashes"]
        tokens = ev.get("token_ids") or []
        parent = ev.get("parent_block_hash")
        kparent = self._g1.get(parent) if parent is not None else None
        if ((parent is not None and kparent is None) or ev.get("lora_name") or any(ev.get("extra_keys") or ())
                or ev.get("block_size") != self.block_size or len(tokens) != len(engine) * self.block_size):
            self.skipped_blocks += len(engine)
            return [], None
        hashes = continue_sequence(kparent, tokens, self.block_size)
        self._g1.update(zip(engine, hashes))
        return hashes, kparent

    def _stored(self, stream: str, tier: str, hashes: list[int], parent: int | None,
                tokens: list[int]) -> list[dict[str, Any]]:
        """``hashes`` (a chain after ``parent``) entered ``tier``; announced once present with tokens."""
        self._streams.setdefault(stream, _Stream()).tiers.add(tier)
        bs = self.block_size
        whole = len(tokens) == len(hashes) * bs  # tokenless stores (salted, unknown) announce nothing
        out = []
        for i, h in enumerate(hashes):
            self._tiers.setdefault(h, set()).add((stream, tier))
            if h not in self._announced and whole:
                self._announced.add(h)
                out.append(_stored_map(h, hashes[i - 1] if i else parent, tokens[i * bs : (i + 1) * bs], bs))
        return out

    def _removed(self, stream: str, tier: str, hashes: list[int]) -> list[dict[str, Any]]:
        out = []
        for h in hashes:
            held = self._tiers.get(h)
            if held is None:
                continue
            held.discard((stream, tier))
            if not held:
                del self._tiers[h]
                if h in self._announced:
                    self._announced.discard(h)
                    out.append({"type": "BlockRemoved", "block_hashes": [h], "medium": None})
        return out

    def _clear(self, stream: str) -> list[dict[str, Any]]:
        """Forget every tier ``stream`` reported (its AllBlocksCleared carries no medium)."""
        st = self._streams.setdefault(stream, _Stream())
        if G1 in st.tiers:
            self._g1.clear()
        out = []
        for tier in st.tiers:
            out += self._removed(stream, tier, [h for h, held in self._tiers.items() if (stream, tier) in held])
        st.tiers.clear()
        return out


def _stored_map(h: int, parent: int | None, tokens: list[int], block_size: int) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": parent, "token_ids": list(tokens),
            "block_size": block_size, "lora_id": None, "medium": None, "lora_name": None}


def _coalesce(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stores that chain as one ``BlockStored``, consecutive removals as one ``BlockRemoved``."""
    out: list[dict[str, Any]] = []
    for ev in events:
        last = out[-1] if out else None
        if last is not None and last["type"] == ev["type"] == "BlockStored" \
                and ev["parent_block_hash"] == last["block_hashes"][-1]:
            last["block_hashes"] += ev["block_hashes"]
            last["token_ids"] += ev["token_ids"]
        elif last is not None and last["type"] == ev["type"] == "BlockRemoved":
            last["block_hashes"] += ev["block_hashes"]
        else:
            out.append(ev)
    return out


def serve(inputs: Sequence[str], publish: str, block_size: int, *, stop: Callable[[], bool] = lambda: False,
          poll_ms: int = 100) -> None:
    """Subscribe to every endpoint of ``inputs``, publish the consolidated stream on ``publish``
    (bound), until ``stop()`` is true."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub = KvEventPublisher(publish, lambda: block_size, context=ctx)
    subs: dict[zmq.Socket[bytes], str] = {}
    poller = zmq.Poller()
    try:
        for endpoint in inputs:
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint)
            subs[sock] = endpoint
            poller.register(sock, zmq.POLLIN)
        log.info("consolidating %s onto %s", ", ".join(inputs), pub.endpoint)
        cons = Consolidator(block_size)
        while not stop():
            for sock, _ in poller.poll(poll_ms):
                frames = sock.recv_multipart()
                stream = subs[sock]
                try:
                    seq = int.from_bytes(frames[-2], "big", signed=True)
                    _, events, _ = decode_batch(frames[-1])
                except (ValueError, IndexError) as e:
                    log.warning("KV events of %s: undecodable batch (%s), skipped", stream, e)
                    continue
                out = cons.gap(stream, seq) + cons.apply(stream, events)
                if out:
                    pub.publish(encode_batch(time.time(), out))
    finally:
        for sock in subs:
            sock.close(0)
        pub.close()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``kvbm consolidate``."""
    p = subparsers.add_parser("consolidate", help="merge engine and kvbm KV events into one stream for a router",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, metavar="ADDR",
                   help="a KV-event stream to subscribe to (the engine's, kvbm's leader's); repeatable")
    p.add_argument("--publish", required=True, metavar="ADDR", help="where to bind the consolidated stream")
    p.add_argument("--block-size", type=int, required=True, help="the engine's tokens per block")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kvbm-consolidate %(levelname)s %(message)s", force=True)
    try:
        serve(args.input, args.publish, args.block_size)
    except KeyboardInterrupt:
        pass
    return 0
