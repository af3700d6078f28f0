"""The receiver-side reduction of reduce-scatter, shared by every backend (one definition).

The ``R`` shards a rank receives (one per source rank, in rank order) are summed in a wider
type, in rank order, then multiplied by ``1/R`` for ``"avg"`` and cast back: float16, bfloat16 and
float32 accumulate in float32, float64 in float64, integers in int64 (``"sum"`` only). The same
torch operations run on every backend, so results are identical bit for bit. It runs as torch
operations (on SMs), after the copy engines moved the shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["OPS", "REDUCE_DTYPES", "accumulate_dtype", "check_reduce", "reduce_shards"]

OPS = ("sum", "avg")
_FLOAT = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32}
_FLOAT[torch.float64] = torch.float64
_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
REDUCE_DTYPES = (*_FLOAT, *_INT)
"""dtypes reduce_scatter accepts."""


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type shards of ``dtype`` are summed in."""
    if dtype in _FLOAT:
        return _FLOAT[dtype]
    return torch.int64


def check_reduce(dtype: torch.dtype, op: object) -> None:
    """Raises for an ``op``/``dtype`` reduce_scatter does not support.

    Raises:
        ValueError: ``op`` is not ``"sum"`` or ``"avg"``.
        TypeError: A dtype without a reduction here (fp8, bool, complex), or ``"avg"`` of ints.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if dtype not in REDUCE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in REDUCE_DTYPES)
        raise TypeError(f"reduce_scatter does not reduce {dtype}; supported: {names}")
    if op == "avg" and dtype in _INT:
        raise TypeError(f"op='avg' needs a floating dtype, got {dtype}")


def reduce_shards(shards: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """Sums ``shards`` (same shape and dtype) in order in the accumulation type, casts back.

    Runs on the current stream; returns a new tensor of the shards' shape and dtype.
    """
    dtype = shards[0].dtype
    acc = shards[0].to(accumulate_dtype(dtype), copy=True)
    for s in shards[1:]:
        acc.add_(s)
    if op == "avg":
        # A multiplication, not a division: CUDA divides by a scalar through its reciprocal, the
        # CPU does not; multiplying by 1/R rounds the same way on both.
        acc.mul_(1.0 / len(shards))
    return acc.to(dtype)


def warm_up(device: torch.device) -> None:
    """Runs every reduction once per supported dtype on ``device`` (loads the kernels).

    CUDA loads kernels lazily, and a first load while a stream waits on a stream memory
    operation blocks until that wait ends; warming up before any wait avoids it.
    """
    for dtype in REDUCE_DTYPES:
        shards = [torch.ones(2, dtype=dtype, device=device) for _ in range(2)]
        for op in OPS:
            if op == "avg" and dtype in _INT:
                continue
            reduce_shards(shards, op)
