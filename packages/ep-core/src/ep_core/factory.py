"""The backends of primitive ``"ep"``: ``"torch"`` (reference) and ``"nvlink"`` (CUDA kernels).

Both are registered with ep-jit's backend registry (:mod:`ep_jit.registry`) through the
``ep_jit.backends`` entry point ``ep_core = "ep_core.factory:ep_backends"``; ``"auto"`` picks the
highest-priority backend that can serve the group. Backends are built with
``cls.from_config(group, config)``, ``config`` a :class:`~ep_core.backend.BackendConfig`.
The NVLink backend lives in ``ep_core.nvlink`` and is imported lazily, only when a CUDA group
asks for it, so importing ep-core never touches CUDA or the compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.distributed as dist

from ep_core.backend import BackendConfig, EPBackend
from ep_jit.registry import BackendSpec, get_backend, select_backend

__all__ = [
    "PRIMITIVE",
    "create_backend",
    "ep_backends",
    "nvlink_backend_class",
    "nvlink_unavailable_reason",
    "resolve_backend",
]

PRIMITIVE = "ep"
"""The primitive name ep-core's backends are registered under."""

# ep-core's own provider is always consulted, so a checkout run from PYTHONPATH (no entry
# points) still finds its backends; with the entry point installed the name is used once.
_PROVIDERS = (("ep_core", "ep_core.factory:ep_backends"),)


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
    too_old = _compute_capability_reason()
    if too_old is not None:
        return too_old
    if nvlink_backend_class() is None:
        return "ep_core.nvlink.NvlinkBackend is not available"
    return None


def _compute_capability_reason() -> str | None:
    """Why this rank's GPU cannot run the NVLink kernels (TMA bulk copies need sm_90), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return (
            "the NVLink kernels need compute capability 9.0 (Hopper) or newer; "
            f"this GPU has {major}.{minor}"
        )
    return None


def ep_backends() -> list[BackendSpec]:
    """ep-core's ``ep_jit.backends`` provider: backends ``"nvlink"`` and ``"torch"`` of ``"ep"``.

    Nothing is imported here beyond the specs; the backend modules load when built.
    """
    return [
        BackendSpec(
            primitive=PRIMITIVE,
            name="nvlink",
            priority=100,
            factory="ep_core.nvlink:NvlinkBackend.from_config",
            unavailable=nvlink_unavailable_reason,
            description="JIT CUDA kernels on peer-mapped memory within one NVLink domain",
        ),
        BackendSpec(
            primitive=PRIMITIVE,
            name="torch",
            priority=0,
            factory="ep_core.reference:TorchBackend.from_config",
            description="reference backend on torch.distributed (gloo on CPU, NCCL on GPU)",
        ),
    ]


def resolve_backend(requested: str, group: dist.ProcessGroup, all_cuda: bool) -> str:
    """Turns a requested backend name into a registered one (``"torch"``, ``"nvlink"``, ...).

    ``"auto"`` picks the highest-priority backend that can serve ``group`` (``"nvlink"`` when
    possible, else ``"torch"``) and logs that choice once. Collective (see
    :func:`nvlink_unavailable_reason` and :func:`ep_jit.registry.select_backend`): every rank
    must call it with the same arguments.

    Raises:
        ValueError: Unknown name (the message lists the known ones), or a named backend that
            cannot serve ``group`` (with why).
    """
    return select_backend(PRIMITIVE, requested, group, all_cuda, _PROVIDERS).name


def create_backend(name: str, group: dist.ProcessGroup, config: BackendConfig) -> EPBackend:
    """Builds the resolved backend ``name`` (see :func:`resolve_backend`) for ``group``.

    Raises:
        ValueError: ``name`` is not a registered backend, or its module cannot be imported.
    """
    backend: EPBackend = get_backend(PRIMITIVE, name, _PROVIDERS).build(group, config)
    return backend
