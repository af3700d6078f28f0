"""The expanded (per-expert) layout, shared by every backend so they agree bit for bit.

A non-expanded receive holds one row per (source rank, source token); the expanded layout holds
one row per (received token, local expert), expert blocks starting at multiples of the expert
alignment (``docs/design.md``). Both functions are device ops without host synchronisation.
"""

from __future__ import annotations

import torch

from ep_core.layout import gather_rows, invert_positions

__all__ = ["accumulate", "expand_rows", "reduce_expanded_rows"]


def expand_rows(
    local_idx: torch.Tensor,
    starts: torch.Tensor,
    num_expanded: int,
    recv_x: torch.Tensor,
    recv_scales: torch.Tensor | None,
    recv_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Spreads received rows into the expanded layout (one row per (token, local expert)).

    Expert ``e``'s rows start at ``starts[e]`` in received-row order; rows nobody maps to (padding,
    and everything past the last expert without CPU sync) stay zero.

    Returns:
        ``(x [M_exp, H], scales [M_exp, P] or None, weights [M_exp] or None,
        expanded_row [M, k] int64 with -1 for lanes not on this rank)``.
    """
    num_rows, k = local_idx.shape
    num_local = starts.shape[0]
    expert_col = torch.where(local_idx >= 0, local_idx, num_local)
    has = torch.zeros(num_rows, num_local + 1, dtype=torch.int64, device=local_idx.device)
    has.scatter_(1, expert_col, 1)
    rank_in_expert = has[:, :num_local].cumsum(0) - 1
    safe = local_idx.clamp(min=0)
    expanded_row = torch.where(local_idx >= 0, starts[safe] + rank_in_expert.gather(1, safe), -1)
    pair = invert_positions(expanded_row, num_expanded)
    token = torch.where(pair >= 0, torch.div(pair, k, rounding_mode="floor"), -1)
    x = gather_rows(recv_x, token)
    scales = None if recv_scales is None else gather_rows(recv_scales, token)
    weights = None if recv_weights is None else gather_rows(recv_weights.reshape(-1), pair)
    return x, scales, weights, expanded_row


def accumulate(
    acc: torch.Tensor, started: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``acc += value`` in float32 where ``mask``, starting from the first contribution."""
    summed = torch.where(started[:, None], acc + value, value)
    return torch.where(mask[:, None], summed, acc), started | mask


def reduce_expanded_rows(
    x: torch.Tensor, weights: torch.Tensor | None, metadata: torch.Tensor, num_topk: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folds expanded rows back to one row per received token (combine's first step).

    Per received token, the float32 sum of its local expert rows in increasing lane order,
    starting from the first contribution, rounded to bf16 once; a token without local rows
    gives zeros. Weights are gathered per lane (0 where the lane is not local).

    Args:
        x: ``[M_exp, H]`` bf16 expert outputs in the expanded layout.
        weights: ``[M_exp]`` float32 or ``None``.
        metadata: ``[M, 2 + k]`` int32 ``recv_src_metadata`` of the expanded dispatch.
        num_topk: ``k``.

    Returns:
        ``(x [M, H] bf16, weights [M, k] float32 or None)`` on ``x``'s device.
    """
    num_rows = metadata.shape[0]
    expanded_row = metadata[:, 2:].to(torch.int64)
    acc = torch.zeros(num_rows, x.shape[1], dtype=torch.float32, device=x.device)
    started = torch.zeros(num_rows, dtype=torch.bool, device=x.device)
    for lane in range(num_topk):
        value = gather_rows(x, expanded_row[:, lane]).float()
        acc, started = accumulate(acc, started, value, expanded_row[:, lane] >= 0)
    out_w = None
    if weights is not None:
        out_w = gather_rows(weights, expanded_row.reshape(-1)).view(num_rows, num_topk)
    return acc.to(torch.bfloat16), out_w
