"""The low-latency half of :class:`ep_elastic.compat.Buffer` (DeepEP V1's names and tuples).

``low_latency_dispatch`` / ``low_latency_combine`` forward to ``ElasticBuffer``'s V1-shaped pair;
this module adds V1's handle tuple, ``zero_copy`` through
``get_next_low_latency_combine_buffer``, ``clean_low_latency_buffer``, the receive-cost
statistics arguments and the rank-mask methods of ``enable_shrink``.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
import torch.distributed as dist

from ep_core.validation import check_num_experts, check_positive_int, check_tensor
from ep_elastic._compat_handle import LowLatencyDispatchHandle
from ep_elastic._low_latency import LowLatencyRecv, RecvHook
from ep_elastic.buffer import ElasticBuffer
from ep_elastic.event import EventHandle, EventOverlap

__all__ = ["LowLatencyCompatMixin", "merge_events", "unwrap_event"]

_LowLatencyDispatchReturn: TypeAlias = (
    "tuple[LowLatencyRecv, torch.Tensor, LowLatencyDispatchHandle, EventOverlap, RecvHook | None]"
)


def unwrap_event(previous_event: object) -> EventHandle | None:
    """V1 passes ``previous_event`` as an :class:`EventOverlap`; ElasticBuffer takes its handle."""
    if previous_event is None or isinstance(previous_event, EventHandle):
        return previous_event
    if isinstance(previous_event, EventOverlap):
        return previous_event.event
    raise TypeError(
        "previous_event must be an EventOverlap (e.g. Buffer.capture()) or an EventHandle, got "
        f"{type(previous_event).__name__}"
    )


def merge_events(first: EventOverlap, second: EventOverlap) -> EventOverlap:
    """``second``'s point, keeping alive the tensors both hold (``EP_AVOID_RECORD_STREAM``)."""
    extra = (first.extra_tensors or ()) + (second.extra_tensors or ())
    return EventOverlap(second.event, extra or None)


class LowLatencyCompatMixin:
    """V1's low-latency methods; the host class sets the attributes declared below."""

    elastic: ElasticBuffer
    group: dist.ProcessGroup
    group_size: int
    low_latency_mode: bool
    enable_shrink: bool

    def _init_low_latency(self) -> None:
        # V1 alternates two buffers: each low-latency dispatch or combine flips the index, and
        # get_next_low_latency_combine_buffer returns the one the next call uses.
        self._ll_index = 0
        self._ll_buffers: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def _require_low_latency(self, what: str) -> None:
        if not self.low_latency_mode:
            raise ValueError(f"{what} needs Buffer(low_latency_mode=True), as in DeepEP V1")

    def _check_cost_stats(self, name: str, stats: torch.Tensor | None) -> None:
        if stats is not None:
            shape = (self.group_size, self.group_size)
            device = self.elastic.device
            check_tensor(name, stats, dtypes=(torch.int64,), shape=shape, device=device)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """V1 zeroes its low-latency signal buffers here (needed after normal kernels).

        The low-latency calls here keep no state between calls, so nothing needs zeroing; this
        checks the arguments and, like V1, is a barrier of the group.
        """
        self._require_low_latency("clean_low_latency_buffer")
        check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        check_positive_int("hidden", hidden)
        check_num_experts(num_experts, self.group_size)
        self.elastic.barrier()

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> _LowLatencyDispatchReturn:
        """V1's low-latency dispatch: :meth:`ElasticBuffer.low_latency_dispatch` with V1's handle.

        Args:
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats, use_fp8, round_scale, use_ue8m0, async_finish,
            return_recv_hook: As ``ElasticBuffer.low_latency_dispatch``.
            dispatch_wait_recv_cost_stats: ``[R, R]`` int64 or ``None``; checked, left
                unchanged (no per-source wait time is measured here).

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``; ``handle`` is a
            :class:`~ep_elastic.compat.LowLatencyDispatchHandle` (V1's 5-tuple).
        """
        self._require_low_latency("low_latency_dispatch")
        self._check_cost_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        recv_x, count, handle, event, hook = self.elastic.low_latency_dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
        )
        self._ll_index ^= 1
        return recv_x, count, LowLatencyDispatchHandle(handle), event, hook

    def _check_ll_handle(self, handle: object) -> LowLatencyDispatchHandle:
        if not isinstance(handle, LowLatencyDispatchHandle):
            raise TypeError(
                "handle must be the handle returned by ep_elastic.compat.Buffer."
                f"low_latency_dispatch, got {type(handle).__name__}"
            )
        return handle

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyDispatchHandle) -> torch.Tensor:
        """The tensor the next :meth:`low_latency_combine` with ``zero_copy=True`` reads.

        Fill it with the expert outputs instead of passing them as ``x``.

        Returns:
            ``[El, R * Nmax, H]`` bf16, contiguous, on the buffer's device; one of two tensors
            that alternate as V1's buffers do (so at most two results are in flight).
        """
        elastic = self._check_ll_handle(handle).elastic
        key = (
            self._ll_index,
            elastic.num_local_experts,
            self.group_size * elastic.num_max_dispatch_tokens_per_rank,
            elastic.hidden,
        )
        buffer = self._ll_buffers.get(key)
        if buffer is None:
            buffer = torch.empty(key[1:], dtype=torch.bfloat16, device=self.elastic.device)
            self._ll_buffers[key] = buffer
        return buffer

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyDispatchHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, RecvHook | None]:
        """V1's low-latency combine (weighted): :meth:`ElasticBuffer.low_latency_combine`.

        Args:
            x: ``[El, R * Nmax, H]`` bf16 expert outputs; with ``zero_copy`` the data is read
                from :meth:`get_next_low_latency_combine_buffer` instead (``x`` is not read).
            topk_idx, topk_weights, async_finish, return_recv_hook, out: As
                ``ElasticBuffer.low_latency_combine``.
            handle: The :class:`~ep_elastic.compat.LowLatencyDispatchHandle` of the dispatch.
            use_logfmt: V1's 10-bit LogFMT transfer format: not supported (``ValueError``),
                as it would change the results.
            zero_copy: Take the data from the next combine buffer (see above).
            combine_wait_recv_cost_stats: ``[R, R]`` int64 or ``None``; checked, left unchanged.

        Returns:
            ``(combined_x [T, H] bf16, event, hook)``.
        """
        self._require_low_latency("low_latency_combine")
        elastic_handle = self._check_ll_handle(handle).elastic
        if use_logfmt:
            raise ValueError(
                "use_logfmt=True (DeepEP V1's lossy LogFMT combine) is not supported; "
                "pass use_logfmt=False"
            )
        self._check_cost_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
        data = self.get_next_low_latency_combine_buffer(handle) if zero_copy else x
        combined, event, hook = self.elastic.low_latency_combine(
            data,
            topk_idx,
            topk_weights,
            elastic_handle,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            out=out,
        )
        self._ll_index ^= 1
        return combined, event, hook

    # -- V1's rank mask (enable_shrink) -------------------------------------------------------

    def _require_shrink(self) -> None:
        if not self.enable_shrink:
            raise ValueError("the rank mask needs Buffer(enable_shrink=True), as in DeepEP V1")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks or unmasks a rank. No rank can be masked here: ``mask=True`` raises.

        Raises:
            ValueError: ``mask=True``, or ``rank_to_mask`` outside ``[0, R)``.
        """
        self._require_shrink()
        check_positive_int("rank_to_mask", rank_to_mask, minimum=0)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask {rank_to_mask} is not in [0, {self.group_size})")
        if mask:
            raise ValueError(
                "masking a rank is not supported: every rank of the group takes part in every "
                "call (mask=False is accepted)"
            )

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes each rank's mask status into ``mask_status`` (``[R]`` int32): all 0 here."""
        self._require_shrink()
        shape, device = (self.group_size,), self.elastic.device
        check_tensor("mask_status", mask_status, dtypes=(torch.int32,), shape=shape, device=device)
        mask_status.zero_()

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank (none can be masked here)."""
        self._require_shrink()
