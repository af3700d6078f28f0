"""The backend protocol every dispatch/combine implementation follows (``docs/design.md``).

``ElasticBuffer`` validates user input, manages streams, events and autograd, and calls one
backend object. Every backend method runs on the caller's *current* CUDA stream (or
synchronously on CPU) and takes already-validated, contiguous tensors. Shapes use ``R`` ranks,
``E`` experts, ``El = E // R``, ``T`` tokens on this rank, ``Nmax``, ``k``, ``H`` and ``P`` scale
columns; ``M``/``M_exp`` are the non-expanded/expanded received rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ep_core.handle import EPHandle, LowLatencyHandle

__all__ = [
    "BackendConfig",
    "DispatchResult",
    "EPBackend",
    "LowLatencyDispatchResult",
    "RecvHook",
    "completed_recv_hook",
]

RecvHook = Callable[[], None]
"""Launches the receive half of a low-latency op on the current stream (call it exactly once)."""


def completed_recv_hook() -> None:
    """The hook of a backend that completed the receive inside the call: nothing is left to do."""


@dataclass(frozen=True)
class BackendConfig:
    """What a backend is built with (the agreed configuration of an ``ElasticBuffer``).

    Attributes:
        rank: This rank.
        num_ranks: ``R``.
        device: Device of every tensor the backend sees.
        num_bytes: Bytes of communication buffer the backend may allocate (kernel backends).
        num_max_tokens_per_rank: Default ``Nmax`` of dispatch.
        hidden: Largest hidden size the buffer is sized for (0 = given by ``num_bytes``).
        num_topk: Largest ``k`` the buffer is sized for (0 = sized for 32).
        use_fp8_dispatch: The buffer is sized for FP8 dispatch.
        num_cpu_timeout_secs: Limit of host waits before an exception.
        num_gpu_timeout_secs: Limit of device spin waits before a diagnostic trap.
        low_latency_mode: The low-latency pair is wanted: a kernel backend builds everything it
            needs (buffer, kernels for ``hidden``/``num_topk``) at construction, and a later
            low-latency call beyond the limits below is a ``ValueError``.
        num_max_dispatch_tokens_per_rank: Largest low-latency ``Nmax`` (with ``low_latency_mode``).
        num_experts: Largest ``E`` of the low-latency pair (with ``low_latency_mode``).
    """

    rank: int
    num_ranks: int
    device: torch.device
    num_bytes: int
    num_max_tokens_per_rank: int
    hidden: int
    num_topk: int
    use_fp8_dispatch: bool
    num_cpu_timeout_secs: float
    num_gpu_timeout_secs: float
    low_latency_mode: bool = False
    num_max_dispatch_tokens_per_rank: int = 0
    num_experts: int = 0


@dataclass
class DispatchResult:
    """Outputs of :meth:`EPBackend.dispatch`, on the backend's device.

    Attributes:
        recv_x: ``[M, H]`` (``[M_exp, H]`` expanded), dtype of the input (bf16 or e4m3).
        recv_x_scales: ``[M, P]`` (``[M_exp, P]``) 4-byte scales for FP8, else ``None``.
        recv_topk_idx: ``[M, k]`` int64 local expert ids or ``-1``; ``None`` when expanded.
        recv_topk_weights: ``[M, k]`` float32 (``[M_exp]`` expanded) or ``None`` without weights.
        handle: The layout (the passed handle itself for a cached dispatch).
    """

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    handle: EPHandle


@dataclass
class LowLatencyDispatchResult:
    """Outputs of :meth:`EPBackend.low_latency_dispatch` (legacy layout, ``L = R * Nmax``).

    Attributes:
        recv_x: ``[El, L, H]`` bf16 or float8_e4m3fn; rows past ``recv_count[e]`` unspecified.
        recv_x_scales: FP8 only: ``[El, L, H/128]`` float32 or ``[El, L, ceil(H/512)]`` int32,
            column-major in the last two dims (stride 1 along tokens); else ``None``.
        recv_count: ``[El]`` int32 rows received per local expert, on the device.
        handle: The layout for :meth:`EPBackend.low_latency_combine`.
    """

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_count: torch.Tensor
    handle: LowLatencyHandle


@runtime_checkable
class EPBackend(Protocol):
    """One implementation of dispatch/combine (see ``docs/design.md`` for exact semantics)."""

    name: str

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        *,
        num_experts: int,
        num_max_tokens_per_rank: int,
        expert_alignment: int,
        do_expand: bool,
        do_cpu_sync: bool,
        handle: EPHandle | None,
        num_sms: int,
    ) -> DispatchResult:
        """Sends each token once to every rank owning one of its experts.

        Args:
            x: ``[T, H]`` bf16 or float8_e4m3fn.
            x_scales: ``[T, P]`` float32/int32 for FP8, else ``None``.
            topk_idx: ``[T, k]`` int64 global expert ids, ``-1`` = none (``handle.topk_idx``
                for a cached dispatch).
            topk_weights: ``[T, k]`` float32 or ``None``.
            num_experts: ``E``.
            num_max_tokens_per_rank: ``Nmax``.
            expert_alignment: ``A``.
            do_expand: Produce the expanded layout.
            do_cpu_sync: Exact output sizes (host sync) instead of worst case.
            handle: A previous handle to replay (cached dispatch) or ``None``.
            num_sms: SMs to use (kernel backends).
        """
        ...

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        num_sms: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns each received row to its source and sums there.

        Args:
            x: ``[M, H]`` (``[M_exp, H]`` expanded) bf16.
            handle: The dispatch's handle.
            topk_weights: ``[M, k]`` (``[M_exp]`` expanded) float32 or ``None``.
            bias: 0, 1 or 2 tensors ``[T, H]`` bf16.
            num_sms: SMs to use (kernel backends).

        Returns:
            ``(combined_x [T, H] bf16, combined_topk_weights [T, k] float32 or None)``.
        """
        ...

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        *,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        return_recv_hook: bool = False,
    ) -> tuple[LowLatencyDispatchResult, RecvHook | None]:
        """Legacy low-latency dispatch of ``x [T, H]`` bf16 by ``topk_idx [T, k]`` int64.

        Runs on the current stream. With ``return_recv_hook=False`` it returns ``(result, None)``
        and the outputs are complete in stream order. With ``True`` a backend may launch only the
        send half and return a hook that launches the receive on the stream current when it is
        called: the outputs are valid only after the hook, in that stream's order. A backend that
        completes the receive inside the call returns :func:`completed_recv_hook`.
        """
        ...

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        out: torch.Tensor | None,
        return_recv_hook: bool = False,
    ) -> tuple[torch.Tensor, RecvHook | None]:
        """Weighted legacy combine of ``x [El, R*Nmax, H]`` bf16 into ``[T, H]`` bf16.

        Returns ``(combined, hook or None)``; ``return_recv_hook`` as in
        :meth:`low_latency_dispatch`.
        """
        ...

    def destroy(self) -> None:
        """Releases the backend's resources; further calls are errors."""
        ...
