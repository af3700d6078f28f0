"""Routing layout: where each token goes, computed from ``topk_idx`` with vectorised torch.

Every function here runs on the tensor's device without reading values on the host, so it is
safe inside CUDA graph capture and on a side stream. Names follow ``docs/design.md``: ``T``
tokens on this rank, ``k`` top-k, ``E`` experts, ``R`` ranks, ``El = E // R`` local experts,
``Nmax`` the per-rank token limit, ``A`` the expert alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DispatchLayout",
    "align_up",
    "align_up_tensor",
    "gather_rows",
    "get_dispatch_layout",
    "invert_positions",
    "worst_case_num_expanded_tokens",
    "worst_case_num_recv_tokens",
]


def align_up(value: int, alignment: int) -> int:
    """Rounds ``value`` up to a multiple of ``alignment`` (host integers)."""
    return (value + alignment - 1) // alignment * alignment


def align_up_tensor(value: torch.Tensor, alignment: int) -> torch.Tensor:
    """Rounds every element of an integer tensor up to a multiple of ``alignment`` (no sync)."""
    return torch.div(value + (alignment - 1), alignment, rounding_mode="floor") * alignment


def worst_case_num_recv_tokens(num_ranks: int, num_max_tokens_per_rank: int) -> int:
    """Rows of a non-expanded dispatch output without CPU sync: ``R * Nmax``."""
    return num_ranks * num_max_tokens_per_rank


def worst_case_num_expanded_tokens(
    num_ranks: int,
    num_max_tokens_per_rank: int,
    num_topk: int,
    num_local_experts: int,
    expert_alignment: int,
) -> int:
    """Rows of an expanded dispatch output without CPU sync.

    ``align(R * Nmax * min(k, El) + (A - 1) * El, A)``: every received token has at most
    ``min(k, El)`` local experts and every expert block adds at most ``A - 1`` padding rows.
    """
    pairs = num_ranks * num_max_tokens_per_rank * min(num_topk, num_local_experts)
    return align_up(pairs + (expert_alignment - 1) * num_local_experts, expert_alignment)


@dataclass(frozen=True)
class DispatchLayout:
    """Where the tokens of one rank go; all tensors on the device of ``topk_idx``.

    Attributes:
        num_tokens_per_rank: ``[R]`` int32, tokens sent to each rank (once per rank).
        num_tokens_per_expert: ``[E]`` int32, tokens selecting each expert.
        is_token_in_rank: ``[T, R]`` bool, token ``t`` goes to rank ``d``.
        send_row: ``[T, R]`` int32, row of token ``t`` inside rank ``d``'s region for this source
            (exclusive prefix sum of ``is_token_in_rank[:, d]``), ``-1`` where not sent.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_row: torch.Tensor


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Computes the routing layout of one rank's tokens.

    Runs on the current stream of ``topk_idx``'s device; asynchronous on CUDA (no host sync).
    The inputs are assumed valid (see :mod:`ep_core.validation`).

    Args:
        topk_idx: ``[T, k]`` int64, global expert ids, ``-1`` for an empty slot.
        num_experts: ``E``, a multiple of ``num_ranks``.
        num_ranks: ``R``.

    Returns:
        The :class:`DispatchLayout`.
    """
    num_tokens = topk_idx.shape[0]
    device = topk_idx.device
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    # Empty slots count into one spare column each, dropped afterwards.
    expert_col = torch.where(valid, topk_idx, num_experts)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    per_expert.scatter_add_(0, expert_col.reshape(-1), torch.ones_like(expert_col.reshape(-1)))
    rank_col = torch.where(
        valid, torch.div(topk_idx, experts_per_rank, rounding_mode="floor"), num_ranks
    )
    in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=device)
    in_rank.scatter_(1, rank_col, True)
    is_token_in_rank = in_rank[:, :num_ranks].contiguous()
    counts = is_token_in_rank.to(torch.int32)
    send_row = torch.where(is_token_in_rank, counts.cumsum(0, dtype=torch.int32) - 1, -1)
    return DispatchLayout(
        num_tokens_per_rank=counts.sum(0, dtype=torch.int32),
        num_tokens_per_expert=per_expert[:num_experts].to(torch.int32),
        is_token_in_rank=is_token_in_rank,
        send_row=send_row.to(torch.int32),
    )


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gathers rows of ``src`` by ``index``; ``-1`` entries yield zero rows. No host sync.

    Args:
        src: ``[N, ...]`` any dtype (a zero row is appended internally, so ``N`` may be 0).
        index: ``[M]`` int, values in ``[-1, N)``.

    Returns:
        ``[M, ...]`` on ``src``'s device, dtype of ``src``.
    """
    num_rows = src.shape[0]
    padded = torch.cat([src, src.new_zeros((1, *src.shape[1:]))], dim=0)
    safe = torch.where(index >= 0, index, num_rows).to(torch.int64)
    return padded.index_select(0, safe.reshape(-1)).reshape(*index.shape, *src.shape[1:])


def invert_positions(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Inverts an injective map: ``out[positions[i]] = i`` for every ``positions[i] >= 0``.

    Deterministic on every device: entries with ``-1`` land in private spare slots, so no index
    is written twice. No host sync.

    Args:
        positions: ``[N]`` int, distinct targets in ``[0, size)`` or ``-1``.
        size: Length of the result.

    Returns:
        ``[size]`` int64 holding the source index of each target, ``-1`` where none maps to it.
    """
    flat = positions.reshape(-1).to(torch.int64)
    count = flat.numel()
    source = torch.arange(count, dtype=torch.int64, device=flat.device)
    target = torch.where(flat >= 0, flat, size + source)
    out = torch.full((size + count,), -1, dtype=torch.int64, device=flat.device)
    out.scatter_(0, target, source)
    return out[:size]
