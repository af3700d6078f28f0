"""Torch tensors over raw device addresses (memory that torch did not allocate).

Peer memory mapped through the driver's virtual memory API (GPU segments of this or another
process, host segments mapped for the GPU) has no torch storage. :func:`device_tensor` wraps such
an address as a 1-D uint8 CUDA tensor through a DLPack capsule built here, with the device given
explicitly: torch's ``__cuda_array_interface__`` path would ask the driver which device owns the
pointer, which host-NUMA mappings do not answer the way torch expects.

The tensor does not own the memory: ``owner`` is kept alive while any view exists, but the
mapping itself ends when its owner is destroyed.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from typing import Any

import torch
import torch.utils.dlpack

__all__ = ["device_tensor"]

_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]

# What each live capsule needs until torch calls its deleter: the struct, the shape array and
# the owner, keyed by the id stored in manager_ctx.
_live: dict[int, tuple[Any, ...]] = {}
_lock = threading.Lock()
_ids = itertools.count(1)


def _release(managed: Any) -> None:  # ctypes pointer to _DLManagedTensor
    with _lock:
        _live.pop(int(managed.contents.manager_ctx or 0), None)


_DELETER = _Deleter(_release)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def device_tensor(address: int, nbytes: int, device: torch.device, owner: object) -> torch.Tensor:
    """A ``[nbytes]`` uint8 tensor on ``device`` at virtual address ``address``.

    Args:
        address: An address mapped for ``device`` (a device-accessible one for CUDA).
        nbytes: Length in bytes (> 0).
        device: ``cuda:<i>`` the tensor is placed on (``cpu`` for host memory).
        owner: Object kept alive as long as the tensor or a view of it exists.

    Returns:
        A contiguous uint8 CUDA tensor that does not own its memory.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    key = next(_ids)
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    if device.type == "cuda":
        managed.dl_tensor.device = _DLDevice(_KDL_CUDA, device.index or 0)
    elif device.type == "cpu":
        managed.dl_tensor.device = _DLDevice(_KDL_CPU, 0)
    else:
        raise ValueError(f"device must be cuda or cpu, got {device}")
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = key
    managed.deleter = _DELETER
    with _lock:
        _live[key] = (managed, shape, owner)
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    try:
        return torch.utils.dlpack.from_dlpack(capsule)
    except BaseException:
        with _lock:
            _live.pop(key, None)
        raise
