"""Reference high-throughput dispatch and combine, built only on ``torch.distributed``.

These functions define the exact semantics of ``docs/design.md`` (order of received rows,
float32 summation order, bf16 rounding points, zero padding) and serve as the test oracle of the
kernel backends. They are deterministic.

Rows travel as packed bytes (:mod:`ep_core._rows`). Two transports exist:

* exact: row counts are on the host (a CPU-synced dispatch, or a handle made by one), so an
  uneven ``all_to_all_single`` moves just the rows;
* padded: every rank owns a private ``Nmax``-row region at every peer, so a fixed-split
  ``all_to_all_single`` moves ``R * Nmax`` rows and nothing is read on the host (the no-CPU-sync
  path; safe on CUDA streams and in graph capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_core.backend import DispatchResult
from ep_core.expand import accumulate, expand_rows, reduce_expanded_rows
from ep_core.handle import EPHandle
from ep_core.layout import (
    align_up_tensor,
    gather_rows,
    get_dispatch_layout,
    invert_positions,
    worst_case_num_expanded_tokens,
)
from ep_core.signature import CallSignature, exchange_header
from ep_jit.rows import RowField, all_to_all_fixed, all_to_all_uneven, pack_rows, unpack_rows

__all__ = ["ExactCounts", "combine", "dispatch"]


@dataclass(frozen=True)
class ExactCounts:
    """Host-side row counts of a CPU-synced dispatch (the reference's ``backend_state``).

    Attributes:
        send_counts: Rows this rank sent to each rank.
        recv_counts: Rows this rank received from each rank.
    """

    send_counts: list[int]
    recv_counts: list[int]


def _exclusive(psum: torch.Tensor) -> torch.Tensor:
    counts = torch.diff(psum, prepend=psum.new_zeros(1))
    return psum - counts


def _padded_recv_index(psum: torch.Tensor, nmax: int, num_ranks: int) -> tuple[torch.Tensor, ...]:
    """For output row ``i`` of a padded exchange: (source rank or -1, row in the padded buffer)."""
    psum64 = psum.to(torch.int64)
    rows = torch.arange(num_ranks * nmax, dtype=torch.int64, device=psum.device)
    src = torch.searchsorted(psum64, rows, right=True)
    valid = src < num_ranks
    excl = torch.cat([_exclusive(psum64), psum64.new_zeros(1)])
    src_row = torch.where(valid, src * nmax + rows - excl[src], -1)
    return torch.where(valid, src, -1), src_row


def _send_dispatch_rows(
    rows: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    send_row: torch.Tensor,
    psum_recv: torch.Tensor,
    exact: ExactCounts | None,
    nmax: int,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves token rows to their ranks; returns (received rows, source rank per row or -1)."""
    num_ranks = is_token_in_rank.shape[1]
    device = rows.device
    if exact is not None:
        order = is_token_in_rank.t().nonzero()[:, 1]
        recv = all_to_all_uneven(
            rows.index_select(0, order), exact.send_counts, exact.recv_counts, group
        )
        counts = torch.tensor(exact.recv_counts, dtype=torch.int64, device=device)
        src = torch.repeat_interleave(torch.arange(num_ranks, device=device), counts)
        return recv, src
    dest = torch.arange(num_ranks, device=device) * nmax + send_row.to(torch.int64)
    pair = invert_positions(torch.where(is_token_in_rank, dest, -1), num_ranks * nmax)
    token = torch.where(pair >= 0, torch.div(pair, num_ranks, rounding_mode="floor"), -1)
    recv_padded = all_to_all_fixed(gather_rows(rows, token), group)
    src, src_row = _padded_recv_index(psum_recv, nmax, num_ranks)
    return gather_rows(recv_padded, src_row), src


def dispatch(
    group: dist.ProcessGroup,
    rank: int,
    num_ranks: int,
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    *,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    do_expand: bool,
    do_cpu_sync: bool,
    handle: EPHandle | None,
    num_sms: int,
    signature: CallSignature,
) -> DispatchResult:
    """Reference dispatch (fresh or cached); arguments of :meth:`EPBackend.dispatch`.

    Runs on the current stream. The first exchange is the call's header (``signature``, checked
    on every rank, plus the token count sent to each rank); the received tokens per local expert
    are counted from the received rows. With ``do_cpu_sync`` (or a handle made with it) row
    counts are read on the host.
    """
    nmax, k = num_max_tokens_per_rank, topk_idx.shape[1]
    num_local = num_experts // num_ranks
    device = x.device
    exact: ExactCounts | None
    if handle is None:
        layout = get_dispatch_layout(topk_idx, num_experts, num_ranks)
        is_in, send_row = layout.is_token_in_rank, layout.send_row
        recv_per_rank = exchange_header(group, rank, signature, layout.num_tokens_per_rank, device)
        psum_recv = recv_per_rank.cumsum(0).to(torch.int32)
        exact = None
        if do_cpu_sync:
            exact = ExactCounts(layout.num_tokens_per_rank.tolist(), recv_per_rank.tolist())
    else:
        exchange_header(group, rank, signature, None, device)
        is_in, send_row = handle.is_token_in_rank, handle.send_row
        psum_recv, unaligned = (
            handle.psum_num_recv_tokens_per_rank,
            handle.num_unaligned_recv_tokens_per_expert,
        )
        state = handle.backend_state
        exact = state if isinstance(state, ExactCounts) else None

    fields = [RowField("x", x.dtype, x.shape[1]), RowField("topk", torch.int64, k)]
    parts = [x, topk_idx]
    if x_scales is not None:
        fields.append(RowField("scales", x_scales.dtype, x_scales.shape[1]))
        parts.append(x_scales)
    if topk_weights is not None:
        fields.append(RowField("weights", torch.float32, k))
        parts.append(topk_weights)
    fields.append(RowField("src", torch.int32, 1))
    parts.append(torch.arange(x.shape[0], dtype=torch.int32, device=device))
    recv_rows, src_rank = _send_dispatch_rows(
        pack_rows(parts), is_in, send_row, psum_recv, exact, nmax, group
    )
    recv = unpack_rows(recv_rows, fields)
    valid = src_rank >= 0
    first = rank * num_local
    is_local = (recv["topk"] >= first) & (recv["topk"] < first + num_local) & valid[:, None]
    local_idx = torch.where(is_local, recv["topk"] - first, -1)
    if handle is None:
        # Ids of one token are distinct (validated), so lanes count tokens per expert.
        lanes = torch.where(is_local, local_idx, num_local).reshape(-1)
        unaligned = (
            torch.zeros(num_local + 1, dtype=torch.int64, device=device)
            .scatter_add_(0, lanes, torch.ones_like(lanes))[:num_local]
            .to(torch.int32)
        )
    recv_weights = None
    if topk_weights is not None:
        recv_weights = torch.where(is_local, recv["weights"], 0.0)
    src_global = src_rank * nmax + recv["src"][:, 0]
    metadata = torch.stack([torch.where(valid, src_global, -1), src_rank], dim=1).to(torch.int32)

    aligned = align_up_tensor(unaligned.to(torch.int64), expert_alignment)
    starts = aligned.cumsum(0) - aligned
    if handle is not None:
        num_expanded, do_expand = handle.num_expanded_tokens, handle.do_expand
    elif exact is not None:
        num_expanded = int(aligned.sum())
    else:
        num_expanded = worst_case_num_expanded_tokens(
            num_ranks, nmax, k, num_local, expert_alignment
        )

    recv_x, recv_scales = recv["x"], recv.get("scales")
    recv_topk: torch.Tensor | None = local_idx
    if do_expand:
        recv_x, recv_scales, recv_weights, expanded_row = expand_rows(
            local_idx, starts, num_expanded, recv_x, recv_scales, recv_weights
        )
        metadata = torch.cat([metadata, expanded_row.to(torch.int32)], dim=1)
        recv_topk = None

    if handle is None:
        handle = EPHandle(
            rank=rank,
            num_ranks=num_ranks,
            num_experts=num_experts,
            num_max_tokens_per_rank=nmax,
            expert_alignment=expert_alignment,
            do_expand=do_expand,
            num_sms=num_sms,
            topk_idx=topk_idx.clone(),
            is_token_in_rank=is_in,
            send_row=send_row,
            num_recv_tokens=recv_rows.shape[0],
            num_expanded_tokens=num_expanded,
            num_recv_tokens_per_expert_list=aligned.tolist() if exact is not None else [],
            psum_num_recv_tokens_per_rank=psum_recv,
            psum_num_recv_tokens_per_expert=(
                (starts + unaligned if do_expand else aligned.cumsum(0)).to(torch.int32)
            ),
            num_unaligned_recv_tokens_per_expert=unaligned,
            recv_src_metadata=metadata,
            backend_state=exact,
        )
    return DispatchResult(recv_x, recv_scales, recv_topk, recv_weights, handle)


def combine(
    group: dist.ProcessGroup,
    rank: int,
    num_ranks: int,
    x: torch.Tensor,
    handle: EPHandle,
    topk_weights: torch.Tensor | None,
    bias: tuple[torch.Tensor, ...],
    num_sms: int,
    signature: CallSignature,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference combine; arguments as :meth:`ep_core.backend.EPBackend.combine`.

    Runs on the current stream; the first exchange is the call's header (``signature``, checked
    on every rank); reads counts on the host only when the handle holds them.
    """
    del num_sms
    device = x.device
    exchange_header(group, rank, signature, None, device)
    num_tokens, k, hidden = handle.num_tokens, handle.num_topk, x.shape[1]
    metadata = handle.recv_src_metadata
    weights = topk_weights
    if handle.do_expand:
        x, weights = reduce_expanded_rows(x, topk_weights, metadata, k)

    fields = [RowField("x", torch.bfloat16, hidden)]
    parts = [x]
    if weights is not None:
        fields.append(RowField("weights", torch.float32, k))
        parts.append(weights)
    rows = pack_rows(parts)
    state = handle.backend_state
    nmax = handle.num_max_tokens_per_rank
    if isinstance(state, ExactCounts):
        recv_rows = all_to_all_uneven(rows, state.recv_counts, state.send_counts, group)
        sent = torch.tensor(state.send_counts, dtype=torch.int64, device=device)
        base = sent.cumsum(0) - sent
    else:
        psum = handle.psum_num_recv_tokens_per_rank.to(torch.int64)
        excl = _exclusive(psum)
        slot = torch.arange(num_ranks * nmax, dtype=torch.int64, device=device)
        src, row_in_src = torch.div(slot, nmax, rounding_mode="floor"), slot % nmax
        row = torch.where(row_in_src < psum[src] - excl[src], excl[src] + row_in_src, -1)
        recv_rows = all_to_all_fixed(gather_rows(rows, row), group)
        base = torch.arange(num_ranks, dtype=torch.int64, device=device) * nmax
    recv = unpack_rows(recv_rows, fields)
    is_in = handle.is_token_in_rank
    from_rank = torch.where(is_in, base + handle.send_row.to(torch.int64), -1)

    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    started = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for d in range(num_ranks):
        value = gather_rows(recv["x"], from_rank[:, d]).float()
        acc, started = accumulate(acc, started, value, is_in[:, d])
    everyone = torch.ones(num_tokens, dtype=torch.bool, device=device)
    for b in bias:
        acc, started = accumulate(acc, started, b.float(), everyone)
    combined = acc.to(torch.bfloat16)

    combined_weights = None
    if weights is not None:
        topk_idx = handle.topk_idx
        owner = torch.div(topk_idx.clamp(min=0), handle.num_local_experts, rounding_mode="floor")
        row = torch.where(topk_idx >= 0, from_rank.gather(1, owner), -1)
        lanes = torch.arange(k, dtype=torch.int64, device=device)
        flat = torch.where(row >= 0, row * k + lanes, -1)
        combined_weights = gather_rows(recv["weights"].reshape(-1), flat.reshape(-1)).view(
            num_tokens, k
        )
    return combined, combined_weights
