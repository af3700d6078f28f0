"""DeepEP V1's ``Buffer`` API on top of :class:`ep_elastic.ElasticBuffer`: a drop-in for V1 code.

``from ep_elastic.compat import Buffer, Config, EventOverlap`` replaces
``from deep_ep import Buffer, Config, EventOverlap``. Every call forwards to a wrapped
``ElasticBuffer`` (same backends, same bit-exact results); this module maps V1's arguments,
return tuples and handles onto it. What maps to what, what is accepted without effect and what
differs: ``docs/migrating.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch
import torch.distributed as dist

from ep_core.layout import get_dispatch_layout as _layout
from ep_core.sizing import BUFFER_ALIGNMENT
from ep_core.validation import (
    check_dispatch_x,
    check_num_experts,
    check_positive_int,
    check_tensor,
    check_topk_idx,
    check_topk_weights,
    should_check_values,
)
from ep_elastic._compat_config import (
    V1_BUFFER_ALIGNMENT,
    Config,
    combine_config,
    dispatch_config,
    low_latency_rdma_size_hint,
)
from ep_elastic._compat_handle import DispatchHandle, LowLatencyDispatchHandle
from ep_elastic._compat_low_latency import LowLatencyCompatMixin, merge_events, unwrap_event
from ep_elastic._high_throughput import DispatchInput
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

_DispatchReturn: TypeAlias = (
    "tuple[DispatchInput, torch.Tensor | None, torch.Tensor | None, list[int] | None, "
    "DispatchHandle | None, EventOverlap]"
)


def _check_bytes(name: str, value: object) -> int:
    check_positive_int(name, value, minimum=0)
    assert isinstance(value, int)
    if value % V1_BUFFER_ALIGNMENT != 0:
        raise ValueError(f"{name} {value} is not a multiple of {V1_BUFFER_ALIGNMENT} (as in V1)")
    return value


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


class Buffer(LowLatencyCompatMixin):
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

    # -- normal mode --------------------------------------------------------------------------

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

    def _check_layout(
        self,
        num_tokens: int,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
    ) -> int:
        """Checks V1's layout arguments of a fresh dispatch; returns ``E``."""
        given = {
            "num_tokens_per_rank": num_tokens_per_rank,
            "is_token_in_rank": is_token_in_rank,
            "num_tokens_per_expert": num_tokens_per_expert,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"a dispatch without handle= needs {', '.join(missing)} (from get_dispatch_layout)"
            )
        device, num_ranks = self.elastic.device, self.group_size
        check_tensor(
            "num_tokens_per_rank",
            num_tokens_per_rank,
            dtypes=(torch.int32,),
            shape=(num_ranks,),
            device=device,
        )
        check_tensor(
            "is_token_in_rank",
            is_token_in_rank,
            dtypes=(torch.bool,),
            shape=(num_tokens, num_ranks),
            device=device,
        )
        assert isinstance(num_tokens_per_expert, torch.Tensor)
        num_experts = num_tokens_per_expert.shape[0] if num_tokens_per_expert.dim() == 1 else -1
        check_tensor(
            "num_tokens_per_expert",
            num_tokens_per_expert,
            dtypes=(torch.int32,),
            shape=(num_experts,),
            device=device,
        )
        return check_num_experts(num_experts, num_ranks)

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

    def _check_fresh(
        self,
        x: DispatchInput,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        nmax: int,
    ) -> int:
        """Local checks of a fresh dispatch's inputs (``T <= nmax``); returns ``E``."""
        device = self.elastic.device
        if isinstance(x, tuple | list):
            if len(x) != 2:
                raise ValueError(f"an FP8 x must be a (data, scales) pair, got {len(x)} items")
            data, _ = check_dispatch_x(x[0], x[1], num_max_tokens_per_rank=nmax, device=device)
        else:
            data, _ = check_dispatch_x(x, None, num_max_tokens_per_rank=nmax, device=device)
        num_tokens = data.shape[0]
        num_experts = self._check_layout(
            num_tokens, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert
        )
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights must be given together, as in V1")
        if topk_idx is None:
            return num_experts
        check_topk_idx(topk_idx, num_tokens=num_tokens, num_experts=num_experts, device=device)
        check_topk_weights(topk_weights, topk_idx)
        if should_check_values(topk_idx):
            layout = _layout(topk_idx, num_experts, self.group_size)
            for name, given, want in (
                ("is_token_in_rank", is_token_in_rank, layout.is_token_in_rank),
                ("num_tokens_per_rank", num_tokens_per_rank, layout.num_tokens_per_rank),
                ("num_tokens_per_expert", num_tokens_per_expert, layout.num_tokens_per_expert),
            ):
                assert isinstance(given, torch.Tensor)
                if not torch.equal(given, want):
                    raise ValueError(
                        f"{name} is not the layout of topk_idx (use get_dispatch_layout on the "
                        "same topk_idx and num_experts)"
                    )
        return num_experts

    def _agree(
        self,
        x: DispatchInput,
        num_tokens_per_rank: object,
        is_token_in_rank: object,
        num_tokens_per_expert: object,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
    ) -> tuple[int, int, list[list[int]] | None]:
        """Checks locally, then all-gathers every rank's shapes (and, without ``topk_idx``, its
        expert counts), so that a rejected input or a too small buffer fails every rank.

        Returns:
            ``(Nmax, E, expert counts by rank or None)``; ``Nmax`` is the buffer's, else the
            largest token count of the ranks.
        """
        error: Exception | None = None
        num_experts = 0
        data = x[0] if isinstance(x, tuple | list) else x
        shape = tuple(data.shape)
        num_topk = self.group_size if topk_idx is None else int(topk_idx.shape[1])
        payload: dict[str, Any] = {
            "shape": (shape[0], shape[1], num_topk, isinstance(x, tuple | list)),
            "expert_counts": None,
        }
        fixed = self.elastic.num_max_tokens_per_rank
        try:
            num_experts = self._check_fresh(
                x,
                num_tokens_per_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                fixed or shape[0],
            )
            if topk_idx is None:
                assert isinstance(num_tokens_per_expert, torch.Tensor)
                payload["expert_counts"] = num_tokens_per_expert.tolist()
        except (ValueError, TypeError) as exc:
            error = exc
        gathered = gather_checked(
            self.group, payload, error, what="compat.Buffer.dispatch", device=self.elastic.device
        )
        nmax = fixed or max(1, *(g["shape"][0] for g in gathered))
        self._check_room([(nmax, *g["shape"][1:]) for g in gathered])
        counts = None if topk_idx is not None else [g["expert_counts"] for g in gathered]
        return nmax, num_experts, counts

    def _lanes_of(self, is_token_in_rank: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Routing without ``topk_idx``: lane ``d`` names rank ``d``'s first expert or ``-1``."""
        num_ranks = self.group_size
        if num_ranks > 32:
            raise ValueError(
                f"a dispatch without topk_idx routes by is_token_in_rank, which supports at most "
                f"32 ranks here, got {num_ranks}"
            )
        first = torch.arange(num_ranks, device=is_token_in_rank.device) * (num_experts // num_ranks)
        return torch.where(is_token_in_rank, first, -1).to(torch.int64)

    def _counts_of(
        self, expert_counts: list[list[int]], num_experts: int, expert_alignment: int
    ) -> list[int]:
        local = num_experts // self.group_size
        begin = self.rank * local
        counts = [sum(c[begin + e] for c in expert_counts) for e in range(local)]
        return [-(-c // expert_alignment) * expert_alignment for c in counts]

    def _check_room(self, shapes: list[tuple[int, int, int, bool]]) -> None:
        """Raises unless the buffer holds a dispatch of every ``(Nmax, H, k, fp8)`` given."""
        need, worst = max(
            (ElasticBuffer.get_buffer_size_hint(self.group, *shape), shape) for shape in shapes
        )
        if need > self.elastic.num_bytes:
            nmax, hidden, num_topk, fp8 = worst
            raise ValueError(
                f"this dispatch (Nmax={nmax} tokens per rank, H={hidden}, k={num_topk}, "
                f"fp8={fp8}) needs a {need}-byte buffer but the Buffer has "
                f"{self.elastic.num_bytes}: pass num_nvl_bytes >= {need}, or "
                "num_max_tokens_per_rank= and hidden= when constructing it"
            )

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
