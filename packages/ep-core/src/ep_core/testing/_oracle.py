"""An independent oracle: expected dispatch/combine outputs from every rank's inputs.

Written as plain per-token Python loops over the semantics of ``docs/design.md``, sharing no
code with the backends (only :func:`ep_core.fp8.per_token_cast_to_fp8`, whose recipe is tested
on its own against scalar arithmetic). Inputs and outputs are CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_core.fp8 import per_token_cast_to_fp8

__all__ = [
    "ExpectedDispatch",
    "ExpectedLowLatency",
    "expected_combine",
    "expected_dispatch",
    "expected_low_latency_combine",
    "expected_low_latency_dispatch",
]


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass
class ExpectedDispatch:
    """What rank ``rank`` must receive (both layouts).

    Attributes:
        rank: The receiving rank.
        rows: ``(src_rank, src_token)`` of each received row, in order.
        position: Row index of each ``(src_rank, src_token)``.
        recv_data: ``[M, H]`` data (bf16 or e4m3).
        recv_scales: ``[M, P]`` or ``None``.
        recv_topk_idx: ``[M, k]`` int64 local ids or ``-1``.
        recv_topk_weights: ``[M, k]`` float32 (0 off this rank) or ``None``.
        src_metadata: ``[M, 2]`` int32.
        psum_per_rank: Inclusive prefix sums of rows per source.
        counts: Unaligned rows per local expert.
        aligned: Aligned rows per local expert.
        expanded_row: ``[M][k]`` expanded row of each lane or ``-1``.
        exp_data: ``[M_exp, H]`` expanded data (zero padding).
        exp_scales: ``[M_exp, P]`` or ``None``.
        exp_weights: ``[M_exp]`` float32 or ``None``.
    """

    rank: int
    rows: list[tuple[int, int]]
    position: dict[tuple[int, int], int]
    recv_data: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor | None
    src_metadata: torch.Tensor
    psum_per_rank: list[int]
    counts: list[int]
    aligned: list[int]
    expanded_row: list[list[int]]
    exp_data: torch.Tensor
    exp_scales: torch.Tensor | None
    exp_weights: torch.Tensor | None

    @property
    def num_rows(self) -> int:
        """``M``."""
        return len(self.rows)

    @property
    def num_expanded(self) -> int:
        """``M_exp`` (sum of aligned counts)."""
        return sum(self.aligned)


def expected_dispatch(
    data: list[torch.Tensor],
    scales: list[torch.Tensor | None],
    topk_idx: list[torch.Tensor],
    topk_weights: list[torch.Tensor | None],
    *,
    rank: int,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
) -> ExpectedDispatch:
    """Expected dispatch outputs of ``rank`` given every rank's inputs (lists indexed by rank)."""
    num_ranks = len(data)
    per_rank = num_experts // num_ranks
    first = rank * per_rank
    ids = [t.tolist() for t in topk_idx]
    k = topk_idx[0].shape[1]
    rows = []
    for s in range(num_ranks):
        for t, row in enumerate(ids[s]):
            if any(e >= 0 and e // per_rank == rank for e in row):
                rows.append((s, t))
    position = {st: i for i, st in enumerate(rows)}
    hidden = data[0].shape[1]
    recv_data = torch.zeros(len(rows), hidden, dtype=data[0].dtype)
    recv_scales = None
    if scales[0] is not None:
        recv_scales = torch.zeros(len(rows), scales[0].shape[1], dtype=scales[0].dtype)
    recv_topk = torch.full((len(rows), k), -1, dtype=torch.int64)
    with_weights = topk_weights[0] is not None
    recv_weights = torch.zeros(len(rows), k) if with_weights else None
    metadata = torch.zeros(len(rows), 2, dtype=torch.int32)
    counts = [0] * per_rank
    members: list[list[int]] = [[] for _ in range(per_rank)]
    for i, (s, t) in enumerate(rows):
        recv_data[i] = data[s][t]
        if recv_scales is not None:
            recv_scales[i] = scales[s][t]  # type: ignore[index]
        metadata[i, 0] = s * num_max_tokens_per_rank + t
        metadata[i, 1] = s
        for j, e in enumerate(ids[s][t]):
            if e >= 0 and e // per_rank == rank:
                recv_topk[i, j] = e - first
                counts[e - first] += 1
                members[e - first].append(i)
                if recv_weights is not None:
                    recv_weights[i, j] = topk_weights[s][t, j]  # type: ignore[index]
    psum, total = [], 0
    for s in range(num_ranks):
        total += sum(1 for (src, _) in rows if src == s)
        psum.append(total)
    aligned = [_align(c, expert_alignment) for c in counts]

    num_expanded = sum(aligned)
    exp_data = torch.zeros(num_expanded, hidden, dtype=recv_data.dtype)
    exp_scales = (
        None
        if recv_scales is None
        else torch.zeros(num_expanded, recv_scales.shape[1], dtype=recv_scales.dtype)
    )
    exp_weights = torch.zeros(num_expanded) if with_weights else None
    expanded_row = [[-1] * k for _ in rows]
    start = 0
    for e in range(per_rank):
        for n, i in enumerate(members[e]):
            j = int((recv_topk[i] == e).nonzero()[0, 0])
            expanded_row[i][j] = start + n
            exp_data[start + n] = recv_data[i]
            if exp_scales is not None and recv_scales is not None:
                exp_scales[start + n] = recv_scales[i]
            if exp_weights is not None and recv_weights is not None:
                exp_weights[start + n] = recv_weights[i, j]
        start += aligned[e]
    return ExpectedDispatch(
        rank,
        rows,
        position,
        recv_data,
        recv_scales,
        recv_topk,
        recv_weights,
        metadata,
        psum,
        counts,
        aligned,
        expanded_row,
        exp_data,
        exp_scales,
        exp_weights,
    )


def _fold(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc + value


def expected_combine(
    dispatched: list[ExpectedDispatch],
    inputs: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    topk_idx: torch.Tensor,
    bias: tuple[torch.Tensor, ...],
    *,
    rank: int,
    num_experts: int,
    do_expand: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expected combine output of source ``rank``.

    Args:
        dispatched: :func:`expected_dispatch` of every rank (indexed by destination).
        inputs: Combine input of every rank (``[M, H]`` or ``[M_exp, H]`` bf16; extra rows
            past the valid ones must be ignored).
        weights: Combine ``topk_weights`` of every rank, or ``None`` each.
        topk_idx: ``[T, k]`` of ``rank``.
        bias: 0-2 ``[T, H]`` bf16 of ``rank``.
        rank: The source rank.
        num_experts: ``E``.
        do_expand: The inputs are in the expanded layout.
    """
    num_ranks = len(dispatched)
    per_rank = num_experts // num_ranks
    num_tokens, k = topk_idx.shape
    hidden = inputs[0].shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
    with_weights = weights[0] is not None
    combined_w = torch.zeros(num_tokens, k) if with_weights else None
    ids = topk_idx.tolist()
    for t in range(num_tokens):
        acc = None
        for d in range(num_ranks):
            i = dispatched[d].position.get((rank, t))
            if i is None:
                continue
            if do_expand:
                partial = None
                for row in dispatched[d].expanded_row[i]:
                    if row >= 0:
                        partial = _fold(partial, inputs[d][row].float())
                assert partial is not None
                value = partial.to(torch.bfloat16).float()
            else:
                value = inputs[d][i].float()
            acc = _fold(acc, value)
        for b in bias:
            acc = _fold(acc, b[t].float())
        if acc is not None:
            out[t] = acc.to(torch.bfloat16)
        if combined_w is None:
            continue
        for j, e in enumerate(ids[t]):
            if e < 0:
                continue
            owner = dispatched[e // per_rank]
            i = owner.position[(rank, t)]
            w = weights[e // per_rank]
            assert w is not None
            combined_w[t, j] = w[owner.expanded_row[i][j]] if do_expand else w[i, j]
    return out, combined_w


@dataclass
class ExpectedLowLatency:
    """What rank ``rank`` must receive from a low-latency dispatch.

    Attributes:
        rows: Per local expert, the ``(src_rank, src_token)`` of its packed rows.
        recv_data: ``[El, L, H]`` (bf16 or e4m3; zero past the counts).
        recv_scales: ``[El, L, P]`` or ``None``.
        layout_range: ``[El, R]`` int64 ``(count << 32) | begin``.
    """

    rows: list[list[tuple[int, int]]]
    recv_data: torch.Tensor
    recv_scales: torch.Tensor | None
    layout_range: torch.Tensor

    @property
    def counts(self) -> list[int]:
        """Rows per local expert."""
        return [len(r) for r in self.rows]


def expected_low_latency_dispatch(
    x: list[torch.Tensor],
    topk_idx: list[torch.Tensor],
    *,
    rank: int,
    num_experts: int,
    num_max_dispatch_tokens_per_rank: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
) -> ExpectedLowLatency:
    """Expected legacy-layout dispatch outputs of ``rank`` (inputs indexed by rank)."""
    num_ranks = len(x)
    per_rank = num_experts // num_ranks
    slots = num_ranks * num_max_dispatch_tokens_per_rank
    hidden = x[0].shape[1]
    if use_fp8:
        casts = [per_token_cast_to_fp8(t, round_scale=round_scale, use_ue8m0=use_ue8m0) for t in x]
        data = [c[0] for c in casts]
        scales: list[torch.Tensor] | None = [c[1] for c in casts]
    else:
        data, scales = x, None
    recv = torch.zeros(per_rank, slots, hidden, dtype=data[0].dtype)
    recv_scales = None
    if scales is not None:
        recv_scales = torch.zeros(per_rank, slots, scales[0].shape[1], dtype=scales[0].dtype)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(per_rank)]
    layout = torch.zeros(per_rank, num_ranks, dtype=torch.int64)
    ids = [t.tolist() for t in topk_idx]
    for e in range(per_rank):
        for s in range(num_ranks):
            begin = len(rows[e])
            for t, row in enumerate(ids[s]):
                if rank * per_rank + e in row:
                    recv[e, len(rows[e])] = data[s][t]
                    if recv_scales is not None and scales is not None:
                        recv_scales[e, len(rows[e])] = scales[s][t]
                    rows[e].append((s, t))
            layout[e, s] = ((len(rows[e]) - begin) << 32) | begin
    return ExpectedLowLatency(rows, recv, recv_scales, layout)


def expected_low_latency_combine(
    dispatched: list[ExpectedLowLatency],
    inputs: list[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    rank: int,
    num_experts: int,
) -> torch.Tensor:
    """Expected weighted legacy combine output ``[T, H]`` bf16 of source ``rank``."""
    num_ranks = len(dispatched)
    per_rank = num_experts // num_ranks
    num_tokens, hidden = topk_idx.shape[0], inputs[0].shape[2]
    out = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
    ids = topk_idx.tolist()
    for t in range(num_tokens):
        acc = None
        for d in range(num_ranks):
            partial = None
            for j, e in enumerate(ids[t]):
                if e < 0 or e // per_rank != d:
                    continue
                local = e - d * per_rank
                row = dispatched[d].rows[local].index((rank, t))
                term = topk_weights[t, j] * inputs[d][local, row].float()
                partial = _fold(partial, term)
            if partial is not None:
                acc = _fold(acc, partial.to(torch.bfloat16).float())
        if acc is not None:
            out[t] = acc.to(torch.bfloat16)
    return out
