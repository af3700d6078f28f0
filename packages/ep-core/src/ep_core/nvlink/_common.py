"""What the NVLink backend's high-throughput and low-latency modules share: the include root,
cached kernel builds and raw device pointers for kernel-argument structs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_kernel", "device_ptr", "register_include_root"]


def register_include_root() -> None:
    """Makes ``#include <ep_core/...>`` resolvable for ep-jit (idempotent)."""
    from ep_jit import include_roots
    from ep_jit import register_include_root as register

    if "ep_core" not in include_roots():
        register("ep_core", Path(__file__).resolve().parents[1] / "include")


@functools.cache
def build_kernel(spec: Any) -> Any:
    """ep-jit's kernel for ``spec`` (compiled on first use; the include root registered)."""
    from ep_jit import build

    register_include_root()
    return build(spec)


def device_ptr(t: torch.Tensor | int | None) -> int:
    """``t``'s device address, 0 for ``None``, an int address as given (kernel-argument structs
    hold raw pointers)."""
    if t is None:
        return 0
    return t if type(t) is int else int(t.data_ptr())  # type: ignore[union-attr]
