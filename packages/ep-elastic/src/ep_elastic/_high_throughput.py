"""High-throughput ``dispatch`` and ``combine`` of :class:`ep_elastic.ElasticBuffer`."""

from __future__ import annotations

from typing import Any, TypeAlias, cast

import torch

from ep_core.handle import EPHandle
from ep_core.validation import (
    check_bias,
    check_combine_x,
    check_positive_int,
    check_tensor,
)
from ep_elastic._compiled_calls import CompiledCallsMixin
from ep_elastic._dispatch_checks import DispatchChecksMixin
from ep_elastic.event import EventHandle, EventOverlap

__all__ = ["DispatchInput", "HighThroughputMixin"]

DispatchInput: TypeAlias = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"
"""``x`` of dispatch: a bf16 tensor, or an FP8 ``(data, scales)`` tuple."""


def _signature(t: torch.Tensor) -> tuple:
    """What the checks of a tensor argument read: shape, strides, dtype and device."""
    return (t.shape, t.stride(), t.dtype, t.device)


def _all_outputs(result: tuple) -> tuple:
    return result


def _new_outputs(result: tuple) -> tuple:
    return result[:4]


class HighThroughputMixin(CompiledCallsMixin, DispatchChecksMixin):
    """``dispatch``/``combine`` on top of :class:`~ep_elastic._base.BufferBase`."""

    def dispatch(
        self,
        x: DispatchInput,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        num_experts: int | None = None,
        num_max_tokens_per_rank: int | None = None,
        expert_alignment: int | None = None,
        num_sms: int = 0,
        previous_event: EventHandle | None = None,
        async_with_compute_stream: bool = False,
        handle: EPHandle | None = None,
        do_cpu_sync: bool | None = None,
        do_expand: bool = False,
    ) -> tuple[DispatchInput, torch.Tensor | None, torch.Tensor | None, EPHandle, EventOverlap]:
        """Sends each token once to every rank owning one of its experts.

        Received rows are grouped by source rank (increasing), then by source token; see
        ``docs/design.md`` for every output's exact content. On CUDA a synchronous call (no
        ``previous_event``, not ``async_with_compute_stream``) runs on the current stream, after
        the buffer's earlier calls; the others run on the comm stream (``docs/ep-elastic.md``,
        "Streams").

        Args:
            x: ``[T, H]`` bf16, or ``(data [T, H] float8_e4m3fn, scales [T, P])`` with 4-byte
                scales (float32, or int32 UE8M0 packs; any strides), ``T <= Nmax``.
            topk_idx: ``[T, k]`` int64 global expert ids, ``-1`` = none; ``None`` iff ``handle``.
            topk_weights: ``[T, k]`` float32 or ``None``.
            cumulative_local_expert_recv_stats: ``[El]`` int32; the real per-local-expert counts
                are added to it (fresh dispatch only).
            num_experts: ``E`` (a multiple of ``R``); taken from ``handle`` when cached.
            num_max_tokens_per_rank: ``Nmax`` of this call (default: the buffer's; at most it).
            expert_alignment: ``A`` (default 1); expert blocks are padded to multiples of it.
            num_sms: SMs for kernel backends; 0 = analytical (cached: the handle's).
            previous_event: Run on the comm stream, which waits for it instead of the current
                stream.
            async_with_compute_stream: Run on the comm stream and return at once with an event
                to wait on; operands are kept alive until then.
            handle: Replay this layout (cached dispatch): ``topk_idx`` must be ``None``, and
                ``do_cpu_sync`` must not be True.
            do_cpu_sync: Exact output sizes (one host sync); ``None`` = True for a fresh
                dispatch, False for a cached one. Without it outputs have worst-case rows.
            do_expand: Produce the expanded per-expert layout (must match a cached handle).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, handle, event)``: ``recv_x`` ``[M, H]``
            (or ``(data, scales)``), ``recv_topk_idx`` ``[M, k]`` int64 local ids (``None``
            expanded), ``recv_topk_weights`` ``[M, k]`` (``[M_exp]`` expanded) float32 or
            ``None``, the :class:`~ep_core.handle.EPHandle`, and an :class:`EventOverlap`.

        Raises:
            ValueError, TypeError: Invalid input (named in the message).
        """
        if torch.compiler.is_compiling():
            return self._compiled_dispatch(
                x,
                topk_idx,
                topk_weights,
                cumulative_local_expert_recv_stats,
                num_experts,
                num_max_tokens_per_rank,
                expert_alignment,
                handle,
                do_cpu_sync,
                do_expand,
            )
        backend = self.backend
        stats = cumulative_local_expert_recv_stats
        # A call whose arguments look like the last accepted one's (same handle object, tensors
        # of the same shape, strides, dtype and device, same options) skips the checks; value
        # checks of a fresh topk_idx that run on the host are never skipped.
        memo_key: tuple | None = None
        if type(x) is torch.Tensor and stats is None:
            memo_key = (
                _signature(x),
                None if topk_idx is None else _signature(topk_idx),
                None if topk_weights is None else _signature(topk_weights),
                num_experts,
                num_max_tokens_per_rank,
                expert_alignment,
                num_sms,
                do_cpu_sync,
                do_expand,
            )
        memo = self._dispatch_memo if memo_key is not None else None
        if memo is not None and memo[0] is handle and memo[1] == memo_key:
            num_experts, nmax, alignment, sync, num_sms = memo[2]
            idx = topk_idx if handle is None else handle.topk_idx
            assert idx is not None  # the signature had one
            checked_x, checked_scales = cast(torch.Tensor, x), None
        else:
            checked = self._checked_dispatch(
                backend,
                x,
                topk_idx,
                topk_weights,
                stats,
                num_experts,
                num_max_tokens_per_rank,
                expert_alignment,
                num_sms,
                handle,
                do_cpu_sync,
                do_expand,
            )
            checked_x, checked_scales, idx, handle, derived, remember = checked
            num_experts, nmax, alignment, sync, num_sms = derived
            # A fresh dispatch whose ids are checked on the host (each call: they may change)
            # is not remembered.
            if memo_key is not None and remember:
                self._dispatch_memo = (handle, memo_key, derived)
        return self._run_dispatch(
            backend,
            checked_x,
            checked_scales,
            idx,
            topk_weights,
            stats,
            num_experts,
            nmax,
            alignment,
            do_expand,
            sync,
            handle,
            num_sms,
            previous_event,
            async_with_compute_stream,
        )

    def _run_dispatch(
        self,
        backend: Any,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        stats: torch.Tensor | None,
        num_experts: int,
        nmax: int,
        alignment: int,
        do_expand: bool,
        sync: bool,
        handle: EPHandle | None,
        num_sms: int,
        previous_event: EventHandle | None,
        async_with_compute_stream: bool,
    ) -> tuple[DispatchInput, torch.Tensor | None, torch.Tensor | None, EPHandle, EventOverlap]:
        """The checked dispatch on the backend, in the buffer's stream order."""

        def call() -> tuple:
            res = backend.dispatch(
                x,
                x_scales,
                idx,
                topk_weights,
                num_experts=num_experts,
                num_max_tokens_per_rank=nmax,
                expert_alignment=alignment,
                do_expand=do_expand,
                do_cpu_sync=sync,
                handle=handle,
                num_sms=num_sms,
            )
            if stats is not None:
                stats.add_(res.handle.num_unaligned_recv_tokens_per_expert)
            return (
                res.recv_x,
                res.recv_x_scales,
                res.recv_topk_idx,
                res.recv_topk_weights,
                res.handle,
            )

        result, event = self._call_order.run(
            self.device,
            call,
            (x, x_scales, idx, topk_weights, stats),
            # A cached dispatch returns its handle unchanged (its tensors were kept alive for
            # the caller's stream by the dispatch that made it): only the new rows.
            _new_outputs if handle is not None else _all_outputs,
            previous_event=previous_event,
            async_with_compute_stream=async_with_compute_stream,
        )
        recv_x, recv_scales, recv_idx, recv_w, out_handle = result
        recv: DispatchInput = recv_x if recv_scales is None else (recv_x, recv_scales)
        return recv, recv_idx, recv_w, out_handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        num_sms: int = 0,
        previous_event: EventHandle | None = None,
        async_with_compute_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Returns every received row to its source rank and sums it there (no weighting).

        ``out[t] = bf16(sum over destination ranks d (increasing) of float(x_d[row]) + bias0
        + bias1)`` in float32; expanded inputs are first reduced per rank over the token's local
        experts (increasing lane), rounded to bf16. Streams as in :meth:`dispatch`.

        Args:
            x: ``[M, H]`` bf16 (``[M_exp, H]`` for an expanded handle), the dispatch's row order.
            handle: The dispatch's :class:`~ep_core.handle.EPHandle`.
            topk_weights: ``[M, k]`` (``[M_exp]`` expanded) float32 to send back, or ``None``.
            bias: ``None``, a ``[T, H]`` bf16 tensor or a tuple of up to two.
            num_sms: SMs for kernel backends; 0 = the handle's.
            previous_event: As in :meth:`dispatch`.
            async_with_compute_stream: As in :meth:`dispatch`.

        Returns:
            ``(combined_x [T, H] bf16, combined_topk_weights [T, k] float32 or None, event)``;
            ``combined_topk_weights[t, j]`` is lane ``j``'s weight from the rank owning it.

        Raises:
            ValueError, TypeError: Invalid input (named in the message).
        """
        if torch.compiler.is_compiling():
            return self._compiled_combine(x, handle, topk_weights, bias)
        backend = self.backend
        # As in dispatch: a call like the last accepted one (same handle object, tensors of the
        # same shape, strides, dtype and device) skips the checks.
        memo_key: tuple | None = None
        if type(x) is torch.Tensor and (bias is None or type(bias) is torch.Tensor):
            memo_key = (
                _signature(x),
                None if topk_weights is None else _signature(topk_weights),
                None if bias is None else _signature(bias),
                num_sms,
            )
            memo = self._combine_memo
            if memo is not None and memo[0] is handle and memo[1] == memo_key:
                return self._run_combine(
                    backend,
                    x,
                    handle,
                    topk_weights,
                    () if bias is None else (bias,),
                    memo[2],
                    previous_event,
                    async_with_compute_stream,
                )
        try:
            handle = self._check_handle(handle)
            rows = handle.num_expanded_tokens if handle.do_expand else handle.num_recv_tokens
            x = check_combine_x(x, num_rows=rows, device=self.device)
            if topk_weights is not None:
                shape = (rows,) if handle.do_expand else (rows, handle.num_topk)
                check_tensor(
                    "topk_weights",
                    topk_weights,
                    dtypes=(torch.float32,),
                    shape=shape,
                    device=self.device,
                )
            biases = check_bias(
                bias, num_tokens=handle.num_tokens, hidden=x.shape[1], device=self.device
            )
            self._check_capacity(handle.num_max_tokens_per_rank, x.shape[1], handle.num_topk, False)
            num_sms = num_sms or handle.num_sms
            check_positive_int("num_sms", num_sms)
        except (ValueError, TypeError) as exc:
            self._reject(exc)
        if memo_key is not None:
            self._combine_memo = (handle, memo_key, num_sms)
        return self._run_combine(
            backend,
            x,
            handle,
            topk_weights,
            biases,
            num_sms,
            previous_event,
            async_with_compute_stream,
        )

    def _run_combine(
        self,
        backend: Any,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        biases: tuple[torch.Tensor, ...],
        num_sms: int,
        previous_event: EventHandle | None,
        async_with_compute_stream: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """The checked combine on the backend, in the buffer's stream order."""
        (combined, combined_w), event = self._call_order.run(
            self.device,
            lambda: backend.combine(x, handle, topk_weights, biases, num_sms),
            (x, topk_weights, biases, handle),
            lambda r: r,
            previous_event=previous_event,
            async_with_compute_stream=async_with_compute_stream,
        )
        return combined, combined_w, event
