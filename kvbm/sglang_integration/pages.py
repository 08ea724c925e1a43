"""SGLang's host KV pool, seen by kvbm's copy engine as engine blocks: one page, one block.

Every SGLang host pool (MHA or MLA, any ``--hicache-mem-layout``) describes a page as byte
regions through ``get_page_buffer_meta`` (the zero-copy backends' interface): per page, the
same regions at the same offsets, shifted by a fixed page stride. kvbm stores a page as those
regions in that order, each a "layer" with one part, so copies go straight between SGLang's
pool and kvbm's shared pool (one slice assignment per region and run of pages).

SGLang's legacy calls pass a page as a flat tensor (``get_data_page(i).flatten()``): the same
regions in address order. :meth:`HostPages.flat_order` maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm.worker.layout import EngineKV, KVLayout, LayoutError


@dataclass(frozen=True)
class PageRegions:
    """Where a page's bytes are in the pool buffer: page p's region j starts at
    ``offsets[j] + p * page_stride`` and is ``region_bytes`` long."""

    page_tokens: int
    num_pages: int
    offsets: tuple[int, ...]
    region_bytes: int
    page_stride: int

    @property
    def page_bytes(self) -> int:
        return len(self.offsets) * self.region_bytes


def _meta(pool: Any, page: int, base: int) -> tuple[list[int], list[int]]:
    import torch

    ps = int(pool.page_size)
    ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page * ps, (page + 1) * ps, dtype=torch.int64))
    return [int(p) - base for p in ptrs], [int(s) for s in sizes]


def page_regions(pool: Any) -> PageRegions:
    """Read the page geometry of an SGLang host pool (checked on the first two and the last page)."""
    buf = getattr(pool, "kv_buffer", None)
    if buf is None or not hasattr(buf, "data_ptr") or not buf.is_contiguous():
        raise LayoutError(f"{type(pool).__name__}: kvbm needs one contiguous kv_buffer tensor")
    if str(buf.device) != "cpu":
        raise LayoutError(f"{type(pool).__name__}: the host pool is on {buf.device}, expected cpu")
    base, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
    ps = int(pool.page_size)
    num_pages = int(pool.size) // ps
    if num_pages < 2:
        raise LayoutError(f"{type(pool).__name__}: {num_pages} host pages; kvbm needs at least 2")
    first, sizes = _meta(pool, 0, base)
    second, _ = _meta(pool, 1, base)
    last, _ = _meta(pool, num_pages - 1, base)
    if not first or len(set(sizes)) != 1 or len(second) != len(first):
        raise LayoutError(f"{type(pool).__name__}: page regions of unequal sizes {sorted(set(sizes))}")
    stride = second[0] - first[0]
    region = sizes[0]
    geometry = PageRegions(ps, num_pages, tuple(first), region, stride)
    if (any(b - a != stride for a, b in zip(first, second))
            or any(c != a + (num_pages - 1) * stride for a, c in zip(first, last))
            or min(first) < 0 or max(last) + region > nbytes or stride < region):
        raise LayoutError(f"{type(pool).__name__} (layout {getattr(pool, 'layout', '?')}): page regions are not "
                          "a fixed pattern shifted by a page stride inside kv_buffer")
    return geometry


@dataclass
class HostPages:
    """An SGLang host pool as kvbm engine blocks (``kv``), and its page geometry."""

    regions: PageRegions
    kv: EngineKV
    dtype: str

    @classmethod
    def of(cls, pool: Any) -> "HostPages":
        import torch

        g = page_regions(pool)
        buf = pool.kv_buffer
        flat = buf.view(torch.uint8).reshape(-1).numpy() if buf.dtype != torch.uint8 else buf.reshape(-1).numpy()
        views = [np.lib.stride_tricks.as_strided(flat[off:], shape=(g.num_pages, 1, g.region_bytes),
                                                 strides=(g.page_stride, g.region_bytes, 1))
                 for off in g.offsets]
        dtype = str(buf.dtype).replace("torch.", "")
        layout = KVLayout("sglang_pages", len(views), g.num_pages, 1, g.region_bytes, dtype)
        return cls(g, EngineKV(layout, views), dtype)

    def page_indices(self, host_indices: Any, num_pages: int) -> np.ndarray | None:
        """Page numbers of the first ``num_pages`` pages of SGLang's token ``host_indices``
        (page i starts at ``host_indices[i * page_size]``); None if they do not fit."""
        idx = np.asarray(host_indices.cpu().numpy() if hasattr(host_indices, "cpu") else host_indices, dtype=np.int64)
        ps = self.regions.page_tokens
        if idx.ndim != 1 or len(idx) < num_pages * ps:
            return None
        starts = idx[: num_pages * ps : ps]
        if len(starts) and ((starts % ps).any() or starts.min() < 0 or starts.max() // ps >= self.regions.num_pages):
            return None
        return starts // ps

    def flat_order(self) -> np.ndarray:
        """Region index of each region-sized chunk of a legacy flat page (address order)."""
        return np.argsort(np.asarray(self.regions.offsets), kind="stable")

    def scratch(self, pages: int) -> tuple[np.ndarray, EngineKV]:
        """A (pages, regions, region_bytes) buffer with its EngineKV, for the legacy calls."""
        g = self.regions
        buf = np.empty((pages, len(g.offsets), g.region_bytes), np.uint8)
        layout = KVLayout("sglang_pages", len(g.offsets), pages, 1, g.region_bytes, self.dtype)
        return buf, EngineKV(layout, [buf[:, j : j + 1] for j in range(len(g.offsets))])


def flat_bytes(t: Any) -> np.ndarray:
    """A flat uint8 NumPy view of a contiguous CPU tensor (SGLang's legacy flat page)."""
    import torch

    if not t.is_contiguous():
        raise LayoutError("a legacy flat page must be contiguous")
    return (t.view(torch.uint8) if t.dtype != torch.uint8 else t).reshape(-1).numpy()


def layout_parts(pool: Any, pages: HostPages) -> list[str]:
    """SGLang's parts of the layout fingerprint (with the model, dtype, page size and kvbm world
    of :func:`kvbm.connector.bootstrap.layout_fingerprint`): pool class, memory layout, layers,
    head geometry and page regions; what must match for two instances to share pages."""
    head = [f"{name}={getattr(pool, name)}" for name in ("head_num", "head_dim", "v_head_dim", "kv_lora_rank",
                                                          "qk_rope_head_dim", "kv_cache_dim")
            if getattr(pool, name, None) is not None]
    g = pages.regions
    return [f"pool={type(pool).__name__}", f"layout={getattr(pool, 'layout', '?')}",
            f"layers={getattr(pool, 'layer_num', '?')}", *head, f"regions={len(g.offsets)}x{g.region_bytes}"]
