"""Checks that the ranks of a group agree, failing on every rank together.

Objects whose ranks address each other's memory (symmetric buffers, kernel engines, EP buffers)
must be built with the same configuration on every rank, and a rank that fails a local check
must not leave the others waiting in the next collective. :func:`gather_checked` all-gathers
each rank's configuration together with its local error; :func:`check_agreement` names the
fields that differ. Every rank sees the same gathered list, so every rank raises the same error.

    configs = gather_checked(group, {"nbytes": n}, error, what="SymmetricBuffer")
    check_agreement(configs, "SymmetricBuffer")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_agreement", "gather_checked"]


def gather_checked(
    group: dist.ProcessGroup,
    payload: Mapping[str, Any],
    error: Exception | None,
    *,
    what: str,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """All-gathers ``payload`` with this rank's local ``error``; fails on every rank together.

    Collective: one ``all_gather_object`` over ``group``.

    Args:
        group: The process group.
        payload: This rank's configuration (picklable values).
        error: The exception a local check raised on this rank, or ``None``.
        what: The name of what is being built, for the message.
        device: The CUDA device current during the gather (NCCL groups), or ``None``.

    Returns:
        Every rank's payload, by rank (the same list on every rank).

    Raises:
        Exception: This rank's own ``error``.
        ValueError: Naming the ranks that failed, when only other ranks did.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * dist.get_world_size(group)
    local = {"payload": dict(payload), "error": message}
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            dist.all_gather_object(gathered, local, group=group)
    else:
        dist.all_gather_object(gathered, local, group=group)
    if error is not None:
        raise error
    failed = [f"rank {r}: {g['error']}" for r, g in enumerate(gathered) if g["error"]]
    if failed:
        raise ValueError(f"{what} cannot be built: " + "; ".join(failed))
    return [g["payload"] for g in gathered]


def check_agreement(configs: list[dict[str, Any]], what: str) -> None:
    """Raises ``ValueError`` naming each field whose value differs between ranks.

    Args:
        configs: Every rank's configuration, by rank (as :func:`gather_checked` returns them).
        what: The name of what is being built, for the message.
    """
    problems = []
    for field in configs[0]:
        values = [c.get(field) for c in configs]
        if any(v != values[0] for v in values[1:]):
            by_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            problems.append(f"{field} differs across ranks ({by_rank})")
    if problems:
        raise ValueError(f"{what} configuration must agree on every rank: " + "; ".join(problems))
