"""``ElasticBuffer``: the user API of expert-parallel dispatch and combine."""

from __future__ import annotations

from ep_elastic._high_throughput import HighThroughputMixin
from ep_elastic._low_latency import LowLatencyMixin
from ep_elastic._primitives import PrimitivesMixin

__all__ = ["ElasticBuffer"]


class ElasticBuffer(HighThroughputMixin, LowLatencyMixin, PrimitivesMixin):
    """Expert-parallel dispatch and combine for MoE layers (DeepEP V2 ``ElasticBuffer``-like).

    ``dispatch`` sends each token once to every rank owning one of its top-k experts;
    ``combine`` sends the (already weighted) expert outputs back and sums them on the source;
    ``low_latency_dispatch``/``low_latency_combine`` are DeepEP's legacy per-expert layout.
    Outputs are bitwise identical across backends and deterministic (``docs/design.md``). On
    CUDA every call runs on a process-global high-priority comm stream; on CPU (gloo) calls
    complete before returning.

    Collective: every rank of ``group`` must construct it with the same configuration (checked:
    a mismatch raises ``ValueError`` on every rank naming the field and the ranks' values). Every
    call is collective too: on the reference backend the ranks check that they are in the same
    call with the same arguments, and a rank that rejects its input makes the others raise (see
    "Errors" in ``docs/ep-elastic.md``).

    DeepEP V2's other primitives keep their names here and delegate to our packages when they
    are installed (extras of ep-elastic): ``agrs_set_config``, ``create_agrs_session``,
    ``destroy_agrs_session``, ``agrs_new_session``, ``agrs_get_inplace_tensor``, ``all_gather``
    and ``reduce_scatter`` (``cp-copyengine``, extra ``cp``); ``pp_set_config``, ``pp_send``,
    ``pp_recv`` (``pp-rdma``, extra ``pp``); ``engram_write``, ``engram_fetch`` (``ep-engram``,
    extra ``engram``). Without the package these raise ``ImportError`` naming it.

    Args:
        group: The expert-parallel process group (gloo on CPU, NCCL on GPUs).
        num_bytes: Communication buffer bytes the NVLink backend allocates (a multiple of 2 MiB,
            at least :meth:`get_buffer_size_hint` of the MoE settings: ``ValueError`` naming both
            numbers otherwise, on every backend); ``None`` allocates the hint.
        num_max_tokens_per_rank: ``Nmax``: most tokens one rank dispatches (default of dispatch).
        hidden: Largest hidden size ``H`` used (bytes are sized for it).
        num_topk: Largest ``k`` used; 0 sizes for 32.
        use_fp8_dispatch: Size dispatch for FP8 data plus scales.
        deterministic: Accepted for DeepEP compatibility; outputs are always deterministic.
        prefer_overlap_with_compute: When False the analytical SM count is at least 64.
        num_cpu_timeout_secs: Limit in seconds of host waits on every backend (the reference
            backend's gloo collectives, the kernel backends' stream syncs); past it the waiting
            rank raises ``ep_jit.HostTimeoutError``. ``None``: ``EP_CPU_TIMEOUT_SECS`` (300).
        num_gpu_timeout_secs: Limit of device spin waits (kernel backends).
        explicitly_destroy: The owner calls :meth:`destroy`; a buffer dropped without it warns.
        backend: ``"auto"`` (NVLink kernels when every rank is on CUDA in one NVLink domain and
            they are available, else the reference; ``EP_BACKEND`` overrides ``"auto"``),
            ``"torch"`` or ``"nvlink"`` (``ValueError`` where impossible).
        device: ``None`` = the current CUDA device for an NCCL group, else CPU; a CUDA device
            with a gloo group runs ranks that share a GPU.
        low_latency_mode: The low-latency pair will be used (DeepEP V1's name). The NVLink
            backend then builds its low-latency buffer (a collective allocation) and compiles
            and loads the low-latency kernels for ``hidden`` and ``num_topk`` here, so no
            low-latency call allocates, compiles or synchronises and the first one can be
            captured in a CUDA graph. Needs the three sizes below (``hidden`` too); a later call
            beyond them raises ``ValueError`` naming the limit, on every backend. Without it the
            NVLink backend builds that buffer at the first low-latency call (collective, not
            capturable) and rebuilds it when a call outgrows it. With it and
            ``num_max_tokens_per_rank=0``, ``num_bytes=None`` allocates the least buffer.
        num_max_dispatch_tokens_per_rank: Largest ``num_max_dispatch_tokens_per_rank`` of the
            low-latency calls (with ``low_latency_mode``; at most 65535).
        num_experts: Largest ``num_experts`` of the low-latency calls (with
            ``low_latency_mode``; a multiple of the group size).

    Attributes:
        group, rank_idx, num_ranks, num_bytes, num_max_tokens_per_rank, hidden, num_topk,
        use_fp8_dispatch, deterministic, explicitly_destroy, device, backend_name,
        low_latency_mode, num_max_dispatch_tokens_per_rank, num_experts.
    """
