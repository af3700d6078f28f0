"""``LowLatencyEngine``: the low-latency (decode) dispatch/combine pair over NVLink.

DeepEP's legacy layout (``docs/design.md``, "Low-latency"): ``recv_x [El, R*Nmax, H]`` with each
local expert's rows packed by (source rank, source token), FP8 cast in the sender, and a weighted
combine. The kernels are ``include/ep_core/sm90_ll.cuh`` (protocol described there); this module
sizes the engine's symmetric buffer, compiles the kernels through ep-jit with the shape as
template constants, allocates the outputs and launches.

Streams and graphs: every call launches on the caller's current CUDA stream and returns without
synchronising the host. No argument of a launch depends on a value computed on the device (the
op's epoch lives in the buffer's control block), so the calls can be captured once in a CUDA
graph and replayed with new routing and data; outputs allocated inside a capture keep their
address across replays. Run each configuration once before capturing so that its kernels are
compiled and loaded outside the capture.

Hooks: with ``return_recv_hook=True`` a call launches only its send kernel and returns a hook
that launches the receive kernel (on the stream current when the hook is called). Two buffer
regions alternate, so at most two ops of one engine (dispatches and combines counted together)
may wait for their hook: an op is refused while the op issued two calls before it still waits.
Results themselves stay valid as long as they are referenced.

Timeouts: a wait that exceeds ``num_gpu_timeout_secs`` records the stage and the peer in a
host-mapped record and every kernel of the engine unwinds; the next call (or
:meth:`LowLatencyEngine.check_error` after a synchronisation) raises
:class:`ep_jit.JitTimeoutError` (stage, peer, seen and expected values). The engine is unusable
afterwards.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import ep_jit
from ep_core.backend import LowLatencyDispatchResult
from ep_core.handle import LowLatencyHandle
from ep_core.nvlink._common import (
    SIGNATURE_COMBINE,
    build_kernel,
    describe_signatures,
    device_ptr,
    register_include_root,
    signature_digest,
)
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.regions import RegionPlan, double_buffered

__all__ = [
    "COMBINE_SIGNATURE_ARGUMENTS",
    "DISPATCH_SIGNATURE_ARGUMENTS",
    "ERROR_ARGUMENTS_DIFFER",
    "LL_STAGES",
    "SIGNATURE_COMBINE",
    "TRACE_NAMES",
    "TRACE_POINTS",
    "LlArgs",
    "LlLayout",
    "LowLatencyEngine",
    "NvlinkLowLatencyState",
    "combine_signature",
    "combine_smem_bytes",
    "compute_ll_layout",
    "describe_disagreement",
    "dispatch_signature",
    "dispatch_smem_bytes",
    "ll_combine_spec",
    "ll_dispatch_spec",
    "shipped_kernels",
    "tag_word",
]

CHUNK = 2048
"""Channels of one work item (``ll::kChunk``)."""

NUM_WARPS = 8
"""Warps per CTA of every low-latency kernel."""

THREADS = NUM_WARPS * 32

MAX_CTAS = 128
"""Default number of CTAs, ``min(MAX_CTAS, SMs)``; every kernel of an engine uses the same count.
On 2x H200 128 CTAs replayed 128/256-token calls 1-9 us faster than 64 and equal at 1-32 tokens
(docs/dev/kernel-notes.md)."""

MAX_RANKS = 32
MAX_TOPK = 32
MAX_HIDDEN = 8192
MAX_LL_TOKENS = 65535
SMEM_LIMIT = 232448
"""Dynamic shared memory one CTA may use on sm_90 (227 KiB)."""

_SLOT_BYTES = CHUNK * 2
_RING_BYTES = NUM_WARPS * (2 * _SLOT_BYTES + (CHUNK // 128) * 4)
_PHASE_SEND, _PHASE_RECV, _PHASE_BOTH = 1, 2, 3

LL_STAGES = {
    21: "low-latency: waiting for a peer to finish reading the buffer of the op before last",
    22: "low-latency dispatch: waiting for a peer's expert counts",
    23: "low-latency dispatch: waiting for a peer's rows",
    24: "low-latency combine: waiting for a peer's top-k weights",
    25: "low-latency combine: waiting for a peer's partial sums",
}
"""Stage ids written by the kernels' timed waits (``enum ep_core::LlStage``)."""

_FORMATS = ("bf16", "fp8", "fp8_pow2", "ue8m0")

TRACE_POINTS = 16
"""Timestamps per CTA of the developer trace (``ll::kTracePoints``)."""

TRACE_NAMES = {
    "dispatch": {
        0: "start",
        1: "prologue done",
        2: "rows issued, release gate passed (warp 0)",
        3: "counts + lane tables written (first table warp)",
        4: "sent flags raised",
        5: "peer counts received (fused: first table warp, before the sent flags)",
        6: "tables written (fused: first table warp, before the sent flags)",
        7: "rows copied (warp 0)",
        8: "end",
    },
    "combine": {
        0: "start",
        1: "prologue done",
        2: "release gate passed, weights sent",
        3: "partials sent (warp 0)",
        4: "sent flags raised",
        5: "reduce start",
        7: "reduced (warp 0)",
        8: "end",
        9: "first weights read (warp 0)",
    },
}
"""What each trace point of the low-latency kernels marks (thread 0 of each CTA)."""


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class LlArgs(ctypes.Structure):
    """Mirror of ``ep_core::LlArgs`` (every field 8 bytes, same order)."""

    _fields_ = [
        ("x", ctypes.c_uint64),
        ("topk_idx", ctypes.c_uint64),
        ("topk_weights", ctypes.c_uint64),
        ("recv_x", ctypes.c_uint64),
        ("recv_scales", ctypes.c_uint64),
        ("recv_count", ctypes.c_uint64),
        ("recv_src_info", ctypes.c_uint64),
        ("recv_range", ctypes.c_uint64),
        ("cmap", ctypes.c_uint64),
        ("recv_ntok", ctypes.c_uint64),
        ("out", ctypes.c_uint64),
        ("peer_bases", ctypes.c_uint64),
        ("error", ctypes.c_uint64),
        ("num_tokens", ctypes.c_int64),
        ("num_experts", ctypes.c_int64),
        ("num_local_experts", ctypes.c_int64),
        ("num_max_tokens", ctypes.c_int64),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int64),
        ("slot", ctypes.c_int64),
        ("buf_max_tokens", ctypes.c_int64),
        ("buf_local_experts", ctypes.c_int64),
        ("buf_topk", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("off_abort", ctypes.c_int64),
        ("off_slot_epoch", ctypes.c_int64),
        ("off_cta_epoch", ctypes.c_int64),
        ("off_rel", ctypes.c_int64),
        ("off_pend", ctypes.c_int64),
        ("region0", ctypes.c_int64),
        ("region1", ctypes.c_int64),
        ("r_cnt", ctypes.c_int64),
        ("r_ntok", ctypes.c_int64),
        ("r_done", ctypes.c_int64),
        ("r_meta", ctypes.c_int64),
        ("r_cmask", ctypes.c_int64),
        ("r_cw", ctypes.c_int64),
        ("r_stage", ctypes.c_int64),
        ("trace", ctypes.c_uint64),
        ("signature", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class LlLayout:
    """Byte offsets inside one rank's low-latency symmetric buffer (see ``sm90_ll.cuh``).

    Attributes:
        num_ranks: ``R``.
        num_ctas: CTAs of every kernel (flag arrays have one word per CTA).
        max_tokens: ``Nmax`` the buffer holds (stride of the staged arrays).
        max_local_experts: ``El`` the buffer holds (stride of the count words).
        hidden: Largest ``H``.
        num_topk: Largest ``k``.
        row_bytes: Stride of a staged row (a bf16 row, or e4m3 data plus scales).
        off_abort, off_slot_epoch, off_cta_epoch, off_rel, off_pend: Control block.
        region: Bases of the two alternating regions.
        r_cnt, r_ntok, r_done, r_meta, r_cmask, r_cw, r_stage: Offsets in a region.
        total_bytes: Bytes of the buffer.
    """

    num_ranks: int
    num_ctas: int
    max_tokens: int
    max_local_experts: int
    hidden: int
    num_topk: int
    row_bytes: int
    off_abort: int
    off_slot_epoch: int
    off_cta_epoch: int
    off_rel: int
    off_pend: int
    region: tuple[int, int]
    r_cnt: int
    r_ntok: int
    r_done: int
    r_meta: int
    r_cmask: int
    r_cw: int
    r_stage: int
    total_bytes: int


def compute_ll_layout(
    num_ranks: int,
    num_ctas: int,
    max_tokens: int,
    max_local_experts: int,
    hidden: int,
    num_topk: int,
) -> LlLayout:
    """Offsets and size of the buffer for a configuration (host integers only)."""
    r, nc, n, k = num_ranks, num_ctas, max_tokens, num_topk
    row_bytes = _align(max(2 * hidden, hidden + 4 * -(-hidden // 128)), 128)
    off_abort, off_slot_epoch, off_cta_epoch = 0, 64, 128
    ctrl = RegionPlan(align=128, size=off_cta_epoch + 8 * nc)
    off_rel = ctrl.add("release words", 2 * r * 8)
    off_pend = ctrl.add("pending words", 8 * nc)
    ctrl_end = ctrl.padded(4096)
    plan = RegionPlan(align=128)
    for name, size in (
        ("cnt", r * max_local_experts * 8),
        ("ntok", r * 8),
        ("done", r * nc * 8),
        ("meta", r * n * k * 4),
        ("cmask", r * n * 8),
        ("cw", r * n * k * 8),
    ):
        plan.add(name, size)
    # Every part's end is padded to 128 bytes before the staged rows start at a 1 KiB offset.
    plan.size = plan.padded(128)
    plan.add("stage", r * n * row_bytes, align=1024)
    parts = plan.offsets
    regions = double_buffered(plan.size, ctrl_end, region_align=1 << 20)
    region = regions.starts
    total = regions.total
    return LlLayout(
        num_ranks=r,
        num_ctas=nc,
        max_tokens=n,
        max_local_experts=max_local_experts,
        hidden=hidden,
        num_topk=k,
        row_bytes=row_bytes,
        off_abort=off_abort,
        off_slot_epoch=off_slot_epoch,
        off_cta_epoch=off_cta_epoch,
        off_rel=off_rel,
        off_pend=off_pend,
        region=region,
        r_cnt=parts["cnt"],
        r_ntok=parts["ntok"],
        r_done=parts["done"],
        r_meta=parts["meta"],
        r_cmask=parts["cmask"],
        r_cw=parts["cw"],
        r_stage=parts["stage"],
        total_bytes=total,
    )


def last_op_of_parity(last_epoch: int, parity: int) -> int:
    """The epoch of the last op of ``parity`` once ops ``1..last_epoch`` have run (0: none)."""
    return last_epoch if last_epoch % 2 == parity else max(last_epoch - 1, 0)


def tag_word(epoch: int) -> int:
    """A 64-bit tagged word of ``epoch`` with payload 0, as a signed int64 value (tests)."""
    v = (epoch & 0xFFFFFFFF) << 32
    return v - (1 << 64) if v >= 1 << 63 else v


def dispatch_smem_bytes(num_ranks: int, num_tokens: int, num_experts: int) -> int:
    """Dynamic shared memory of a dispatch kernel: staging ring, then bitmap or tables."""
    el = num_experts // num_ranks
    bitmap = num_experts * (-(-num_tokens // 32)) * 4
    tables = (num_ranks * el + el + 2 * num_ranks + 1) * 4
    return _RING_BYTES + _align(max(bitmap, tables, 16), 16)


def combine_smem_bytes(num_ranks: int) -> int:
    """Dynamic shared memory of a combine kernel: staging ring, then source tables."""
    return NUM_WARPS * 2 * _SLOT_BYTES + _align((2 * num_ranks + 1) * 4, 16)


def _fmt(use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> str:
    if not use_fp8:
        return "bf16"
    if use_ue8m0:
        return "ue8m0"
    return "fp8_pow2" if round_scale else "fp8"


DISPATCH_SIGNATURE_ARGUMENTS = (
    "num_experts, hidden size, num_topk, num_max_dispatch_tokens_per_rank, and the FP8 format "
    "(use_fp8, round_scale, use_ue8m0)"
)
"""What a low-latency dispatch's signature covers."""

COMBINE_SIGNATURE_ARGUMENTS = (
    "hidden size of x, and the handles' num_experts, num_topk and num_max_dispatch_tokens_per_rank"
)
"""What a low-latency combine's signature covers."""

ERROR_ARGUMENTS_DIFFER = 3
"""``ep_core::kErrorLlArgumentsDiffer``: the record's ``peer`` wrote another signature
(``observed``) than this rank's (``expected``) into its token word of the same op."""


@functools.lru_cache(maxsize=256)
def dispatch_signature(num_experts: int, hidden: int, num_topk: int, nmax: int, fmt: str) -> int:
    """A low-latency dispatch's call signature (15 bits; :data:`DISPATCH_SIGNATURE_ARGUMENTS`).
    Written beside the token count every rank reads from every source; a rank that reads
    another records ``kErrorLlArgumentsDiffer``. Two different argument sets share a signature
    with probability 2^-15."""
    return signature_digest(("ll-dispatch", num_experts, hidden, num_topk, nmax, fmt))


@functools.lru_cache(maxsize=256)
def combine_signature(num_experts: int, hidden: int, num_topk: int, nmax: int) -> int:
    """A low-latency combine's call signature: :data:`SIGNATURE_COMBINE` plus a 15-bit digest
    of :data:`COMBINE_SIGNATURE_ARGUMENTS`, written where a dispatch writes its token count, so
    ranks in different kinds of op never agree."""
    return SIGNATURE_COMBINE | signature_digest(("ll-combine", num_experts, hidden, num_topk, nmax))


def describe_disagreement(rank: int, peer: int, observed: int, expected: int) -> str:
    """The message of an ``ERROR_ARGUMENTS_DIFFER`` record of the low-latency kernels."""
    covered = {"dispatch": DISPATCH_SIGNATURE_ARGUMENTS, "combine": COMBINE_SIGNATURE_ARGUMENTS}
    return describe_signatures(
        rank, peer, observed, expected, family="low_latency_", covered=covered
    )


def ll_dispatch_spec(num_ranks: int, num_topk: int, hidden: int, fmt: str, phase: int) -> Any:
    """KernelSpec of one dispatch instantiation (``fmt`` in bf16/fp8/fp8_pow2/ue8m0)."""
    from ep_jit import KernelSpec

    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {fmt!r}")
    return KernelSpec(
        name=f"ep_ll_dispatch_{fmt}_p{phase}",
        includes=["ep_core/sm90_ll.cuh"],
        template="ep_core::ll_dispatch",
        params=["const __grid_constant__ ep_core::LlArgs args"],
        constants={
            "kRanks": num_ranks,
            "kTopk": num_topk,
            "kHidden": hidden,
            "kNumWarps": NUM_WARPS,
            "kFp8": fmt != "bf16",
            "kRoundScale": fmt in ("fp8_pow2", "ue8m0"),
            "kUe8m0": fmt == "ue8m0",
            "kPhase": phase,
        },
        launch_bounds=(THREADS, 1),
    )


def ll_combine_spec(num_ranks: int, num_topk: int, hidden: int, phase: int) -> Any:
    """KernelSpec of one combine instantiation."""
    from ep_jit import KernelSpec

    return KernelSpec(
        name=f"ep_ll_combine_p{phase}",
        includes=["ep_core/sm90_ll.cuh"],
        template="ep_core::ll_combine",
        params=["const __grid_constant__ ep_core::LlArgs args"],
        constants={
            "kRanks": num_ranks,
            "kTopk": num_topk,
            "kHidden": hidden,
            "kNumWarps": NUM_WARPS,
            "kPhase": phase,
        },
        launch_bounds=(THREADS, 1),
    )


def shipped_kernels() -> list[Any]:
    """Representative instantiations (EP4, top-8, H 7168 and 2880) for compile-only checks."""
    register_include_root()
    specs = [ll_dispatch_spec(4, 8, 7168, fmt, _PHASE_BOTH) for fmt in _FORMATS]
    specs += [ll_dispatch_spec(4, 8, 7168, "fp8", p) for p in (_PHASE_SEND, _PHASE_RECV)]
    specs.append(ll_dispatch_spec(8, 6, 2880, "bf16", _PHASE_BOTH))
    specs += [ll_combine_spec(4, 8, 7168, p) for p in (_PHASE_SEND, _PHASE_RECV, _PHASE_BOTH)]
    specs.append(ll_combine_spec(8, 6, 2880, _PHASE_BOTH))
    return specs


@dataclass
class NvlinkLowLatencyState:
    """This engine's private part of a :class:`~ep_core.handle.LowLatencyHandle`.

    Attributes:
        cmap: ``[R, Nmax, k]`` int32: packed row ``e * L + row`` (this rank's layout) of each
            source token's lane, ``-1`` where the lane is not on this rank.
        recv_ntok: ``[R]`` int32: tokens each rank dispatched.
        num_tokens: ``T`` of this rank's dispatch.
        engine_id: ``id`` of the engine that made the handle.
    """

    cmap: torch.Tensor
    recv_ntok: torch.Tensor
    num_tokens: int
    engine_id: int


class LowLatencyEngine:
    """Low-latency dispatch/combine kernels of one group on one NVLink domain.

    Collective: every rank of ``group`` builds it with the same arguments (it allocates a
    symmetric buffer and synchronises the device once).

    Args:
        group: The process group (one GPU per rank, every pair peer-accessible).
        rank: This rank in ``group``.
        num_ranks: ``R`` (at most 32).
        num_max_dispatch_tokens_per_rank: Largest ``Nmax`` a call may use (at most 65535).
        hidden: Largest ``H`` (a multiple of 64, at most 8192).
        num_experts: Largest ``E`` (a multiple of ``R``).
        num_topk: Largest ``k`` (at most 32).
        device: This rank's CUDA device; default the current one.
        num_gpu_timeout_secs: How long a kernel waits for a peer before it records a timeout
            (``<= 0``: forever).
        num_sms: CTAs of every kernel (one per SM); 0 picks ``min(128, SMs)``. Must agree on
            every rank.
        cooperative: Launch cooperatively (guarantees that all CTAs are resident, which the
            kernels' intra-grid waits need).
        poison_outputs: Fill outputs with NaN/-1 patterns before the kernels write them (tests).

    Raises:
        ValueError: A size outside what the kernels support (on this or another rank), or ranks
            whose configurations differ (raised on every rank).
    """

    trace: torch.Tensor | None = None
    """The developer trace tensor once :meth:`enable_trace` was called."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        rank: int,
        num_ranks: int,
        num_max_dispatch_tokens_per_rank: int,
        hidden: int,
        num_experts: int,
        num_topk: int,
        device: torch.device | int | str | None = None,
        num_gpu_timeout_secs: float = 100.0,
        num_sms: int = 0,
        cooperative: bool = True,
        poison_outputs: bool = False,
    ) -> None:

        if not 1 <= num_ranks <= MAX_RANKS:
            raise ValueError(f"num_ranks must be in [1, {MAX_RANKS}], got {num_ranks}")
        if group.size() != num_ranks or group.rank() != rank:
            raise ValueError(
                f"rank {rank} / num_ranks {num_ranks} do not match the group "
                f"(rank {group.rank()} of {group.size()})"
            )
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"LowLatencyEngine needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_ctas = num_sms if num_sms > 0 else min(MAX_CTAS, sms)
        # Size errors are gathered with the configuration, so every rank fails together.
        problem = None
        smem = dispatch_smem_bytes(num_ranks, num_max_dispatch_tokens_per_rank, num_experts)
        if not 1 <= num_max_dispatch_tokens_per_rank <= MAX_LL_TOKENS:
            problem = (
                f"num_max_dispatch_tokens_per_rank must be in [1, {MAX_LL_TOKENS}], got "
                f"{num_max_dispatch_tokens_per_rank}"
            )
        elif hidden <= 0 or hidden % 64 or hidden > MAX_HIDDEN:
            problem = f"hidden must be a positive multiple of 64 up to {MAX_HIDDEN}, got {hidden}"
        elif num_experts <= 0 or num_experts % num_ranks:
            problem = f"num_experts {num_experts} must be a positive multiple of {num_ranks}"
        elif not 1 <= num_topk <= MAX_TOPK:
            problem = f"num_topk must be in [1, {MAX_TOPK}], got {num_topk}"
        elif not 1 <= num_ctas <= min(sms, 1024):
            problem = f"num_sms must be in [1, {sms}], got {num_sms}"
        elif smem > SMEM_LIMIT:
            problem = (
                f"{num_experts} experts x {num_max_dispatch_tokens_per_rank} tokens need {smem} B "
                f"of shared memory per CTA (limit {SMEM_LIMIT}); use fewer tokens or experts"
            )
        # Every rank must build the same engine (the kernels index each other's buffers and count
        # each other's CTAs), and none may fail alone (the others would wait for it in the
        # buffer's collective set-up): one all-gather, every rank raises the same error.
        config = {
            "num_ranks": num_ranks,
            "num_max_dispatch_tokens_per_rank": num_max_dispatch_tokens_per_rank,
            "hidden": hidden,
            "num_experts": num_experts,
            "num_topk": num_topk,
            "num_ctas": num_ctas,
            "cooperative": cooperative,
        }
        error = None if problem is None else ValueError(problem)
        configs = gather_checked(group, config, error, what="LowLatencyEngine", device=device)
        check_agreement(configs, "LowLatencyEngine")

        self.group = group
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_max_tokens = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts
        self.num_topk = num_topk
        self.device = device
        self.num_ctas = num_ctas
        self.cooperative = cooperative
        self.poison_outputs = poison_outputs
        # Device timeouts (the abort word is the buffer's own, in its control block).
        self._watchdog = ep_jit.DeviceWatchdog(
            LL_STAGES, rank=rank, timeout_s=max(num_gpu_timeout_secs, 0.0), device=device
        )
        self.timeout_ns = self._watchdog.timeout_ns
        self._error_code = ctypes.c_int32.from_address(self._watchdog.record_ptr)
        self.layout = compute_ll_layout(
            num_ranks,
            num_ctas,
            num_max_dispatch_tokens_per_rank,
            num_experts // num_ranks,
            hidden,
            num_topk,
        )
        self.sym = ep_jit.peer_memory(group, self.layout.total_bytes, device=device, signal_bytes=0)
        # Pinned host memory is device-accessible at the same address (UVA).
        with torch.cuda.device(device):
            self.sym.local.zero_()
            self.sym.settle()
        self._peer_bases = self.sym.peer_ptrs_dev
        self._seq = 0
        self._pending: set[int] = set()
        self._calls = [0, 0]  # dispatches, combines (host-alternated hook slots)
        self._destroyed = False

    def enable_trace(self) -> torch.Tensor:
        """Developer trace: every later launch records ``%globaltimer`` (ns) per CTA.

        Returns the ``[num_ctas, TRACE_POINTS]`` int64 tensor the kernels write (see
        :data:`TRACE_NAMES`); call before capturing graphs that should record into it.
        """
        if self.trace is None:
            self.trace = torch.zeros(
                (self.num_ctas, TRACE_POINTS), dtype=torch.int64, device=self.device
            )
        return self.trace

    def prepare(self, hidden: int | None = None, num_topk: int | None = None) -> None:
        """Compiles and loads every kernel of calls with this ``hidden`` and ``num_topk``.

        Every dispatch format and both the fused and the split (hook) phases of dispatch and
        combine, so that the first call of that shape launches without compiling or loading
        anything (it can then be captured in a CUDA graph). Compiles in parallel threads; loads
        on this engine's device. Defaults: the engine's largest ``hidden`` and ``num_topk``.
        """
        from concurrent.futures import ThreadPoolExecutor

        self._check_alive()
        h = self.hidden if hidden is None else hidden
        k = self.num_topk if num_topk is None else num_topk
        r = self.num_ranks
        phases = (_PHASE_BOTH, _PHASE_SEND, _PHASE_RECV)
        specs = [ll_dispatch_spec(r, k, h, fmt, p) for fmt in _FORMATS for p in phases]
        num_dispatch = len(specs)
        specs += [ll_combine_spec(r, k, h, p) for p in phases]
        register_include_root()  # once, before the threads
        with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
            kernels = list(pool.map(build_kernel, specs))
        # Binding (without launching) loads each kernel and raises its shared-memory limit to the
        # most a call can ask for, so no launch changes a function attribute (e.g. in a capture).
        smem_d = dispatch_smem_bytes(r, self.num_max_tokens, self.num_experts)
        smem_c = combine_smem_bytes(r)
        with torch.cuda.device(self.device):
            for i, kernel in enumerate(kernels):
                smem = smem_d if i < num_dispatch else smem_c
                kernel.bind((self.num_ctas, 1, 1), (THREADS, 1, 1), LlArgs(), smem=smem)

    # ---- state ----------------------------------------------------------------------------------
    def fits(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int, num_topk: int
    ) -> bool:
        """Whether a call of this shape can run on this engine's buffer."""
        return (
            num_max_dispatch_tokens_per_rank <= self.num_max_tokens
            and hidden <= self.hidden
            and num_experts % self.num_ranks == 0
            and num_experts // self.num_ranks <= self.layout.max_local_experts
            and num_experts <= self.num_experts
            and num_topk <= self.num_topk
        )

    def check_error(self) -> None:
        """Raises ``ep_jit.JitTimeoutError`` if a kernel recorded a timeout,
        ``ep_jit.JitPeerAbortError`` if one saw a rank give up on its op, or ``ValueError`` if
        one found a peer in another kind of op or called with other arguments (reads host
        memory).

        Call after synchronising with the kernels' stream to see their latest state.
        """
        if not self._error_code.value:
            return
        rec = self._watchdog.read_record()
        if rec.code == ERROR_ARGUMENTS_DIFFER:
            raise ValueError(
                describe_disagreement(rec.rank, rec.peer, rec.observed, rec.expected)
                + "; no rank's result is valid, and the buffer serves no more calls: build a "
                "new one"
            )
        self._watchdog.check()

    @property
    def failed(self) -> bool:
        """Whether a kernel recorded a failure (one read of pinned host memory)."""
        return self._error_code.value != 0

    def abort_words(self) -> list[int]:
        """Device addresses of every rank's abort word of this engine (``ep_jit.signal_abort``)."""
        return [base + self.layout.off_abort for base in self.sym.peer_ptrs]

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("LowLatencyEngine was destroyed")
        self.check_error()

    def _next_op(self) -> int:
        """Host-side rule of the two alternating regions; returns the next op's number.

        Nothing changes until :meth:`_commit_op` (a launch that raises leaves no trace).
        """
        seq = self._seq + 1
        stale = [s for s in self._pending if s <= seq - 2]
        if stale:
            raise RuntimeError(
                "at most two low-latency ops may wait for their receive hook: call the hook of "
                f"op {min(stale)} before issuing op {seq} (dispatches and combines count together)"
            )
        return seq

    def _commit_op(self, seq: int, kind: int, pending: bool) -> None:
        self._seq = seq
        self._calls[kind] += 1
        if pending:
            self._pending.add(seq)

    def _base_args(self, slot: int) -> LlArgs:
        lay = self.layout
        a = LlArgs()
        a.peer_bases = device_ptr(self._peer_bases)
        a.error = self._watchdog.record_ptr
        a.timeout_ns = self.timeout_ns
        a.rank = self.rank
        a.slot = slot
        a.buf_max_tokens = lay.max_tokens
        a.buf_local_experts = lay.max_local_experts
        a.buf_topk = lay.num_topk
        a.row_bytes = lay.row_bytes
        a.off_abort, a.off_slot_epoch = lay.off_abort, lay.off_slot_epoch
        a.off_cta_epoch, a.off_rel, a.off_pend = lay.off_cta_epoch, lay.off_rel, lay.off_pend
        a.region0, a.region1 = lay.region
        a.r_cnt, a.r_ntok, a.r_done = lay.r_cnt, lay.r_ntok, lay.r_done
        a.r_meta, a.r_cmask, a.r_cw, a.r_stage = lay.r_meta, lay.r_cmask, lay.r_cw, lay.r_stage
        a.trace = device_ptr(self.trace)
        return a

    def _launch(self, spec: Any, args: LlArgs, smem: int) -> None:
        build_kernel(spec).launch(
            (self.num_ctas, 1, 1), (THREADS, 1, 1), args, smem=smem, cooperative=self.cooperative
        )

    def _hook(self, seq: int, launch: Callable[[], None]) -> Callable[[], None]:
        called = False

        def hook() -> None:
            nonlocal called
            if called:
                raise RuntimeError(f"the receive hook of low-latency op {seq} was already called")
            self._check_alive()
            called = True
            with torch.cuda.device(self.device):
                launch()
            self._pending.discard(seq)

        return hook

    # ---- dispatch -------------------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        *,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[LowLatencyDispatchResult, Callable[[], None] | None]:
        """Sends every token to the ranks of its experts, packed per local expert.

        Runs on the current stream; asynchronous. Without a hook the results are complete in
        stream order after the call; with one, after the hook ran.

        Args:
            x: ``[T, H]`` bf16, contiguous, on this engine's device (``T <= Nmax``).
            topk_idx: ``[T, k]`` int64, ``-1`` = no expert.
            num_max_dispatch_tokens_per_rank: ``Nmax`` (the same on every rank).
            num_experts: ``E``.
            use_fp8: Cast to e4m3 in the sender (per token and 128 channels).
            round_scale: Power-of-two scales.
            use_ue8m0: int32 UE8M0 scale packs (requires ``round_scale``).
            return_recv_hook: Launch only the send kernel and return the receive hook.

        Returns:
            ``(LowLatencyDispatchResult, hook or None)``: ``recv_x [El, L, H]``, scales
            ``[El, L, P]`` column-major (FP8), ``recv_count [El]`` int32, the handle.

        Raises:
            ValueError: Bad shapes, dtypes or sizes beyond the engine's.
            RuntimeError: A third op while the op two calls back still waits for its hook.
            JitTimeoutError: An earlier kernel of the engine timed out.
        """
        self._check_alive()
        r, nmax = self.num_ranks, num_max_dispatch_tokens_per_rank
        if x.dim() != 2 or x.dtype != torch.bfloat16:
            raise ValueError(f"x must be a [T, H] bf16 tensor, got {x.dtype} {tuple(x.shape)}")
        if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"topk_idx must be [T, k] int64 with T = {x.shape[0]}, got {topk_idx.dtype} "
                f"{tuple(topk_idx.shape)}"
            )
        num_tokens, hidden = x.shape
        k = topk_idx.shape[1]
        self._check_shape(nmax, hidden, num_experts, k, num_tokens)
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True requires round_scale=True (UE8M0 holds powers of two)")
        if use_fp8 and hidden % 128:
            raise ValueError(f"FP8 dispatch needs hidden % 128 == 0, got {hidden}")
        x = self._operand(x, "x")
        topk_idx = self._operand(topk_idx, "topk_idx")
        fmt = _fmt(use_fp8, round_scale, use_ue8m0)
        el = num_experts // r
        slots = r * nmax
        dev = self.device

        data_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        recv_x = torch.empty((el, slots, hidden), dtype=data_dtype, device=dev)
        recv_scales = None
        if use_fp8:
            cols = -(-hidden // 512) if use_ue8m0 else hidden // 128
            dtype = torch.int32 if use_ue8m0 else torch.float32
            recv_scales = torch.empty((el, cols, slots), dtype=dtype, device=dev).transpose(1, 2)
        # One int32 allocation for the small tables (the int64 ranges first: 8-byte aligned).
        n_range, n_src, n_cmap = 2 * el * r, el * slots, r * nmax * k
        ints = torch.empty(n_range + el + n_src + n_cmap + r, dtype=torch.int32, device=dev)
        recv_range = ints[:n_range].view(torch.int64).view(el, r)
        recv_count = ints[n_range : n_range + el]
        recv_src_info = ints[n_range + el : n_range + el + n_src].view(el, slots)
        cmap = ints[n_range + el + n_src : n_range + el + n_src + n_cmap].view(r, nmax, k)
        recv_ntok = ints[n_range + el + n_src + n_cmap :]
        if self.poison_outputs:
            recv_x.view(torch.uint8).fill_(0x7F)  # NaN in e4m3 and bf16 (0x7F7F)
            if recv_scales is not None:
                recv_scales.view(torch.int32).fill_(0x7FC00000)
            ints.fill_(-7)

        seq = self._next_op()
        a = self._base_args(self._calls[0] & 1)
        a.x, a.topk_idx = device_ptr(x), device_ptr(topk_idx)
        a.recv_x, a.recv_scales = device_ptr(recv_x), device_ptr(recv_scales)
        a.recv_count, a.recv_src_info = device_ptr(recv_count), device_ptr(recv_src_info)
        a.recv_range = device_ptr(recv_range)
        a.cmap, a.recv_ntok = device_ptr(cmap), device_ptr(recv_ntok)
        a.num_tokens, a.num_experts, a.num_local_experts = num_tokens, num_experts, el
        a.num_max_tokens = nmax
        a.signature = dispatch_signature(num_experts, hidden, k, nmax, fmt)
        smem = dispatch_smem_bytes(r, num_tokens, num_experts)

        # The closure keeps the inputs alive until the receive kernel is enqueued.
        def launch(phase: int, _keep: tuple[torch.Tensor, ...] = (x, topk_idx)) -> None:
            self._launch(ll_dispatch_spec(r, k, hidden, fmt, phase), a, smem)

        hook = None
        with torch.cuda.device(dev):
            launch(_PHASE_SEND if return_recv_hook else _PHASE_BOTH)
        self._commit_op(seq, 0, return_recv_hook)
        if return_recv_hook:
            hook = self._hook(seq, lambda: launch(_PHASE_RECV))

        handle = LowLatencyHandle(
            rank=self.rank,
            num_ranks=r,
            num_experts=num_experts,
            num_max_dispatch_tokens_per_rank=nmax,
            hidden=hidden,
            num_topk=k,
            recv_src_info=recv_src_info,
            recv_layout_range=recv_range,
            recv_count=recv_count,
            backend_state=NvlinkLowLatencyState(cmap, recv_ntok, num_tokens, id(self)),
        )
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle), hook

    # ---- combine --------------------------------------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        out: torch.Tensor | None = None,
        return_recv_hook: bool = False,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """Weighted sum of the expert outputs back on each token's rank (``docs/design.md``).

        Runs on the current stream; asynchronous. The send kernel waits for every rank's
        weights (written at the start of the same op), so in hook mode it returns once the
        partial sums are on their way; the hook reduces them into ``out``.

        Args:
            x: ``[El, R*Nmax, H]`` bf16 expert outputs in the dispatch's packed layout.
            topk_idx: ``[T, k]`` int64 of the dispatch (lanes may be set to ``-1``).
            topk_weights: ``[T, k]`` float32.
            handle: The handle of a dispatch made by this engine.
            out: Optional ``[T, H]`` bf16 destination.
            return_recv_hook: Launch only the send kernel and return the receive hook.

        Returns:
            ``(out [T, H] bf16, hook or None)``.

        Raises:
            ValueError/TypeError: Bad shapes, dtypes, or a handle of another backend or engine.
            RuntimeError: A third op while the op two calls back still waits for its hook.
            JitTimeoutError: An earlier kernel of the engine timed out.
        """
        self._check_alive()
        state = handle.backend_state
        if not isinstance(state, NvlinkLowLatencyState) or state.engine_id != id(self):
            raise TypeError("the handle was not made by this engine's low-latency dispatch")
        r, nmax, k = self.num_ranks, handle.num_max_dispatch_tokens_per_rank, handle.num_topk
        el, hidden = handle.num_local_experts, x.shape[-1]
        num_tokens = state.num_tokens
        if x.dtype != torch.bfloat16 or tuple(x.shape) != (el, r * nmax, hidden):
            raise ValueError(
                f"x must be [{el}, {r * nmax}, H] bf16, got {x.dtype} {tuple(x.shape)}"
            )
        if tuple(topk_idx.shape) != (num_tokens, k) or topk_idx.dtype != torch.int64:
            raise ValueError(
                f"topk_idx must be [{num_tokens}, {k}] int64, got {topk_idx.dtype} "
                f"{tuple(topk_idx.shape)}"
            )
        if tuple(topk_weights.shape) != (num_tokens, k):
            raise ValueError(
                f"topk_weights must be [{num_tokens}, {k}], got {tuple(topk_weights.shape)}"
            )
        self._check_shape(nmax, hidden, handle.num_experts, k, num_tokens)
        x = self._operand(x, "x")
        topk_idx = self._operand(topk_idx, "topk_idx")
        weights = self._operand(topk_weights.to(torch.float32), "topk_weights")
        dev = self.device
        target = out
        if out is not None:
            if out.dtype != torch.bfloat16 or tuple(out.shape) != (num_tokens, hidden):
                raise ValueError(
                    f"out must be [{num_tokens}, {hidden}] bf16, got {out.dtype} {tuple(out.shape)}"
                )
            if out.device != dev:
                raise ValueError(f"out is on {out.device}, expected {dev}")
            if not out.is_contiguous() or out.data_ptr() % 16:
                target = None
        if target is None:
            target = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=dev)

        seq = self._next_op()
        a = self._base_args(self._calls[1] & 1)
        a.x, a.topk_idx, a.topk_weights = device_ptr(x), device_ptr(topk_idx), device_ptr(weights)
        a.cmap, a.recv_ntok, a.out = (
            device_ptr(state.cmap),
            device_ptr(state.recv_ntok),
            device_ptr(target),
        )
        a.num_tokens, a.num_experts, a.num_local_experts = num_tokens, handle.num_experts, el
        a.num_max_tokens = nmax
        a.signature = combine_signature(handle.num_experts, hidden, k, nmax)
        smem = combine_smem_bytes(r)

        # The closure keeps the inputs alive until the receive kernel is enqueued.
        def launch(phase: int, _keep: tuple[Any, ...] = (x, topk_idx, weights, state)) -> None:
            self._launch(ll_combine_spec(r, k, hidden, phase), a, smem)
            if phase != _PHASE_SEND and out is not None and target is not out:
                out.copy_(target)

        hook = None
        with torch.cuda.device(dev):
            launch(_PHASE_SEND if return_recv_hook else _PHASE_BOTH)
        self._commit_op(seq, 1, return_recv_hook)
        if return_recv_hook:
            hook = self._hook(seq, lambda: launch(_PHASE_RECV))
        return (out if out is not None else target), hook

    # ---- helpers --------------------------------------------------------------------------------
    def _check_shape(
        self, nmax: int, hidden: int, num_experts: int, k: int, num_tokens: int
    ) -> None:
        if not 1 <= nmax <= self.num_max_tokens:
            raise ValueError(
                f"num_max_dispatch_tokens_per_rank {nmax} must be in [1, {self.num_max_tokens}]"
            )
        if num_tokens > nmax:
            raise ValueError(f"{num_tokens} tokens exceed num_max_dispatch_tokens_per_rank {nmax}")
        if hidden <= 0 or hidden % 64 or hidden > self.hidden:
            raise ValueError(f"hidden {hidden} must be a multiple of 64 up to {self.hidden}")
        if num_experts <= 0 or num_experts % self.num_ranks or num_experts > self.num_experts:
            raise ValueError(
                f"num_experts {num_experts} must be a multiple of {self.num_ranks} up to "
                f"{self.num_experts}"
            )
        if not 1 <= k <= self.num_topk:
            raise ValueError(f"num_topk {k} must be in [1, {self.num_topk}]")

    def _operand(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, expected {self.device}")
        t = t.contiguous()
        if t.numel() and t.data_ptr() % 16:
            t = t.clone()  # 16-byte vector loads
        return t

    def _jump_epoch_for_testing(self, last_epoch: int) -> None:
        """Tests only: makes the buffer look as if ``last_epoch`` ops had run and been released.

        Lets a test reach the 32-bit tag wrap (op 2^32) and the tag refresh ops (epochs 0 and 1
        modulo 2^30, ``kTagRefreshPeriod``) without running billions of ops. Collective: every
        rank calls it with the same value, with no kernel in flight and no receive hook pending.
        """
        self._check_alive()
        if self._pending:
            raise RuntimeError("a receive hook is still pending")
        if last_epoch < 0:
            raise ValueError(f"last_epoch must be >= 0, got {last_epoch}")
        lay, nc, r = self.layout, self.num_ctas, self.num_ranks
        with torch.cuda.device(self.device):
            self.sym.settle()
            self.sym.tensor(lay.off_cta_epoch, (nc,), torch.int64).fill_(last_epoch)
            self.sym.tensor(lay.off_pend, (nc,), torch.int64).zero_()
            # rel[q][peer] counts the CTA releases of ops of parity q (see warp_gate).
            rel = self.sym.tensor(lay.off_rel, (2, r), torch.int64)
            rel[0].fill_(nc * (last_epoch // 2))
            rel[1].fill_(nc * ((last_epoch + 1) // 2))
            # Tagged words and flags of each region as the last op of its parity left them.
            k, n, el = lay.num_topk, lay.max_tokens, lay.max_local_experts
            for p in (0, 1):
                last = last_op_of_parity(last_epoch, p)
                base = lay.region[p]
                for off, count in ((lay.r_cnt, r * el), (lay.r_ntok, r), (lay.r_cmask, r * n)):
                    self.sym.tensor(base + off, (count,), torch.int64).fill_(tag_word(last))
                self.sym.tensor(base + lay.r_cw, (r * n * k,), torch.int64).fill_(tag_word(last))
                self.sym.tensor(base + lay.r_done, (r * nc,), torch.int64).fill_(last)
            self.sym.settle()
        self._seq = last_epoch

    def destroy(self) -> None:
        """Frees the symmetric buffer (idempotent). Synchronises the device first."""
        if self._destroyed:
            return
        self._destroyed = True
        self._pending.clear()
        ep_jit.wait_device(self.device, what="LowLatencyEngine.destroy")
        self.sym.destroy()
