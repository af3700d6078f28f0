"""Thin helpers over ``cuda.bindings.driver``: result checking and torch's primary context.

Importing this module loads no driver library; the first driver call does.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from cuda.bindings import driver

from ep_jit.errors import JitLaunchError

__all__ = [
    "check",
    "cu_stream",
    "current_device",
    "current_stream_handle",
    "driver",
    "ensure_context",
    "stream_handle",
]

_SUCCESS = driver.CUresult.CUDA_SUCCESS
_init_lock = threading.Lock()
_initialized = False
_primary: dict[int, Any] = {}
_current = threading.local()  # the device whose primary context this thread made current


def _error_name(err: object) -> str:
    try:
        res, name = driver.cuGetErrorName(err)
        if res == _SUCCESS and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is a courtesy; never mask the original failure
        pass
    return str(err)


def check(call: str, result: object, detail: str = "") -> Any:
    """Unpacks a cuda-bindings result tuple, raising on any error.

    Args:
        call: Name of the driver function, for the message.
        result: What the binding returned: ``(CUresult, *values)`` or a bare ``CUresult``.
        detail: Context added to the message (kernel name, sizes).

    Returns:
        ``None``, the single value, or a tuple of values.

    Raises:
        JitLaunchError: The ``CUresult`` is not ``CUDA_SUCCESS``.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != _SUCCESS:
        raise JitLaunchError(call, _error_name(err), detail)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def ensure_context(device: int) -> None:
    """Makes torch's primary context of ``device`` current on this thread (no-op if it is).

    torch initialises CUDA lazily; driver calls made before torch touched the device would
    otherwise fail with ``CUDA_ERROR_INVALID_CONTEXT`` or create a context torch does not use.
    """
    global _initialized
    if getattr(_current, "device", None) == device:
        # Launch path: this thread already made the device's primary context current. torch
        # switches devices only through cudaSetDevice, which selects the same primary contexts.
        return
    if not _initialized:
        with _init_lock:
            torch.cuda.current_device()  # torch initialises CUDA lazily
            check("cuInit", driver.cuInit(0))
            _initialized = True
    ctx = check("cuCtxGetCurrent", driver.cuCtxGetCurrent())
    if ctx is not None and int(ctx) != 0:
        current = check("cuCtxGetDevice", driver.cuCtxGetDevice())
        if int(current) == device:
            _current.device = device
            return
    primary = _primary.get(device)
    if primary is None:
        dev = check("cuDeviceGet", driver.cuDeviceGet(device))
        # Retained once per device for the life of the process: the same context the CUDA
        # runtime (and so torch) uses.
        primary = _primary[device] = check(
            "cuDevicePrimaryCtxRetain", driver.cuDevicePrimaryCtxRetain(dev)
        )
    check("cuCtxSetCurrent", driver.cuCtxSetCurrent(primary))
    _current.device = device


# torch's raw lookups cost a fraction of torch.cuda.current_stream() (which builds a Stream
# object) and torch.cuda.current_device(); they give the same answers. The launch path uses them.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_get_device = getattr(torch._C, "_cuda_getDevice", None)


def current_device() -> int:
    """torch's current CUDA device index."""
    return int(_get_device()) if _get_device is not None else torch.cuda.current_device()


def current_stream_handle(device: int | None = None) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device`` (default: current)."""
    if _raw_stream is not None:
        return int(_raw_stream(current_device() if device is None else device))
    return int(torch.cuda.current_stream(device).cuda_stream)


def stream_handle(stream: torch.cuda.Stream | None) -> int:
    """The raw handle of ``stream`` (default: torch's current one), its device's primary
    context made current on this thread (for the driver calls that follow)."""
    ensure_context(torch.cuda.current_device() if stream is None else stream.device.index or 0)
    return current_stream_handle() if stream is None else int(stream.cuda_stream)


_cu_streams: dict[int, Any] = {}


def cu_stream(handle: int) -> Any:  # a cuda-bindings CUstream
    """The cuda-bindings ``CUstream`` of a raw stream handle, built once per handle.

    Every launch, copy and stream memory operation passes one; building it anew each time costs
    host time on every call.
    """
    stream = _cu_streams.get(handle)
    if stream is None:
        if len(_cu_streams) > 256:
            _cu_streams.clear()
        stream = _cu_streams[handle] = driver.CUstream(handle)
    return stream
