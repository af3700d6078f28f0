"""What the NVLink backend's high-throughput and low-latency modules share: the include root,
cached kernel builds, raw device pointers for kernel-argument structs, and call signatures."""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SIGNATURE_COMBINE",
    "build_kernel",
    "describe_signatures",
    "device_ptr",
    "register_include_root",
    "signature_digest",
]

SIGNATURE_COMBINE = 0x8000
"""Bit of a call signature that marks a combine (``ep_core::kSignatureCombine`` and
``kLlSignatureCombine``); a dispatch's has it clear, so ranks in different kinds of op never
agree."""


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


def signature_digest(fields: tuple[Any, ...]) -> int:
    """15 bits digesting ``fields`` (the arguments every rank of a call must share); two
    different tuples share a digest with probability 2^-15."""
    return zlib.crc32(repr(fields).encode()) & 0x7FFF


def describe_signatures(
    rank: int,
    peer: int,
    seen: int,
    mine: int,
    *,
    family: str,
    covered: dict[str, str],
    where: str = "",
) -> str:
    """The message of two 16-bit call signatures that differ: ``peer``'s ``seen`` and this
    ``rank``'s ``mine``. Calls of another kind (:data:`SIGNATURE_COMBINE`) are named as such;
    else the message lists what the signatures cover (``covered[kind]``). ``family``: the calls'
    name prefix (``""`` or ``"low_latency_"``); ``where``: appended to a difference in kind."""
    kind_seen = "combine" if seen & SIGNATURE_COMBINE else "dispatch"
    kind_mine = "combine" if mine & SIGNATURE_COMBINE else "dispatch"
    if kind_seen != kind_mine:
        calls = "low-latency dispatch and combine" if family else "dispatch and combine"
        return (
            f"every rank must make the same sequence of {calls} calls on this buffer: rank "
            f"{peer} called {family}{kind_seen} while rank {rank} called {family}{kind_mine}"
            f"{where}"
        )
    return (
        f"{family}{kind_mine} configuration must agree on every rank: rank {peer} called with "
        f"other arguments than rank {rank} (one of {covered[kind_mine]}; signatures "
        f"{seen:#06x} and {mine:#06x})"
    )
