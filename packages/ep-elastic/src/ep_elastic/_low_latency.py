"""Low-latency ``low_latency_dispatch``/``low_latency_combine`` (DeepEP's legacy layout)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import torch

from ep_core.backend import RecvHook, completed_recv_hook
from ep_core.handle import LowLatencyHandle
from ep_core.validation import (
    check_hidden,
    check_low_latency_shape,
    check_num_experts,
    check_positive_int,
    check_tensor,
    check_topk_idx,
)
from ep_elastic._base import BufferBase
from ep_elastic._compiled import (
    CompiledLowLatencyHandle,
    low_latency_combine_op,
    low_latency_dispatch_op,
)
from ep_elastic.event import EventOverlap, run_on_comm_stream

__all__ = ["LowLatencyMixin", "RecvHook"]

LowLatencyRecv: TypeAlias = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"

_completed_hook = completed_recv_hook


def _once(what: str, hook: RecvHook, then: Callable[[], None] | None = None) -> RecvHook:
    """``hook`` (then ``then``) callable exactly once; a second call raises ``RuntimeError``."""
    called = False

    def recv_hook() -> None:
        nonlocal called
        if called:
            raise RuntimeError(f"the receive hook of this {what} was already called")
        called = True
        hook()
        if then is not None:
            then()

    return recv_hook


def _check_hook_args(async_finish: bool, return_recv_hook: bool) -> None:
    if async_finish and return_recv_hook:
        raise ValueError(
            "async_finish=True and return_recv_hook=True cannot be combined (as in DeepEP): with "
            "a hook the send and the hook's receive run on the current stream"
        )


class LowLatencyMixin(BufferBase):
    """The legacy low-latency pair on top of :class:`~ep_elastic._base.BufferBase`.

    Receive hooks (DeepEP's semantics): with ``return_recv_hook=True`` the call launches only
    the send on the *current* stream (not the comm stream) and returns; the outputs are valid
    only after ``hook()``, which launches the receive on the stream current when it is called
    (call it on the same stream, or one ordered after it). The NVLink backend really defers the
    receive (compute can run between the call and the hook); the reference backend completes
    the transfer inside the call and its hook only finishes the bookkeeping. At most two ops
    (dispatches and combines together) may wait for their hook. ``async_finish`` cannot be
    combined with a hook.
    """

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[LowLatencyRecv, torch.Tensor, LowLatencyHandle, EventOverlap, RecvHook | None]:
        """Sends each token to the ranks of its experts, packed per local expert.

        Layout (``L = R * Nmax``): ``recv_x [El, L, H]``; expert ``e``'s rows are packed by
        source rank, then source token, ``recv_count[e]`` of them valid (the rest unspecified).
        FP8 is cast per token and 128 channels (``ep_core.fp8``). Nothing is read on the host.

        Args:
            x: ``[T, H]`` bf16, ``T <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[T, k]`` int64, ``-1`` = none.
            num_max_dispatch_tokens_per_rank: ``Nmax`` of the low-latency layout (same on all
                ranks).
            num_experts: ``E``.
            cumulative_local_expert_recv_stats: ``[El]`` int32; ``recv_count`` is added to it.
            use_fp8: Send e4m3 data with per-128-channel scales.
            round_scale: Power-of-two scales.
            use_ue8m0: int32 UE8M0 scale packs (requires ``round_scale``).
            async_finish: Return an event recorded on the comm stream instead of waiting (not
                with ``return_recv_hook``).
            return_recv_hook: Launch only the send, on the current stream, and return a hook
                that launches the receive on the stream current when it is called (once); the
                outputs (and ``cumulative_local_expert_recv_stats``) are valid only after it.
                ``False``: the hook returned is ``None``.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``[El, L, H]`` bf16, or
            with FP8 ``(data [El, L, H] e4m3, scales)``, scales ``[El, L, H/128]`` float32 or
            ``[El, L, ceil(H/512)]`` int32, column-major in the last two dims; ``recv_count``
            ``[El]`` int32 on the device.
        """
        if torch.compiler.is_compiling():
            if use_fp8 or cumulative_local_expert_recv_stats is not None:
                raise ValueError(
                    "under torch.compile low_latency_dispatch takes use_fp8=False and no "
                    "cumulative_local_expert_recv_stats"
                )
            recv_x, count = low_latency_dispatch_op(
                x, topk_idx, self._op_key, num_max_dispatch_tokens_per_rank, num_experts
            )
            compiled = CompiledLowLatencyHandle(recv_x, x.shape[0])
            hook = _completed_hook if return_recv_hook else None
            return recv_x, count, compiled, EventOverlap(), hook  # type: ignore[return-value]
        backend = self.backend
        try:
            nmax = check_positive_int(
                "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank
            )
            check_num_experts(num_experts, self.num_ranks)
            if use_ue8m0 and not round_scale:
                raise ValueError(
                    "use_ue8m0=True requires round_scale=True (UE8M0 holds powers of two)"
                )
            if (round_scale or use_ue8m0) and not use_fp8:
                raise ValueError("round_scale/use_ue8m0 apply to FP8 only (use_fp8=False given)")
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise ValueError(
                    f"x must be a [T, H] tensor, got {getattr(x, 'shape', type(x).__name__)}"
                )
            num_tokens, hidden = x.shape
            x = check_tensor(
                "x", x, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden), device=self.device
            )
            check_hidden(hidden, fp8=use_fp8, name="hidden size of x")
            if num_tokens > nmax:
                raise ValueError(
                    f"x has {num_tokens} tokens, more than "
                    f"num_max_dispatch_tokens_per_rank = {nmax}"
                )
            check_topk_idx(
                topk_idx, num_tokens=num_tokens, num_experts=num_experts, device=self.device
            )
            check_low_latency_shape(
                self.num_ranks, nmax, hidden, num_experts, int(topk_idx.shape[1])
            )
            stats = cumulative_local_expert_recv_stats
            self._check_recv_stats(stats, num_experts)
            self._check_low_latency_capacity(nmax, hidden, num_experts, int(topk_idx.shape[1]))
            _check_hook_args(async_finish, return_recv_hook)
        except (ValueError, TypeError) as exc:
            self._reject(exc)

        def send() -> tuple:
            return backend.low_latency_dispatch(
                x,
                topk_idx,
                num_max_dispatch_tokens_per_rank=nmax,
                num_experts=num_experts,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                return_recv_hook=return_recv_hook,
            )

        if return_recv_hook:
            # DeepEP: the send runs on the current stream and the hook's receive on the stream
            # current when it is called; nothing waits for the comm stream.
            res, backend_hook = send()
            count = res.recv_count
            then = None
            if stats is not None:
                cumulative = stats

                def then() -> None:
                    cumulative.add_(count)

            hook = _once("low_latency_dispatch", backend_hook or _completed_hook, then)
            recv_hooked: LowLatencyRecv = (
                res.recv_x if res.recv_x_scales is None else (res.recv_x, res.recv_x_scales)
            )
            return recv_hooked, count, res.handle, EventOverlap(), hook

        def call() -> tuple:
            res, _ = send()
            if stats is not None:
                stats.add_(res.recv_count)
            return res.recv_x, res.recv_x_scales, res.recv_count, res.handle

        (recv_x, scales, count, handle), event = run_on_comm_stream(
            self.device,
            call,
            (x, topk_idx, stats),
            lambda r: r,
            previous_event=None,
            async_with_compute_stream=async_finish,
        )
        recv: LowLatencyRecv = recv_x if scales is None else (recv_x, scales)
        return recv, count, handle, event, None

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, RecvHook | None]:
        """Weighted reduction of expert outputs back on the source ranks.

        On each rank ``d``, ``p_d(t) = bf16(sum over t's lanes j on d, increasing j, of
        w[t, j] * float(y))`` (separate multiply and add); the source sums the ``p_d`` over ``d``
        increasing in float32 and rounds to bf16. A token with no valid lane gives 0.

        Args:
            x: ``[El, R * Nmax, H]`` bf16 in the dispatch's packed layout.
            topk_idx: ``[T, k]`` int64, the dispatch's (lanes set to ``-1`` are skipped).
            topk_weights: ``[T, k]`` float32.
            handle: The :class:`~ep_core.handle.LowLatencyHandle` of the dispatch.
            async_finish: Return an event recorded on the comm stream instead of waiting (not
                with ``return_recv_hook``).
            return_recv_hook: Launch only the send, on the current stream, and return a hook
                that launches the receive (the reduction) on the stream current when it is
                called (once); ``combined_x`` is valid only after it. ``False``: hook ``None``.
            out: Optional ``[T, H]`` bf16 contiguous destination.

        Returns:
            ``(combined_x [T, H] bf16, event, hook)``.
        """
        if torch.compiler.is_compiling():
            if not isinstance(handle, CompiledLowLatencyHandle) or out is not None:
                raise ValueError(
                    "under torch.compile low_latency_combine takes the handle of a compiled "
                    "low_latency_dispatch and no out="
                )
            combined = low_latency_combine_op(
                x, topk_idx, topk_weights, handle.recv_x, self._op_key
            )
            return combined, EventOverlap(), _completed_hook if return_recv_hook else None
        backend = self.backend
        try:
            if not isinstance(handle, LowLatencyHandle):
                raise TypeError(f"handle must be a LowLatencyHandle, got {type(handle).__name__}")
            if handle.rank != self.rank_idx or handle.num_ranks != self.num_ranks:
                raise ValueError(f"handle was made by rank {handle.rank} of {handle.num_ranks}")
            slots = self.num_ranks * handle.num_max_dispatch_tokens_per_rank
            shape = (handle.num_local_experts, slots, handle.hidden)
            x = check_tensor("x", x, dtypes=(torch.bfloat16,), shape=shape, device=self.device)
            num_tokens = topk_idx.shape[0] if isinstance(topk_idx, torch.Tensor) else -1
            idx_shape = (num_tokens, handle.num_topk)
            check_tensor(
                "topk_idx", topk_idx, dtypes=(torch.int64,), shape=idx_shape, device=self.device
            )
            check_topk_idx(
                topk_idx, num_tokens=num_tokens, num_experts=handle.num_experts, device=self.device
            )
            check_tensor(
                "topk_weights",
                topk_weights,
                dtypes=(torch.float32,),
                shape=idx_shape,
                device=self.device,
            )
            if out is not None:
                check_tensor(
                    "out",
                    out,
                    dtypes=(torch.bfloat16,),
                    shape=(num_tokens, handle.hidden),
                    device=self.device,
                )
            _check_hook_args(async_finish, return_recv_hook)
        except (ValueError, TypeError) as exc:
            self._reject(exc)
        if return_recv_hook:
            combined, backend_hook = backend.low_latency_combine(
                x, topk_idx, topk_weights, handle, out, return_recv_hook=True
            )
            hook = _once("low_latency_combine", backend_hook or _completed_hook)
            return combined, EventOverlap(), hook
        (combined, _), event = run_on_comm_stream(
            self.device,
            lambda: backend.low_latency_combine(x, topk_idx, topk_weights, handle, out),
            (x, topk_idx, topk_weights, out, handle),
            lambda r: (r[0],),
            previous_event=None,
            async_with_compute_stream=async_finish,
        )
        return combined, event, None
