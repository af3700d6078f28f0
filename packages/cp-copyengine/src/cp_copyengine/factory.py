"""The backends of primitive ``"cp"``: ``"copyengine"`` and ``"torch"`` (reference).

Registered with ep-jit's backend registry through the ``ep_jit.backends`` entry point
``cp_copyengine = "cp_copyengine.factory:cp_backends"``; ``"auto"`` takes the copy engines when
every rank is on a GPU and all of them form one NVLink domain (or share one GPU), else the
reference. Backends are built with ``create(group, session_bytes, max_ops, device, timeout_s)``.
"""

from __future__ import annotations

import torch.distributed as dist

from ep_jit.registry import BackendSpec, peer_access_unavailable, select_backend

__all__ = ["PRIMITIVE", "copyengine_unavailable_reason", "cp_backends", "resolve_backend"]

PRIMITIVE = "cp"
# Consulted always, so a source checkout on PYTHONPATH (no entry points) finds its backends.
_PROVIDERS = (("cp_copyengine", "cp_copyengine.factory:cp_backends"),)


copyengine_unavailable_reason = peer_access_unavailable
"""Why the copy engines cannot serve a group, or ``None`` (ep-jit's peer-access condition)."""


def cp_backends() -> list[BackendSpec]:
    """cp-copyengine's ``ep_jit.backends`` provider."""
    return [
        BackendSpec(
            primitive=PRIMITIVE,
            name="copyengine",
            priority=100,
            factory="cp_copyengine.copyengine:CopyEngineBackend.create",
            unavailable=copyengine_unavailable_reason,
            description="copy-engine peer copies and stream-memory-op flags on peer memory",
        ),
        BackendSpec(
            primitive=PRIMITIVE,
            name="torch",
            priority=0,
            factory="cp_copyengine.reference:TorchBackend.create",
            description="reference on torch.distributed (gloo on CPU, NCCL on GPU)",
        ),
    ]


def resolve_backend(requested: str, group: dist.ProcessGroup, all_cuda: bool) -> BackendSpec:
    """The backend spec for ``requested`` (``"auto"``, ``"copyengine"`` or ``"torch"``).

    Collective: every rank calls it with the same arguments.

    Raises:
        ValueError: Unknown name, or a named backend that cannot serve ``group`` (with why).
    """
    return select_backend(PRIMITIVE, requested, group, all_cuda, _PROVIDERS)
