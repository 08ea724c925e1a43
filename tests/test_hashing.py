"""Tests for kvbm.hashing: Dynamo test vectors, salt encoding, incremental hashing, wire format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.hashing import (
    EMPTY_SALT_HASH,
    SequenceHasher,
    block_hash,
    hashes_from_bytes,
    hashes_to_bytes,
    salt_hash,
    sequence_hashes,
)

# Dynamo block/registry.rs test vector: tokens 1..10, block size 4, salt hash 1337.
VECTOR_TOKENS = list(range(1, 11))
VECTOR_HASHES = [14643705804678351452, 4945711292740353085]

U32_MAX = 2**32 - 1
token_lists = st.lists(st.integers(0, U32_MAX), max_size=200)
block_sizes = st.sampled_from([1, 2, 4, 8, 16, 32])


def reference_hashes(tokens: list[int], block_size: int, seed: int) -> list[int]:
    """A plain, slow transcription of Dynamo's tokens.rs, to check the fast path against."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = struct.pack(f"<{block_size}I", *tokens[start : start + block_size])
        bh = xxhash.xxh3_64_intdigest(chunk, seed=seed)
        if out:
            bh = xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], bh), seed=seed)
        out.append(bh)
    return out


def test_dynamo_test_vector() -> None:
    assert sequence_hashes(VECTOR_TOKENS, 4, 1337) == VECTOR_HASHES
    assert sequence_hashes(np.arange(1, 11), 4, 1337) == VECTOR_HASHES


def test_test_vector_block_hash_and_chaining() -> None:
    first = block_hash([1, 2, 3, 4], 1337)
    assert first == VECTOR_HASHES[0]
    second = block_hash([5, 6, 7, 8], 1337)
    chained = xxhash.xxh3_64_intdigest(struct.pack("<QQ", first, second), seed=1337)
    assert chained == VECTOR_HASHES[1]


def test_test_vector_incremental() -> None:
    hasher = SequenceHasher(4, 1337)
    assert hasher.extend([1, 2, 3]) == []
    assert hasher.extend([4, 5]) == [VECTOR_HASHES[0]]
    assert hasher.extend([6, 7, 8, 9, 10]) == [VECTOR_HASHES[1]]
    assert hasher.hashes == VECTOR_HASHES
    assert hasher.num_tokens == 10
    assert hasher.num_blocks == 2


def test_empty_salt_hash() -> None:
    assert salt_hash() == EMPTY_SALT_HASH == 1389868326933519382
    assert xxhash.xxh3_64_intdigest(b"{}") == EMPTY_SALT_HASH


def test_salt_json_encoding_matches_serde_json() -> None:
    x = xxhash.xxh3_64_intdigest
    assert salt_hash("1337") == x(b'{"salt":"1337"}')
    assert salt_hash(1337) == salt_hash("1337")  # Dynamo's salt is a string
    assert salt_hash(lora_name="ad") == x(b'{"lora_name":"ad"}')
    assert salt_hash("s", "ad") == x(b'{"salt":"s","lora_name":"ad"}')
    # serde_json writes non-ASCII as raw UTF-8 and control chars as lowercase \u00xx.
    assert salt_hash("\u00e9") == x('{"salt":"\u00e9"}'.encode())
    assert salt_hash('a"\\\n\x01') == x(b'{"salt":"a\\"\\\\\\n\\u0001"}')


def test_salt_and_lora_variants_differ() -> None:
    variants = [
        salt_hash(),
        salt_hash("a"),
        salt_hash("b"),
        salt_hash(lora_name="a"),
        salt_hash("a", "a"),
        salt_hash("", None),
        salt_hash(None, ""),
    ]
    assert len(set(variants)) == len(variants)
    tokens = list(range(64))
    per_salt = {tuple(sequence_hashes(tokens, 16, s)) for s in variants}
    assert len(per_salt) == len(variants)


def test_salt_type_errors() -> None:
    with pytest.raises(TypeError):
        salt_hash(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        salt_hash(True)
    with pytest.raises(TypeError):
        salt_hash(lora_name=3)  # type: ignore[arg-type]


def test_only_full_blocks_are_hashed() -> None:
    tokens = list(range(100, 135))  # 35 tokens, block 16: 2 full blocks
    hashes = sequence_hashes(tokens, 16)
    assert len(hashes) == 2
    assert hashes == sequence_hashes(tokens[:32], 16)
    assert sequence_hashes(tokens[:15], 16) == []
    assert sequence_hashes([], 16) == []
    hasher = SequenceHasher(16)
    assert hasher.extend(tokens) == hashes
    assert hasher.num_tokens == 35


def test_prefix_property() -> None:
    tokens = list(range(1000, 1100))
    full = sequence_hashes(tokens, 8)
    for cut in range(0, 100, 7):
        assert sequence_hashes(tokens[:cut], 8) == full[: cut // 8]


def test_trailing_zero_bytes_and_extreme_tokens() -> None:
    # Blocks ending in zero bytes must keep them (the void-view fast path must not strip).
    for tokens in ([0] * 32, [U32_MAX] * 32, [5, 0, 0, 0] * 8, [0, U32_MAX] * 16):
        for bs in (1, 4, 16, 32):
            assert sequence_hashes(tokens, bs, 7) == reference_hashes(tokens, bs, 7)
    assert sequence_hashes([0] * 4, 4) != sequence_hashes([0] * 3 + [1], 4)


@pytest.mark.parametrize("n_blocks", [1, 2, 15, 16, 17, 40])
def test_small_and_bulk_paths_agree(n_blocks: int) -> None:
    # Few blocks take a plain loop and many take the numpy bulk path; both, with and without a parent.
    tokens = [int(t) for t in np.random.default_rng(n_blocks).integers(0, 2**32, 8 * (n_blocks + 3))]
    expected = reference_hashes(tokens, 8, 11)
    assert sequence_hashes(tokens[: 8 * n_blocks], 8, 11) == expected[:n_blocks]
    hasher = SequenceHasher(8, 11)
    assert hasher.extend(tokens[:20]) == expected[:2]
    assert hasher.extend(tokens[20 : 20 + 8 * n_blocks]) == expected[2 : 2 + n_blocks]


def test_position_matters() -> None:
    # The same block content at a different position gets a different sequence hash.
    a = sequence_hashes([1, 2, 3, 4, 9, 9, 9, 9], 4)
    b = sequence_hashes([9, 9, 9, 9, 1, 2, 3, 4], 4)
    assert a[0] != b[1]
    assert a[0] == block_hash([1, 2, 3, 4], EMPTY_SALT_HASH)


@settings(max_examples=200, deadline=None)
@given(tokens=token_lists, block_size=block_sizes, seed=st.integers(0, 2**64 - 1))
def test_matches_reference(tokens: list[int], block_size: int, seed: int) -> None:
    assert sequence_hashes(tokens, block_size, seed) == reference_hashes(tokens, block_size, seed)


@settings(max_examples=200, deadline=None)
@given(
    tokens=token_lists,
    block_size=block_sizes,
    cuts=st.lists(st.integers(0, 200), max_size=8),
    as_numpy=st.booleans(),
)
def test_incremental_equals_one_shot(
    tokens: list[int], block_size: int, cuts: list[int], as_numpy: bool
) -> None:
    expected = sequence_hashes(tokens, block_size, 42)
    hasher = SequenceHasher(block_size, 42)
    bounds = [0, *sorted(min(c, len(tokens)) for c in cuts), len(tokens)]
    collected: list[int] = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = tokens[lo:hi]
        new = hasher.extend(np.array(part, dtype=np.uint32) if as_numpy else part)
        # Each call returns exactly the blocks it completed.
        assert len(new) == hi // block_size - lo // block_size
        collected += new
    assert collected == expected
    assert hasher.hashes == expected
    assert hasher.num_tokens == len(tokens)


def test_hashes_property_is_a_copy() -> None:
    hasher = SequenceHasher(2)
    hasher.extend([1, 2, 3, 4])
    hasher.hashes.clear()
    assert hasher.num_blocks == 2 and len(hasher.hashes) == 2


@pytest.mark.parametrize(
    "dtype", [np.int64, np.int32, np.uint16, np.uint32, np.uint64, np.int16, np.uint8]
)
def test_numpy_and_list_inputs_agree(dtype: type) -> None:
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 120, size=70)]
    expected = sequence_hashes(tokens, 16, 99)
    arr: np.ndarray = np.array(tokens, dtype=dtype)
    assert sequence_hashes(arr, 16, 99) == expected
    assert sequence_hashes(tuple(tokens), 16, 99) == expected
    assert sequence_hashes(arr[::-1][::-1], 16, 99) == expected  # non-contiguous view
    assert block_hash(arr[:16], 99) == block_hash(tokens[:16], 99)
    big_endian = np.array(tokens, dtype=">u4")
    assert sequence_hashes(big_endian, 16, 99) == expected


def test_large_random_prompt_matches_reference() -> None:
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 2**32, size=4096 + 5)]
    assert sequence_hashes(tokens, 16, 3) == reference_hashes(tokens, 16, 3)
    assert sequence_hashes(np.array(tokens, dtype=np.uint32), 16, 3) == reference_hashes(
        tokens, 16, 3
    )


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_bytes_round_trip(hashes: list[int]) -> None:
    data = hashes_to_bytes(hashes)
    assert len(data) == 8 * len(hashes)
    assert data == np.array(hashes, dtype="<u8").tobytes()
    assert hashes_from_bytes(data) == hashes
    assert hashes_from_bytes(bytearray(data)) == hashes


def test_bytes_wire_format_is_little_endian() -> None:
    assert hashes_to_bytes([1, 2**64 - 1]) == b"\x01" + b"\x00" * 7 + b"\xff" * 8
    assert hashes_from_bytes(b"") == []


def test_bytes_invalid() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        hashes_from_bytes(b"\x00" * 9)
    with pytest.raises(ValueError):
        hashes_to_bytes([-1])
    with pytest.raises(ValueError):
        hashes_to_bytes([2**64])


@pytest.mark.parametrize("block_size", [0, -4, 1.0, True, "16"])
def test_invalid_block_size(block_size: object) -> None:
    with pytest.raises(ValueError, match="whole number of tokens >= 1"):
        sequence_hashes([1, 2, 3], block_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number of tokens >= 1"):
        SequenceHasher(block_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_size", [3, 12, 24, 48, 2048, 4096])
def test_any_block_size_is_hashed(block_size: int) -> None:
    # Dynamo hashes any block size (24 and 2048 verified against its 1.6.1 wheel), not only
    # powers of two: the chain is the same formula whatever the size.
    tokens = list(range(1, 3 * block_size + 2))
    seed = EMPTY_SALT_HASH
    b = [block_hash(tokens[i * block_size:(i + 1) * block_size], seed) for i in range(3)]
    want = [b[0]]
    for x in b[1:]:
        want.append(xxhash.xxh3_64_intdigest(struct.pack("<QQ", want[-1], x), seed))
    assert sequence_hashes(tokens, block_size) == want
    hasher = SequenceHasher(block_size)
    assert hasher.extend(tokens[:block_size + 1]) + hasher.extend(tokens[block_size + 1:]) == want


def test_valid_block_size_bounds() -> None:
    assert len(sequence_hashes(list(range(1024)), 1024)) == 1
    assert len(sequence_hashes([7], 1)) == 1


@pytest.mark.parametrize("bad", [[-1], [2**32], [0, 5, 2**40]])
def test_out_of_range_tokens(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"2\*\*32"):
        sequence_hashes(bad, 1)
    with pytest.raises(ValueError, match=r"2\*\*32"):
        sequence_hashes(np.array(bad, dtype=np.int64), 1)
    with pytest.raises(ValueError):
        SequenceHasher(4).extend(bad)
    with pytest.raises(ValueError):
        block_hash(bad, 0)


def test_failed_extend_leaves_state_unchanged() -> None:
    hasher = SequenceHasher(4)
    hasher.extend([1, 2, 3])
    with pytest.raises(ValueError):
        hasher.extend([4, -1])
    assert hasher.num_tokens == 3
    assert hasher.extend([4]) == sequence_hashes([1, 2, 3, 4], 4)


def test_bad_token_types() -> None:
    with pytest.raises(TypeError):
        sequence_hashes(np.array([1.0, 2.0]), 1)
    with pytest.raises(TypeError):
        sequence_hashes([1.5], 1)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        sequence_hashes(b"\x01\x00\x00\x00", 1)
    with pytest.raises(ValueError, match="1-D"):
        sequence_hashes(np.zeros((2, 4), dtype=np.int64), 4)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.0])
def test_invalid_salt_hash(bad: object) -> None:
    with pytest.raises(ValueError, match="salt_hash"):
        sequence_hashes([1], 1, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="salt_hash"):
        block_hash([1], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="salt_hash"):
        SequenceHasher(1, bad)  # type: ignore[arg-type]
