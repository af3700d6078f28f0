"""Argument checks of :class:`ep_elastic.ElasticBuffer`'s high-throughput ``dispatch``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ep_core.handle import EPHandle
from ep_core.validation import (
    check_dispatch_x,
    check_expert_alignment,
    check_num_experts,
    check_positive_int,
    check_topk_idx,
    check_topk_weights,
)
from ep_elastic._base import BufferBase

if TYPE_CHECKING:
    from ep_elastic._high_throughput import DispatchInput

__all__ = ["DispatchChecksMixin"]


def _split_x(x: object) -> tuple[object, object]:
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a (data, scales) pair, got {len(x)} items")
        return x[0], x[1]
    return x, None


def _check_matches_handle(handle: EPHandle, **given: object) -> None:
    """A cached dispatch's explicit arguments must equal the handle's (``None`` = not given)."""
    for name, value in given.items():
        have = getattr(handle, name)
        if value is not None and value != have:
            raise ValueError(f"{name}={value!r} differs from the handle's {have!r}")


def _checks_on_device(backend: object) -> bool:
    """Whether ``backend`` checks a dispatch's ``topk_idx`` values on the device (with CPU sync)."""
    return bool(getattr(backend, "checks_topk_idx_on_device", False))


class DispatchChecksMixin(BufferBase):
    """The checks a dispatch runs before its backend call (see :meth:`_checked_dispatch`)."""

    def _check_handle(self, handle: object) -> EPHandle:
        if not isinstance(handle, EPHandle):
            raise TypeError(f"handle must be an EPHandle, got {type(handle).__name__}")
        if handle.rank != self.rank_idx or handle.num_ranks != self.num_ranks:
            raise ValueError(
                f"handle was made by rank {handle.rank} of {handle.num_ranks}, this buffer is "
                f"rank {self.rank_idx} of {self.num_ranks}"
            )
        return handle

    def _call_nmax(self, num_max_tokens_per_rank: int | None) -> int:
        """``Nmax`` of a fresh dispatch: the argument, else the buffer's; at most the buffer's."""
        nmax = num_max_tokens_per_rank
        if nmax is None:
            nmax = self.num_max_tokens_per_rank
        check_positive_int("num_max_tokens_per_rank", nmax)
        if 0 < self.num_max_tokens_per_rank < nmax:
            raise ValueError(
                f"num_max_tokens_per_rank {nmax} exceeds the buffer's "
                f"{self.num_max_tokens_per_rank}"
            )
        return nmax

    def _checked_dispatch(
        self,
        backend: Any,
        x: DispatchInput,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        stats: torch.Tensor | None,
        num_experts: int | None,
        num_max_tokens_per_rank: int | None,
        expert_alignment: int | None,
        num_sms: int,
        handle: EPHandle | None,
        do_cpu_sync: bool | None,
        do_expand: bool,
    ) -> tuple[Any, ...]:
        """Checks a dispatch's arguments (rejecting on every rank, see ``_reject``).

        Returns:
            ``(x, x_scales, topk_idx, handle, (num_experts, nmax, alignment, sync, num_sms),
            remember)``: the checked operands, the values the call derives, and whether a call
            with the same signature may skip these checks.
        """
        try:
            data, scales = _split_x(x)
            if handle is not None:
                handle = self._check_handle(handle)
                if topk_idx is not None:
                    raise ValueError(
                        "topk_idx must be None for a cached dispatch (handle= is given)"
                    )
                if do_cpu_sync:
                    raise ValueError("do_cpu_sync=True is not allowed for a cached dispatch")
                if stats is not None:
                    raise ValueError(
                        "cached dispatches do not update cumulative_local_expert_recv_stats"
                    )
                _check_matches_handle(
                    handle,
                    num_experts=num_experts,
                    num_max_tokens_per_rank=num_max_tokens_per_rank,
                    expert_alignment=expert_alignment,
                    do_expand=do_expand,
                )
                num_experts, nmax = handle.num_experts, handle.num_max_tokens_per_rank
                alignment, sync, idx = handle.expert_alignment, False, handle.topk_idx
            else:
                if topk_idx is None:
                    raise ValueError("topk_idx is required for a fresh dispatch (no handle given)")
                if num_experts is None:
                    raise ValueError("num_experts is required for a fresh dispatch")
                check_num_experts(num_experts, self.num_ranks)
                nmax = self._call_nmax(num_max_tokens_per_rank)
                alignment = check_expert_alignment(
                    1 if expert_alignment is None else expert_alignment
                )
                sync, idx = do_cpu_sync is not False, topk_idx
            checked_x, checked_scales = check_dispatch_x(
                data, scales, num_max_tokens_per_rank=nmax, device=self.device
            )
            num_tokens, hidden = checked_x.shape
            if handle is None:
                # A backend that reads its counts back anyway checks the ids' values on the
                # device in that same read (no sort, no extra syncs here); the others on the host.
                on_device = sync and _checks_on_device(backend)
                check_topk_idx(
                    idx,
                    num_tokens=num_tokens,
                    num_experts=num_experts,
                    device=self.device,
                    values=not on_device,
                )
            elif num_tokens != handle.num_tokens:
                raise ValueError(
                    f"x has {num_tokens} tokens but the handle's dispatch had {handle.num_tokens}"
                )
            if topk_weights is not None:
                check_topk_weights(topk_weights, idx)
            self._check_recv_stats(stats, num_experts)
            k = idx.shape[1]
            self._check_capacity(nmax, hidden, k, checked_scales is not None)
            if num_sms == 0:
                num_sms = (
                    handle.num_sms if handle is not None else self._default_num_sms(num_experts, k)
                )
            check_positive_int("num_sms", num_sms)
            on_device = handle is None and sync and _checks_on_device(backend)
        except (ValueError, TypeError) as exc:
            self._reject(exc)
        derived = (num_experts, nmax, alignment, sync, num_sms)
        remember = handle is not None or on_device
        return checked_x, checked_scales, idx, handle, derived, remember
