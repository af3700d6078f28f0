"""Input checks of :class:`ep_elastic.compat.Buffer`'s normal dispatch (DeepEP V1's arguments).

A fresh dispatch takes V1's layout arguments (from ``get_dispatch_layout``) beside or instead of
``topk_idx``. These checks validate them on the rank, then all-gather every rank's shapes (and,
without ``topk_idx``, its expert counts) so that a rejected input or a too small buffer raises on
every rank, and derive the routing and per-expert counts a dispatch without ``topk_idx`` needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ep_core.layout import get_dispatch_layout as _layout
from ep_core.validation import (
    check_dispatch_x,
    check_num_experts,
    check_tensor,
    check_topk_idx,
    check_topk_weights,
    should_check_values,
)
from ep_elastic._high_throughput import DispatchInput
from ep_elastic.buffer import ElasticBuffer
from ep_jit.agreement import gather_checked

__all__ = ["DispatchChecksMixin"]


class DispatchChecksMixin:
    """Checks of V1's dispatch inputs; the host class sets the attributes declared below."""

    elastic: ElasticBuffer
    group: dist.ProcessGroup
    group_size: int
    rank: int

    def _check_layout(
        self,
        num_tokens: int,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
    ) -> int:
        """Checks V1's layout arguments of a fresh dispatch; returns ``E``."""
        given = {
            "num_tokens_per_rank": num_tokens_per_rank,
            "is_token_in_rank": is_token_in_rank,
            "num_tokens_per_expert": num_tokens_per_expert,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"a dispatch without handle= needs {', '.join(missing)} (from get_dispatch_layout)"
            )
        device, num_ranks = self.elastic.device, self.group_size
        check_tensor(
            "num_tokens_per_rank",
            num_tokens_per_rank,
            dtypes=(torch.int32,),
            shape=(num_ranks,),
            device=device,
        )
        check_tensor(
            "is_token_in_rank",
            is_token_in_rank,
            dtypes=(torch.bool,),
            shape=(num_tokens, num_ranks),
            device=device,
        )
        assert isinstance(num_tokens_per_expert, torch.Tensor)
        num_experts = num_tokens_per_expert.shape[0] if num_tokens_per_expert.dim() == 1 else -1
        check_tensor(
            "num_tokens_per_expert",
            num_tokens_per_expert,
            dtypes=(torch.int32,),
            shape=(num_experts,),
            device=device,
        )
        return check_num_experts(num_experts, num_ranks)

    def _check_fresh(
        self,
        x: DispatchInput,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        nmax: int,
    ) -> int:
        """Local checks of a fresh dispatch's inputs (``T <= nmax``); returns ``E``."""
        device = self.elastic.device
        if isinstance(x, tuple | list):
            if len(x) != 2:
                raise ValueError(f"an FP8 x must be a (data, scales) pair, got {len(x)} items")
            data, _ = check_dispatch_x(x[0], x[1], num_max_tokens_per_rank=nmax, device=device)
        else:
            data, _ = check_dispatch_x(x, None, num_max_tokens_per_rank=nmax, device=device)
        num_tokens = data.shape[0]
        num_experts = self._check_layout(
            num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert
        )
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights must be given together, as in V1")
        if topk_idx is None:
            return num_experts
        check_topk_idx(topk_idx, num_tokens=num_tokens, num_experts=num_experts, device=device)
        check_topk_weights(topk_weights, topk_idx)
        if should_check_values(topk_idx):
            layout = _layout(topk_idx, num_experts, self.group_size)
            for name, given, want in (
                ("is_token_in_rank", is_token_in_rank, layout.is_token_in_rank),
                ("num_tokens_per_rank", num_tokens_per_rank, layout.num_tokens_per_rank),
                ("num_tokens_per_expert", num_tokens_per_expert, layout.num_tokens_per_expert),
            ):
                assert isinstance(given, torch.Tensor)
                if not torch.equal(given, want):
                    raise ValueError(
                        f"{name} is not the layout of topk_idx (use get_dispatch_layout on the "
                        "same topk_idx and num_experts)"
                    )
        return num_experts

    def _agree(
        self,
        x: DispatchInput,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
    ) -> tuple[int, int, list[list[int]] | None]:
        """Checks locally, then all-gathers every rank's shapes (and, without ``topk_idx``, its
        expert counts), so that a rejected input or a too small buffer fails every rank.

        Returns:
            ``(Nmax, E, expert counts by rank or None)``; ``Nmax`` is the buffer's, else the
            largest token count of the ranks.
        """
        error: Exception | None = None
        num_experts = 0
        data = x[0] if isinstance(x, tuple | list) else x
        shape = tuple(data.shape)
        num_topk = self.group_size if topk_idx is None else int(topk_idx.shape[1])
        payload: dict[str, Any] = {
            "shape": (shape[0], shape[1], num_topk, isinstance(x, tuple | list)),
            "expert_counts": None,
        }
        fixed = self.elastic.num_max_tokens_per_rank
        try:
            num_experts = self._check_fresh(
                x,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                fixed or shape[0],
            )
            if topk_idx is None:
                assert isinstance(num_tokens_per_expert, torch.Tensor)
                payload["expert_counts"] = num_tokens_per_expert.tolist()
        except (ValueError, TypeError) as exc:
            error = exc
        gathered = gather_checked(
            self.group, payload, error, what="compat.Buffer.dispatch", device=self.elastic.device
        )
        nmax = fixed or max(1, *(g["shape"][0] for g in gathered))
        self._check_room([(nmax, *g["shape"][1:]) for g in gathered])
        counts = None if topk_idx is not None else [g["expert_counts"] for g in gathered]
        return nmax, num_experts, counts

    def _lanes_of(self, is_token_in_rank: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Routing without ``topk_idx``: lane ``d`` names rank ``d``'s first expert or ``-1``."""
        num_ranks = self.group_size
        if num_ranks > 32:
            raise ValueError(
                f"a dispatch without topk_idx routes by is_token_in_rank, which supports at most "
                f"32 ranks here, got {num_ranks}"
            )
        first = torch.arange(num_ranks, device=is_token_in_rank.device) * (num_experts // num_ranks)
        return torch.where(is_token_in_rank, first, -1).to(torch.int64)

    def _counts_of(
        self, expert_counts: list[list[int]], num_experts: int, expert_alignment: int
    ) -> list[int]:
        local = num_experts // self.group_size
        begin = self.rank * local
        counts = [sum(c[begin + e] for c in expert_counts) for e in range(local)]
        return [-(-c // expert_alignment) * expert_alignment for c in counts]

    def _check_room(self, shapes: list[tuple[int, int, int, bool]]) -> None:
        """Raises unless the buffer holds a dispatch of every ``(Nmax, H, k, fp8)`` given."""
        need, worst = max(
            (ElasticBuffer.get_buffer_size_hint(self.group, *shape), shape) for shape in shapes
        )
        if need > self.elastic.num_bytes:
            nmax, hidden, num_topk, fp8 = worst
            raise ValueError(
                f"this dispatch (Nmax={nmax} tokens per rank, H={hidden}, k={num_topk}, "
                f"fp8={fp8}) needs a {need}-byte buffer but the Buffer has "
                f"{self.elastic.num_bytes}: pass num_nvl_bytes >= {need}, or "
                "num_max_tokens_per_rank= and hidden= when constructing it"
            )
