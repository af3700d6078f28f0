"""``ElasticBuffer`` under ``torch.compile``: its collective calls as custom ops.

Inside a compiled region (``torch.compiler.is_compiling()``) the buffer's methods call the ops
below instead of running their Python body. Each op is opaque to the compiler: its real
implementation is the eager method (every value check included, outside the traced graph), and
its fake implementation gives the output shapes without running anything: the worst case
(``R * Nmax`` received rows; no CPU sync under compile) or the token count of the dispatch.

Ops take tensors and plain values only, so the buffer is named by a process-local key and a
dispatch's handle travels with its received rows: the handle is stored under the address of the
``recv_x`` the op returned, and combine takes that ``recv_x`` as an input (which also orders it
after the dispatch). The entry is dropped when that ``recv_x`` is freed.

Autograd: dispatch's backward is a combine of the gradient with the same handle, combine's is a
cached dispatch of the gradient (as :mod:`ep_elastic.autograd`); the low-latency pair is not
differentiable.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

if TYPE_CHECKING:
    from ep_elastic.buffer import ElasticBuffer

__all__ = ["CompiledHandle", "CompiledLowLatencyHandle", "register_buffer"]

_keys = itertools.count(1)
_BUFFERS: dict[int, weakref.ref[Any]] = {}
_HANDLES: dict[tuple[int, int], tuple[Any, object]] = {}


class CompiledHandle(NamedTuple):
    """The handle a dispatch returns inside a compiled region.

    Attributes:
        recv_x: The dispatch's ``[R * Nmax, H]`` output (carries the layout to combine).
        num_tokens: ``T`` of the dispatch.
        num_topk: ``k``.
    """

    recv_x: torch.Tensor
    num_tokens: int
    num_topk: int


class CompiledLowLatencyHandle(NamedTuple):
    """The handle a low-latency dispatch returns inside a compiled region.

    Attributes:
        recv_x: The dispatch's ``[El, R * Nmax, H]`` output (carries the layout to combine).
        num_tokens: ``T`` of the dispatch.
    """

    recv_x: torch.Tensor
    num_tokens: int


def register_buffer(buffer: object) -> int:
    """A key naming ``buffer`` in the ops (weakly held; dropped with the buffer)."""
    key = next(_keys)
    _BUFFERS[key] = weakref.ref(buffer, lambda _: _BUFFERS.pop(key, None))
    return key


def _buffer(key: int) -> ElasticBuffer:
    ref = _BUFFERS.get(key)
    buffer = None if ref is None else ref()
    if buffer is None:
        raise RuntimeError(f"the ElasticBuffer of this compiled call (key {key}) no longer exists")
    return cast("ElasticBuffer", buffer)


def _keep(key: int, recv_x: torch.Tensor, handle: Any) -> None:
    slot = (key, recv_x.data_ptr())
    # A backend may return its outputs in place of an earlier call's (the same address): the
    # newer handle replaces the older one, and the older tensor's end must not drop it.
    token = object()
    _HANDLES[slot] = (handle, token)
    weakref.finalize(recv_x, _drop, slot, token)


def _drop(slot: tuple[int, int], token: object) -> None:
    entry = _HANDLES.get(slot)
    if entry is not None and entry[1] is token:
        del _HANDLES[slot]


def _handle(key: int, recv_x: torch.Tensor) -> Any:
    entry = _HANDLES.get((key, recv_x.data_ptr()))
    if entry is None:
        raise ValueError("combine's handle must be the one the compiled dispatch returned")
    return entry[0]


def _rows(key: int, nmax: int) -> int:
    return int(_buffer(key).num_ranks) * nmax


# ---- high-throughput ---------------------------------------------------------------------------


@torch.library.custom_op("ep_elastic::dispatch", mutates_args=())
def dispatch_op(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    key: int,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh dispatch without CPU sync; ``(recv_x, recv_topk_idx, recv_topk_weights)``.

    ``recv_topk_weights`` is ``[0]`` when no weights were given.
    """
    buffer = _buffer(key)
    recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(
        x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        num_experts=num_experts,
        num_max_tokens_per_rank=num_max_tokens_per_rank,
        expert_alignment=expert_alignment,
        do_cpu_sync=False,
    )
    assert isinstance(recv_x, torch.Tensor) and recv_idx is not None  # BF16, not expanded
    _keep(key, recv_x, handle)
    if recv_w is None:
        recv_w = torch.empty(0, dtype=torch.float32, device=x.device)
    return recv_x, recv_idx, recv_w


@dispatch_op.register_fake
def _(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    key: int,
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, k = _rows(key, num_max_tokens_per_rank), topk_idx.shape[1]
    recv_w = (
        x.new_empty((0,), dtype=torch.float32)
        if topk_weights is None
        else x.new_empty((rows, k), dtype=torch.float32)
    )
    return x.new_empty((rows, x.shape[1])), topk_idx.new_empty((rows, k)), recv_w


@torch.library.custom_op("ep_elastic::combine", mutates_args=())
def combine_op(x: torch.Tensor, recv_x: torch.Tensor, key: int, num_tokens: int) -> torch.Tensor:
    """Combine of ``x`` with the handle of the dispatch that returned ``recv_x``; ``[T, H]``."""
    combined, _, _ = _buffer(key).combine(x, _handle(key, recv_x))
    return combined


@combine_op.register_fake
def _(x: torch.Tensor, recv_x: torch.Tensor, key: int, num_tokens: int) -> torch.Tensor:
    return x.new_empty((num_tokens, x.shape[1]))


@torch.library.custom_op("ep_elastic::cached_dispatch", mutates_args=())
def cached_dispatch_op(x: torch.Tensor, recv_x: torch.Tensor, key: int) -> torch.Tensor:
    """Cached dispatch of ``x`` with the handle of the dispatch that returned ``recv_x``."""
    out, _, _, _, _ = _buffer(key).dispatch(x, handle=_handle(key, recv_x))
    assert isinstance(out, torch.Tensor)  # BF16 in, BF16 out
    return out


@cached_dispatch_op.register_fake
def _(x: torch.Tensor, recv_x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((recv_x.shape[0], x.shape[1]))


def _dispatch_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.key = inputs[3]
    ctx.num_tokens = inputs[0].shape[0]
    ctx.save_for_backward(output[0])


def _dispatch_backward(
    ctx: Any, grad_x: torch.Tensor, grad_idx: torch.Tensor | None, grad_w: torch.Tensor | None
) -> tuple[Any, ...]:
    (recv_x,) = ctx.saved_tensors
    grad = combine_op(grad_x.contiguous(), recv_x, ctx.key, ctx.num_tokens)
    return grad, None, None, None, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.key = inputs[2]
    ctx.save_for_backward(inputs[1])


def _combine_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (recv_x,) = ctx.saved_tensors
    return cached_dispatch_op(grad.contiguous(), recv_x, ctx.key), None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- low-latency -------------------------------------------------------------------------------


@torch.library.custom_op("ep_elastic::low_latency_dispatch", mutates_args=())
def low_latency_dispatch_op(
    x: torch.Tensor, topk_idx: torch.Tensor, key: int, nmax: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 low-latency dispatch; ``(recv_x [El, R * Nmax, H], recv_count [El])``."""
    buffer = _buffer(key)
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(
        x, topk_idx, nmax, num_experts, use_fp8=False
    )
    assert isinstance(recv_x, torch.Tensor)  # BF16
    _keep(key, recv_x, handle)
    return recv_x, count


@low_latency_dispatch_op.register_fake
def _(
    x: torch.Tensor, topk_idx: torch.Tensor, key: int, nmax: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_ranks = int(_buffer(key).num_ranks)
    local = num_experts // num_ranks
    return (
        x.new_empty((local, num_ranks * nmax, x.shape[1])),
        x.new_empty((local,), dtype=torch.int32),
    )


@torch.library.custom_op("ep_elastic::low_latency_combine", mutates_args=())
def low_latency_combine_op(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    recv_x: torch.Tensor,
    key: int,
) -> torch.Tensor:
    """Weighted low-latency combine with the handle of the dispatch that returned ``recv_x``."""
    combined, _, _ = _buffer(key).low_latency_combine(
        x, topk_idx, topk_weights, _handle(key, recv_x)
    )
    return combined


@low_latency_combine_op.register_fake
def _(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    recv_x: torch.Tensor,
    key: int,
) -> torch.Tensor:
    return x.new_empty((topk_idx.shape[0], x.shape[2]))
