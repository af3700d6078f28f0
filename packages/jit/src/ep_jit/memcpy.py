"""Batches of device copies on the copy engines: one ``cuMemcpyBatchAsync`` where it exists.

Copy-engine protocols (all-gather into peers' memory, pipeline sends) enqueue many independent
pointer-to-pointer copies at once. :func:`memcpy_batch` submits them as one driver call when the
driver offers ``cuMemcpyBatchAsync`` (CUDA 12.8+), with stream-ordered source access and the
"prefer overlap with compute" hint, and otherwise (older drivers, or while the stream is being
captured into a CUDA graph) as one ``cuMemcpyAsync`` per copy. Either way the copies run on copy
engines, not on SMs, in stream order relative to the stream's other work; the copies of one batch
are not ordered among themselves::

    ep_jit.memcpy.memcpy_batch([(dst_ptr, src_ptr, nbytes), ...])  # current stream
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ep_jit._cuda import check, cu_stream, driver, stream_handle
from ep_jit._log import logger

__all__ = ["batch_copy_supported", "memcpy_batch"]

_batch_state: dict[str, bool] = {}
_DEFAULT_STREAMS = (0, 1, 2)  # NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
_NOT_SUPPORTED = {
    getattr(driver.CUresult, name)
    for name in ("CUDA_ERROR_NOT_SUPPORTED", "CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_INVALID_VALUE")
    if hasattr(driver.CUresult, name)
}


def batch_copy_supported() -> bool:
    """Whether this cuda-bindings build exposes ``cuMemcpyBatchAsync`` and it has not been
    found unsupported by the driver in this process."""
    return hasattr(driver, "cuMemcpyBatchAsync") and _batch_state.get("ok", True)


def _check_copies(copies: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out = []
    for i, c in enumerate(copies):
        if len(c) != 3:
            raise ValueError(f"copy {i} must be (dst, src, nbytes), got {c!r}")
        dst, src, n = (int(v) for v in c)
        if n < 0:
            raise ValueError(f"copy {i} has a negative size {n}")
        if n and (dst <= 0 or src <= 0):
            raise ValueError(f"copy {i} has a null address (dst {dst:#x}, src {src:#x})")
        if n:
            out.append((dst, src, n))
    return out


_attrs: list[object] = []


def _copy_attributes() -> list[object]:
    """The one attribute set of every batch (stream-ordered sources, overlap with compute)."""
    if not _attrs:
        attrs = driver.CUmemcpyAttributes()
        attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        attrs.flags = int(driver.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        _attrs.append(attrs)
    return _attrs


def _batched(copies: list[tuple[int, int, int]], stream: object) -> bool:
    """Submits ``copies`` as one cuMemcpyBatchAsync; False when the driver refuses the call."""
    try:
        result = driver.cuMemcpyBatchAsync(
            [driver.CUdeviceptr(d) for d, _, _ in copies],
            [driver.CUdeviceptr(s) for _, s, _ in copies],
            [n for _, _, n in copies],
            len(copies),
            _copy_attributes(),
            [0],
            1,
            stream,
        )
    except TypeError:
        # cuda-bindings 12.x takes an extra failIdx argument: use the per-copy path there.
        _batch_state["ok"] = False
        return False
    err = result[0] if isinstance(result, tuple) else result
    if err in _NOT_SUPPORTED and "ok" not in _batch_state:
        # The first refusal of this process: an old driver. Fall back for good, visibly: the
        # copies stay correct but cost one driver call each.
        _batch_state["ok"] = False
        logger.warning(
            "cuMemcpyBatchAsync refused (%s); copies go one cuMemcpyAsync each in this process",
            err,
        )
        return False
    check("cuMemcpyBatchAsync", result, f"{len(copies)} copies")
    _batch_state["ok"] = True
    return True


def memcpy_batch(
    copies: Sequence[tuple[int, int, int]],
    *,
    stream: torch.cuda.Stream | None = None,
    batched: bool | None = None,
) -> str:
    """Enqueues independent device copies ``(dst, src, nbytes)`` on ``stream`` (copy engines).

    Addresses are device pointers of this process (peer-mapped memory included); zero-byte
    copies are dropped. Asynchronous; the sources are read in stream order, so earlier work of
    the stream that writes them is seen. The copies of one call may run in any order and
    concurrently: none may depend on another.

    Args:
        copies: ``(dst, src, nbytes)`` triples.
        stream: Default: torch's current stream.
        batched: ``True``: one ``cuMemcpyBatchAsync`` (raises where unavailable); ``False``: one
            ``cuMemcpyAsync`` per copy; ``None``: batched when the driver has it, the stream is
            not a default (NULL) stream, which the driver refuses for batches, and it is not
            capturing a graph.

    Returns:
        ``"batch"``, ``"loop"`` or ``"none"`` (nothing to copy): how the copies were submitted.

    Raises:
        ValueError: A malformed triple, a negative size or a null address.
        RuntimeError: ``batched=True`` where ``cuMemcpyBatchAsync`` is unavailable.
        JitLaunchError: The driver rejected a copy.
    """
    todo = _check_copies(copies)
    if not todo:
        return "none"
    raw = stream_handle(stream)
    stream_obj = cu_stream(raw)
    explicit = batched is True
    if explicit and not hasattr(driver, "cuMemcpyBatchAsync"):
        raise RuntimeError("cuMemcpyBatchAsync is not in this cuda-bindings build")
    if batched is None:
        # The driver refuses batches on the NULL (legacy or per-thread default) stream.
        batched = raw not in _DEFAULT_STREAMS and batch_copy_supported()
        batched = batched and not _capturing(stream_obj)
    if batched:
        if _batched(todo, stream_obj):
            return "batch"
        if explicit:
            raise RuntimeError("the driver does not support cuMemcpyBatchAsync")
    for dst, src, n in todo:
        check("cuMemcpyAsync", driver.cuMemcpyAsync(dst, src, n, stream_obj), f"{n} bytes")
    return "loop"


def _capturing(stream: object) -> bool:
    """Whether ``stream`` (a ``CUstream``) is capturing a graph (batched copies are not used
    there, as NCCL does not)."""
    status = check("cuStreamIsCapturing", driver.cuStreamIsCapturing(stream))
    return bool(int(status) != int(driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE))
