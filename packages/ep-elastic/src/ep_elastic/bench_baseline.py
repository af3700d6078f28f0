"""The plain ``all_to_all_single`` pipeline ``ep-bench`` times beside the buffer under test.

What a user without an EP library writes, on NCCL (GPU) or gloo (CPU):

* dispatch: find the destination ranks of every token, exchange the per-rank row counts
  (``all_to_all_single``), synchronise the host to read the split sizes, gather the token rows
  per destination rank and move them with one ``all_to_all_single``. Each row packs the token's
  top-k ids and weights, its FP8 scales (if any) and its data into one byte row, so one collective
  carries everything the buffer's dispatch delivers.
* combine: send every received row back with one ``all_to_all_single`` (split sizes known from
  the dispatch) and reduce on the source in float32.

The outputs follow the project's exact dispatch/combine semantics (``docs/design.md``): rows
grouped by source rank then source token, local expert ids (``-1`` elsewhere), weights zeroed on
non-local lanes, combine summed over destination ranks in increasing order. So the baseline is
checked bit for bit against the reference backend too, which also checks the bench itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_elastic.bench_cases import tokens_in_rank

__all__ = [
    "BaselineDispatch",
    "BaselineHandle",
    "baseline_combine",
    "baseline_dispatch",
]

_ROW_ALIGN = 16
"""Packed rows are padded to this many bytes so every part can be viewed in its own dtype."""


@dataclass(frozen=True)
class BaselineHandle:
    """What the baseline combine needs from its dispatch.

    Attributes:
        send_token: ``[S]`` int64, source token of each sent row (destination-major, then token).
        lane_rank: ``[T, k]`` int64, rank owning each top-k lane (``R`` for ``-1`` lanes).
        send_splits: Rows sent to each rank.
        recv_splits: Rows received from each rank.
        num_tokens: ``T``, tokens on this rank before dispatch.
    """

    send_token: torch.Tensor
    lane_rank: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


@dataclass(frozen=True)
class BaselineDispatch:
    """Received tokens of the baseline dispatch; ``M`` = rows received (local ones included).

    Attributes:
        recv_x: ``[M, H]`` data, the input's dtype (a strided view into the receive buffer).
        recv_scales: ``[M, P]`` scales, or ``None`` for BF16.
        recv_topk_idx: ``[M, k]`` int64, local expert ids or ``-1``.
        recv_topk_weights: ``[M, k]`` float32, weights of the local lanes, 0 elsewhere.
        handle: Layout for :func:`baseline_combine`.
    """

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    handle: BaselineHandle


_Layout = list[tuple[int, int, torch.dtype]]


def _pack(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, _Layout]:
    """Concatenates ``[N, *]`` tensors byte-wise into ``[N, B]`` uint8 (``B`` padded to 16)."""
    views = [
        p.contiguous().view(torch.uint8).view(p.shape[0], math.prod(p.shape[1:]) * p.element_size())
        for p in parts
    ]
    layout: _Layout = []
    offset = 0
    for p, v in zip(parts, views, strict=True):
        layout.append((offset, v.shape[1], p.dtype))
        offset += v.shape[1]
    pad = -offset % _ROW_ALIGN
    if pad:
        views.append(torch.zeros(views[0].shape[0], pad, dtype=torch.uint8, device=views[0].device))
    return torch.cat(views, dim=1), layout


def _unpack(rows: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    """Strided views of the parts of ``rows`` ``[M, B]`` uint8, each in its own dtype."""
    return [rows[:, off : off + n].view(dtype) for off, n, dtype in layout]


def _exchange(
    send: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    recv = torch.empty(sum(recv_splits), send.shape[1], dtype=send.dtype, device=send.device)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=recv_splits,
        input_split_sizes=send_splits,
        group=group,
    )
    return recv


def baseline_dispatch(
    x: torch.Tensor,
    scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    group: dist.ProcessGroup,
) -> BaselineDispatch:
    """Dispatches tokens with plain collectives; blocks the host once for the split sizes.

    Args:
        x: ``[T, H]`` bfloat16 or float8_e4m3fn tokens.
        scales: ``[T, P]`` 4-byte scales of FP8 tokens, or ``None``.
        topk_idx: ``[T, k]`` int64 global expert ids, ``-1`` = none.
        topk_weights: ``[T, k]`` float32.
        num_experts: ``E``, a multiple of the group size.
        group: Process group (NCCL for CUDA tensors, gloo for CPU ones).

    Returns:
        The received rows and the layout for :func:`baseline_combine`.
    """
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    num_local = num_experts // num_ranks
    in_rank = tokens_in_rank(topk_idx, num_experts, num_ranks)
    send_counts = in_rank.sum(dim=0)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # nonzero over [R, T] lists rows destination-major, then by token: the receive order.
    _, send_token = in_rank.t().nonzero(as_tuple=True)
    splits = torch.stack([send_counts, recv_counts]).tolist()
    send_splits, recv_splits = [int(n) for n in splits[0]], [int(n) for n in splits[1]]

    parts = [topk_idx, topk_weights] + ([scales] if scales is not None else []) + [x]
    packed, layout = _pack(parts)
    recv = _exchange(packed.index_select(0, send_token), send_splits, recv_splits, group)
    views = _unpack(recv, layout)
    idx, weights, recv_x = views[0], views[1], views[-1]
    on_rank = (idx >= 0) & (idx // num_local == rank)
    recv_idx = torch.where(on_rank, idx - rank * num_local, torch.full_like(idx, -1))
    recv_weights = torch.where(on_rank, weights, torch.zeros_like(weights))
    lane_rank = torch.where(topk_idx >= 0, topk_idx // num_local, num_ranks)
    handle = BaselineHandle(send_token, lane_rank, send_splits, recv_splits, x.shape[0])
    recv_scales = views[2] if scales is not None else None
    return BaselineDispatch(recv_x, recv_scales, recv_idx, recv_weights, handle)


def baseline_combine(
    x: torch.Tensor,
    handle: BaselineHandle,
    topk_weights: torch.Tensor | None,
    *,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns received rows to their sources and sums them there; no host synchronisation.

    ``out[t] = bf16(sum over destination ranks d of t, increasing d, of float(x_d[row]))``, and
    ``combined_topk_weights[t, j]`` = the weight returned for lane ``j`` by the rank owning it.

    Args:
        x: ``[M, H]`` bfloat16, one row per row the dispatch received.
        handle: From :func:`baseline_dispatch`.
        topk_weights: ``[M, k]`` float32 weights to send back with the rows, or ``None``.
        group: The dispatch's process group.

    Returns:
        ``combined_x`` ``[T, H]`` bfloat16 and ``combined_topk_weights`` ``[T, k]`` float32
        (``None`` without weights).
    """
    parts = ([topk_weights] if topk_weights is not None else []) + [x]
    packed, layout = _pack(parts)
    back = _exchange(packed, handle.recv_splits, handle.send_splits, group)
    views = _unpack(back, layout)
    rows = views[-1]
    acc = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out_w = None
    if topk_weights is not None:
        out_w = torch.zeros(
            handle.num_tokens, topk_weights.shape[1], dtype=torch.float32, device=x.device
        )
    start = 0
    # One source rank at a time: each token appears at most once per rank, so every
    # index_add_ touches an element once and the float32 sum runs in increasing rank order.
    for d, n in enumerate(handle.send_splits):
        if n == 0:
            continue
        tok = handle.send_token[start : start + n]
        acc.index_add_(0, tok, rows[start : start + n].float())
        if out_w is not None:
            mine = handle.lane_rank.index_select(0, tok) == d
            w = views[0][start : start + n]
            out_w.index_add_(0, tok, torch.where(mine, w, torch.zeros_like(w)))
        start += n
    return acc.to(torch.bfloat16), out_w
