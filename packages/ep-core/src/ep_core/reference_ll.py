"""Reference low-latency dispatch and combine (DeepEP's legacy layout) on ``torch.distributed``.

Layout (``L = R * Nmax``): ``recv_x [El, L, H]``; the rows of local expert ``e`` are packed
(source rank ascending, then source token ascending), ``recv_count[e]`` of them valid; the rest
are zero here (unspecified by the contract). FP8 data is cast on the source with
:func:`ep_core.fp8.per_token_cast_to_fp8`; scales are column-major in the last two dims.

Both directions use fixed-split collectives only (every source owns ``Nmax`` rows at every
peer), so nothing is read on the host: safe on CUDA streams and in graph capture.

Combine reduction (``docs/design.md``): on each rank ``d``, per source token ``t``,
``p_d(t) = bf16(sum over lanes j of t on d, increasing j, of w[t, j] * float(y))`` with a
separate float32 multiply and add; on the source ``out[t] = bf16(sum over d increasing of
float(p_d(t)))``. Sums start from their first term (no ``0.0 +``), so signed zeros survive; a
token with no valid lane gives ``+0``. The reference computes ``p_d`` on the source from the
returned expert rows, which is the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_core.backend import LowLatencyDispatchResult
from ep_core.fp8 import per_token_cast_to_fp8
from ep_core.handle import LowLatencyHandle
from ep_core.layout import gather_rows, get_dispatch_layout, invert_positions
from ep_core.signature import CallSignature, exchange_header
from ep_jit.rows import RowField, all_to_all_fixed, pack_rows, unpack_rows

__all__ = ["LowLatencyState", "low_latency_combine", "low_latency_dispatch"]


@dataclass(frozen=True)
class LowLatencyState:
    """The reference's private part of a :class:`~ep_core.handle.LowLatencyHandle`.

    Attributes:
        return_slot: ``[El * L]`` int64; for packed row ``e * L + r``, where its combine result
            goes: ``(src_rank * Nmax + src_token) * k + lane``, ``-1`` for an empty row.
    """

    return_slot: torch.Tensor


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, strides ``(rows * cols, 1, rows)`` in the last two dims."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def low_latency_dispatch(
    group: dist.ProcessGroup,
    rank: int,
    num_ranks: int,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    *,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    signature: CallSignature,
) -> LowLatencyDispatchResult:
    """Reference legacy dispatch; see :meth:`ep_core.backend.EPBackend.low_latency_dispatch`.

    Args:
        group: Process group of ``R`` ranks.
        rank: This rank.
        num_ranks: ``R``.
        x: ``[T, H]`` bf16.
        topk_idx: ``[T, k]`` int64, ``-1`` = none.
        num_max_dispatch_tokens_per_rank: ``Nmax`` (``T <= Nmax`` on every rank).
        num_experts: ``E``.
        use_fp8: Cast to e4m3 on the source.
        round_scale: Power-of-two scales.
        use_ue8m0: int32 UE8M0 packs (implies ``round_scale``).
        signature: This rank's call signature (the first exchange, checked on every rank).
    """
    exchange_header(group, rank, signature, None, x.device)
    nmax, k = num_max_dispatch_tokens_per_rank, topk_idx.shape[1]
    num_local = num_experts // num_ranks
    slots = num_ranks * nmax
    num_tokens, hidden = x.shape
    device = x.device
    if use_fp8:
        data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    else:
        data, scales = x, None
    fields = [RowField("x", data.dtype, hidden), RowField("topk", torch.int64, k)]
    parts = [data, topk_idx]
    if scales is not None:
        fields.append(RowField("scales", scales.dtype, scales.shape[1]))
        parts.append(scales)
    fields += [RowField("src", torch.int32, 1), RowField("valid", torch.int32, 1)]
    parts += [
        torch.arange(num_tokens, dtype=torch.int32, device=device),
        torch.ones(num_tokens, dtype=torch.int32, device=device),
    ]

    layout = get_dispatch_layout(topk_idx, num_experts, num_ranks)
    dest = torch.arange(num_ranks, device=device) * nmax + layout.send_row.to(torch.int64)
    pair = invert_positions(torch.where(layout.is_token_in_rank, dest, -1), slots)
    token = torch.where(pair >= 0, torch.div(pair, num_ranks, rounding_mode="floor"), -1)
    recv = unpack_rows(all_to_all_fixed(gather_rows(pack_rows(parts), token), group), fields)

    # Slot s * Nmax + j holds the j-th token source s sent here, in source-token order.
    valid = recv["valid"][:, 0] == 1
    first = rank * num_local
    ids = recv["topk"]
    local_idx = torch.where(
        (ids >= first) & (ids < first + num_local) & valid[:, None], ids - first, -1
    )
    has = torch.zeros(slots, num_local + 1, dtype=torch.int64, device=device)
    has.scatter_(1, torch.where(local_idx >= 0, local_idx, num_local), 1)
    has = has[:, :num_local].contiguous()
    safe = local_idx.clamp(min=0)
    packed_row = torch.where(
        local_idx >= 0, local_idx * slots + (has.cumsum(0) - 1).gather(1, safe), -1
    )
    pair = invert_positions(packed_row, num_local * slots)
    slot = torch.where(pair >= 0, torch.div(pair, k, rounding_mode="floor"), -1)

    recv_x = gather_rows(recv["x"], slot).view(num_local, slots, hidden)
    recv_scales = None
    if scales is not None:
        recv_scales = _column_major(gather_rows(recv["scales"], slot).view(num_local, slots, -1))
    src_token = gather_rows(recv["src"][:, 0], slot).to(torch.int64)
    src_rank = torch.div(slot, nmax, rounding_mode="floor")
    lane = pair % k
    return_slot = torch.where(pair >= 0, (src_rank * nmax + src_token) * k + lane, -1)

    per_source = has.view(num_ranks, nmax, num_local).sum(1).t()
    begin = per_source.cumsum(1) - per_source
    handle = LowLatencyHandle(
        rank=rank,
        num_ranks=num_ranks,
        num_experts=num_experts,
        num_max_dispatch_tokens_per_rank=nmax,
        hidden=hidden,
        num_topk=k,
        recv_src_info=torch.where(pair >= 0, src_token, -1).view(num_local, slots).to(torch.int32),
        recv_layout_range=((per_source << 32) | begin).contiguous(),
        recv_count=has.sum(0).to(torch.int32),
        backend_state=LowLatencyState(return_slot),
    )
    return LowLatencyDispatchResult(recv_x, recv_scales, handle.recv_count, handle)


def low_latency_combine(
    group: dist.ProcessGroup,
    rank: int,
    num_ranks: int,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    out: torch.Tensor | None,
    signature: CallSignature,
) -> torch.Tensor:
    """Reference weighted legacy combine; see :meth:`ep_core.backend.EPBackend.low_latency_combine`.

    Args:
        group: Process group of ``R`` ranks.
        rank: This rank.
        num_ranks: ``R``.
        x: ``[El, R * Nmax, H]`` bf16 expert outputs in the dispatch's packed layout.
        topk_idx: ``[T, k]`` int64 (lanes set to ``-1`` are skipped).
        topk_weights: ``[T, k]`` float32.
        handle: The low-latency dispatch's handle.
        out: Optional ``[T, H]`` bf16 destination.
        signature: This rank's call signature (the first exchange, checked on every rank).

    Returns:
        ``[T, H]`` bf16 (``out`` when given).
    """
    exchange_header(group, rank, signature, None, x.device)
    state = handle.backend_state
    if not isinstance(state, LowLatencyState):
        raise TypeError("the handle was not made by the reference backend's low_latency_dispatch")
    nmax, k = handle.num_max_dispatch_tokens_per_rank, handle.num_topk
    num_tokens, hidden = topk_idx.shape[0], x.shape[2]
    device = x.device
    send_row = invert_positions(state.return_slot, num_ranks * nmax * k)
    send = gather_rows(x.reshape(-1, hidden), send_row)
    recv = all_to_all_fixed(send, group).view(num_ranks, nmax, k, hidden)[:, :num_tokens]

    owner = torch.div(topk_idx, handle.num_local_experts, rounding_mode="floor")
    valid = topk_idx >= 0
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    started = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for d in range(num_ranks):
        part = torch.zeros_like(acc)
        part_started = torch.zeros_like(started)
        for j in range(k):
            on_d = valid[:, j] & (owner[:, j] == d)
            term = topk_weights[:, j : j + 1] * recv[d, :, j].float()
            summed = torch.where(part_started[:, None], part + term, term)
            part = torch.where(on_d[:, None], summed, part)
            part_started = part_started | on_d
        rounded = part.to(torch.bfloat16).float()
        summed = torch.where(started[:, None], acc + rounded, rounded)
        acc = torch.where(part_started[:, None], summed, acc)
        started = started | part_started
    result = acc.to(torch.bfloat16)
    if out is None:
        return result
    out.copy_(result)
    return out
