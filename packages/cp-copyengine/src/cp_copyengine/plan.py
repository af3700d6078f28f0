"""Where each gathered tensor sits in a session, and the checks of every call's tensors.

A session is a bump allocator over the buffer's session area: every call takes, for each of its
tensors, ``align(R * nbytes, 32)`` bytes (the gathered ``[R, *shape]`` tensor of an all-gather, or
the ``R`` received shards of a reduce-scatter), in call order, and one of the session's
``num_max_ops_per_session`` arrival-flag slots. Rank ``r``'s piece of a region starts at
``offset + r * nbytes``. The plan is a pure function of the calls' shapes and dtypes, so it is the
same on every rank when the ranks agree on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ALIGN",
    "Item",
    "Transfer",
    "align_up",
    "check_shape",
    "nbytes_of",
    "session_bytes_hint",
]

ALIGN = 32
"""Alignment of every gathered tensor in the session area, in bytes (as DeepEP's AGRS)."""


def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def check_shape(shape: object, what: str = "shape") -> tuple[int, ...]:
    """A shape as a tuple of non-negative ints.

    Raises:
        TypeError: Not a sequence of ints.
        ValueError: A negative dimension.
    """
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"{what} must be a sequence of ints, got {shape!r}")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{what} must be a sequence of ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"{what} {tuple(shape)} has a negative dimension")
        dims.append(int(d))
    return tuple(dims)


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a contiguous ``shape``/``dtype`` tensor."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def session_bytes_hint(
    num_ranks: int, shapes: Sequence[Sequence[int]], dtype: torch.dtype | Sequence[torch.dtype]
) -> int:
    """The ``num_max_session_bytes`` a session of all-gathers of these tensors needs.

    Args:
        num_ranks: Ranks of the group (``R``).
        shapes: The per-rank shape of every tensor all-gathered in one session.
        dtype: Their dtype (one for all, or one per shape).

    Returns:
        The sum over tensors of ``align(R * nbytes, 32)``. A reduce-scatter of an ``[R*n, ...]``
        tensor takes as much as an all-gather of its ``[n, ...]`` shard.
    """
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    dtypes = [dtype] * len(shapes) if isinstance(dtype, torch.dtype) else list(dtype)
    if len(dtypes) != len(shapes):
        raise ValueError(f"{len(shapes)} shapes but {len(dtypes)} dtypes")
    return sum(
        align_up(num_ranks * nbytes_of(check_shape(s), d))
        for s, d in zip(shapes, dtypes, strict=True)
    )


@dataclass(frozen=True)
class Item:
    """One tensor of a call.

    Attributes:
        src: The contiguous input on the buffer's device (an all-gather's tensor, or a
            reduce-scatter's ``[R*n, ...]`` tensor).
        offset: Byte offset of the call's region for this tensor in the session area.
        nbytes: Bytes of one rank's piece (the all-gathered tensor, or one shard).
        inplace: ``src`` already sits at this rank's piece (its self copy is skipped).
    """

    src: torch.Tensor
    offset: int
    nbytes: int
    inplace: bool = False


@dataclass(frozen=True)
class Transfer:
    """One call, as the backends execute it.

    Attributes:
        kind: ``"all_gather"`` or ``"reduce_scatter"``.
        session: The session's number (1 for the buffer's first session, then +1).
        slot: The call's index in its session (its arrival-flag slot).
        items: The call's tensors.
    """

    kind: str
    session: int
    slot: int
    items: tuple[Item, ...]
