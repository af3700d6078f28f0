"""Shapes, dtypes and memory layouts of Engram tables and fetch results.

A table row is ``hidden`` elements of BF16 or FP8 (E4M3), stored densely. FP8 rows carry one
scale per 128 channels, as ``float32`` (``ceil(hidden / 128)`` packs per row) or as UE8M0 exponent
bytes packed four to an ``int32`` (``ceil(ceil(hidden / 128) / 4)`` packs per row).

Fetched scales come row-major, ``[T, K*P]`` with strides ``(K*P, 1)``, or in DeepEP's TMA-aligned
column-major layout: the same shape with strides ``(1, align(T, 4))``, i.e. every column starts
on a 16-byte boundary, as TMA loads of GEMM kernels want it.
"""

from __future__ import annotations

import torch

__all__ = [
    "DTYPES",
    "SF_BLOCK",
    "SF_DTYPES",
    "align",
    "empty_sf",
    "num_sf_packs",
    "row_bytes",
    "sf_col_stride",
]

DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
"""Element types of a table."""

SF_DTYPES = (torch.float32, torch.int32)
"""Types of FP8 scale packs: float32 scales, or four UE8M0 exponent bytes per int32."""

SF_BLOCK = 128
"""Channels that share one FP8 scale."""


def align(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def row_bytes(hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one table row."""
    return hidden * torch.empty((), dtype=dtype).element_size()


def num_sf_packs(hidden: int, sf_dtype: torch.dtype) -> int:
    """Scale packs per row: one float32 per 128 channels, or one int32 per 4 UE8M0 scales."""
    groups = (hidden + SF_BLOCK - 1) // SF_BLOCK
    return groups if sf_dtype == torch.float32 else (groups + 3) // 4


def sf_col_stride(num_tokens: int) -> int:
    """Column stride of the TMA-aligned column-major scale layout: ``align(T, 4)``."""
    return align(num_tokens, 4)


def empty_sf(
    num_tokens: int,
    num_cols: int,
    dtype: torch.dtype,
    device: torch.device,
    col_major: bool,
) -> torch.Tensor:
    """An uninitialised ``[T, num_cols]`` scale tensor in the row- or column-major layout.

    The column-major one is a strided view of ``num_cols * align(T, 4)`` elements; the padding
    elements between columns are zeroed. With ``T = 0`` there is nothing to lay out and a plain
    empty tensor is returned.
    """
    if not col_major or num_tokens == 0:
        return torch.empty((num_tokens, num_cols), dtype=dtype, device=device)
    ld = sf_col_stride(num_tokens)
    base = torch.empty(num_cols * ld, dtype=dtype, device=device)
    if ld != num_tokens:
        base.view(num_cols, ld)[:, num_tokens:].zero_()
    return base.as_strided((num_tokens, num_cols), (1, ld))
