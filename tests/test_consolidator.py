"""The consolidated KV-event stream (kvbm.leader.consolidator): a block is present while the
engine's G1 or any kvbm tier holds it, under kvbm's sequence hashes."""

from __future__ import annotations

from typing import Any

from kvbm.hashing import sequence_hashes
from kvbm.leader.consolidator import Consolidator

BS = 4
PROMPT = list(range(100, 100 + 3 * BS))
KV = sequence_hashes(PROMPT, BS)  # kvbm's hashes of its 3 blocks


def g1_stored(engine: list[int], tokens: list[int], parent: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": engine, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None, **extra}


def kv_stored(hashes: list[int], tokens: list[int], parent: int | None = None, medium: str = "CPU") -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BS, "lora_id": None, "medium": medium, "lora_name": None}


def removed(hashes: list[int], medium: str) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def test_a_block_is_announced_once_and_removed_when_no_tier_holds_it() -> None:
    c = Consolidator(BS)
    out = c.apply("engine", [g1_stored([901, 902], PROMPT[: 2 * BS])])  # the engine's own hashes
    assert out == [{"type": "BlockStored", "block_hashes": KV[:2], "parent_block_hash": None,
                    "token_ids": PROMPT[: 2 * BS], "block_size": BS, "lora_id": None, "medium": None,
                    "lora_name": None}]
    # The next engine store chains to its parent's kvbm hash.
    out = c.apply("engine", [g1_stored([903], PROMPT[2 * BS :], parent=902)])
    assert [(e["block_hashes"], e["parent_block_hash"]) for e in out] == [(KV[2:], KV[1])]
    assert c.apply("kvbm", [kv_stored(KV, PROMPT)]) == []  # present already
    assert c.apply("engine", [removed([901, 902, 903], "GPU")]) == []  # G2 still holds them
    assert c.apply("kvbm", [kv_stored(KV[:1], PROMPT[:BS], medium="STORAGE")]) == []
    assert c.apply("kvbm", [removed(KV, "CPU")]) == [removed(KV[1:], None)]  # block 0 is on disk
    assert c.apply("kvbm", [removed(KV[:1], "STORAGE")]) == [removed(KV[:1], None)]


def test_blocks_without_a_kvbm_identity_or_tokens_are_not_announced() -> None:
    c = Consolidator(BS)
    assert c.apply("engine", [g1_stored([905], PROMPT[BS : 2 * BS], parent=904)]) == []  # parent never seen
    assert c.apply("engine", [g1_stored([901], PROMPT[:BS], extra_keys=[("tenant-1",)])]) == []  # salted
    assert c.skipped_blocks == 2
    assert c.apply("kvbm", [kv_stored(KV[:1], [])]) == []  # kvbm's tokenless store (salted, or unknown)
    out = c.apply("engine", [g1_stored([901], PROMPT[:BS])])
    assert [e["block_hashes"] for e in out] == [KV[:1]]  # announced once its tokens are known


def test_a_clear_or_a_gap_drops_only_what_that_stream_reported() -> None:
    c = Consolidator(BS)
    c.apply("engine", [g1_stored([901, 902, 903], PROMPT)])
    c.apply("kvbm", [kv_stored(KV[:1], PROMPT[:BS])])
    assert c.apply("engine", [{"type": "AllBlocksCleared"}]) == [removed(KV[1:], None)]
    assert c.gap("kvbm", 0) == [] and c.gap("kvbm", 1) == []
    assert c.gap("kvbm", 5) == [removed(KV[:1], None)]  # batches 2..4 lost: kvbm's blocks forgotten
    # After the clear the engine's hash map is empty: a continuation of a cleared block is skipped.
    assert c.apply("engine", [g1_stored([904], PROMPT[:BS], parent=903)]) == []
