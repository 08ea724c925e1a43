"""Engine KV layouts, seen as byte regions per (block, layer, K/V).

Supported engine layouts (all detected from the tensor shapes):

* ``kv_first``    vLLM per-layer tensors ``[2, num_blocks, block_size, heads, head_dim]``
* ``block_first`` vLLM per-layer tensors ``[num_blocks, 2, block_size, heads, head_dim]``
  (and MLA's ``[num_blocks, block_size, dim]`` with one region per layer)
* ``contiguous``  one tensor ``[num_blocks, layers, 2, ...]`` (TensorRT-LLM)

In the host pool, a rank's bytes of a block are ``[layers, outer, region_bytes]``, whatever the
engine layout: one contiguous slice, or in the TP-independent heads format its heads inside every
region of the whole model (:mod:`kvbm.ipc.block_format`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from kvbm.ipc.block_format import Placement

KV_FIRST = "kv_first"
BLOCK_FIRST = "block_first"
CONTIGUOUS = "contiguous"


class LayoutError(ValueError):
    """KV tensors the adapter cannot interpret; the message names the offending tensor."""


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one rank's KV cache."""

    kind: str
    num_layers: int
    num_blocks: int
    outer: int  # 2 for K and V, 1 for MLA
    region_bytes: int  # bytes of one (block, layer, outer) region
    dtype: str

    @property
    def slice_bytes(self) -> int:
        """Bytes of this rank's slice of one block."""
        return self.num_layers * self.outer * self.region_bytes


class KVSource(Protocol):
    """Any engine KV cache description (host EngineKV, or a device one from cuda_copy)."""

    @property
    def layout(self) -> KVLayout: ...


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def as_bytes_view(t: Any) -> np.ndarray:
    """A zero-copy uint8 NumPy view of a NumPy array or CPU torch tensor (last axis in bytes)."""
    if isinstance(t, np.ndarray):
        arr = t
    else:  # torch tensor: reinterpret as bytes first (numpy has no bfloat16)
        import torch

        if t.device.type != "cpu":
            raise LayoutError(f"a {t.device.type} tensor needs the GPU copy engine, not the CPU one")
        arr = t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy()
    if not arr.flags.c_contiguous:
        raise LayoutError(f"KV tensor of shape {arr.shape} is not contiguous")
    return arr.view(np.uint8).reshape(arr.shape[:-1] + (arr.shape[-1] * arr.itemsize,))


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def detect_layer_layout(shape: Sequence[int], num_blocks: int | None = None) -> tuple[str, int, int]:
    """(kind, num_blocks, outer) of one vLLM per-layer tensor shape."""
    if len(shape) < 3:
        raise LayoutError(f"per-layer KV tensor of shape {tuple(shape)} has too few dimensions")
    if num_blocks is not None:
        if shape[0] == 2 and shape[1] == num_blocks:
            return KV_FIRST, num_blocks, 2
        if shape[0] == num_blocks:
            return BLOCK_FIRST, num_blocks, (2 if len(shape) >= 5 and shape[1] == 2 else 1)
        raise LayoutError(f"KV tensor of shape {tuple(shape)} has no axis of {num_blocks} blocks")
    if len(shape) >= 5 and shape[0] == 2 and shape[1] != 2:
        return KV_FIRST, shape[1], 2
    if len(shape) >= 5 and shape[1] == 2:
        return BLOCK_FIRST, shape[0], 2
    if len(shape) == 3:  # MLA: [num_blocks, block_size, dim]
        return BLOCK_FIRST, shape[0], 1
    raise LayoutError(f"cannot tell the block axis of KV tensor shape {tuple(shape)}; pass num_blocks")


@dataclass
class EngineKV:
    """One rank's KV cache as byte views ``(num_blocks, outer, region_bytes)`` per layer."""

    layout: KVLayout
    layers: list[np.ndarray]
    whole: np.ndarray | None = None  # (num_blocks, layers, outer, region) when contiguous

    @classmethod
    def from_layers(cls, kv_caches: Mapping[str, Any] | Sequence[Any], num_blocks: int | None = None) -> "EngineKV":
        """From vLLM's ``register_kv_caches`` dict (ordered by layer) or a list of per-layer tensors."""
        tensors = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
        if not tensors:
            raise LayoutError("no KV tensors registered")
        shape0 = _shape(tensors[0])
        kind, nb, outer = detect_layer_layout(shape0, num_blocks)
        names = list(kv_caches) if isinstance(kv_caches, Mapping) else [str(i) for i in range(len(tensors))]
        views = []
        for name, t in zip(names, tensors):
            if _shape(t) != shape0 or _dtype_name(t) != _dtype_name(tensors[0]):
                raise LayoutError(f"layer {name} has shape {_shape(t)} / {_dtype_name(t)}, "
                                  f"expected {shape0} / {_dtype_name(tensors[0])} like the first layer")
            b = as_bytes_view(t)
            if kind == KV_FIRST:
                v = b.reshape(2, nb, -1).swapaxes(0, 1)
            else:
                v = b.reshape(nb, outer, -1)
            views.append(v)
        layout = KVLayout(kind, len(views), nb, outer, views[0].shape[2], _dtype_name(tensors[0]))
        return cls(layout, views)

    @classmethod
    def from_contiguous(cls, tensor: Any, num_layers: int, outer: int = 2) -> "EngineKV":
        """From one ``[num_blocks, layers, outer, ...]`` tensor (TensorRT-LLM)."""
        shape = _shape(tensor)
        if len(shape) < 3 or shape[1] != num_layers or shape[2] != outer:
            raise LayoutError(f"contiguous KV tensor of shape {shape} is not [blocks, {num_layers}, {outer}, ...]")
        b = as_bytes_view(tensor)
        whole = b.reshape(shape[0], num_layers, outer, -1)
        layout = KVLayout(CONTIGUOUS, num_layers, shape[0], outer, whole.shape[3], _dtype_name(tensor))
        return cls(layout, [whole[:, i] for i in range(num_layers)], whole)


PAGE_BYTES = 4096


def page_aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a page boundary.

    For host KV tensors of simulated engines and benchmarks. The host pool's slots start on page
    boundaries; NumPy puts a large array 16 bytes past one, and a copy whose destination sits a
    few bytes past its source modulo 4 KiB runs ~3x slower on x86 (4K aliasing: loads wait on
    unrelated earlier stores), which hit every G2 -> G1 load into such tensors.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + PAGE_BYTES, np.uint8)
    start = -raw.ctypes.data % PAGE_BYTES
    return raw[start : start + nbytes].view(dt).reshape(tuple(shape))


def host_view(pool_array: np.ndarray, placement: Placement, layout: KVLayout) -> np.ndarray:
    """This rank's bytes of every host block at ``placement``, as
    ``(host_blocks, layers, outer, region_bytes)``, or ``(host_blocks, layers, outer, rows,
    row_bytes)`` when the rank's region is several rows in the block (token-major heads)."""
    p = placement
    nb, bb = pool_array.shape
    if p.region_bytes != layout.region_bytes:
        raise ValueError(f"a placement of {p.rows} x {p.row_bytes} B does not hold regions of {layout.region_bytes} B")
    if p.end(layout.num_layers * layout.outer) > bb:
        raise ValueError(f"a placement ending at {p.end(layout.num_layers * layout.outer)} does not fit in "
                         f"host blocks of {bb} bytes")
    row = (p.row_bytes,) if p.rows == 1 else (p.rows, p.row_bytes)
    row_strides = (1,) if p.rows == 1 else (p.pitch, 1)
    return np.lib.stride_tricks.as_strided(
        pool_array[:, p.offset:], shape=(nb, layout.num_layers, layout.outer) + row,
        strides=(pool_array.strides[0], layout.outer * p.region_stride, p.region_stride) + row_strides)


def host_slice_view(pool_array: np.ndarray, slice_offset: int, layout: KVLayout) -> np.ndarray:
    """This rank's slice of every host block as ``(host_blocks, layers, outer, region_bytes)``."""
    return host_view(pool_array, Placement.sliced(slice_offset, layout.region_bytes), layout)
