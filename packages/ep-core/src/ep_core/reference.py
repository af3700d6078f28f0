"""``TorchBackend``: the reference backend, built only on ``torch.distributed`` collectives.

It runs anywhere ``torch.distributed`` does (gloo on CPU, NCCL on GPUs), defines the exact
semantics of ``docs/design.md`` and is the oracle the kernel backends are tested against. The
algorithms live in :mod:`ep_core.reference_ht` and :mod:`ep_core.reference_ll`; this class binds
them to a process group.
"""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist

from ep_core import reference_ht, reference_ll
from ep_core.backend import (
    BackendConfig,
    DispatchResult,
    LowLatencyDispatchResult,
    RecvHook,
    completed_recv_hook,
)
from ep_core.handle import EPHandle, LowLatencyHandle
from ep_core.signature import CallSignature, exchange_header
from ep_jit.rows import collective_timeout

__all__ = ["TorchBackend"]


class TorchBackend:
    """Reference implementation of :class:`ep_core.backend.EPBackend`.

    Every method runs its collectives on the caller's current stream (NCCL) or synchronously
    (gloo). Without CPU sync, and in the low-latency pair, nothing is read on the host.

    Args:
        group: The process group (its size is ``num_ranks``).
        rank: This process's rank in ``group``.
        num_ranks: Size of ``group``.

    Raises:
        ValueError: ``rank``/``num_ranks`` disagree with ``group``.
    """

    name = "torch"

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        num_ranks: int,
        timeout_s: float | None = None,
    ) -> None:
        if group.size() != num_ranks or group.rank() != rank:
            raise ValueError(
                f"rank {rank} / num_ranks {num_ranks} do not match the group "
                f"(rank {group.rank()} of {group.size()})"
            )
        self.group = group
        self.rank = rank
        self.num_ranks = num_ranks
        # Host waits of the collectives that block the host (gloo): a peer that never arrives
        # (it raised on its own input, or died) makes this rank raise instead of waiting.
        self.timeout_s = timeout_s
        # Numbers every collective call (aborted ones too); part of each call's signature.
        self._sequence = 0
        self._destroyed = False

    @classmethod
    def from_config(cls, group: dist.ProcessGroup, config: BackendConfig) -> TorchBackend:
        """Builds the backend from an ``ElasticBuffer``'s agreed configuration."""
        return cls(group, config.rank, config.num_ranks, config.num_cpu_timeout_secs)

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("TorchBackend was destroyed")

    def _bounded(self) -> contextlib.AbstractContextManager[None]:
        return collective_timeout(self.timeout_s)

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def abort_call(self, device: torch.device) -> None:
        """Takes part in the current call's header exchange as a rank that rejected its input.

        The peers receive an ``"abort"`` signature and raise ``ValueError`` naming this rank,
        instead of waiting for it; the caller then raises its own error.
        """
        self._check_alive()
        with self._bounded():
            exchange_header(
                self.group, self.rank, CallSignature.abort(self._next_sequence()), None, device
            )

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
        """See :meth:`ep_core.backend.EPBackend.dispatch` and :func:`reference_ht.dispatch`."""
        self._check_alive()
        cached = handle is not None
        signature = CallSignature(
            "cached dispatch" if cached else "dispatch",
            self._next_sequence(),
            num_experts=num_experts,
            hidden=x.shape[1],
            num_topk=topk_idx.shape[1],
            x_dtype=x.dtype,
            scales_dtype=None if x_scales is None else x_scales.dtype,
            scales_cols=0 if x_scales is None else x_scales.shape[1],
            topk_weights=topk_weights is not None,
            do_cpu_sync=(
                isinstance(handle.backend_state, reference_ht.ExactCounts)
                if handle is not None
                else do_cpu_sync
            ),
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            expert_alignment=expert_alignment,
            do_expand=do_expand,
        )
        with self._bounded():
            return reference_ht.dispatch(
                self.group,
                self.rank,
                self.num_ranks,
                x,
                x_scales,
                topk_idx,
                topk_weights,
                num_experts=num_experts,
                num_max_tokens_per_rank=num_max_tokens_per_rank,
                expert_alignment=expert_alignment,
                do_expand=do_expand,
                do_cpu_sync=do_cpu_sync,
                handle=handle,
                num_sms=num_sms,
                signature=signature,
            )

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        num_sms: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See :meth:`ep_core.backend.EPBackend.combine` and :func:`reference_ht.combine`."""
        self._check_alive()
        signature = CallSignature(
            "combine",
            self._next_sequence(),
            num_experts=handle.num_experts,
            hidden=x.shape[1],
            num_topk=handle.num_topk,
            x_dtype=x.dtype,
            topk_weights=topk_weights is not None,
            do_cpu_sync=isinstance(handle.backend_state, reference_ht.ExactCounts),
            num_max_tokens_per_rank=handle.num_max_tokens_per_rank,
            expert_alignment=handle.expert_alignment,
            do_expand=handle.do_expand,
            num_bias=len(bias),
        )
        with self._bounded():
            return reference_ht.combine(
                self.group,
                self.rank,
                self.num_ranks,
                x,
                handle,
                topk_weights,
                bias,
                num_sms,
                signature=signature,
            )

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
        """See :func:`ep_core.reference_ll.low_latency_dispatch`.

        The receive completes inside the call; with ``return_recv_hook`` the returned hook has
        nothing left to do.
        """
        self._check_alive()
        signature = CallSignature(
            "low_latency_dispatch",
            self._next_sequence(),
            num_experts=num_experts,
            hidden=x.shape[1],
            num_topk=topk_idx.shape[1],
            x_dtype=torch.float8_e4m3fn if use_fp8 else x.dtype,
            # The FP8 cast is local but sets the rows' layout: agreed like the dtypes.
            scales_dtype=(torch.int32 if use_ue8m0 else torch.float32) if use_fp8 else None,
            scales_cols=(-(-x.shape[1] // 512) if use_ue8m0 else x.shape[1] // 128)
            if use_fp8
            else 0,
            num_max_tokens_per_rank=num_max_dispatch_tokens_per_rank,
        )
        with self._bounded():
            result = reference_ll.low_latency_dispatch(
                self.group,
                self.rank,
                self.num_ranks,
                x,
                topk_idx,
                num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                num_experts=num_experts,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                signature=signature,
            )
        return result, completed_recv_hook if return_recv_hook else None

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        out: torch.Tensor | None,
        return_recv_hook: bool = False,
    ) -> tuple[torch.Tensor, RecvHook | None]:
        """See :func:`ep_core.reference_ll.low_latency_combine`; hooks as in the dispatch."""
        self._check_alive()
        signature = CallSignature(
            "low_latency_combine",
            self._next_sequence(),
            num_experts=handle.num_experts,
            hidden=x.shape[2],
            num_topk=handle.num_topk,
            x_dtype=x.dtype,
            topk_weights=True,
            num_max_tokens_per_rank=handle.num_max_dispatch_tokens_per_rank,
        )
        with self._bounded():
            combined = reference_ll.low_latency_combine(
                self.group,
                self.rank,
                self.num_ranks,
                x,
                topk_idx,
                topk_weights,
                handle,
                out,
                signature=signature,
            )
        return combined, completed_recv_hook if return_recv_hook else None

    def barrier(self) -> None:
        """Blocks until every rank of the group arrives (on gloo within ``timeout_s``)."""
        self._check_alive()
        if self.timeout_s and self.timeout_s > 0 and str(dist.get_backend(self.group)) == "gloo":
            dist.monitored_barrier(
                group=self.group, timeout=datetime.timedelta(seconds=self.timeout_s)
            )
        else:
            dist.barrier(group=self.group)

    def destroy(self) -> None:
        """Marks the backend destroyed (it owns no memory); idempotent."""
        self._destroyed = True
