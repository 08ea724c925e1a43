"""GPU copy engine: CuPy copies between engine KV tensors on a CUDA device (G1) and this
rank's slice of the pinned shared host pool (G2).

Same interface as :class:`kvbm.worker.copy.NumpyCopyEngine` (``store``/``load`` return once
the copy finished, which is what the rank agent's copy thread wants), plus ``store_async`` /
``load_async`` returning a :class:`Transfer` that any thread can poll without blocking. Both
engines check a batch with :func:`kvbm.worker.copy.check_batch`; this one splits it into runs
on both sides with :func:`kvbm.worker.copy.plan_batch`; a store is ``d2h``, a load ``h2d``
(:class:`kvbm.worker.copy.Direction`).

* Engine KV tensors arrive as torch CUDA tensors or CuPy arrays and are taken zero-copy:
  only their device addresses are kept (:class:`EngineKVDevice`), never a host round trip.
* The process's mapping of the host pool is pinned with ``cudaHostRegister`` (portable and
  mapped, so kernels can address it) and unregistered by :meth:`CudaCopyEngine.close`, which
  must run before the pool is unmapped.
* Copies run on two dedicated non-blocking streams (stores, loads), never the engine's.
  A store first waits, through a CUDA event, for the engine's stream (or the event/stream
  the caller names), so it reads a layer only after the forward pass wrote it.

Copy strategies, selectable by name (see :data:`STRATEGIES`):

``memcpy2d``  one ``cudaMemcpy2DAsync`` per (run of consecutive block pairs, segment):
              a segment is the bytes of a block that are contiguous on both sides (one
              K or V region per layer for vLLM's ``kv_first`` layout, K+V per layer for
              ``block_first``, the whole slice for the contiguous layout); a run of k blocks
              is k rows of it, at the engine's block stride on the GPU and the pool's block
              size on the host. DMA engines only, no SM time. With scattered blocks this is
              one ``cudaMemcpyAsync`` per region (2 x layers per block for ``kv_first``).
``kernel``    one CuPy RawKernel launch per batch that gathers/scatters every region in
              16-byte words through the mapped pinned pool; independent of how scattered
              the blocks are, but it occupies SMs while it runs.
``batch``     one ``cudaMemcpyBatchAsync`` per batch (through ``cuda.bindings``, where
              installed: CuPy does not expose it); DMA like memcpy2d, one call.
``auto``      memcpy2d when each 2D copy moves at least ``dma_min_bytes`` (large blocks or
              long runs) in rows of at least ``DMA_MIN_ROW_BYTES``, else the kernel
              (thresholds measured on an H200 with ``python -m kvbm.bench.gpu_copy``).

Loads are not ordered after the engine's stream by default: the blocks they fill must not
be in use by queued engine work (name ``after_stream``/``after_event`` otherwise). The
engine's forward pass can wait for a load with :meth:`Transfer.wait_on`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from kvbm.ipc.block_format import Placement
from kvbm.worker.copy import BlockRuns, Direction, IndexList, index_array, plan_batch
from kvbm.worker.layout import CONTIGUOUS, KV_FIRST, KVLayout, LayoutError, detect_layer_layout

if TYPE_CHECKING:
    from kvbm.ipc.shm import HostPool

MEMCPY2D = "memcpy2d"
KERNEL = "kernel"
BATCH = "batch"
AUTO = "auto"
STRATEGIES = (MEMCPY2D, KERNEL, BATCH)

DMA_MIN_BYTES = 64 << 10  # auto: DMA when each cudaMemcpy2DAsync moves at least this much
# ... in rows at least this wide. Measured on an H200 (docs/benchmarks.md): one run of 64 blocks
# in 4 KiB rows ran at 0.4-0.6 of cudaMemcpy with memcpy2d, 0.73 with the kernel; 32 KiB rows: equal.
DMA_MIN_ROW_BYTES = 16 << 10
KERNEL_CHUNK_BYTES = 32 << 10  # kernel work item: at most this many bytes of one region
KERNEL_THREADS = 256
KERNEL_BLOCKS_PER_SM = 4  # enough 16-byte loads in flight to cover PCIe latency
_WORD = 16  # the kernel moves uint4 words: every address and width must be a multiple
LEGACY_STREAM = 1  # cudaStreamLegacy: the legacy default stream, whatever the compile flags

# cudaHostRegister flags and the error for an already registered range.
_REGISTER_PORTABLE = 1
_REGISTER_MAPPED = 2
_ERR_ALREADY_REGISTERED = 712

_KERNEL_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256)
kvbm_copy_regions(const long long* __restrict__ idx,      // [2*npairs]: engine blocks, then host slots
                  const int npairs,
                  const unsigned long long* __restrict__ seg_dev,  // device address in engine block 0
                  const long long* __restrict__ seg_dev_stride,    // bytes between engine blocks
                  const long long* __restrict__ seg_host,          // offset inside a host slice
                  const long long* __restrict__ seg_words,         // width in 16-byte words
                  const int nseg,
                  const unsigned long long host_base,              // slice of host block 0 (mapped)
                  const long long host_stride,                     // bytes between host blocks
                  const int to_host)                               // 1: store (d2h), 0: load (h2d)
{
    const long long ntasks = (long long)npairs * nseg;
    const long long step = blockDim.x;
    for (long long t = blockIdx.x; t < ntasks; t += gridDim.x) {
        const long long p = t / nseg;
        const int j = (int)(t - p * nseg);
        const unsigned long long dev = seg_dev[j] + (unsigned long long)(idx[p] * seg_dev_stride[j]);
        const unsigned long long host = host_base + (unsigned long long)(idx[npairs + p] * host_stride + seg_host[j]);
        const uint4* src = reinterpret_cast<const uint4*>(to_host ? dev : host);
        uint4* dst = reinterpret_cast<uint4*>(to_host ? host : dev);
        const long long n = seg_words[j];
        long long w = threadIdx.x;
        // Four loads in flight per thread before the stores: PCIe reads are slow to answer.
        for (; w + 3 * step < n; w += 4 * step) {
            const uint4 a = src[w], b = src[w + step], c = src[w + 2 * step], d = src[w + 3 * step];
            dst[w] = a; dst[w + step] = b; dst[w + 2 * step] = c; dst[w + 3 * step] = d;
        }
        for (; w < n; w += step) dst[w] = src[w];
    }
}
"""


_kernel_lock = threading.Lock()
_kernel_obj: Any = None


def _copy_kernel() -> Any:
    """The gather/scatter RawKernel, one per process (CuPy compiles it per device on first launch)."""
    global _kernel_obj
    with _kernel_lock:
        if _kernel_obj is None:
            _kernel_obj = _cupy().RawKernel(_KERNEL_SOURCE, "kvbm_copy_regions")
        return _kernel_obj


def _cupy() -> Any:
    import cupy

    return cupy


def cuda_available() -> bool:
    """True when CuPy is installed and sees a CUDA device (never raises)."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


# -- engine tensors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDesc:
    """Where a C-contiguous tensor lives: address, size, shape, dtype name, CUDA device."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    device: int  # CUDA ordinal; -1 for host memory (CPU tests of the planning code)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, acc = [], itemsize
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def describe(t: Any) -> TensorDesc:
    """Zero-copy description of a torch CUDA tensor, a CuPy array or any CUDA-array-interface object."""
    if hasattr(t, "data_ptr") and hasattr(t, "is_contiguous"):  # torch
        if not t.is_cuda:
            raise LayoutError(f"a {t.device.type} tensor needs the CPU copy engine (kvbm.worker.copy)")
        if not t.is_contiguous():
            raise LayoutError(f"KV tensor of shape {tuple(t.shape)} is not contiguous")
        return TensorDesc(int(t.data_ptr()), int(t.numel()) * int(t.element_size()), tuple(int(d) for d in t.shape),
                          str(t.dtype).replace("torch.", ""), int(t.device.index))
    cai = getattr(t, "__cuda_array_interface__", None)
    if cai is None:
        raise LayoutError(f"{type(t).__name__} is neither a torch CUDA tensor nor a CUDA array (CuPy); "
                          "host arrays go through the CPU copy engine")
    shape = tuple(int(d) for d in cai["shape"])
    dt = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None:
        want = _c_strides(shape, dt.itemsize)
        if any(s != w for s, w, d in zip(strides, want, shape) if d > 1):
            raise LayoutError(f"KV tensor of shape {shape} is not contiguous")
    ptr = int(cai["data"][0])
    device = getattr(getattr(t, "device", None), "id", None)
    if device is None:
        device = int(_cupy().cuda.runtime.pointerGetAttributes(ptr).device)
    return TensorDesc(ptr, math.prod(shape) * dt.itemsize, shape, dt.name, int(device))


@dataclass(frozen=True)
class Segment:
    """Bytes of an engine block that are contiguous on the device and in the host slice."""

    dev: int  # address in engine block 0
    dev_stride: int  # bytes between engine blocks
    host_off: int  # offset inside this rank's slice of a host block
    width: int  # bytes


@dataclass
class EngineKVDevice:
    """One rank's KV cache on a CUDA device, by address.

    Region ``(block, layer, outer)`` starts at
    ``layer_ptrs[layer] + block * block_stride + outer * outer_stride`` and is
    ``layout.region_bytes`` long; in a host block it lies where the rank's
    :class:`~kvbm.ipc.block_format.Placement` says, exactly as for the CPU engine.
    """

    layout: KVLayout
    device: int
    layer_ptrs: list[int]
    block_stride: int
    outer_stride: int
    keep: list[Any] = field(default_factory=list, repr=False)  # the tensors, kept alive

    @classmethod
    def from_layers(cls, kv_caches: Mapping[str, Any] | Sequence[Any],
                    num_blocks: int | None = None) -> "EngineKVDevice":
        """From vLLM's ``register_kv_caches`` dict (ordered by layer) or a list of per-layer CUDA tensors."""
        tensors = list(kv_caches.values()) if isinstance(kv_caches, Mapping) else list(kv_caches)
        names = list(kv_caches) if isinstance(kv_caches, Mapping) else [str(i) for i in range(len(tensors))]
        out = cls.from_layer_descs([describe(t) for t in tensors], num_blocks, names)
        out.keep = tensors
        return out

    @classmethod
    def from_layer_descs(cls, descs: Sequence[TensorDesc], num_blocks: int | None = None,
                         names: Sequence[str] | None = None) -> "EngineKVDevice":
        """From per-layer tensor descriptions (vLLM ``kv_first`` or ``block_first``)."""
        if not descs:
            raise LayoutError("no KV tensors registered")
        names = list(names) if names is not None else [str(i) for i in range(len(descs))]
        d0 = descs[0]
        kind, nb, outer = detect_layer_layout(d0.shape, num_blocks)
        for name, d in zip(names, descs):
            if (d.shape, d.dtype, d.device) != (d0.shape, d0.dtype, d0.device):
                raise LayoutError(f"layer {name} has shape {d.shape} / {d.dtype} on device {d.device}, expected "
                                  f"{d0.shape} / {d0.dtype} on device {d0.device} like the first layer")
        if d0.nbytes % (nb * outer):
            raise LayoutError(f"KV tensor of shape {d0.shape} does not split into {nb} x {outer} regions")
        region = d0.nbytes // (nb * outer)
        if kind == KV_FIRST:
            block_stride, outer_stride = region, nb * region
        else:
            block_stride, outer_stride = outer * region, region
        layout = KVLayout(kind, len(descs), nb, outer, region, d0.dtype)
        return cls(layout, d0.device, [d.ptr for d in descs], block_stride, outer_stride)

    @classmethod
    def from_contiguous(cls, tensor: Any, num_layers: int, outer: int = 2) -> "EngineKVDevice":
        """From one ``[num_blocks, layers, outer, ...]`` CUDA tensor (TensorRT-LLM)."""
        out = cls.from_contiguous_desc(describe(tensor), num_layers, outer)
        out.keep = [tensor]
        return out

    @classmethod
    def from_contiguous_desc(cls, d: TensorDesc, num_layers: int, outer: int = 2) -> "EngineKVDevice":
        if len(d.shape) < 3 or d.shape[1] != num_layers or d.shape[2] != outer:
            raise LayoutError(f"contiguous KV tensor of shape {d.shape} is not [blocks, {num_layers}, {outer}, ...]")
        nb = d.shape[0]
        region = d.nbytes // (nb * num_layers * outer)
        layout = KVLayout(CONTIGUOUS, num_layers, nb, outer, region, d.dtype)
        ptrs = [d.ptr + layer * outer * region for layer in range(num_layers)]
        return cls(layout, d.device, ptrs, num_layers * outer * region, region)

    def region_address(self, block: int, layer: int, outer: int) -> int:
        """Device address of one (block, layer, K/V) region."""
        return self.layer_ptrs[layer] + block * self.block_stride + outer * self.outer_stride

    def segments(self, placement: Placement | int = 0) -> list[Segment]:
        """The block's pieces in host order (a region, or a row of one at a placement in the
        heads format), merged where they are adjacent on the device and in the host block."""
        lay = self.layout
        p = as_placement(placement, lay)
        segs: list[Segment] = []
        for layer in range(lay.num_layers):
            for o in range(lay.outer):
                region = self.region_address(0, layer, o)
                for i in range(p.rows):
                    dev = region + i * p.row_bytes
                    host = (layer * lay.outer + o) * p.region_stride + i * p.pitch
                    last = segs[-1] if segs else None
                    # Merge only while the merged width fits the block stride (a 2D copy's pitch).
                    if (last is not None and last.dev + last.width == dev and last.host_off + last.width == host
                            and last.width + p.row_bytes <= self.block_stride):
                        segs[-1] = Segment(last.dev, last.dev_stride, last.host_off, last.width + p.row_bytes)
                    else:
                        segs.append(Segment(dev, self.block_stride, host, p.row_bytes))
        return segs


# -- host side --------------------------------------------------------------------------------
def as_placement(placement: Placement | int, layout: KVLayout) -> Placement:
    """``placement``, or a rank slice at that offset (the rank-slices format)."""
    if isinstance(placement, Placement):
        return placement
    return Placement.sliced(placement, layout.region_bytes)


@dataclass(frozen=True)
class HostSlice:
    """This rank's bytes of every block of a host pool, by address (segments' host offsets
    count from ``slice_offset``, where the rank's first piece lies in a block)."""

    base: int  # address of host block 0
    num_blocks: int
    block_bytes: int
    slice_offset: int

    @classmethod
    def of(cls, pool_array: np.ndarray, placement: Placement | int, layout: KVLayout) -> "HostSlice":
        """From the pool as a ``[num_blocks, block_bytes]`` uint8 array (``HostPool.array``) and
        where the rank's bytes lie in a block (a :class:`Placement`, or a slice's offset)."""
        if pool_array.ndim != 2 or pool_array.dtype != np.uint8 or not pool_array.flags.c_contiguous:
            raise ValueError("the host pool must be a C-contiguous [num_blocks, block_bytes] uint8 array")
        nb, bb = pool_array.shape
        p = as_placement(placement, layout)
        end = p.end(layout.num_layers * layout.outer)
        if p.offset < 0 or end > bb or p.region_bytes != layout.region_bytes:
            raise ValueError(f"slice [{p.offset}, {end}) does not fit in host blocks of {bb} bytes")
        return cls(int(pool_array.ctypes.data), nb, bb, p.offset)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes


# -- copy plans (pure arithmetic, testable without a GPU) ----------------------------------
Copy2D = tuple[int, int, int, int, int, int]  # dst, dst pitch, src, src pitch, width, height


def dma_copies(segs: Sequence[Segment], host: HostSlice, runs: BlockRuns, direction: Direction) -> list[Copy2D]:
    """One 2D copy per (run, segment), run by run; the addresses are computed with NumPy."""
    if not len(runs) or not segs:
        return []
    dev = np.array([s.dev for s in segs], np.int64)  # device addresses fit in 63 bits
    stride = np.array([s.dev_stride for s in segs], np.int64)
    off = np.array([s.host_off for s in segs], np.int64)
    width = np.array([s.width for s in segs], np.int64)
    shape = (len(runs), len(segs))
    d = (dev[None, :] + runs.engine[:, None] * stride[None, :]).ravel().tolist()
    h = (host.base + host.slice_offset + runs.host[:, None] * host.block_bytes + off[None, :]).ravel().tolist()
    pitch = np.broadcast_to(stride, shape).ravel().tolist()
    widths = np.broadcast_to(width, shape).ravel().tolist()
    rows = np.broadcast_to(runs.length[:, None], shape).ravel().tolist()
    hp = host.block_bytes
    if direction is Direction.STORE:
        return [(hh, hp, dd, dp, w, n) for hh, dd, dp, w, n in zip(h, d, pitch, widths, rows)]
    return [(dd, dp, hh, hp, w, n) for hh, dd, dp, w, n in zip(h, d, pitch, widths, rows)]


def region_copies(segs: Sequence[Segment], host: HostSlice, engine_blocks: np.ndarray, slots: np.ndarray,
                  direction: Direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dsts, srcs, sizes)`` of every (pair, segment) region, as uint64 arrays."""
    dev = np.array([s.dev for s in segs], np.uint64)
    stride = np.array([s.dev_stride for s in segs], np.uint64)
    off = np.array([s.host_off for s in segs], np.uint64)
    width = np.array([s.width for s in segs], np.uint64)
    eb, sl = engine_blocks.astype(np.uint64), slots.astype(np.uint64)
    d = (dev[None, :] + eb[:, None] * stride[None, :]).ravel()
    h = (np.uint64(host.base + host.slice_offset) + sl[:, None] * np.uint64(host.block_bytes) + off[None, :]).ravel()
    sizes = np.broadcast_to(width, (len(eb), len(segs))).ravel().copy()
    return (h, d, sizes) if direction is Direction.STORE else (d, h, sizes)


def auto_strategy(nbytes: int, ncopies: int, dma_min_bytes: int = DMA_MIN_BYTES, kernel_ok: bool = True,
                  row_bytes: int = DMA_MIN_ROW_BYTES) -> str:
    """``auto``'s pick: DMA (memcpy2d) when each 2D copy moves ``dma_min_bytes`` or more in rows
    of at least :data:`DMA_MIN_ROW_BYTES` (``row_bytes``: the narrowest region), else the kernel."""
    if not kernel_ok:
        return MEMCPY2D
    if nbytes / max(1, ncopies) >= dma_min_bytes and row_bytes >= DMA_MIN_ROW_BYTES:
        return MEMCPY2D
    return KERNEL


def split_segments(segs: Sequence[Segment], chunk: int) -> list[Segment]:
    """Segments cut into pieces of at most ``chunk`` bytes (the kernel's work items)."""
    out = []
    for s in segs:
        for o in range(0, s.width, chunk):
            out.append(Segment(s.dev + o, s.dev_stride, s.host_off + o, min(chunk, s.width - o)))
    return out


# -- pinning ----------------------------------------------------------------------------------
_pins: dict[tuple[int, int], list[int]] = {}  # (ptr, size) -> [refcount, registered by us]
_pins_lock = threading.Lock()


class PinnedHost:
    """``cudaHostRegister`` (portable, mapped) of ``[ptr, ptr + size)``, counted per process.

    Several engines of one process (TP ranks in one test, say) can pin the same mapping;
    the range is unregistered when the last one closes. A range that someone else already
    registered is used as it is and left registered.
    """

    def __init__(self, ptr: int, size: int) -> None:
        self.key = (int(ptr), int(size))
        self._closed = False
        cp = _cupy()
        with _pins_lock:
            entry = _pins.get(self.key)
            if entry is not None:
                entry[0] += 1
                return
            ours = 1
            try:
                cp.cuda.runtime.hostRegister(ptr, size, _REGISTER_PORTABLE | _REGISTER_MAPPED)
            except cp.cuda.runtime.CUDARuntimeError as e:
                if getattr(e, "status", None) != _ERR_ALREADY_REGISTERED:
                    raise RuntimeError(f"cudaHostRegister of the host pool ({size / 2**30:.2f} GiB at "
                                       f"{ptr:#x}) failed: {e}") from None
                ours = 0
            _pins[self.key] = [1, ours]

    def close(self) -> None:
        """Drop this reference; the last one unregisters (before the mapping goes). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _pins_lock:
            entry = _pins[self.key]
            entry[0] -= 1
            if entry[0]:
                return
            del _pins[self.key]
            if entry[1]:
                _cupy().cuda.runtime.hostUnregister(self.key[0])

    def __enter__(self) -> "PinnedHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned_ranges() -> dict[tuple[int, int], int]:
    """Ranges this process pinned through kvbm, with their reference counts (for tests)."""
    with _pins_lock:
        return {k: v[0] for k, v in _pins.items()}


# -- streams and events -----------------------------------------------------------------------
def stream_handle(s: Any) -> int:
    """Raw ``cudaStream_t`` of an int, a CuPy stream (``.ptr``) or a torch stream (``.cuda_stream``)."""
    if isinstance(s, int):
        return s
    for attr in ("cuda_stream", "ptr"):
        if hasattr(s, attr):
            return int(getattr(s, attr))
    raise TypeError(f"not a CUDA stream: {s!r}")


def event_handle(e: Any) -> int:
    """Raw ``cudaEvent_t`` of an int, a CuPy event (``.ptr``) or a recorded torch event (``.cuda_event``)."""
    if isinstance(e, int):
        return e
    for attr in ("cuda_event", "ptr"):
        if hasattr(e, attr):
            h = int(getattr(e, attr))
            if h == 0:
                raise ValueError("the event was never recorded")
            return h
    raise TypeError(f"not a CUDA event: {e!r}")


class Transfer:
    """A submitted copy batch. ``done()`` polls from any thread; ``wait()`` blocks (spinning) its caller only."""

    def __init__(self, event: Any, keep: tuple[Any, ...], nbytes: int, strategy: str) -> None:
        self.event = event  # a cupy.cuda.Event recorded after the copies
        self.nbytes = nbytes
        self.strategy = strategy
        self._keep: tuple[Any, ...] = keep  # buffers the copies still read

    def done(self) -> bool:
        """True once every copy of the batch finished (never blocks)."""
        if self.event is None:
            return True
        finished = bool(self.event.done)
        if finished:
            self._keep = ()
        return finished

    def wait(self) -> None:
        """Block the calling thread until the batch finished."""
        if self.event is not None:
            self.event.synchronize()
        self._keep = ()

    def wait_on(self, stream: Any) -> None:
        """Make ``stream`` (e.g. the engine's) wait for this batch, without blocking any thread."""
        if self.event is not None:
            _cupy().cuda.runtime.streamWaitEvent(stream_handle(stream), self.event.ptr, 0)


def _batch_api() -> Any:
    """``cuda.bindings.runtime`` when it has ``cudaMemcpyBatchAsync`` (CUDA >= 12.8), else None."""
    try:
        from cuda.bindings import runtime as cbr
    except Exception:  # not installed, or built for another CUDA
        return None
    return cbr if hasattr(cbr, "cudaMemcpyBatchAsync") else None


class _IndexUpload:
    """The kernel's index array (engine blocks, then host slots) on the device, per stream.

    A fresh device array per batch (``cupy.asarray``) costs an allocation and a pageable copy,
    about a third of a 64-block batch's submission time. Instead the batch is written into one
    of a few pinned host buffers and copied on the copy's own stream into one device buffer:
    uploads and kernels of one stream run in order, so one device buffer suffices, and a host
    buffer is rewritten only after the upload that last read it has run (its event).
    """

    RING = 4

    def __init__(self, cp: Any, pairs: int = 256) -> None:
        self._cp = cp
        self._alloc(pairs)

    def _alloc(self, pairs: int) -> None:
        cp = self._cp
        self.capacity = pairs
        self._host = [cp.cuda.alloc_pinned_memory(2 * pairs * 8) for _ in range(self.RING)]
        self._views = [np.frombuffer(h, np.int64, 2 * pairs) for h in self._host]
        self._uploaded: list[Any] = [None] * self.RING
        self._next = 0
        self.device = cp.empty(2 * pairs, cp.int64)

    def put(self, stream: Any, eb: np.ndarray, sl: np.ndarray) -> Any:
        """Queue the upload of ``eb`` then ``sl`` on ``stream``; returns the device buffer."""
        n = len(eb)
        if n > self.capacity:
            stream.synchronize()  # kernels queued on this stream still read the old buffer
            self._alloc(max(n, 2 * self.capacity))
        i = self._next
        self._next = (i + 1) % self.RING
        if self._uploaded[i] is not None:
            self._uploaded[i].synchronize()
        view = self._views[i]
        view[:n] = eb
        view[n:2 * n] = sl
        rt = self._cp.cuda.runtime
        rt.memcpyAsync(self.device.data.ptr, view.ctypes.data, 2 * n * 8, rt.memcpyHostToDevice, stream.ptr)
        if self._uploaded[i] is None:
            self._uploaded[i] = self._cp.cuda.Event(block=False, disable_timing=True)
        self._uploaded[i].record(stream)
        return self.device


# -- the engine -------------------------------------------------------------------------------
class CudaCopyEngine:
    """Copies between a CUDA device's KV tensors and this rank's slice of the pinned host pool.

    ``engine_stream``: the stream the engine writes KV on (int handle, CuPy or torch stream;
    default :data:`LEGACY_STREAM`, where torch and vLLM run unless told otherwise).
    Stores wait for the work queued on it at submission, unless the call names its own
    ``after_event``/``after_stream``. ``None`` disables the implicit wait.
    """

    def __init__(self, kv: EngineKVDevice, pool_array: np.ndarray, placement: Placement | int, *,
                 strategy: str = AUTO, engine_stream: Any = LEGACY_STREAM, dma_min_bytes: int = DMA_MIN_BYTES,
                 pin: bool = True) -> None:
        if strategy not in STRATEGIES + (AUTO,):
            raise ValueError(f"unknown copy strategy {strategy!r}; choose one of {', '.join(STRATEGIES + (AUTO,))}")
        cp = _cupy()
        self.kv = kv
        self.host = HostSlice.of(pool_array, placement, kv.layout)
        self.strategy = strategy
        self.dma_min_bytes = dma_min_bytes
        self.engine_stream = None if engine_stream is None else stream_handle(engine_stream)
        self._segs = kv.segments(placement)
        self._kseg = split_segments(self._segs, KERNEL_CHUNK_BYTES)
        self._min_width = min(seg.width for seg in self._segs)
        self._lock = threading.Lock()
        self._closed = False
        self._pin: PinnedHost | None = None
        with cp.cuda.Device(kv.device):
            self._store_stream = cp.cuda.Stream(non_blocking=True)
            self._load_stream = cp.cuda.Stream(non_blocking=True)
            self._engine_event = cp.cuda.Event(disable_timing=True)
            if pin:
                self._pin = PinnedHost(self.host.base, self.host.nbytes)
            try:
                self._kernel_error = self._setup_kernel(cp)
                self._batch: Any = None
                self._batch_error: str | None = None  # None: not probed yet (only when asked for)
                if strategy == BATCH:
                    self._batch_unavailable()
            except BaseException:
                self.close()
                raise
        if strategy == KERNEL and self._kernel_error:
            self.close()
            raise ValueError(f"copy strategy 'kernel' is unavailable: {self._kernel_error}")
        if strategy == BATCH and self._batch_unavailable():
            self.close()
            raise ValueError(f"copy strategy 'batch' is unavailable: {self._batch_error}")

    # -- setup ------------------------------------------------------------------------------
    def _setup_kernel(self, cp: Any) -> str:
        """Upload the kernel's per-segment tables; returns why the kernel cannot run, or ''."""
        rt = cp.cuda.runtime
        if not rt.deviceGetAttribute(rt.cudaDevAttrCanUseHostPointerForRegisteredMem, self.kv.device):
            return "this device cannot address registered host memory by its host pointer"
        addrs = [self.host.base, self.host.block_bytes, self.host.slice_offset]
        for s in self._kseg:
            addrs += [s.dev, s.dev_stride, s.host_off, s.width]
        if any(a % _WORD for a in addrs):
            return f"addresses, strides or region sizes are not multiples of {_WORD} bytes"
        self._k_dev = cp.asarray(np.array([s.dev for s in self._kseg], np.uint64))
        self._k_stride = cp.asarray(np.array([s.dev_stride for s in self._kseg], np.int64))
        self._k_host = cp.asarray(np.array([s.host_off for s in self._kseg], np.int64))
        self._k_words = cp.asarray(np.array([s.width // _WORD for s in self._kseg], np.int64))
        # The uploads ran on the current stream, which our non-blocking streams do not wait for.
        cp.cuda.get_current_stream().synchronize()
        sms = int(rt.getDeviceProperties(self.kv.device)["multiProcessorCount"])
        self._k_max_grid = max(1, sms * KERNEL_BLOCKS_PER_SM)
        self._kernel = _copy_kernel()
        self._store_idx, self._load_idx = _IndexUpload(cp), _IndexUpload(cp)
        return ""

    def _batch_unavailable(self) -> str:
        """Why the batch strategy cannot run here ('' when it can); probes it on first use."""
        if self._batch_error is None:
            with _cupy().cuda.Device(self.kv.device):
                self._batch, self._batch_error = self._setup_batch()
        return self._batch_error

    def _setup_batch(self) -> tuple[Any, str]:
        cbr = _batch_api()
        if cbr is None:
            return None, "needs cuda.bindings with cudaMemcpyBatchAsync (CUDA >= 12.8)"
        attr = cbr.cudaMemcpyAttributes()
        attr.srcAccessOrder = cbr.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        attr.flags = cbr.cudaMemcpyFlags.cudaMemcpyFlagPreferOverlapWithCompute
        self._batch_attr = attr
        # Probe the binding once with a 16-byte device copy: an API that the driver refuses
        # makes the strategy unavailable instead of failing every batch.
        cp = _cupy()
        src, dst = cp.arange(16, dtype=cp.uint8), cp.zeros(16, dtype=cp.uint8)
        cp.cuda.get_current_stream().synchronize()
        try:
            self._batch_call(cbr, [dst.data.ptr], [src.data.ptr], [16], self._store_stream)
            self._store_stream.synchronize()
        except Exception as e:
            return None, f"cudaMemcpyBatchAsync does not work here: {type(e).__name__}: {e}"
        if not bool((dst == src).all()):
            return None, "cudaMemcpyBatchAsync did not copy the probe bytes"
        return cbr, ""

    def _batch_call(self, cbr: Any, dsts: list[int], srcs: list[int], sizes: list[int], stream: Any) -> None:
        cbr.cudaSetDevice(self.kv.device)  # cuda.bindings may hold its own runtime state
        ret = cbr.cudaMemcpyBatchAsync(dsts, srcs, sizes, len(sizes), [self._batch_attr], [0], 1, stream.ptr)
        err = ret[0] if isinstance(ret, tuple) else ret
        if err != cbr.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaMemcpyBatchAsync failed: {err}")

    def available(self) -> dict[str, str]:
        """Each strategy and why it is unavailable ('' when it runs here)."""
        return {MEMCPY2D: "", KERNEL: self._kernel_error, BATCH: self._batch_unavailable()}

    # -- CopyEngine interface ---------------------------------------------------------------
    def store(self, engine_blocks: IndexList, slots: IndexList) -> None:
        """G1 -> G2 (d2h), returning once the bytes are in the host pool."""
        self.store_async(engine_blocks, slots).wait()

    def load(self, slots: IndexList, engine_blocks: IndexList) -> None:
        """G2 -> G1 (h2d), returning once the bytes are in the engine's blocks."""
        self.load_async(slots, engine_blocks).wait()

    def store_async(self, engine_blocks: IndexList, slots: IndexList, *, after_event: Any = None,
                    after_stream: Any = None, strategy: str | None = None) -> Transfer:
        """Queue G1 -> G2 on the store stream, after ``after_event``/``after_stream`` (default: the engine stream)."""
        wait = after_stream if after_stream is not None else (self.engine_stream if after_event is None else None)
        return self._submit(Direction.STORE, engine_blocks, slots, after_event, wait, strategy)

    def load_async(self, slots: IndexList, engine_blocks: IndexList, *, after_event: Any = None,
                   after_stream: Any = None, strategy: str | None = None) -> Transfer:
        """Queue G2 -> G1 on the load stream (after the named event/stream, if any)."""
        return self._submit(Direction.LOAD, engine_blocks, slots, after_event, after_stream, strategy)

    def close(self) -> None:
        """Finish in-flight copies and unpin the host pool (call before unmapping it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in (getattr(self, "_store_stream", None), getattr(self, "_load_stream", None)):
            if s is not None:
                s.synchronize()
        if self._pin is not None:
            self._pin.close()
            self._pin = None

    def __enter__(self) -> "CudaCopyEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def choose(self, runs: BlockRuns) -> str:
        """The strategy this engine uses for a batch split into ``runs``."""
        if self.strategy != AUTO:
            return self.strategy
        return auto_strategy(runs.num_blocks * self.kv.layout.slice_bytes, len(runs) * len(self._segs),
                             self.dma_min_bytes, not self._kernel_error, self._min_width)

    def _submit(self, direction: Direction, engine_blocks: IndexList, slots: IndexList, after_event: Any,
                after_stream: Any, strategy: str | None) -> Transfer:
        if self._closed:
            raise RuntimeError("the copy engine is closed")
        eb, sl = index_array(engine_blocks, "engine_blocks"), index_array(slots, "slots")
        runs = plan_batch(eb, sl, self.kv.layout.num_blocks, self.host.num_blocks, direction)
        cp = _cupy()
        rt = cp.cuda.runtime
        stream = self._store_stream if direction is Direction.STORE else self._load_stream
        chosen = strategy or self.choose(runs)
        nbytes = len(eb) * self.kv.layout.slice_bytes
        with self._lock, cp.cuda.Device(self.kv.device):
            if after_event is not None:
                rt.streamWaitEvent(stream.ptr, event_handle(after_event), 0)
            if after_stream is not None:
                rt.eventRecord(self._engine_event.ptr, stream_handle(after_stream))
                rt.streamWaitEvent(stream.ptr, self._engine_event.ptr, 0)
            keep: tuple[Any, ...] = ()
            if len(eb):
                if chosen == MEMCPY2D:
                    kind = rt.memcpyDeviceToHost if direction is Direction.STORE else rt.memcpyHostToDevice
                    for c in dma_copies(self._segs, self.host, runs, direction):
                        rt.memcpy2DAsync(*c, kind, stream.ptr)
                elif chosen == KERNEL:
                    keep = self._launch_kernel(cp, stream, eb, sl, direction)
                elif chosen == BATCH:
                    keep = self._launch_batch(stream, eb, sl, direction)
                else:
                    raise ValueError(f"unknown copy strategy {chosen!r}")
            # A spinning (non-blocking-sync) event: a sleeping wait adds tens of microseconds per batch.
            event = cp.cuda.Event(block=False, disable_timing=True)
            event.record(stream)
        return Transfer(event, keep, nbytes, chosen)

    def _launch_kernel(self, cp: Any, stream: Any, eb: np.ndarray, sl: np.ndarray,
                       direction: Direction) -> tuple[Any, ...]:
        if self._kernel_error:
            raise ValueError(f"copy strategy 'kernel' is unavailable: {self._kernel_error}")
        upload = self._store_idx if direction is Direction.STORE else self._load_idx
        with stream:
            idx_dev = upload.put(stream, eb, sl)  # queued on our stream, ahead of the kernel
            ntasks = len(eb) * len(self._kseg)
            grid = min(ntasks, self._k_max_grid)
            self._kernel((grid,), (KERNEL_THREADS,), (
                idx_dev, np.int32(len(eb)), self._k_dev, self._k_stride, self._k_host, self._k_words,
                np.int32(len(self._kseg)), np.uint64(self.host.base + self.host.slice_offset),
                np.int64(self.host.block_bytes), np.int32(1 if direction is Direction.STORE else 0)))
        return ()

    def _launch_batch(self, stream: Any, eb: np.ndarray, sl: np.ndarray, direction: Direction) -> tuple[Any, ...]:
        if self._batch_unavailable():
            raise ValueError(f"copy strategy 'batch' is unavailable: {self._batch_error}")
        dsts, srcs, sizes = region_copies(self._segs, self.host, eb, sl, direction)
        self._batch_call(self._batch, dsts.tolist(), srcs.tolist(), sizes.tolist(), stream)
        return ()


def cuda_engine(kv: EngineKVDevice, pool: "HostPool", placement: Placement) -> CudaCopyEngine:
    """Rank-agent engine factory (``RankAgent(engine_factory=cuda_engine)``) with the defaults."""
    return CudaCopyEngine(kv, pool.array, placement)
