"""Differentiable dispatch and combine for training.

Dispatch copies each token to ranks, so its backward is a combine with the same handle
(gradients of the copies are summed on the source; gradients of ``recv_topk_weights`` come back
as ``combined_topk_weights``). Combine sums rows, so its backward is a cached dispatch of the
output gradient with the same handle (the ``combined_topk_weights`` gradient travels as the
dispatched weights). Only BF16 dispatch is differentiable. Rows a dispatch without CPU sync
leaves unspecified get zero gradients. Under ``torch.compile`` both functions are the compiled
calls of :class:`ElasticBuffer` (custom ops registered with the same backward rules).
"""

from __future__ import annotations

from typing import Any

import torch

from ep_core.handle import EPHandle
from ep_elastic.buffer import ElasticBuffer

__all__ = ["combine_fn", "dispatch_fn", "valid_rows"]


def valid_rows(handle: EPHandle) -> torch.Tensor:
    """``[M]`` (``[M_exp]`` expanded) bool: rows of the dispatch output the contract defines.

    Padding rows of the expanded layout count as invalid too. Only the handle's defined parts
    are read (the psum and the metadata of valid rows). No host sync.
    """
    metadata = handle.recv_src_metadata
    received = torch.arange(metadata.shape[0], device=metadata.device)
    received = received < handle.psum_num_recv_tokens_per_rank[-1]
    if not handle.do_expand:
        return received
    rows = handle.num_expanded_tokens
    lanes = torch.where(received[:, None], metadata[:, 2:].to(torch.int64), -1).reshape(-1)
    mask = torch.zeros(rows + 1, dtype=torch.bool, device=metadata.device)
    mask[torch.where(lanes >= 0, lanes, rows)] = True
    return mask[:rows]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        buffer: ElasticBuffer,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None,
        topk_idx: torch.Tensor,
        options: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, EPHandle]:
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, **options
        )
        assert isinstance(recv_x, torch.Tensor)  # BF16 input (checked by dispatch_fn)
        ctx.buffer, ctx.handle, ctx.hidden = buffer, handle, recv_x.shape[1]
        if recv_idx is not None:
            ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, handle

    @staticmethod
    def backward(
        ctx: Any, grad_x: torch.Tensor | None, _idx: Any, grad_w: torch.Tensor | None, _h: Any
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None, None]:
        handle: EPHandle = ctx.handle
        rows = handle.num_expanded_tokens if handle.do_expand else handle.num_recv_tokens
        device = handle.recv_src_metadata.device
        if grad_x is None:
            grad_x = torch.zeros(rows, ctx.hidden, dtype=torch.bfloat16, device=device)
        weights = None
        if ctx.needs_input_grad[2]:
            shape = (rows,) if handle.do_expand else (rows, handle.num_topk)
            weights = (
                torch.zeros(shape, device=device) if grad_w is None else grad_w.float().contiguous()
            )
        grad_in, grad_weights, _ = ctx.buffer.combine(
            grad_x.to(torch.bfloat16).contiguous(), handle, topk_weights=weights
        )
        return None, grad_in if ctx.needs_input_grad[1] else None, grad_weights, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        buffer: ElasticBuffer,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None,
        handle: EPHandle,
        num_sms: int,
        *bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        combined, combined_w, _ = buffer.combine(
            x, handle, topk_weights=topk_weights, bias=tuple(bias) or None, num_sms=num_sms
        )
        ctx.buffer, ctx.handle, ctx.num_sms, ctx.num_bias = buffer, handle, num_sms, len(bias)
        ctx.hidden = x.shape[1]
        return combined, combined_w

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor | None, grad_w: torch.Tensor | None
    ) -> tuple[Any, ...]:
        handle: EPHandle = ctx.handle
        device = handle.recv_src_metadata.device
        if grad_out is None:
            grad_out = torch.zeros(
                handle.num_tokens, ctx.hidden, dtype=torch.bfloat16, device=device
            )
        grad_out = grad_out.to(torch.bfloat16).contiguous()
        weights = None
        if ctx.needs_input_grad[2]:
            shape = (handle.num_tokens, handle.num_topk)
            weights = (
                torch.zeros(shape, device=device) if grad_w is None else grad_w.float().contiguous()
            )
        grad_x, _, grad_weights, _, _ = ctx.buffer.dispatch(
            grad_out,
            topk_weights=weights,
            handle=handle,
            do_expand=handle.do_expand,
            num_sms=ctx.num_sms,
        )
        if not handle.do_cpu_sync:
            keep = valid_rows(handle)
            grad_x = torch.where(keep[:, None], grad_x, 0)
            if grad_weights is not None:
                grad_weights = torch.where(
                    keep if handle.do_expand else keep[:, None], grad_weights, 0.0
                )
        grad_bias = tuple(grad_out for _ in range(ctx.num_bias))
        return (None, grad_x, grad_weights, None, None, *grad_bias)


def dispatch_fn(
    buffer: ElasticBuffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    num_experts: int,
    num_max_tokens_per_rank: int | None = None,
    expert_alignment: int | None = None,
    do_expand: bool = False,
    do_cpu_sync: bool | None = None,
    num_sms: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, EPHandle]:
    """Differentiable :meth:`ElasticBuffer.dispatch` (BF16, fresh layout).

    Args:
        buffer: The buffer.
        x: ``[T, H]`` bf16 (may require grad).
        topk_idx: ``[T, k]`` int64.
        topk_weights: ``[T, k]`` float32 (may require grad) or ``None``.
        num_experts, num_max_tokens_per_rank, expert_alignment, do_expand, do_cpu_sync, num_sms:
            As in :meth:`ElasticBuffer.dispatch`.

    Returns:
        ``(recv_x, recv_topk_idx, recv_topk_weights, handle)`` as in
        :meth:`ElasticBuffer.dispatch`; ``recv_x`` and ``recv_topk_weights`` carry gradients.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"dispatch_fn differentiates BF16 dispatch only; got {type(x).__name__} "
            "(FP8 (data, scales) tuples have no gradient)"
        )
    if torch.compiler.is_compiling():
        # The compiled call is a custom op with its own autograd (ep_elastic._compiled).
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            expert_alignment=expert_alignment,
            do_cpu_sync=do_cpu_sync,
            do_expand=do_expand,
        )
        return recv_x, recv_idx, recv_w, handle  # type: ignore[return-value]
    options = {
        "num_experts": num_experts,
        "num_max_tokens_per_rank": num_max_tokens_per_rank,
        "expert_alignment": expert_alignment,
        "do_expand": do_expand,
        "do_cpu_sync": do_cpu_sync,
        "num_sms": num_sms,
    }
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, EPHandle]
    out = _Dispatch.apply(buffer, x, topk_weights, topk_idx, options)
    return out


def combine_fn(
    buffer: ElasticBuffer,
    x: torch.Tensor,
    handle: EPHandle,
    topk_weights: torch.Tensor | None = None,
    bias: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    num_sms: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable :meth:`ElasticBuffer.combine`.

    Args:
        buffer: The buffer.
        x: ``[M, H]`` (``[M_exp, H]`` expanded) bf16 (may require grad).
        handle: The dispatch's handle.
        topk_weights: ``[M, k]`` (``[M_exp]``) float32 (may require grad) or ``None``.
        bias: ``None``, a ``[T, H]`` bf16 tensor or a tuple of up to two (may require grad).
        num_sms: As in :meth:`ElasticBuffer.combine`.

    Returns:
        ``(combined_x [T, H] bf16, combined_topk_weights [T, k] float32 or None)``.
    """
    if torch.compiler.is_compiling():
        # The compiled call is a custom op with its own autograd (ep_elastic._compiled).
        combined, combined_w, _ = buffer.combine(x, handle, topk_weights, bias, num_sms)
        return combined, combined_w
    biases = () if bias is None else ((bias,) if isinstance(bias, torch.Tensor) else tuple(bias))
    out: tuple[torch.Tensor, torch.Tensor | None]
    out = _Combine.apply(buffer, x, topk_weights, handle, num_sms, *biases)
    return out
