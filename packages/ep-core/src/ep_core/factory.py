"""Backend selection: ``"auto"``, ``"torch"`` (reference) or ``"nvlink"`` (CUDA kernels).

Backends are built with ``cls.from_config(group, config)``, ``config`` a
:class:`~ep_core.backend.BackendConfig`.
The NVLink backend lives in ``ep_core.nvlink`` and is imported lazily, only when a CUDA group
asks for it, so importing ep-core never touches CUDA or the compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.distributed as dist

from ep_core.backend import BackendConfig, EPBackend
from ep_core.knobs import BACKEND_CHOICES
from ep_core.reference import TorchBackend

__all__ = ["create_backend", "nvlink_backend_class", "nvlink_unavailable_reason", "resolve_backend"]


def nvlink_backend_class() -> Any | None:
    """``ep_core.nvlink.NvlinkBackend`` when that module imports, else ``None``."""
    try:
        module = importlib.import_module("ep_core.nvlink")
    except ImportError:
        return None
    return getattr(module, "NvlinkBackend", None)


def nvlink_unavailable_reason(group: dist.ProcessGroup, all_cuda: bool) -> str | None:
    """Why the NVLink backend cannot serve ``group``, or ``None`` when it can.

    Collective when ``all_cuda`` (it asks ep-jit whether the group is one NVLink domain), so
    every rank must call it with the same ``all_cuda``.

    Args:
        group: The process group.
        all_cuda: Every rank of the group uses a CUDA device (agreed across ranks).
    """
    if not all_cuda:
        return "not every rank is on a CUDA device"
    import ep_jit

    is_single_domain = getattr(ep_jit, "is_single_nvlink_domain", None)
    if is_single_domain is None:
        return "ep_jit provides no is_single_nvlink_domain()"
    if not is_single_domain(group):
        return "the ranks do not share one NVLink domain"
    if nvlink_backend_class() is None:
        return "ep_core.nvlink.NvlinkBackend is not available"
    return None


def resolve_backend(requested: str, group: dist.ProcessGroup, all_cuda: bool) -> str:
    """Turns a requested backend name into ``"torch"`` or ``"nvlink"``.

    ``"auto"`` picks ``"nvlink"`` when possible, else ``"torch"``. Collective (see
    :func:`nvlink_unavailable_reason`) unless ``requested == "torch"``.

    Raises:
        ValueError: Unknown name, or ``"nvlink"`` requested where it cannot run (with why).
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {requested!r}")
    if requested == "torch":
        return "torch"
    reason = nvlink_unavailable_reason(group, all_cuda)
    if reason is None:
        return "nvlink"
    if requested == "nvlink":
        raise ValueError(f"backend='nvlink' cannot be used: {reason}")
    return "torch"


def create_backend(name: str, group: dist.ProcessGroup, config: BackendConfig) -> EPBackend:
    """Builds the resolved backend ``"torch"`` or ``"nvlink"``."""
    if name == "torch":
        return TorchBackend.from_config(group, config)
    if name == "nvlink":
        cls = nvlink_backend_class()
        if cls is None:
            raise ValueError(
                "backend 'nvlink' requested but ep_core.nvlink.NvlinkBackend is missing"
            )
        backend: EPBackend = cls.from_config(group, config)
        return backend
    raise ValueError(f"unknown resolved backend {name!r}; expected 'torch' or 'nvlink'")
