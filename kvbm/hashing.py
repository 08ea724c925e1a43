"""Block identity: Dynamo-compatible salt, block and chained sequence hashes.

Same hashes as Dynamo's ``lib/llm/src/tokens.rs`` and its vLLM bindings, so our
hashes match Dynamo's:

* **Salt hash**: ``xxh3_64(json, seed=0)``, where ``json`` is the compact
  serde_json encoding of ``{"salt": <str>, "lora_name": <str>}``, fields in
  that order, with a field left out when it is None. Dynamo's ``salt`` field
  is ``Option<String>``, so an int salt is hashed as its decimal string. The
  empty object ``{}`` gives :data:`EMPTY_SALT_HASH`.
* **Block hash**: ``xxh3_64(tokens as u32 little-endian, seed=salt_hash)``.
* **Sequence hash**: for the first block it is the block hash. For later
  blocks it is ``xxh3_64(parent_seq u64 LE ++ block_hash u64 LE, seed=salt_hash)``.

Only full blocks are hashed. In Dynamo's test vector (tokens 1..10, block
size 4, "salt 1337" -> 14643705804678351452, 4945711292740353085), 1337 is
the *salt hash* itself, i.e. the xxh3 seed. Hashing ``{"salt":1337}`` or
``{"salt":"1337"}`` does not reproduce it, so pass ``salt_hash=1337``.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import repeat
from typing import Optional, Union

import numpy as np
import xxhash

__all__ = [
    "EMPTY_SALT_HASH",
    "SequenceHash",
    "SequenceHasher",
    "block_hash",
    "hashes_from_bytes",
    "hashes_to_bytes",
    "salt_hash",
    "sequence_hashes",
]

SequenceHash = int
"""A block's chained sequence hash: an unsigned 64-bit integer in [0, 2**64)."""

TokenInput = Union[Sequence[int], np.ndarray]

EMPTY_SALT_HASH: int = 1389868326933519382
"""Salt hash of ``{}`` (no cache salt, no LoRA), Dynamo's default."""

_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64
_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack
# array("I") is 4 bytes wide on every mainstream ABI; "L" covers the exotic rest.
_U32_CODE = next(code for code in "IL" if array(code).itemsize == 4)
_BIG_ENDIAN = sys.byteorder == "big"
# Below this many blocks a plain loop beats the bulk path, whose numpy view and
# extra lists cost a few us up front (measured crossover: ~16 blocks). This matters
# for decode, which completes one block at a time.
_BULK_MIN_BLOCKS = 16


def salt_hash(salt: str | int | None = None, lora_name: str | None = None) -> int:
    """Dynamo's salt hash of a request's cache salt and LoRA adapter name.

    An int ``salt`` is hashed as its decimal string, because Dynamo's salt field
    is a string. ``salt_hash()`` returns :data:`EMPTY_SALT_HASH`.
    """
    payload: dict[str, str] = {}
    if salt is not None:
        if isinstance(salt, bool) or not isinstance(salt, (str, int)):
            raise TypeError(f"salt must be str, int or None, got {type(salt).__name__}")
        payload["salt"] = str(salt)
    if lora_name is not None:
        if not isinstance(lora_name, str):
            raise TypeError(f"lora_name must be str or None, got {type(lora_name).__name__}")
        payload["lora_name"] = lora_name
    # This gives the same bytes as serde_json::to_vec: no spaces, raw UTF-8, and
    # the same escapes (\" \\ \b \f \n \r \t, other control chars as \u00xx).
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _xxh3(data)


def block_hash(tokens: TokenInput, salt_hash: int) -> int:
    """xxh3_64 of the tokens as u32 little-endian, seeded with ``salt_hash``."""
    _check_salt_hash(salt_hash)
    return _xxh3(_token_bytes(tokens), salt_hash)


def sequence_hashes(
    tokens: TokenInput, block_size: int, salt_hash: int = EMPTY_SALT_HASH
) -> list[SequenceHash]:
    """Chained sequence hashes, one for each *full* block of ``tokens``.

    The trailing partial block (if any) is not hashed.
    """
    _check_block_size(block_size)
    _check_salt_hash(salt_hash)
    data = _token_bytes(tokens)
    return _chain(data, len(data) // (4 * block_size), block_size, salt_hash, None)


def continue_sequence(
    parent: Optional[SequenceHash], tokens: TokenInput, block_size: int, salt_hash: int = EMPTY_SALT_HASH
) -> list[SequenceHash]:
    """The sequence hashes of the full blocks of ``tokens`` chained after ``parent`` (None: the
    sequence's first block), as :func:`sequence_hashes` of the whole sequence gives them."""
    _check_block_size(block_size)
    _check_salt_hash(salt_hash)
    data = _token_bytes(tokens)
    return _chain(data, len(data) // (4 * block_size), block_size, salt_hash, parent)


class SequenceHasher:
    """Incremental hashes for one request: extend() hashes only new full blocks.

    It keeps the bytes of the trailing partial block, so a block that spans
    several ``extend`` calls is hashed once, when it becomes full. The results
    always equal :func:`sequence_hashes` over all tokens seen so far.
    """

    __slots__ = ("_block_size", "_salt_hash", "_pending", "_hashes", "_num_tokens")

    def __init__(self, block_size: int, salt_hash: int = EMPTY_SALT_HASH) -> None:
        _check_block_size(block_size)
        _check_salt_hash(salt_hash)
        self._block_size = block_size
        self._salt_hash = salt_hash
        self._pending = b""  # u32-LE bytes of the trailing partial block
        self._hashes: list[SequenceHash] = []
        self._num_tokens = 0

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def salt_hash(self) -> int:
        """Seed of every hash in this sequence."""
        return self._salt_hash

    def extend(self, tokens: TokenInput) -> list[SequenceHash]:
        """Append ``tokens``. Returns the hashes of the blocks this call completed."""
        new = _token_bytes(tokens)
        self._num_tokens += len(new) // 4
        data = self._pending + new if self._pending else new
        block_bytes = 4 * self._block_size
        n_full = len(data) // block_bytes
        if not n_full:  # the common decode step: no block completed
            self._pending = data
            return []
        parent = self._hashes[-1] if self._hashes else None
        completed = _chain(data, n_full, self._block_size, self._salt_hash, parent)
        self._hashes += completed
        self._pending = data[n_full * block_bytes :]
        return completed

    @property
    def hashes(self) -> list[SequenceHash]:
        """A new list holding the hash of every full block so far."""
        return list(self._hashes)

    @property
    def num_tokens(self) -> int:
        """Tokens appended so far, including those in the partial last block."""
        return self._num_tokens

    @property
    def num_blocks(self) -> int:
        """Number of full (hashed) blocks so far."""
        return len(self._hashes)


def hashes_to_bytes(hashes: Sequence[int] | np.ndarray) -> bytes:
    """Encode hashes as a little-endian uint64 array (the wire format).

    Raises ValueError if a hash is not an integer in [0, 2**64).
    """
    if isinstance(hashes, np.ndarray):
        return hashes.astype("<u8", copy=False).tobytes()
    try:
        arr = array("Q", hashes)  # C-level conversion: ~5x faster than numpy from a list
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"hashes must be integers in [0, 2**64): {exc}") from None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def hashes_from_bytes(data: Union[bytes, bytearray, memoryview]) -> list[int]:
    """Decode a little-endian uint64 array. Raises ValueError if the length is not a multiple of 8."""
    nbytes = memoryview(data).nbytes
    if nbytes % 8:
        raise ValueError(f"hash bytes length must be a multiple of 8, got {nbytes}")
    arr = array("Q")
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def _chain(
    data: bytes, n_blocks: int, block_size: int, seed: int, parent: Optional[int]
) -> list[int]:
    """Sequence hashes of the first ``n_blocks`` blocks of u32-LE ``data``.

    Chaining starts after ``parent``; None means block 0 of a sequence.
    """
    h, pack = _xxh3, _pack_pair  # local names: cheaper lookups in the loops
    block_bytes = 4 * block_size
    if n_blocks < _BULK_MIN_BLOCKS:
        out: list[int] = []
        for start in range(0, n_blocks * block_bytes, block_bytes):
            b = h(data[start : start + block_bytes], seed)
            parent = b if parent is None else h(pack(parent, b), seed)
            out.append(parent)
        return out
    # A numpy void view turns the buffer into one bytes object per block in C,
    # so only the hash calls run per block: about half the cost of slicing.
    blocks = np.frombuffer(data, dtype=f"V{block_bytes}", count=n_blocks).tolist()
    block_hashes = list(map(h, blocks, repeat(seed)))
    # Chaining is serial; a comprehension with := is the cheapest Python loop for it.
    if parent is None:
        p = block_hashes[0]
        return [p] + [p := h(pack(p, b), seed) for b in block_hashes[1:]]
    p = parent
    return [p := h(pack(p, b), seed) for b in block_hashes]


def _token_bytes(tokens: TokenInput) -> bytes:
    """Tokens as u32 little-endian bytes. Raises ValueError if a token is outside [0, 2**32)."""
    if type(tokens) is not list and isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise ValueError(f"token array must be 1-D, got shape {tokens.shape}")
        dtype = tokens.dtype
        if dtype.kind not in "iu":
            raise TypeError(f"token array must have an integer dtype, got {dtype}")
        # Range check only where the dtype can hold values outside u32 (one vectorised pass).
        if tokens.size and not (dtype.kind == "u" and dtype.itemsize <= 4):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= _U32_LIMIT:
                raise ValueError(f"tokens must be in [0, 2**32), got range [{lo}, {hi}]")
        return tokens.astype("<u4", copy=False).tobytes()
    if type(tokens) is not list and isinstance(tokens, (str, bytes, bytearray, memoryview)):
        # array() would read bytes as raw machine words and fail on str.
        raise TypeError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    # array("I") converts and range-checks in C; this is the fastest path for a list.
    try:
        buf = array(_U32_CODE, tokens)
    except OverflowError as exc:
        raise ValueError(f"tokens must be in [0, 2**32): {exc}") from None
    if _BIG_ENDIAN:
        buf.byteswap()
    return buf.tobytes()


def _check_block_size(block_size: int) -> None:
    # Any size an engine uses (Dynamo's hashing takes 24 or 2048 as well as 16).
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a whole number of tokens >= 1, got {block_size!r}")


def _check_salt_hash(salt_hash: int) -> None:
    if isinstance(salt_hash, bool) or not isinstance(salt_hash, int) or not 0 <= salt_hash < _U64_LIMIT:
        raise ValueError(f"salt_hash must be an integer in [0, 2**64), got {salt_hash!r}")
