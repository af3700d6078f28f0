"""The handles of :class:`ep_elastic.compat.Buffer`: DeepEP V1's tuples around ep-core's handles.

V1 returns plain tuples; code unpacks them or reads ``handle[0]``. These are tuple subclasses
with V1's positions, which also carry the :class:`~ep_core.handle.EPHandle` /
:class:`~ep_core.handle.LowLatencyHandle` that the wrapped ``ElasticBuffer`` replays.
"""

from __future__ import annotations

from typing import Any

import torch

from ep_core.handle import EPHandle, LowLatencyHandle

__all__ = ["DispatchHandle", "LowLatencyDispatchHandle"]


class DispatchHandle(tuple[Any, ...]):
    """V1's intranode handle: ``(rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head)``.

    Positions with a counterpart here hold V1's values (on the dispatch's device):

    - ``rank_prefix_matrix``: ``[R, R]`` int32; column ``r`` (this rank) is the inclusive prefix
      sum over source ranks of the rows received from them, so rows
      ``[m[s-1, r], m[s, r])`` came from rank ``s``. As in V1, the other columns carry nothing
      (zero here).
    - ``recv_src_idx``: ``[M]`` int32, the source-rank token index of each received row (``-1``
      on the padding rows of a ``num_worst_tokens`` dispatch).
    - ``is_token_in_rank``: ``[T, R]`` bool, where this rank's tokens went.

    ``channel_prefix_matrix``, ``recv_channel_prefix_matrix`` and ``send_head`` are V1's
    per-channel ring-buffer bookkeeping, which this library has no counterpart for: they are
    ``None``.

    Attributes:
        elastic: The :class:`~ep_core.handle.EPHandle` of the wrapped dispatch.
        num_recv_tokens: Rows of the V1 outputs (``M``; ``num_worst_tokens`` when given).
        has_topk: Whether the dispatch carried ``topk_idx`` (else its lanes were derived from
            ``is_token_in_rank`` and combine takes no ``topk_weights``).
    """

    elastic: EPHandle
    num_recv_tokens: int
    has_topk: bool

    def __new__(
        cls,
        elastic: EPHandle,
        rank_prefix_matrix: torch.Tensor,
        recv_src_idx: torch.Tensor,
        is_token_in_rank: torch.Tensor,
        *,
        num_recv_tokens: int,
        has_topk: bool,
    ) -> DispatchHandle:
        self = super().__new__(
            cls, (rank_prefix_matrix, None, None, recv_src_idx, is_token_in_rank, None)
        )
        self.elastic = elastic
        self.num_recv_tokens = num_recv_tokens
        self.has_topk = has_topk
        return self

    @property
    def rank_prefix_matrix(self) -> torch.Tensor:
        """``[R, R]`` int32; see the class doc."""
        return self[0]  # type: ignore[no-any-return]

    @property
    def recv_src_idx(self) -> torch.Tensor:
        """``[M]`` int32 source token index of each received row."""
        return self[3]  # type: ignore[no-any-return]

    @property
    def is_token_in_rank(self) -> torch.Tensor:
        """``[T, R]`` bool."""
        return self[4]  # type: ignore[no-any-return]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the handle (for stream bookkeeping)."""
        return [t for t in self if isinstance(t, torch.Tensor)] + self.elastic.tensors()


class LowLatencyDispatchHandle(tuple[Any, ...]):
    """V1's low-latency handle: ``(src_info, layout_range, num_max_dispatch_tokens_per_rank,
    hidden, num_experts)``.

    ``src_info`` is ``[El, R * Nmax]`` int32 (source token of each packed row), ``layout_range``
    ``[El, R]`` int64 (``(count << 32) | begin`` per source rank), as in V1.

    Attributes:
        elastic: The :class:`~ep_core.handle.LowLatencyHandle` of the wrapped dispatch.
    """

    elastic: LowLatencyHandle

    def __new__(cls, elastic: LowLatencyHandle) -> LowLatencyDispatchHandle:
        self = super().__new__(
            cls,
            (
                elastic.recv_src_info,
                elastic.recv_layout_range,
                elastic.num_max_dispatch_tokens_per_rank,
                elastic.hidden,
                elastic.num_experts,
            ),
        )
        self.elastic = elastic
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the handle (for stream bookkeeping)."""
        return self.elastic.tensors()
