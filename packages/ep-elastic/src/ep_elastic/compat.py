"""DeepEP V1's ``Buffer`` API on top of :class:`ep_elastic.ElasticBuffer`: a drop-in for V1 code.

``from ep_elastic.compat import Buffer, Config, EventOverlap`` replaces
``from deep_ep import Buffer, Config, EventOverlap``. Every call forwards to a wrapped
``ElasticBuffer`` (same backends, same bit-exact results); this module maps V1's arguments,
return tuples and handles onto it. What maps to what, what is accepted without effect and what
differs: ``docs/migrating.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ep_core.sizing import BUFFER_ALIGNMENT
from ep_core.validation import check_positive_int
from ep_elastic._compat_config import (
    V1_BUFFER_ALIGNMENT,
    Config,
    combine_config,
    dispatch_config,
    low_latency_rdma_size_hint,
)
from ep_elastic._compat_dispatch import NormalDispatchMixin, _check_overlap_args
from ep_elastic._compat_handle import DispatchHandle, LowLatencyDispatchHandle
from ep_elastic._compat_low_latency import LowLatencyCompatMixin, merge_events
from ep_elastic.buffer import ElasticBuffer
from ep_elastic.event import EventHandle, EventOverlap, run_on_comm_stream
from ep_jit.agreement import check_agreement, gather_checked

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "LowLatencyDispatchHandle",
    "topk_idx_t",
]

topk_idx_t: torch.dtype = torch.int64
"""dtype of ``topk_idx`` (DeepEP's name)."""


def _check_bytes(name: str, value: object) -> int:
    check_positive_int(name, value, minimum=0)
    assert isinstance(value, int)
    if value % V1_BUFFER_ALIGNMENT != 0:
        raise ValueError(f"{name} {value} is not a multiple of {V1_BUFFER_ALIGNMENT} (as in V1)")
    return value


class Buffer(NormalDispatchMixin, LowLatencyCompatMixin):
    """DeepEP V1's ``Buffer`` on the backends of :class:`~ep_elastic.ElasticBuffer`.

    Collective: every rank of ``group`` constructs it with the same arguments (checked; a
    difference or a rejected argument raises ``ValueError`` on every rank).

    All ranks form one dispatch domain whatever their number (V1's intranode path): there is no
    RDMA/NVLink split and no NVSHMEM. Accepted without effect (documented, never reinterpreted):
    ``num_rdma_bytes`` beyond buffer sizing, ``num_qps_per_rank``,
    ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``.

    Args:
        group: The expert-parallel process group (gloo on CPU, NCCL on GPUs).
        num_nvl_bytes: V1's NVLink buffer bytes (a multiple of 128). The wrapped buffer gets
            ``max(num_nvl_bytes, num_rdma_bytes)`` rounded up to 2 MiB, at least 2 MiB.
        num_rdma_bytes: V1's RDMA bytes (a multiple of 128); on one node V1 uses them for the
            low-latency kernels only; here they only count towards the size above.
        low_latency_mode: Enables the ``low_latency_*`` methods (V1 requires it for them).
        num_qps_per_rank: V1's RDMA queue pairs per rank (``> 0`` in low-latency mode, as V1);
            no effect.
        allow_nvlink_for_low_latency_mode: No effect (all traffic of a domain is peer memory).
        allow_mnnvl: No effect.
        explicitly_destroy: :meth:`destroy` must be called (V1 allows it only with this flag).
        enable_shrink: Enables V1's rank-mask methods; no rank can be masked here (masking one
            raises ``ValueError``).
        comm: V1's mpi4py alternative to ``group``: not supported (``ValueError``).
        num_max_tokens_per_rank: Extension (keyword only): a fixed ``Nmax`` for every normal
            dispatch, which also sizes the buffer with ``hidden``. 0 = each dispatch agrees on
            the largest token count of its ranks.
        hidden: Extension (keyword only): the largest hidden size, with the above and with
            the low-latency sizes below.
        num_max_dispatch_tokens_per_rank: Extension (keyword only, with ``low_latency_mode``):
            the largest ``num_max_dispatch_tokens_per_rank`` of the low-latency calls. Given
            with ``hidden`` and ``num_experts``, the low-latency buffer and kernels are built at
            construction (``ElasticBuffer(low_latency_mode=True)``), so the first low-latency
            call can be captured in a CUDA graph and a larger call raises ``ValueError``; else
            they are built at the first low-latency call.
        num_experts: Extension (keyword only): the largest ``num_experts`` of those calls.
        num_topk: Extension (keyword only): the largest ``k`` of those calls (0: 32).
        backend: Extension: ``ElasticBuffer``'s ``"auto"``, ``"torch"`` or ``"nvlink"``.
        device: Extension: ``ElasticBuffer``'s device (``None`` = from the group).

    Attributes:
        num_sms: Class attribute, SMs of the normal kernels (V1's default 20).
        rank, group, group_size, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
        explicitly_destroy, enable_shrink: As in V1.
        elastic: The wrapped :class:`~ep_elastic.ElasticBuffer`.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_max_dispatch_tokens_per_rank: int = 0,
        num_experts: int = 0,
        num_topk: int = 0,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        if group is None:
            if comm is not None:
                raise ValueError(
                    "comm= (an mpi4py communicator) is not supported: pass a torch.distributed "
                    "process group as group="
                )
            raise ValueError("Either 'group' or 'comm' must be provided.")
        config = {
            "num_nvl_bytes": num_nvl_bytes,
            "num_rdma_bytes": num_rdma_bytes,
            "low_latency_mode": low_latency_mode,
            "num_qps_per_rank": num_qps_per_rank,
            "enable_shrink": enable_shrink,
            "explicitly_destroy": explicitly_destroy,
        }
        error: Exception | None = None
        num_bytes = BUFFER_ALIGNMENT
        try:
            largest = max(
                _check_bytes("num_nvl_bytes", num_nvl_bytes),
                _check_bytes("num_rdma_bytes", num_rdma_bytes),
            )
            if low_latency_mode:
                check_positive_int("num_qps_per_rank", num_qps_per_rank)
            num_bytes = max(-(-largest // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT, num_bytes)
            check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, minimum=0)
            check_positive_int("hidden", hidden, minimum=0)
            check_positive_int(
                "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=0
            )
            if num_max_dispatch_tokens_per_rank and not low_latency_mode:
                raise ValueError(
                    "num_max_dispatch_tokens_per_rank sizes the low-latency pair: pass it with "
                    "low_latency_mode=True"
                )
            if num_max_tokens_per_rank and hidden:
                need = ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden)
                num_bytes = max(num_bytes, need)
        except (ValueError, TypeError) as exc:
            error = exc
        check_agreement(gather_checked(group, config, error, what="compat.Buffer"), "compat.Buffer")
        self.rank = group.rank()
        self.group = group
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        # Sized low-latency use builds its buffer at construction (ElasticBuffer checks sizes).
        ll_at_construction = bool(low_latency_mode and num_max_dispatch_tokens_per_rank > 0)
        self.elastic = ElasticBuffer(
            group,
            num_bytes,
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            hidden=hidden,
            num_topk=num_topk,
            explicitly_destroy=explicitly_destroy,
            backend=backend,
            device=device,
            low_latency_mode=ll_at_construction,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            num_experts=num_experts if ll_at_construction else 0,
        )
        self._init_low_latency()

    # -- configuration ------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SM count of the normal kernels for every ``Buffer`` (V1: must be even)."""
        check_positive_int("new_num_sms", new_num_sms, minimum=0)
        if new_num_sms % 2 != 0:
            raise ValueError(f"The SM count must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """V1's tuned dispatch :class:`Config` for ``num_ranks`` with :attr:`num_sms`.

        Raises:
            ValueError: ``num_ranks`` is not in V1's table (2, 4, 8, 16, ..., 160).
        """
        return dispatch_config(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """V1's tuned combine :class:`Config` for ``num_ranks`` (``ValueError`` if untabulated)."""
        return combine_config(Buffer.num_sms, num_ranks)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """V1's low-latency RDMA bytes for these settings (to pass as ``num_rdma_bytes``)."""
        return low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    @staticmethod
    def capture() -> EventOverlap:
        """An :class:`EventOverlap` on the current CUDA stream (empty without CUDA), as V1."""
        return EventOverlap(EventHandle())

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The comm stream on CUDA, ``None`` on CPU."""
        return self.elastic.get_comm_stream()

    def destroy(self) -> None:
        """Releases the buffer (V1: only with ``explicitly_destroy=True``)."""
        if not self.explicitly_destroy:
            raise ValueError("destroy() needs Buffer(explicitly_destroy=True), as in DeepEP V1")
        self.elastic.destroy()

    def _num_sms(self, config: object) -> int:
        if config is None:
            return Buffer.num_sms
        if not isinstance(config, Config):
            raise TypeError(
                f"config must be an ep_elastic.compat.Config, got {type(config).__name__}"
            )
        return config.num_sms

    # -- normal mode --------------------------------------------------------------------------

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """V1's normal combine: each received row returns to its source and is summed there.

        Unweighted, as V1: ``out[t]`` is the float32 sum over the ranks ``t`` went to
        (increasing), plus the biases, rounded to bf16 (``ElasticBuffer.combine``'s order).

        Args:
            x: ``[M, H]`` bf16, rows in the dispatch's order (``M`` = the dispatch's rows).
            handle: The :class:`~ep_elastic.compat.DispatchHandle` of a fresh dispatch.
            topk_weights: ``[M, k]`` float32 or ``None``; needs a dispatch with ``topk_idx``.
            bias: ``None``, a ``[T, H]`` bf16 tensor or a pair of them.
            config: A :class:`Config`; only ``num_sms`` is used (default :attr:`num_sms`).
            previous_event: The comm stream waits for it instead of the current stream.
            async_finish: Return an event instead of making the current stream wait.
            allocate_on_comm_stream: V1's flag; needs ``previous_event`` and ``async_finish``.

        Returns:
            ``(combined_x [T, H] bf16, combined_topk_weights [T, k] float32 or None, event)``;
            lane ``j`` of ``combined_topk_weights`` is the value returned by the rank owning
            expert ``topk_idx[t, j]`` (0 where ``-1``).

        Raises:
            ValueError, TypeError: Invalid input (named in the message).
        """
        event = _check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
        num_sms = self._num_sms(config)
        if not isinstance(handle, DispatchHandle):
            raise TypeError(
                "handle must be the handle returned by ep_elastic.compat.Buffer.dispatch, got "
                f"{type(handle).__name__}"
            )
        if topk_weights is not None and not handle.has_topk:
            raise ValueError("combine got topk_weights but the dispatch had no topk_idx")
        rows = handle.num_recv_tokens
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != rows:
            raise ValueError(
                f"x must be [{rows}, H] (the dispatch's rows), got {getattr(x, 'shape', x)!r}"
            )
        full = handle.elastic.num_recv_tokens
        pre_event = EventOverlap(event)
        if full != rows:
            # num_worst_tokens: the wrapped handle has R * Nmax rows; the extra rows are past
            # the received count, so their contents are never read.
            def pad() -> tuple[torch.Tensor, torch.Tensor | None]:
                grow = (0, 0, 0, full - rows)
                w = None if topk_weights is None else torch.nn.functional.pad(topk_weights, grow)
                return torch.nn.functional.pad(x, grow), w

            (x, topk_weights), pre_event = run_on_comm_stream(
                self.elastic.device,
                pad,
                (x, topk_weights),
                lambda r: r,
                previous_event=event,
                async_with_compute_stream=True,
            )
            event = pre_event.event
        combined, combined_w, ev = self.elastic.combine(
            x,
            handle.elastic,
            topk_weights=topk_weights,
            bias=bias,
            num_sms=num_sms,
            previous_event=event,
            async_with_compute_stream=async_finish,
        )
        return combined, combined_w, merge_events(pre_event, ev)
