"""The backends of primitive ``"engram"``: ``"intranode"`` (JIT gather kernel) and ``"reference"``.

Both are registered with ep-jit's backend registry (:mod:`ep_jit.registry`) through the
``ep_jit.backends`` entry point ``ep_engram = "ep_engram.factory:engram_backends"``; ``"auto"``
takes the intranode backend when every rank has a GPU and all of them share one host whose GPUs
reach each other's memory, else the reference backend. Factories are called as
``factory(config, meeting)`` with a :class:`~ep_engram.backend.TableConfig`.
"""

from __future__ import annotations

import torch.distributed as dist

from ep_jit.registry import BackendSpec, peer_access_unavailable

__all__ = ["PRIMITIVE", "PROVIDERS", "engram_backends", "intranode_unavailable_reason"]

PRIMITIVE = "engram"
"""The primitive name ep-engram's backends are registered under."""

# Always consulted, so that a checkout run from PYTHONPATH (no entry points) finds the backends.
PROVIDERS = (("ep_engram", "ep_engram.factory:engram_backends"),)


def intranode_unavailable_reason(group: dist.ProcessGroup, all_cuda: bool) -> str | None:
    """Why the intranode backend cannot serve ``group``, or ``None`` when it can.

    Collective when ``all_cuda`` (it asks ep-jit whether the ranks share one host and reach each
    other's GPU memory).
    """
    if not all_cuda:
        return "not every rank is on a CUDA device"
    from ep_engram.kernels import MAX_RANKS

    if group.size() > MAX_RANKS:
        return (
            f"the gather kernel addresses at most {MAX_RANKS} ranks, the group has {group.size()}"
        )
    return peer_access_unavailable(group, all_cuda)


def engram_backends() -> list[BackendSpec]:
    """ep-engram's ``ep_jit.backends`` provider (imports no backend module)."""
    return [
        BackendSpec(
            primitive=PRIMITIVE,
            name="intranode",
            priority=100,
            factory="ep_engram.intranode:IntranodeBackend.from_config",
            unavailable=intranode_unavailable_reason,
            description="JIT gather kernel reading the owners' peer-mapped GPU or host segments",
        ),
        BackendSpec(
            primitive=PRIMITIVE,
            name="reference",
            priority=0,
            factory="ep_engram.reference:ReferenceBackend.from_config",
            description="all-to-all of ids, local gather, all-to-all of rows (torch.distributed)",
        ),
    ]
