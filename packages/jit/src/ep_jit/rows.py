"""Byte rows and the all-to-all collectives that move them (reference backends).

A reference backend packs everything one item carries (a token's data, scales, ids, weights and
source index) into one ``uint8`` row, so a single ``all_to_all_single`` moves it whatever the
dtypes: gloo has no float8 or int16 collectives, and bytes work the same on NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["RowField", "all_to_all_fixed", "all_to_all_uneven", "pack_rows", "unpack_rows"]


@dataclass(frozen=True)
class RowField:
    """One field of a packed row: ``cols`` elements of ``dtype`` per row."""

    name: str
    dtype: torch.dtype
    cols: int

    @property
    def nbytes(self) -> int:
        return self.cols * torch.empty((), dtype=self.dtype).element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    cols = 1
    for size in t.shape[1:]:
        cols *= size
    flat = t.reshape(t.shape[0], cols)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.contiguous().view(torch.uint8)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenates the bytes of each part row by row.

    Args:
        parts: Tensors with the same first dimension ``N`` on one device.

    Returns:
        ``[N, B]`` uint8, ``B`` the sum of the parts' bytes per row.
    """
    return torch.cat([_as_bytes(p) for p in parts], dim=1)


def unpack_rows(rows: torch.Tensor, fields: Sequence[RowField]) -> dict[str, torch.Tensor]:
    """Splits ``[N, B]`` uint8 rows into one contiguous ``[N, cols]`` tensor per field."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for f in fields:
        # A fresh buffer: a one-row slice counts as contiguous yet keeps the parent's row stride,
        # which a dtype view would reject.
        chunk = rows.new_empty((rows.shape[0], f.nbytes))
        chunk.copy_(rows[:, offset : offset + f.nbytes])
        out[f.name] = chunk.view(f.dtype)
        offset += f.nbytes
    if offset != rows.shape[1]:
        raise RuntimeError(f"row layout mismatch: fields cover {offset} of {rows.shape[1]} bytes")
    return out


def all_to_all_fixed(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all: block ``d`` of ``send`` goes to rank ``d``.

    Needs no host-side counts, so it never syncs. Runs on the current stream.

    Args:
        send: ``[R * C, ...]`` contiguous.
        group: The process group of ``R`` ranks.

    Returns:
        ``[R * C, ...]``; block ``s`` came from rank ``s``.
    """
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


def all_to_all_uneven(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """All-to-all with row counts known on the host.

    Args:
        send: ``[sum(send_counts), ...]`` contiguous, rows for rank 0 first.
        send_counts: Rows sent to each rank.
        recv_counts: Rows received from each rank.
        group: The process group.

    Returns:
        ``[sum(recv_counts), ...]``, rows from rank 0 first.
    """
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=group)
    return recv
