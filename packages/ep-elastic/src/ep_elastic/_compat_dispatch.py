"""The normal dispatch of :class:`ep_elastic.compat.Buffer` (DeepEP V1's names and tuples).

``get_dispatch_layout`` and ``dispatch`` (fresh or cached) forward to ``ElasticBuffer``; this
module maps V1's layout arguments, ``num_worst_tokens`` and return tuple onto it. ``combine``,
the other half of normal mode, is on ``Buffer`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch

from ep_core.layout import get_dispatch_layout as _layout
from ep_core.validation import check_num_experts, check_positive_int, check_topk_idx
from ep_elastic._compat_checks import DispatchChecksMixin
from ep_elastic._compat_config import Config
from ep_elastic._compat_handle import DispatchHandle
from ep_elastic._compat_low_latency import merge_events, unwrap_event
from ep_elastic._high_throughput import DispatchInput
from ep_elastic.event import EventHandle, EventOverlap, run_on_comm_stream

__all__ = ["NormalDispatchMixin"]

_DispatchReturn: TypeAlias = (
    "tuple[DispatchInput, torch.Tensor | None, torch.Tensor | None, list[int] | None, "
    "DispatchHandle | None, EventOverlap]"
)


def _check_overlap_args(
    previous_event: object, async_finish: bool, allocate_on_comm_stream: bool
) -> EventHandle | None:
    """V1's rule: ``allocate_on_comm_stream`` needs ``previous_event`` and ``async_finish``."""
    event = unwrap_event(previous_event)
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError(
            "allocate_on_comm_stream=True requires previous_event and async_finish=True "
            f"(got previous_event={previous_event!r}, async_finish={async_finish})"
        )
    return event


def _slice_x(x: DispatchInput, rows: int) -> DispatchInput:
    if isinstance(x, tuple):
        return x[0][:rows], x[1][:rows]
    return x[:rows]


class NormalDispatchMixin(DispatchChecksMixin):
    """V1's normal dispatch methods; the host class sets the attributes declared below."""

    _num_sms: Callable[[object], int]

    def _run_after(
        self,
        fn: Callable[[], Any],
        inputs: tuple[Any, ...],
        event: EventOverlap,
        async_finish: bool,
    ) -> tuple[Any, EventOverlap]:
        """Runs ``fn`` (post-processing of a call's outputs) on the comm stream after ``event``."""
        result, after = run_on_comm_stream(
            self.elastic.device,
            fn,
            inputs,
            lambda r: r,
            previous_event=event.event if async_finish else None,
            async_with_compute_stream=async_finish,
        )
        return result, merge_events(event, after)

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Where this rank's tokens go (no communication).

        Args:
            topk_idx: ``[T, k]`` int64 global expert ids, ``-1`` = none.
            num_experts: ``E``, a multiple of the rank count.
            previous_event: The comm stream waits for it (CUDA) instead of the current stream.
            async_finish: Return an event to wait on instead of making the current stream wait.
            allocate_on_comm_stream: V1's flag; needs ``previous_event`` and ``async_finish``.
                Outputs are always made on the comm stream and kept alive for both streams.

        Returns:
            ``(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
            is_token_in_rank [T, R] bool, event)`` on the buffer's device. The second value is
            V1's per-RDMA-rank count, ``None`` as on one V1 node: there is no RDMA level here.
        """
        event = _check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
        device, num_ranks = self.elastic.device, self.group_size
        check_num_experts(num_experts, num_ranks)
        rows = topk_idx.shape[0] if isinstance(topk_idx, torch.Tensor) else -1
        check_topk_idx(topk_idx, num_tokens=rows, num_experts=num_experts, device=device)
        layout, out_event = run_on_comm_stream(
            device,
            lambda: _layout(topk_idx, num_experts, num_ranks),
            (topk_idx,),
            lambda r: (r.num_tokens_per_rank, r.num_tokens_per_expert, r.is_token_in_rank),
            previous_event=event,
            async_with_compute_stream=async_finish,
        )
        return (
            layout.num_tokens_per_rank,
            None,
            layout.num_tokens_per_expert,
            layout.is_token_in_rank,
            out_event,
        )

    def dispatch(
        self,
        x: DispatchInput,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> _DispatchReturn:
        """V1's normal dispatch: each token goes once to every rank in its ``is_token_in_rank``.

        Received rows are grouped by source rank (increasing), then source token, as
        ``ElasticBuffer.dispatch`` (``docs/design.md``). A fresh dispatch without
        ``num_worst_tokens`` synchronises with the host (exact sizes) and first all-gathers the
        ranks' token counts, which agree on ``Nmax`` and make a rejected input fail every rank.

        Args:
            x: ``[T, H]`` bf16, or ``(e4m3 [T, H], scales [T, H/128] float32 or int32 packs)``.
            handle: A fresh dispatch's handle: replay its layout (cached dispatch; the layout
                arguments and ``expert_alignment`` / ``num_worst_tokens`` are then ignored, as
                V1). ``topk_idx`` and ``topk_weights`` must be ``None``.
            num_tokens_per_rank: ``[R]`` int32, from :meth:`get_dispatch_layout`.
            num_tokens_per_rdma_rank: Ignored (V1's internode count; no RDMA level here).
            is_token_in_rank: ``[T, R]`` bool. With ``topk_idx`` the routing follows
                ``topk_idx`` and this must be its layout (compared while ``EP_CHECK_INPUTS`` is
                on); without, it defines the routing.
            num_tokens_per_expert: ``[E]`` int32; gives ``E``. Without ``topk_idx`` the
                per-expert counts returned are its sums over the source ranks.
            topk_idx: ``[T, k]`` int64 or ``None`` (then ``topk_weights`` must be ``None`` too).
            topk_weights: ``[T, k]`` float32, given exactly when ``topk_idx`` is.
            expert_alignment: Per-expert counts are rounded up to a multiple of it.
            num_worst_tokens: ``> 0``: no host sync; outputs have this many rows, rows past the
                received count are unspecified (``recv_topk_idx`` rows are ``-1``). Needs
                ``topk_idx``; here it also fixes ``Nmax = ceil(num_worst_tokens / R)``, which
                every rank's ``T`` must not exceed.
            config: A :class:`Config`; only ``num_sms`` is used (default :attr:`num_sms`).
            previous_event: An :class:`EventOverlap` (or ``EventHandle``) the comm stream waits for.
            async_finish: Return an event instead of making the current stream wait.
            allocate_on_comm_stream: V1's flag; needs ``previous_event`` and ``async_finish``.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
            handle, event)``: ``recv_x`` ``[M, H]`` (or ``(data, scales)``), ``recv_topk_idx``
            ``[M, k]`` int64 local ids (``-1`` elsewhere) and ``recv_topk_weights`` ``[M, k]``
            float32 (0 off this rank) or ``None`` without ``topk_idx``, the aligned counts of
            the ``El`` local experts (``[]`` with ``num_worst_tokens``), a
            :class:`~ep_elastic.compat.DispatchHandle`, an :class:`EventOverlap`. A cached
            dispatch returns ``(recv_x, None, None, None, None, event)``.

        Raises:
            ValueError, TypeError: Invalid input (named in the message).
        """
        event = _check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
        num_sms = self._num_sms(config)
        if handle is not None:
            return self._cached_dispatch(
                x, handle, topk_idx, topk_weights, num_sms, event, async_finish
            )
        data = x[0] if isinstance(x, tuple | list) and len(x) == 2 else x
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError(f"x must be a [T, H] tensor, got {getattr(data, 'shape', data)!r}")
        hidden = data.shape[1]
        fp8 = isinstance(x, tuple | list)
        check_positive_int("num_worst_tokens", num_worst_tokens, minimum=0)
        fresh = (x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
        if num_worst_tokens:
            if topk_idx is None:
                raise ValueError("num_worst_tokens > 0 needs topk_idx and topk_weights, as in V1")
            nmax = -(-num_worst_tokens // self.group_size)
            if data.shape[0] > nmax:
                raise ValueError(
                    f"x has {data.shape[0]} tokens but num_worst_tokens={num_worst_tokens} over "
                    f"{self.group_size} ranks allows at most {nmax} per rank here"
                )
            num_experts = self._check_fresh(*fresh, topk_idx, topk_weights, nmax)
            self._check_room([(nmax, hidden, topk_idx.shape[1], fp8)])
            expert_counts: list[list[int]] | None = None
        else:
            nmax, num_experts, expert_counts = self._agree(*fresh, topk_idx, topk_weights)
        idx = topk_idx
        if idx is None:
            assert isinstance(is_token_in_rank, torch.Tensor)
            idx = self._lanes_of(is_token_in_rank, num_experts)
        recv_x, recv_idx, recv_w, eh, ev = self.elastic.dispatch(
            x,
            topk_idx=idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            num_max_tokens_per_rank=nmax,
            expert_alignment=expert_alignment,
            num_sms=num_sms,
            previous_event=event,
            async_with_compute_stream=async_finish,
            do_cpu_sync=not num_worst_tokens,
        )
        rows = num_worst_tokens or eh.num_recv_tokens

        def finish() -> tuple[Any, ...]:
            meta = eh.recv_src_metadata[:rows].to(torch.int64)
            src = torch.where(meta[:, 0] >= 0, meta[:, 0] - meta[:, 1] * nmax, -1)
            prefix = torch.zeros(
                self.group_size, self.group_size, dtype=torch.int32, device=data.device
            )
            prefix[:, self.rank] = eh.psum_num_recv_tokens_per_rank
            out_idx = recv_idx
            if topk_idx is None:
                out_idx, out_w = None, None
            else:
                out_w = recv_w[:rows] if recv_w is not None else None
                if recv_idx is not None:
                    valid = eh.psum_num_recv_tokens_per_rank[-1]
                    pad = torch.arange(rows, device=data.device) >= valid
                    out_idx = recv_idx[:rows].masked_fill(pad[:, None], -1)
            return _slice_x(recv_x, rows), out_idx, out_w, prefix, src.to(torch.int32)

        (out_x, out_idx, out_w, prefix, src), out_event = self._run_after(
            finish, (recv_x, recv_idx, recv_w, eh), ev, async_finish
        )
        if num_worst_tokens:
            counts: list[int] = []
        elif expert_counts is not None:
            counts = self._counts_of(expert_counts, num_experts, expert_alignment)
        else:
            counts = list(eh.num_recv_tokens_per_expert_list)
        assert isinstance(is_token_in_rank, torch.Tensor)
        out_handle = DispatchHandle(
            eh,
            prefix,
            src,
            is_token_in_rank,
            num_recv_tokens=rows,
            has_topk=topk_idx is not None,
        )
        return out_x, out_idx, out_w, counts, out_handle, out_event

    def _cached_dispatch(
        self,
        x: DispatchInput,
        handle: object,
        topk_idx: object,
        topk_weights: object,
        num_sms: int,
        event: EventHandle | None,
        async_finish: bool,
    ) -> _DispatchReturn:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(
                "handle must be the handle returned by ep_elastic.compat.Buffer.dispatch, got "
                f"{type(handle).__name__}"
            )
        if topk_idx is not None or topk_weights is not None:
            raise ValueError("a cached dispatch (handle=) takes no topk_idx / topk_weights, as V1")
        recv_x, _, _, _, ev = self.elastic.dispatch(
            x,
            handle=handle.elastic,
            num_sms=num_sms,
            previous_event=event,
            async_with_compute_stream=async_finish,
        )
        rows = handle.num_recv_tokens
        out_x, out_event = self._run_after(
            lambda: _slice_x(recv_x, rows), (recv_x,), ev, async_finish
        )
        return out_x, None, None, None, None, out_event
