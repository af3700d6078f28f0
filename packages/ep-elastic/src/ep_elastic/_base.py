"""The part of ``ElasticBuffer`` that is not dispatch/combine: configuration, agreement across
ranks, backend choice, sizing, lifetime, barrier, streams and events."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, NoReturn

import torch
import torch.distributed as dist

import ep_jit
from ep_core import knobs as core_knobs
from ep_core.backend import BackendConfig, EPBackend
from ep_core.factory import create_backend, resolve_backend
from ep_core.sizing import BUFFER_ALIGNMENT, CPU_NOMINAL_NUM_SMS, SIZING_HIDDEN, SIZING_TOPK
from ep_core.sizing import get_buffer_size_hint as _size_hint
from ep_core.sizing import get_theoretical_num_sms as _num_sms
from ep_core.validation import (
    MAX_TOPK,
    check_hidden,
    check_low_latency_shape,
    check_num_experts,
    check_positive_int,
    check_tensor,
)
from ep_elastic._compiled import register_buffer
from ep_elastic.event import EventHandle, get_comm_stream
from ep_jit._log import verbose
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.streams import CallOrder

__all__ = ["BufferBase", "group_device"]


def group_device(group: dist.ProcessGroup, device: torch.device | str | None) -> torch.device:
    """The device a buffer on ``group`` works on.

    ``None`` means the current CUDA device when the group can run NCCL collectives and CUDA is
    available, else the CPU (gloo).

    Raises:
        ValueError: ``device`` is neither CPU nor CUDA, or CUDA on a group that is neither NCCL
            nor gloo.
    """
    backend = str(dist.get_backend(group)).lower()
    if device is None:
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if "nccl" not in backend and "gloo" not in backend:
            raise ValueError(
                f"device {dev} needs a group with an NCCL or gloo backend, got {backend!r}"
            )
        # gloo with CUDA: ranks that share a GPU (NCCL refuses them); the NVLink backend runs
        # on ep-jit's peer memory and the reference backend's collectives go through gloo.
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {dev}")
    if "gloo" not in backend:
        raise ValueError(f"device cpu needs a group with a gloo backend, got {backend!r}")
    return dev


def _resolve_num_bytes(
    num_ranks: int,
    num_bytes: int | None,
    num_max_tokens_per_rank: int,
    hidden: int,
    num_topk: int,
    use_fp8_dispatch: bool,
) -> int:
    """Checks the sizing arguments; returns ``num_bytes`` or the size hint when ``None``."""
    check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, minimum=0)
    check_positive_int("num_topk", num_topk, minimum=0)
    if num_topk > MAX_TOPK:
        raise ValueError(f"num_topk {num_topk} exceeds the supported maximum {MAX_TOPK}")
    if hidden:
        check_hidden(hidden, fp8=use_fp8_dispatch)
    if num_bytes is None:
        if num_max_tokens_per_rank <= 0 or hidden <= 0:
            raise ValueError(
                "give num_bytes, or num_max_tokens_per_rank > 0 and hidden > 0 to size the "
                f"buffer (got num_max_tokens_per_rank={num_max_tokens_per_rank}, hidden={hidden})"
            )
        return _size_hint(num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch)
    check_positive_int("num_bytes", num_bytes)
    if num_bytes % BUFFER_ALIGNMENT != 0:
        raise ValueError(f"num_bytes {num_bytes} is not a multiple of 2 MiB ({BUFFER_ALIGNMENT})")
    if num_max_tokens_per_rank > 0:
        # hidden == 0: sized as the NVLink backend lays it out (SIZING_HIDDEN). Checked on every
        # backend, so a size that works on CPU works on GPUs.
        need = _size_hint(num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch)
        if num_bytes < need:
            raise ValueError(
                f"num_bytes {num_bytes} is too small: Nmax={num_max_tokens_per_rank}, "
                f"hidden={hidden or SIZING_HIDDEN}, num_topk={num_topk or SIZING_TOPK}, "
                f"fp8={use_fp8_dispatch} need {need} bytes (get_buffer_size_hint)"
            )
    return num_bytes


def _check_low_latency_config(
    num_ranks: int,
    low_latency_mode: bool,
    num_max_dispatch_tokens_per_rank: int,
    hidden: int,
    num_experts: int,
    num_topk: int,
) -> None:
    """Checks the low-latency arguments of the constructor (the kernels' limits, every backend)."""
    if not isinstance(low_latency_mode, bool):
        raise TypeError(f"low_latency_mode must be a bool, got {type(low_latency_mode).__name__}")
    check_positive_int(
        "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=0
    )
    check_positive_int("num_experts", num_experts, minimum=0)
    if not low_latency_mode:
        if num_max_dispatch_tokens_per_rank or num_experts:
            raise ValueError(
                "num_max_dispatch_tokens_per_rank and num_experts size the low-latency pair: "
                "pass them with low_latency_mode=True"
            )
        return
    missing = [
        name
        for name, value in (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_experts", num_experts),
        )
        if value <= 0
    ]
    if missing:
        raise ValueError(
            f"low_latency_mode=True needs {', '.join(missing)} > 0 (the low-latency buffer is "
            "sized and built at construction)"
        )
    check_num_experts(num_experts, num_ranks)
    check_low_latency_shape(
        num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts, num_topk or MAX_TOPK
    )


class BufferBase:
    """Configuration and lifetime of an ``ElasticBuffer``; see :class:`ep_elastic.ElasticBuffer`."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_bytes: int | None = None,
        *,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        deterministic: bool = True,
        prefer_overlap_with_compute: bool = True,
        num_cpu_timeout_secs: float | None = None,
        num_gpu_timeout_secs: float = 100,
        explicitly_destroy: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        low_latency_mode: bool = False,
        num_max_dispatch_tokens_per_rank: int = 0,
        num_experts: int = 0,
    ) -> None:
        self._backend: EPBackend | None = None
        self._destroyed = False
        # Results of per-call computations that depend only on the call's sizes.
        self._num_sms_cache: dict[tuple[int, int], int] = {}
        self._capacity_ok: set[tuple[int, int, int, bool]] = set()
        # The high-throughput calls' stream order: synchronous calls run on the caller's stream.
        self._call_order = CallOrder()
        # The last accepted high-throughput calls: (handle, argument signature, checked values);
        # a call with the same signature skips the checks (ep_elastic._high_throughput).
        self._dispatch_memo: tuple[Any, ...] | None = None
        self._combine_memo: tuple[Any, ...] | None = None
        # Names this buffer in the torch.compile custom ops (ep_elastic._compiled).
        self._op_key = register_buffer(self)
        if num_cpu_timeout_secs is None:
            num_cpu_timeout_secs = float(core_knobs.ep.cpu_timeout_secs)
        self._group: dist.ProcessGroup | None = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        config: dict[str, Any] = {
            "num_bytes": num_bytes,
            "num_max_tokens_per_rank": num_max_tokens_per_rank,
            "hidden": hidden,
            "num_topk": num_topk,
            "use_fp8_dispatch": use_fp8_dispatch,
            "deterministic": deterministic,
            "prefer_overlap_with_compute": prefer_overlap_with_compute,
            "num_cpu_timeout_secs": num_cpu_timeout_secs,
            "num_gpu_timeout_secs": num_gpu_timeout_secs,
            "explicitly_destroy": explicitly_destroy,
            "backend": backend,
            "device_type": None,
            "low_latency_mode": low_latency_mode,
            "num_max_dispatch_tokens_per_rank": num_max_dispatch_tokens_per_rank,
            "num_experts": num_experts,
        }
        # Local mistakes are gathered with the configuration, so every rank raises together
        # instead of one rank raising while the others wait in a collective.
        error: Exception | None = None
        resolved_bytes = 0
        try:
            self.device = group_device(group, device)
            config["device_type"] = self.device.type
            config["backend"] = core_knobs.ep.backend if backend == "auto" else backend
            _check_low_latency_config(
                self.num_ranks,
                low_latency_mode,
                num_max_dispatch_tokens_per_rank,
                hidden,
                num_experts,
                num_topk,
            )
            # A buffer for the low-latency pair only needs no high-throughput sizing.
            ll_only = low_latency_mode is True and num_max_tokens_per_rank == 0
            resolved_bytes = _resolve_num_bytes(
                self.num_ranks,
                BUFFER_ALIGNMENT if num_bytes is None and ll_only else num_bytes,
                num_max_tokens_per_rank,
                hidden,
                num_topk,
                use_fp8_dispatch,
            )
        except (ValueError, TypeError) as exc:
            error = exc
        configs = gather_checked(group, config, error, what="ElasticBuffer")
        check_agreement(configs, "ElasticBuffer")
        self.num_bytes = num_bytes = resolved_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.num_topk = num_topk
        self.use_fp8_dispatch = use_fp8_dispatch
        self.deterministic = deterministic
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.num_cpu_timeout_secs = num_cpu_timeout_secs
        self.num_gpu_timeout_secs = num_gpu_timeout_secs
        self.explicitly_destroy = explicitly_destroy
        self.low_latency_mode = low_latency_mode
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.num_experts = num_experts

        all_cuda = all(c["device_type"] == "cuda" for c in configs)
        resolved, error = "", None
        try:
            resolved = resolve_backend(config["backend"], group, all_cuda)
        except ValueError as exc:
            error = exc
        resolved_all = gather_checked(
            group, {"resolved backend": resolved}, error, what="ElasticBuffer"
        )
        check_agreement(resolved_all, "ElasticBuffer")
        self.backend_name = resolved
        self._backend = create_backend(
            resolved,
            group,
            BackendConfig(
                rank=self.rank_idx,
                num_ranks=self.num_ranks,
                device=self.device,
                num_bytes=num_bytes,
                num_max_tokens_per_rank=num_max_tokens_per_rank,
                hidden=hidden,
                num_topk=num_topk,
                use_fp8_dispatch=use_fp8_dispatch,
                num_cpu_timeout_secs=num_cpu_timeout_secs,
                num_gpu_timeout_secs=num_gpu_timeout_secs,
                low_latency_mode=low_latency_mode,
                num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                num_experts=num_experts,
            ),
        )
        if low_latency_mode and self.device.type == "cuda":
            get_comm_stream(self.device)  # created here, never first inside a captured call
        if core_knobs.ep.buffer_debug:
            regions = getattr(self._backend, "allocation", None)
            by_region = regions() if callable(regions) else {}
            verbose(
                "rank %d/%d: backend=%s device=%s num_bytes=%s Nmax=%d hidden=%d num_topk=%d "
                "fp8=%s; allocated by region: %s",
                self.rank_idx,
                self.num_ranks,
                resolved,
                self.device,
                num_bytes,
                num_max_tokens_per_rank,
                hidden,
                num_topk,
                use_fp8_dispatch,
                ", ".join(f"{k} {v} B" for k, v in by_region.items()) or "none (no buffer)",
                name="ep_elastic",
            )

    # -- sizing -------------------------------------------------------------------------------

    @staticmethod
    def get_buffer_size_hint(
        group: dist.ProcessGroup,
        num_max_tokens_per_rank: int,
        hidden: int,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
    ) -> int:
        """Bytes the NVLink backend allocates for these MoE settings (2 MiB aligned, monotone;
        see :func:`ep_core.sizing.get_buffer_size_hint`); the least ``num_bytes`` accepted."""
        return _size_hint(group.size(), num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch)

    def get_theoretical_num_sms(
        self, num_experts: int, num_topk: int, nvlink_gbs: float | None = None
    ) -> int:
        """SMs that saturate NVLink for balanced routing (even, >= 4, <= the device's SMs).

        On CPU the device is taken to have :data:`ep_core.sizing.CPU_NOMINAL_NUM_SMS` SMs.
        """
        if self.device.type == "cuda":
            device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:
            device_sms = CPU_NOMINAL_NUM_SMS
        kwargs: dict[str, Any] = {} if nvlink_gbs is None else {"nvlink_gbs": nvlink_gbs}
        return _num_sms(
            self.num_ranks,
            num_experts or 0,
            num_topk or 0,
            device_sms,
            prefer_overlap_with_compute=self.prefer_overlap_with_compute,
            **kwargs,
        )

    def _default_num_sms(self, num_experts: int, num_topk: int) -> int:
        """:meth:`get_theoretical_num_sms`, computed once per ``(E, k)`` (a call's host path)."""
        key = (num_experts, num_topk)
        sms = self._num_sms_cache.get(key)
        if sms is None:
            sms = self._num_sms_cache[key] = self.get_theoretical_num_sms(num_experts, num_topk)
        return sms

    def _check_recv_stats(self, stats: torch.Tensor | None, num_experts: int) -> None:
        """``cumulative_local_expert_recv_stats`` of a dispatch: ``None`` or ``[El]`` int32."""
        if stats is not None:
            check_tensor(
                "cumulative_local_expert_recv_stats",
                stats,
                dtypes=(torch.int32,),
                shape=(num_experts // self.num_ranks,),
                device=self.device,
            )

    def _check_capacity(self, num_max_tokens: int, hidden: int, num_topk: int, fp8: bool) -> None:
        key = (num_max_tokens, hidden, num_topk, fp8)
        if key in self._capacity_ok:  # the size computation builds a whole layout
            return
        self._check_capacity_uncached(num_max_tokens, hidden, num_topk, fp8)
        if len(self._capacity_ok) > 64:
            self._capacity_ok.clear()
        self._capacity_ok.add(key)

    def _check_capacity_uncached(
        self, num_max_tokens: int, hidden: int, num_topk: int, fp8: bool
    ) -> None:
        if self.hidden and hidden > self.hidden:
            raise ValueError(f"hidden size {hidden} exceeds the buffer's hidden {self.hidden}")
        if self.num_topk and num_topk > self.num_topk:
            raise ValueError(f"k = {num_topk} exceeds the buffer's num_topk {self.num_topk}")
        need = _size_hint(self.num_ranks, num_max_tokens, hidden, num_topk, fp8)
        if need > self.num_bytes:
            raise ValueError(
                f"the buffer has {self.num_bytes} bytes but Nmax={num_max_tokens}, H={hidden}, "
                f"k={num_topk}, fp8={fp8} need {need}"
            )

    def _check_low_latency_capacity(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int, num_topk: int
    ) -> None:
        """A low-latency call within the limits given at construction (``low_latency_mode``)."""
        if not self.low_latency_mode:
            return
        limits = (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_experts", num_experts),
            ("num_topk", num_topk),
        )
        for name, value in limits:
            limit = getattr(self, name) or (MAX_TOPK if name == "num_topk" else 0)
            if value > limit:
                raise ValueError(
                    f"low-latency {name} {value} exceeds the buffer's {limit} (given at "
                    "construction with low_latency_mode=True)"
                )

    def _reject(self, error: Exception) -> NoReturn:
        """Raises this rank's own input ``error`` after telling the peers, so they raise too.

        The backend takes part in the call's first exchange with an ``"abort"`` signature
        (reference backend), so the peers raise ``ValueError`` naming this rank instead of waiting
        for it or pairing its next call with their current one.
        """
        abort = getattr(self._backend, "abort_call", None)
        if abort is None or self._destroyed:
            raise error
        try:
            # After this buffer's earlier work, wherever it was ordered (kernel backends).
            last = self._call_order.last_stream
            with torch.cuda.stream(last) if last is not None else contextlib.nullcontext():
                abort(self.device)
        finally:
            raise error  # this rank's own error wins over a failed abort

    # -- lifetime, streams, events ------------------------------------------------------------

    @property
    def backend(self) -> EPBackend:
        """The backend object (raises once destroyed)."""
        if self._destroyed or self._backend is None:
            raise RuntimeError("this ElasticBuffer was destroyed")
        return self._backend

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group of the buffer (released by :meth:`destroy`).

        Raises:
            RuntimeError: The buffer was destroyed.
        """
        if self._group is None:
            raise RuntimeError("ElasticBuffer was destroyed")
        return self._group

    def destroy(self) -> None:
        """Releases the backend and the buffer's reference to its group; idempotent.

        Later calls raise ``RuntimeError``. Dropping the group reference matters at exit: a gloo
        group that outlives ``torch.distributed.destroy_process_group()`` (held by a buffer kept
        in a module-level variable) can abort the process while Python shuts down.
        """
        if self._destroyed:
            return
        self._destroyed = True
        if self._backend is not None:
            self._backend.destroy()
            self._backend = None
        self._group = None

    def __del__(self) -> None:
        if getattr(self, "_destroyed", True) or getattr(self, "_backend", None) is None:
            return
        if self.explicitly_destroy:
            warnings.warn(
                "ElasticBuffer(explicitly_destroy=True) was dropped without destroy()",
                ResourceWarning,
                stacklevel=2,
            )
        self.destroy()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False) -> None:
        """Waits until every rank arrives; with CUDA, optionally synchronises the device around.

        Args:
            use_comm_stream: Order the barrier after the comm stream's work (CUDA).
            with_cpu_sync: Synchronise the device before and after (CUDA), each wait bounded
                by ``num_cpu_timeout_secs`` (``ep_jit.HostTimeoutError`` past it).
        """
        backend = self.backend
        cuda = self.device.type == "cuda"
        if cuda and with_cpu_sync:
            ep_jit.wait_device(
                self.device, what="ElasticBuffer.barrier", timeout_s=self.num_cpu_timeout_secs
            )
        if cuda and use_comm_stream:
            get_comm_stream(self.device).wait_stream(torch.cuda.current_stream(self.device))
        barrier = getattr(backend, "barrier", None)
        if barrier is not None:
            barrier()
        else:
            dist.barrier(group=self.group)
        if cuda and with_cpu_sync:
            ep_jit.wait_device(
                self.device, what="ElasticBuffer.barrier", timeout_s=self.num_cpu_timeout_secs
            )

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The comm stream (``torch.cuda.Stream``) on CUDA, ``None`` on CPU."""
        return get_comm_stream(self.device) if self.device.type == "cuda" else None

    @staticmethod
    def capture() -> EventHandle:
        """An :class:`EventHandle` on the current CUDA stream (empty without CUDA)."""
        return EventHandle()
