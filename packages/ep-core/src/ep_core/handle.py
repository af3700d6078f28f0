"""Handles: what a dispatch leaves behind so that combine (and a cached dispatch) can replay it.

:class:`EPHandle` is the contract of ``docs/design.md`` (high-throughput dispatch/combine);
:class:`LowLatencyHandle` belongs to the legacy low-latency pair. Both are plain dataclasses; the
tensors live on the device of the dispatch that made them and are written on its stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["EPHandle", "LowLatencyHandle"]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
"""Field names per handle class: ``dataclasses.fields`` walks the class's field table on every
call, and a handle's tensors are listed on the host path of every dispatch, after its CPU sync."""


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    names = _FIELD_NAMES.get(type(obj))
    if names is None:
        names = _FIELD_NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, torch.Tensor):
            yield value


@dataclass
class EPHandle:
    """Layout of one high-throughput dispatch (``R`` ranks, ``El`` local experts, ``k`` top-k).

    Attributes:
        rank: This rank ``r``.
        num_ranks: ``R``.
        num_experts: ``E``.
        num_max_tokens_per_rank: ``Nmax`` of the dispatch.
        expert_alignment: ``A``.
        do_expand: Whether the dispatch produced the expanded (per-expert) layout.
        num_sms: SMs used by the dispatch (combine reuses it when given 0).
        topk_idx: ``[T, k]`` int64, clone of the dispatch's ``topk_idx``.
        is_token_in_rank: ``[T, R]`` bool, token ``t`` went to rank ``d``.
        send_row: ``[T, R]`` int32, row of token ``t`` inside rank ``d``'s region for this source,
            ``-1`` where not sent.
        num_recv_tokens: Rows ``M`` of the non-expanded output: exact with CPU sync, else
            ``R * Nmax``.
        num_expanded_tokens: Rows ``M_exp`` of the expanded output: exact with CPU sync, else the
            worst case; also filled for a non-expanded dispatch.
        num_recv_tokens_per_expert_list: Aligned per-local-expert counts (``El`` ints), ``[]``
            without CPU sync.
        psum_num_recv_tokens_per_rank: ``[R]`` int32, inclusive prefix sum of rows received from
            each source rank; the last entry is the number of valid rows.
        psum_num_recv_tokens_per_expert: ``[El]`` int32. Non-expanded: inclusive prefix sum of the
            aligned counts. Expanded: ``aligned_start(i) + count(i)``.
        num_unaligned_recv_tokens_per_expert: ``[El]`` int32, real per-local-expert counts.
        recv_src_metadata: ``[M, 2]`` int32 (``[M, 2 + k]`` when expanded). Column 0 is
            ``src_rank * Nmax + src_token``, column 1 ``src_rank``; column ``2 + j`` is the
            expanded row of lane ``j`` or ``-1``. Rows past the valid count hold ``-1``.
        backend_state: Private to the backend that made the handle.
    """

    rank: int
    num_ranks: int
    num_experts: int
    num_max_tokens_per_rank: int
    expert_alignment: int
    do_expand: bool
    num_sms: int
    topk_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_row: torch.Tensor
    num_recv_tokens: int
    num_expanded_tokens: int
    num_recv_tokens_per_expert_list: list[int]
    psum_num_recv_tokens_per_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: torch.Tensor
    recv_src_metadata: torch.Tensor
    backend_state: object | None = None

    @property
    def psum_num_recv_tokens_per_scaleup_rank(self) -> torch.Tensor:
        """Alias of :attr:`psum_num_recv_tokens_per_rank` (DeepEP V2's name)."""
        return self.psum_num_recv_tokens_per_rank

    @property
    def num_local_experts(self) -> int:
        """``El = E // R``."""
        return self.num_experts // self.num_ranks

    @property
    def num_tokens(self) -> int:
        """``T``, the tokens this rank dispatched."""
        return int(self.topk_idx.shape[0])

    @property
    def num_topk(self) -> int:
        """``k``."""
        return int(self.topk_idx.shape[1])

    @property
    def do_cpu_sync(self) -> bool:
        """Whether the dispatch synchronised with the host (exact output sizes)."""
        return len(self.num_recv_tokens_per_expert_list) > 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor field (for stream bookkeeping such as ``record_stream``)."""
        return list(_tensors(self))


@dataclass
class LowLatencyHandle:
    """Layout of one low-latency dispatch (legacy DeepEP layout, ``L = R * Nmax``).

    Attributes:
        rank: This rank ``r``.
        num_ranks: ``R``.
        num_experts: ``E``.
        num_max_dispatch_tokens_per_rank: ``Nmax`` of the low-latency dispatch.
        hidden: ``H``.
        num_topk: ``k``.
        recv_src_info: ``[El, L]`` int32, source token index of each packed row, ``-1`` past
            ``recv_count[e]``.
        recv_layout_range: ``[El, R]`` int64, ``(count << 32) | begin`` of the rows expert ``e``
            received from source rank ``s``.
        recv_count: ``[El]`` int32, rows received per local expert.
        backend_state: Private to the backend that made the handle.
    """

    rank: int
    num_ranks: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_topk: int
    recv_src_info: torch.Tensor
    recv_layout_range: torch.Tensor
    recv_count: torch.Tensor
    backend_state: object | None = None

    @property
    def num_local_experts(self) -> int:
        """``El = E // R``."""
        return self.num_experts // self.num_ranks

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor field (for stream bookkeeping such as ``record_stream``)."""
        return list(_tensors(self))
