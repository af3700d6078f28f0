"""``ElasticBuffer``'s high-throughput calls inside a ``torch.compile`` region.

Inside a compiled region the calls are the custom ops of :mod:`ep_elastic._compiled`: checks of
the arguments' kinds happen here while tracing; value checks run inside the ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ep_core.handle import EPHandle
from ep_elastic._base import BufferBase
from ep_elastic._compiled import CompiledHandle, cached_dispatch_op, combine_op, dispatch_op
from ep_elastic.event import EventOverlap

if TYPE_CHECKING:
    from ep_elastic._high_throughput import DispatchInput

__all__ = ["CompiledCallsMixin"]


class CompiledCallsMixin(BufferBase):
    """``dispatch`` and ``combine`` as the compiled region sees them (see the module doc)."""

    def _compiled_dispatch(
        self,
        x: object,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        stats: torch.Tensor | None,
        num_experts: int | None,
        num_max_tokens_per_rank: int | None,
        expert_alignment: int | None,
        handle: object,
        do_cpu_sync: bool | None,
        do_expand: bool,
    ) -> tuple[DispatchInput, torch.Tensor | None, torch.Tensor | None, EPHandle, EventOverlap]:
        if not isinstance(x, torch.Tensor):
            raise ValueError("under torch.compile dispatch takes a BF16 x (no FP8 tuple)")
        if do_cpu_sync or do_expand or stats is not None:
            raise ValueError(
                "under torch.compile dispatch runs without CPU sync (worst-case rows), without "
                "do_expand and without cumulative_local_expert_recv_stats"
            )
        if handle is not None:
            if not isinstance(handle, CompiledHandle) or topk_idx is not None:
                raise ValueError(
                    "under torch.compile a cached dispatch takes the handle of a compiled "
                    "dispatch and no topk_idx"
                )
            recv = cached_dispatch_op(x, handle.recv_x, self._op_key)
            return recv, None, None, handle, EventOverlap()  # type: ignore[return-value]
        if topk_idx is None or num_experts is None:
            raise ValueError("a fresh dispatch needs topk_idx and num_experts")
        nmax = num_max_tokens_per_rank or self.num_max_tokens_per_rank
        recv_x, recv_idx, recv_w = dispatch_op(
            x,
            topk_idx,
            topk_weights,
            self._op_key,
            num_experts,
            nmax,
            expert_alignment or 1,
        )
        out = CompiledHandle(recv_x, x.shape[0], topk_idx.shape[1])
        weights = None if topk_weights is None else recv_w
        return recv_x, recv_idx, weights, out, EventOverlap()  # type: ignore[return-value]

    def _compiled_combine(
        self,
        x: torch.Tensor,
        handle: object,
        topk_weights: torch.Tensor | None,
        bias: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        if not isinstance(handle, CompiledHandle):
            raise ValueError("under torch.compile combine takes the handle of a compiled dispatch")
        if topk_weights is not None or bias is not None:
            raise ValueError("under torch.compile combine takes no topk_weights and no bias")
        combined = combine_op(x, handle.recv_x, self._op_key, handle.num_tokens)
        return combined, None, EventOverlap()
