"""Kernel specs, launch configurations and launches of the high-throughput NVLink kernels.

Each kernel is one instantiation of a device template in ``include/ep_core/sm90_ht_*.cuh`` with
the shape as template constants; ep-jit compiles it on first use and caches it on disk. The
launch configuration (warps per role, shared-memory slots per warp) is derived from the row size
so that one CTA fills one SM's shared memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ep_core.nvlink._common import (
    SIGNATURE_COMBINE,
    build_kernel,
    describe_signatures,
    device_ptr,
    register_include_root,
    signature_digest,
)
from ep_core.nvlink.layout import (
    CHUNK_TOKENS,
    HtCombineArgs,
    HtDispatchArgs,
    NvlinkSizing,
    SymLayout,
    combine_payload_bytes,
    dispatch_payload_bytes,
)

__all__ = [
    "CHECK_MAX_CTAS",
    "COMBINE_SIGNATURE_ARGUMENTS",
    "DEFAULT_NUM_SMS",
    "ERROR_ARGUMENTS_DIFFER",
    "SIGNATURE_ARGUMENTS",
    "SIGNATURE_COMBINE",
    "SPLIT_MIN_SMS",
    "STAGES",
    "STAGE_DISPATCH_INFO",
    "CombinePlan",
    "DispatchReplay",
    "HtContext",
    "check_ctas",
    "combine_config",
    "combine_signature",
    "describe_disagreement",
    "dispatch_config",
    "dispatch_signature",
    "launch_dispatch",
    "launch_dispatch_tail",
    "launch_layout",
    "launch_zero",
    "shipped_kernels",
    "use_split",
    "use_split_combine",
]

DEFAULT_NUM_SMS = 24
"""SMs used when a call passes ``num_sms=0`` and the caller gave no analytical choice."""

SPLIT_MIN_SMS = 20
"""From this many SMs on, the default launches give each CTA one role (senders or receivers,
pushers or reducers); below it every CTA holds both. Measured on 4x H200 at 8-32 SMs
(docs/dev/kernel-notes.md): the split shapes were 4-25 % slower below 20 SMs, equal at 20
and faster from 24 on."""


def use_split(num_sms: int) -> bool:
    """Whether launches of ``num_sms`` CTAs give each CTA one role (see ``SPLIT_MIN_SMS``)."""
    return num_sms >= SPLIT_MIN_SMS


def use_split_combine(num_sms: int, num_ranks: int) -> bool:
    """``use_split`` for the combine: with two ranks mixed CTAs (4 push + 12 reducer warps) at
    every SM count, 15-20 % faster than the split launch at 20-32 SMs on 2x H200; from three
    ranks on as ``use_split`` (on 4x H200 the split launch stays 2-4 % ahead of the mixed one at
    20 and 24 SMs). Measurements: docs/dev/kernel-notes.md."""
    return num_ranks > 2 and use_split(num_sms)


SMEM_LIMIT = 232448
"""Dynamic shared memory one CTA may use on sm_90 (227 KiB)."""

STAGES = {
    1: "dispatch: waiting for a peer's row counts",
    2: "dispatch: waiting for a peer's chunk of rows",
    3: "dispatch: waiting for a TMA load",
    4: "dispatch: waiting for every peer to start",
    11: "combine: waiting for a peer's chunk of rows",
    12: "combine: waiting for a TMA load",
    13: "combine: waiting for every peer to start",
}
"""Stage ids written by the kernels' timed waits (``enum DispatchStage/CombineStage``); the
backend's ``ep_jit.DeviceWatchdog`` names them in its ``JitTimeoutError``."""


def _first_role_ctas(grid: int, fraction: float) -> int:
    """CTAs of the first role in a split launch of ``grid`` CTAs (at least one of each role)."""
    return min(grid - 1, max(1, round(grid * fraction)))


def _cta_threads(split: bool, first_warps: int, second_warps: int) -> int:
    """Threads per CTA: a split launch's CTAs hold one role each, mixed ones both."""
    return 32 * (max(first_warps, second_warps) if split else first_warps + second_warps)


@dataclass(frozen=True)
class DispatchConfig:
    send_warps: int
    recv_warps: int
    send_slots: int
    recv_slots: int
    payload: int
    num_ranks: int
    split: bool = False
    """Sender and receiver warps in different CTAs (``kSplit``); needs 2 SMs or more."""
    send_fraction: float = 0.5
    """With ``split``: the share of the CTAs that send."""

    @classmethod
    def from_override(cls, ov: tuple[int, ...], payload: int, num_ranks: int) -> DispatchConfig:
        """From a developer override: send warps, recv warps, send slots, recv slots[, split[, %]].

        ``%`` is the share of the CTAs that send, in percent (default 50).
        """
        return cls(
            ov[0],
            ov[1],
            ov[2],
            ov[3],
            payload,
            num_ranks,
            split=len(ov) > 4 and bool(ov[4]),
            send_fraction=ov[5] / 100 if len(ov) > 5 else 0.5,
        )

    def num_send_ctas(self, grid: int) -> int:
        """Sender CTAs of a split launch of ``grid`` CTAs (at least one of each role)."""
        return _first_role_ctas(grid, self.send_fraction)

    @property
    def threads(self) -> int:
        return _cta_threads(self.split, self.send_warps, self.recv_warps)

    def smem_bytes(self, num_local_experts: int) -> int:
        """Mirror of ``HtDispatch::smem_bytes``."""
        send = self.send_warps * self.send_slots
        recv = self.recv_warps * self.recv_slots
        slots = max(send, recv) if self.split else send + recv
        return slots * (self.payload + 8) + send * (1 + self.num_ranks) * 4 + num_local_experts * 4


@dataclass(frozen=True)
class CombineConfig:
    push_warps: int
    reduce_warps: int
    slots: int
    payload: int
    split: bool = False
    """Push and reduce warps in different CTAs (``kSplit``); needs 2 SMs or more."""
    push_fraction: float = 0.5
    """With ``split``: the share of the CTAs that push."""

    @property
    def threads(self) -> int:
        return _cta_threads(self.split, self.push_warps, self.reduce_warps)

    @classmethod
    def from_override(cls, ov: tuple[int, ...], payload: int) -> CombineConfig:
        """From a developer override: push warps, reduce warps, slots[, split[, push %]]."""
        return cls(
            ov[0],
            ov[1],
            ov[2],
            payload,
            split=len(ov) > 3 and bool(ov[3]),
            push_fraction=ov[4] / 100 if len(ov) > 4 else 0.5,
        )

    def num_push_ctas(self, grid: int) -> int:
        """Push CTAs of a split launch of ``grid`` CTAs (at least one of each role)."""
        return _first_role_ctas(grid, self.push_fraction)

    def smem_bytes(self) -> int:
        """Mirror of ``HtCombine::smem_bytes``."""
        return self.push_warps * self.slots * (self.payload + 8 + 4)


def dispatch_config(
    payload: int, num_ranks: int, num_local_experts: int, split: bool = True
) -> DispatchConfig:
    """Warps and TMA slots per role so that the slots fill one SM's shared memory.

    With ``split`` sender and receiver warps run in different CTAs: 8 warps x 3 slots per CTA
    with 10 of every 24 CTAs sending when 24 payload rows fit in shared memory (FP8 rows of
    7.5 KB; half of them with two ranks, whose receivers copy only half of the rows), 4 x 3 with
    half of the CTAs sending when 12 fit (bf16 rows of 14 KB). Without it every CTA holds both
    roles: 4 sender warps x 3 slots + 8 receiver warps x 2 slots when 28 rows fit, 3 x 2 + 3 x 3
    when 15 fit. These were the fastest shapes measured on 4x H200 (2026-11-22; the two-rank FP8
    share on 2x H200; docs/dev/kernel-notes.md); the split ones from 20 SMs on, the mixed ones
    below (``use_split``).
    """
    budget = SMEM_LIMIT - num_local_experts * 4 - 1024
    per_slot = payload + 8 + (1 + num_ranks) * 4
    total = budget // per_slot
    if split and total >= 24:
        share = 0.5 if num_ranks == 2 else 10 / 24
        return DispatchConfig(8, 8, 3, 3, payload, num_ranks, split=True, send_fraction=share)
    if split and total >= 12:
        return DispatchConfig(4, 4, 3, 3, payload, num_ranks, split=True)
    if total >= 28:
        return DispatchConfig(4, 8, 3, 2, payload, num_ranks)
    if total >= 25:
        return DispatchConfig(3, 4, 3, 4, payload, num_ranks)
    if total >= 15:
        return DispatchConfig(3, 3, 2, 3, payload, num_ranks)
    if total >= 14:
        return DispatchConfig(3, 2, 2, 4, payload, num_ranks)
    for warps in (4, 3, 2, 1):
        per_warp = min(6, total // (2 * warps))
        if per_warp >= 2:
            return DispatchConfig(warps, warps, per_warp, per_warp, payload, num_ranks)
    raise ValueError(f"rows of {payload} bytes are too large for the dispatch kernel")


def combine_config(payload: int, split: bool = True) -> CombineConfig:
    """Push warps with TMA slots and reducer warps.

    With ``split`` half of the CTAs push (4 warps, up to 4 slots each) and the other half reduce
    (16 warps): on 4x H200 this took combine of 4096 x 7168 at 24 SMs from 705 to 616 us
    (docs/dev/kernel-notes.md). Without it (``use_split_combine``: two ranks, or fewer than 20
    SMs) each CTA has 4 push warps with up to 3 slots (fewer warps when their slots do not fit)
    and 12 reducer warps: the fastest mixed shape measured on 2x H200 and on 4x H200
    (8-16 SMs 4-10 % faster than 5 push warps, whose 17-warp CTA is capped at 96
    registers and spills).
    """
    budget = SMEM_LIMIT - 512
    most_warps, most_slots, reducers = (4, 4, 16) if split else (4, 3, 12)
    for warps in range(most_warps, 0, -1):
        slots = min(most_slots, budget // (warps * (payload + 12)))
        if slots >= 2:
            return CombineConfig(warps, reducers, slots, payload, split=split)
    raise ValueError(f"rows of {payload} bytes are too large for the combine kernel")


LAYOUT_THREADS = 1024
"""Threads per CTA of the routing layout kernel (``kLayoutThreads``)."""


def _layout_spec(num_ranks: int, num_topk: int) -> Any:
    from ep_jit import KernelSpec

    return KernelSpec(
        name="ep_ht_layout",
        includes=["ep_core/smxx_ht_common.cuh"],
        template="ep_core::ht_layout",
        params=[
            "const int64_t* topk_idx",
            "int64_t num_tokens",
            "int64_t num_local_experts",
            "int32_t* send_row",
            "bool* is_in",
            "int32_t* chunk_prefix",
            "int64_t* topk_copy",
            "int64_t num_experts",
            "int32_t* zero",
            "int64_t num_zero",
            "int32_t* bad",
        ],
        constants={"kRanks": num_ranks, "kTopk": num_topk, "kChunk": CHUNK_TOKENS},
        launch_bounds=(LAYOUT_THREADS, 1),
    )


TAIL_THREADS = 256
TAIL_MAX_CTAS = 64


def _tail_spec(num_topk: int) -> Any:
    from ep_jit import KernelSpec

    return KernelSpec(
        name="ep_ht_dispatch_tail",
        includes=["ep_core/smxx_ht_common.cuh"],
        template="ep_core::ht_dispatch_tail",
        params=[
            "const int32_t* valid_rows",
            "int64_t rows",
            "int32_t* meta",
            "int64_t* topk_idx",
            "float* topk_weights",
            "void* x",
            "int64_t x_row_bytes",
            "void* x_sf",
            "int64_t sf_row_bytes",
        ],
        constants={"kTopk": num_topk},
        launch_bounds=(TAIL_THREADS, 1),
    )


CHECK_MAX_CTAS = 32
"""Most check CTAs of the dispatch prologue (``ht_layout``): one verdict word per CTA, which one
warp of the dispatch kernel reads (one word per lane)."""


def check_ctas(num_tokens: int) -> int:
    """Check CTAs of the dispatch prologue for ``num_tokens`` tokens (one thread per token, in
    CTAs of ``LAYOUT_THREADS``)."""
    return max(1, min(CHECK_MAX_CTAS, -(-num_tokens // LAYOUT_THREADS)))


ZERO_THREADS = 256
"""Threads of the counter-zeroing kernel (``kZeroThreads``)."""


def _zero_spec() -> Any:
    from ep_jit import KernelSpec

    return KernelSpec(
        name="ep_ht_zero",
        includes=["ep_core/smxx_ht_common.cuh"],
        template="ep_core::ht_zero_words",
        params=["int32_t* zero", "int64_t num_zero"],
        launch_bounds=(ZERO_THREADS, 1),
    )


def _dispatch_spec(
    num_ranks: int, num_topk: int, row_bytes: int, num_sf: int, cfg: DispatchConfig
) -> Any:
    from ep_jit import KernelSpec

    return KernelSpec(
        name="ep_ht_dispatch",
        includes=["ep_core/sm90_ht_dispatch.cuh"],
        template="ep_core::ht_dispatch",
        params=["const __grid_constant__ ep_core::HtDispatchArgs args"],
        constants={
            "kRanks": num_ranks,
            "kTopk": num_topk,
            "kRowBytes": row_bytes,
            "kNumSF": num_sf,
            "kNumSendWarps": cfg.send_warps,
            "kNumRecvWarps": cfg.recv_warps,
            "kSendSlots": cfg.send_slots,
            "kRecvSlots": cfg.recv_slots,
            "kChunk": CHUNK_TOKENS,
            "kSplit": cfg.split,
        },
        launch_bounds=(cfg.threads, 1),
    )


def _combine_spec(num_ranks: int, num_topk: int, hidden: int, cfg: CombineConfig) -> Any:
    from ep_jit import KernelSpec

    return KernelSpec(
        name="ep_ht_combine",
        includes=["ep_core/sm90_ht_combine.cuh"],
        template="ep_core::ht_combine",
        params=["const __grid_constant__ ep_core::HtCombineArgs args"],
        constants={
            "kRanks": num_ranks,
            "kTopk": num_topk,
            "kHidden": hidden,
            "kNumPushWarps": cfg.push_warps,
            "kNumReduceWarps": cfg.reduce_warps,
            "kSlots": cfg.slots,
            "kChunk": CHUNK_TOKENS,
            "kSplit": cfg.split,
        },
        launch_bounds=(cfg.threads, 1),
    )


def shipped_kernels() -> list[Any]:
    """Representative instantiations of every kernel ep-core ships (for compile-only checks).

    High-throughput kernels only; ``ep_core.nvlink.shipped_kernels`` adds the low-latency ones.
    """
    register_include_root()
    specs = [_layout_spec(4, 8), _layout_spec(4, 16), _tail_spec(8), _zero_spec()]
    for row_bytes, num_sf in ((7168, 56), (14336, 0), (5760, 0)):
        cfg = dispatch_config(dispatch_payload_bytes(row_bytes, num_sf, 8), 4, 64)
        specs.append(_dispatch_spec(4, 8, row_bytes, num_sf, cfg))
    # Fewer than SPLIT_MIN_SMS SMs: mixed-role CTAs.
    for row_bytes, num_sf in ((7168, 56), (14336, 0)):
        cfg = dispatch_config(dispatch_payload_bytes(row_bytes, num_sf, 8), 4, 64, split=False)
        specs.append(_dispatch_spec(4, 8, row_bytes, num_sf, cfg))
    for hidden in (7168, 2880):
        specs.append(_combine_spec(4, 8, hidden, combine_config(combine_payload_bytes(hidden, 8))))
    specs.append(
        _combine_spec(4, 8, 7168, combine_config(combine_payload_bytes(7168, 8), split=False))
    )
    return specs


@dataclass
class HtContext:
    """What the high-throughput launchers need of a buffer (the backend holds one).

    Attributes:
        rank: This rank.
        num_ranks: Ranks of the buffer.
        sizing: The buffer's sizing.
        layout: Offsets of the buffer's regions (passed to the kernels by value).
        peer_bases: ``[R]`` int64 CUDA tensor of the peers' buffer addresses.
        watchdog: The ``ep_jit.DeviceWatchdog`` whose record the kernels fill on a timeout.
        dispatch_override: Developer override of the dispatch's launch shape (benchmarks):
            (send warps, recv warps, send slots, recv slots[, split[, send %]]).
        combine_override: The same for the combine: (push, reduce, slots[, split[, push %]]).
        trace_dispatch: Developer trace, ``[CTAs, 32 warps, 8]`` int64, written when set.
        trace_combine: The same for the combine.
    """

    rank: int
    num_ranks: int
    sizing: NvlinkSizing
    layout: SymLayout
    peer_bases: torch.Tensor
    watchdog: Any
    dispatch_override: tuple[int, ...] | None = None
    combine_override: tuple[int, ...] | None = None
    trace_dispatch: torch.Tensor | None = None
    trace_combine: torch.Tensor | None = None
    arg_templates: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    """Launches by shape (``_Launch``): a kernel-argument struct with the fields that do not
    change between calls of one shape filled in once, whose other fields each call sets (see
    ``launch_dispatch``)."""


class _Launch:
    """A launch of one shape: its argument struct (fixed fields filled once, the others set by
    each call), grid, block and shared memory; ``seen``: the plan (:class:`DispatchReplay`,
    :class:`CombinePlan`) that wrote the struct's per-handle fields last (see :meth:`claim`);
    ``None`` after a launcher that sets every field."""

    __slots__ = ("args", "block", "bound", "grid", "seen", "signatures", "smem")

    def __init__(
        self, args: Any, grid: tuple[int, int, int], block: tuple[int, int, int], smem: int
    ) -> None:
        self.args = args
        self.grid = grid
        self.block = block
        self.smem = smem
        self.seen: Any = None
        self.bound: Any = None  # the kernel's BoundLaunch of ``args`` (made at the first call)
        self.signatures: tuple[int, ...] = ()  # a combine's, without and with weights

    def claim(self, owner: object, fixed: tuple[tuple[str, Any], ...]) -> None:
        """Writes ``fixed`` (``(field, value)`` pairs) into the struct unless ``owner`` (a plan
        holding those values) was the last to write them."""
        if self.seen is not owner:
            a = self.args
            for name, value in fixed:
                setattr(a, name, value)
            self.seen = owner

    def launch(self, kernel: Any) -> None:
        """Enqueues ``kernel`` (cooperative) with the struct as it is now, on the current
        stream. The launch is bound once: it passes the struct by address, so every call sees
        the fields its launcher has just set, without packing arguments again."""
        bound = self.bound
        if bound is None:
            bound = self.bound = kernel.bind(
                self.grid, self.block, self.args, smem=self.smem, cooperative=True
            )
        bound()


_configured: dict[tuple[Any, ...], tuple[Any, Any]] = {}
"""Launch configuration and kernel per shape, so a call builds no spec (host overhead)."""


def _plain_kernel(make_spec: Any, *args: int) -> Any:
    """The kernel of ``make_spec(*args)`` for a launcher with no launch configuration to choose,
    built at its first use (kept in ``_configured`` by spec function and arguments)."""
    key = (make_spec, *args)
    found = _configured.get(key)
    if found is None:
        found = _configured[key] = (None, build_kernel(make_spec(*args)))
    return found[1]


def launch_layout(
    num_ranks: int,
    num_topk: int,
    topk_idx: torch.Tensor,
    num_local_experts: int,
    send_row: torch.Tensor | int,
    is_in: torch.Tensor | int,
    chunk_prefix: torch.Tensor | int,
    topk_copy: torch.Tensor | int | None = None,
    *,
    num_experts: int = 0,
    zero: torch.Tensor | int | None = None,
    num_zero: int = 0,
    bad: torch.Tensor | int | None = None,
    num_bad: int = 0,
) -> None:
    """A fresh dispatch's prologue on the current stream, one launch (``LAYOUT_THREADS``
    threads per CTA): the routing layout (one CTA per rank; its outputs given as tensors or
    device addresses); a copy of ``topk_idx`` into ``topk_copy`` when given (same shape,
    contiguous); ``num_zero`` int32 words zeroed at
    ``zero`` (a tensor or a device address); and, when ``bad`` is given, ``num_bad =
    check_ctas(T)`` verdict words written there (1: ``topk_idx`` has an id outside
    ``[-1, num_experts)`` or a repeated expert in a row), by CTAs beside the layout's."""
    extra = num_bad if bad is not None else (1 if num_zero else 0)
    _plain_kernel(_layout_spec, num_ranks, num_topk).launch(
        (num_ranks + extra, 1, 1),
        (LAYOUT_THREADS, 1, 1),
        topk_idx,
        topk_idx.shape[0],
        num_local_experts,
        send_row,
        is_in,
        chunk_prefix,
        topk_copy,
        num_experts,
        zero,
        num_zero,
        bad,
    )


def launch_zero(zero: torch.Tensor | int, num_zero: int) -> None:
    """Zeroes ``num_zero`` int32 words at ``zero`` (a tensor or a device address) on the current
    stream: the counters of a dispatch that has no prologue (a cached one that reads them)."""
    _plain_kernel(_zero_spec).launch((1, 1, 1), (ZERO_THREADS, 1, 1), zero, num_zero)


def launch_dispatch_tail(
    valid_rows: torch.Tensor | int,
    out_meta: torch.Tensor | int,
    out_idx: torch.Tensor,
    out_w: torch.Tensor | None,
    out_x: torch.Tensor | None = None,
    out_sf: torch.Tensor | None = None,
) -> None:
    """Fills the rows of a dispatch's worst-case outputs past the valid count on the current
    stream: metadata and ids -1, weights 0, received rows and scales zero (as the reference
    backend). ``valid_rows``: the count, an int32 in device memory (a tensor or its address),
    read by the kernel; ``out_meta`` a tensor or its address; ``out_x`` and ``out_sf``
    contiguous ``[rows, ...]`` or ``None``."""
    rows, k = out_idx.shape
    kernel = _plain_kernel(_tail_spec, k)
    x_bytes = 0 if out_x is None else out_x.shape[1] * out_x.element_size()
    sf_bytes = 0 if out_sf is None else out_sf.shape[1] * out_sf.element_size()
    work = max(rows * k, rows * x_bytes // 16)
    ctas = max(1, min(TAIL_MAX_CTAS, -(-work // TAIL_THREADS)))
    kernel.launch(
        (ctas, 1, 1),
        (TAIL_THREADS, 1, 1),
        valid_rows,
        rows,
        out_meta,
        out_idx,
        out_w,
        out_x,
        x_bytes,
        out_sf,
        sf_bytes,
    )


def _dispatch_launch(
    ctx: HtContext,
    num_topk: int,
    row_bytes: int,
    num_sf: int,
    num_local_experts: int,
    num_max_tokens: int,
    expert_alignment: int,
    num_sms: int,
) -> tuple[_Launch, Any]:
    """The dispatch kernel of this shape and its launch (the struct's fixed fields filled in),
    made at the first call of the shape."""
    r = ctx.num_ranks
    splittable = use_split(num_sms)
    key = (
        "dispatch",
        r,
        num_topk,
        row_bytes,
        num_sf,
        num_local_experts,
        ctx.dispatch_override,
        splittable,
    )
    found = _configured.get(key)
    if found is None:
        payload = dispatch_payload_bytes(row_bytes, num_sf, num_topk)
        if ctx.dispatch_override is not None:
            cfg = DispatchConfig.from_override(ctx.dispatch_override, payload, r)
        else:
            cfg = dispatch_config(payload, r, num_local_experts, split=splittable)
        spec = _dispatch_spec(r, num_topk, row_bytes, num_sf, cfg)
        found = _configured[key] = (cfg, build_kernel(spec))
    cfg, kernel = found
    # The fields fixed for this shape, buffer and launch come from a template made once.
    tkey = (key, num_max_tokens, expert_alignment, num_sms, device_ptr(ctx.trace_dispatch))
    template = ctx.arg_templates.get(tkey)
    if template is None:
        t = HtDispatchArgs()
        t.peer_bases = device_ptr(ctx.peer_bases)
        t.error = ctx.watchdog.record_ptr
        t.num_max_tokens = num_max_tokens
        t.num_local_experts, t.max_chunks = num_local_experts, ctx.sizing.max_chunks
        t.expert_alignment, t.timeout_ns, t.rank = (
            expert_alignment,
            ctx.watchdog.timeout_ns,
            ctx.rank,
        )
        t.lay = ctx.layout
        t.trace = device_ptr(ctx.trace_dispatch) or None
        t.num_send_ctas = cfg.num_send_ctas(num_sms) if cfg.split else 0
        if len(ctx.arg_templates) > 64:
            ctx.arg_templates.clear()
        shape = ((num_sms, 1, 1), (cfg.threads, 1, 1), cfg.smem_bytes(num_local_experts))
        template = ctx.arg_templates[tkey] = _Launch(t, *shape)
    return template, kernel


def launch_dispatch(
    ctx: HtContext,
    *,
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    send_row: torch.Tensor | int,
    chunk_prefix: torch.Tensor | int,
    out_x: torch.Tensor,
    out_sf: torch.Tensor | None,
    out_idx: torch.Tensor,
    out_w: torch.Tensor | None,
    out_meta: torch.Tensor | int,
    counts: torch.Tensor | int,
    src_bad: torch.Tensor | int,
    topk_bad: torch.Tensor | int | None,
    num_topk_bad: int,
    chunk_end: torch.Tensor | int,
    nchunks: torch.Tensor | int,
    num_max_tokens: int,
    num_local_experts: int,
    expert_alignment: int,
    num_sms: int,
) -> None:
    """Dispatch kernel on the current stream (cooperative, ``num_sms`` CTAs).

    ``counts``: ``[R psum per source | El counts | El aligned psum]``; the per-expert counts are
    added to what is there (zeroed by the prologue). A :class:`DispatchReplay`, whose counts
    nobody reads, launches the same kernel with ``count_experts`` off: then neither they nor
    their prefix sums are written.

    ``topk_bad``: the prologue's ``num_topk_bad`` verdict words on ``topk_idx``
    (``launch_layout``) or ``None``; the kernel announces their OR to every peer with its
    token count, and writes every source's verdict into ``src_bad`` (``[R]`` int32, 1 = that
    rank's ids were bad). ``out_meta``, ``counts``, ``src_bad`` and ``topk_bad`` may be given
    as device addresses.
    """
    k = topk_idx.shape[1]
    row_bytes = x.shape[1] * x.element_size()
    num_sf = 0 if x_scales is None else x_scales.shape[1]
    template, kernel = _dispatch_launch(
        ctx, k, row_bytes, num_sf, num_local_experts, num_max_tokens, expert_alignment, num_sms
    )
    # The launch copies the struct's bytes, so one struct per shape serves every call: each
    # call overwrites every field that is not fixed for the shape.
    a = template.args
    a.x, a.x_sf = x.data_ptr(), device_ptr(x_scales)
    a.topk_idx, a.topk_weights = topk_idx.data_ptr(), device_ptr(topk_weights)
    a.send_row, a.chunk_prefix = device_ptr(send_row), device_ptr(chunk_prefix)
    a.out_x, a.out_sf, a.out_topk_idx = out_x.data_ptr(), device_ptr(out_sf), out_idx.data_ptr()
    a.out_topk_weights, a.out_src_meta = device_ptr(out_w), device_ptr(out_meta)
    a.out_counts, a.out_chunk_end, a.out_nchunks = (
        device_ptr(counts),
        device_ptr(chunk_end),
        device_ptr(nchunks),
    )
    a.sf_stride_t = 0 if x_scales is None else x_scales.stride(0)
    a.sf_stride_p = 0 if x_scales is None else x_scales.stride(1)
    a.num_tokens = x.shape[0]
    a.topk_bad, a.out_src_bad = device_ptr(topk_bad), device_ptr(src_bad)
    a.num_topk_bad = 0 if topk_bad is None else num_topk_bad
    a.signature = dispatch_signature(
        num_local_experts,
        x.dtype,
        row_bytes,
        None if x_scales is None else x_scales.dtype,
        num_sf,
        k,
        num_max_tokens,
        topk_weights is not None,
    )
    a.count_experts = 1
    template.seen = None  # every field written: a replay plan writes its fixed ones again
    template.launch(kernel)


class DispatchReplay:
    """A cached dispatch of one handle and one input shape, prepared at its first call.

    The launch struct's fields that stay the same from call to call (the handle's layout, the
    replay scratch's addresses, the token count, the signature, the absent operands) are
    written when another call used the struct last; a call allocates the received rows, sets
    the input and output addresses and makes the bound launch. ``num_rows``: the handle's
    exact received rows (the outputs are views of that many rows), or ``None`` for a handle
    made without CPU sync (worst-case rows, whose tail a second kernel fills).
    """

    __slots__ = (
        "device", "fixed", "hidden", "kernel", "num_rows", "num_topk", "rows", "scale_cols",
        "scale_dtype", "tail_at", "template", "x_dtype",
    )  # fmt: skip

    def __init__(
        self,
        ctx: HtContext,
        *,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        num_topk: int,
        weighted: bool,
        layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        scratch: tuple[int, int, int],
        num_rows: int | None,
        num_local_experts: int,
        num_max_tokens: int,
        expert_alignment: int,
        num_sms: int,
    ) -> None:
        row_bytes = x.shape[1] * x.element_size()
        num_sf = 0 if x_scales is None else x_scales.shape[1]
        self.template, self.kernel = _dispatch_launch(
            ctx,
            num_topk,
            row_bytes,
            num_sf,
            num_local_experts,
            num_max_tokens,
            expert_alignment,
            num_sms,
        )
        self.device = x.device
        self.rows = ctx.num_ranks * num_max_tokens
        self.hidden, self.x_dtype, self.num_topk = x.shape[1], x.dtype, num_topk
        self.scale_cols = num_sf
        self.scale_dtype = None if x_scales is None else x_scales.dtype
        self.num_rows = num_rows
        send_row, chunk_prefix, chunk_end, nchunks = layout
        counts, src_bad, meta = scratch
        # The source count of the last rank is the received total (the tail kernel's bound).
        self.tail_at = (counts + 4 * (ctx.num_ranks - 1), meta)
        signature = dispatch_signature(
            num_local_experts,
            x.dtype,
            row_bytes,
            self.scale_dtype,
            num_sf,
            num_topk,
            num_max_tokens,
            weighted,
        )
        # The layout's tensors are the handle's, which holds this plan: they outlive it.
        self.fixed = (
            ("send_row", send_row.data_ptr()),
            ("chunk_prefix", chunk_prefix.data_ptr()),
            ("out_chunk_end", chunk_end.data_ptr()),
            ("out_nchunks", nchunks.data_ptr()),
            ("out_counts", counts),
            ("out_src_bad", src_bad),
            ("out_src_meta", meta),
            ("topk_bad", 0),
            ("num_topk_bad", 0),
            ("count_experts", 0),
            ("num_tokens", x.shape[0]),
            ("signature", signature),
            ("sf_stride_t", 0 if x_scales is None else x_scales.stride(0)),
            ("sf_stride_p", 0 if x_scales is None else x_scales.stride(1)),
            ("x_sf", 0),
            ("out_sf", 0),
            ("topk_weights", 0),
            ("out_topk_weights", 0),
        )

    def __call__(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Enqueues the dispatch on the current stream; returns ``(recv_x, recv_x_scales,
        recv_topk_idx, recv_topk_weights)`` (operands of the shape the plan was made for)."""
        template = self.template
        template.claim(self, self.fixed)
        a = template.args
        dev, rows, k = self.device, self.rows, self.num_topk
        out_x = torch.empty((rows, self.hidden), dtype=self.x_dtype, device=dev)
        out_idx = torch.empty((rows, k), dtype=torch.int64, device=dev)
        a.x, a.out_x = x.data_ptr(), out_x.data_ptr()
        a.topk_idx, a.out_topk_idx = topk_idx.data_ptr(), out_idx.data_ptr()
        out_sf = out_w = None
        if x_scales is not None:
            out_sf = torch.empty((rows, self.scale_cols), dtype=self.scale_dtype, device=dev)
            a.x_sf, a.out_sf = x_scales.data_ptr(), out_sf.data_ptr()
        if topk_weights is not None:
            out_w = torch.empty((rows, k), dtype=torch.float32, device=dev)
            a.topk_weights, a.out_topk_weights = topk_weights.data_ptr(), out_w.data_ptr()
        template.launch(self.kernel)
        n = self.num_rows
        if n is None:
            launch_dispatch_tail(self.tail_at[0], self.tail_at[1], out_idx, out_w, out_x, out_sf)
            return out_x, out_sf, out_idx, out_w
        if n == rows:
            return out_x, out_sf, out_idx, out_w
        return (
            out_x[:n],
            None if out_sf is None else out_sf[:n],
            out_idx[:n],
            None if out_w is None else out_w[:n],
        )


SIGNATURE_ARGUMENTS = (
    "num_experts, hidden size, x dtype, FP8 scales (dtype and columns), num_topk, "
    "num_max_tokens_per_rank, topk_weights given or not"
)
"""What a dispatch's signature covers (named in the error when ranks' signatures differ)."""


@functools.lru_cache(maxsize=256)
def dispatch_signature(
    num_local_experts: int,
    x_dtype: torch.dtype,
    row_bytes: int,
    sf_dtype: torch.dtype | None,
    num_sf: int,
    num_topk: int,
    num_max_tokens: int,
    has_weights: bool,
) -> int:
    """A dispatch's call signature: a 15-bit digest of the arguments every rank must share
    (:data:`SIGNATURE_ARGUMENTS`). Each rank announces it to every peer with its token count;
    a receiver whose own differs records ``kErrorArgumentsDiffer`` (``ERROR_ARGUMENTS_DIFFER``).
    Two different argument sets share a digest with probability 2^-15."""
    return signature_digest(
        (num_local_experts, str(x_dtype), row_bytes, str(sf_dtype), num_sf, num_topk,
         num_max_tokens, has_weights)
    )  # fmt: skip


COMBINE_SIGNATURE_ARGUMENTS = (
    "hidden size of x, topk_weights given or not, and the handles' num_topk, num_experts and "
    "num_max_tokens_per_rank"
)
"""What a combine's signature covers (named in the error when ranks' signatures differ)."""


@functools.lru_cache(maxsize=256)
def combine_signature(
    num_local_experts: int, hidden: int, num_topk: int, num_max_tokens: int, has_weights: bool
) -> int:
    """A combine's call signature: :data:`SIGNATURE_COMBINE` plus a 15-bit digest of what
    every rank must share (:data:`COMBINE_SIGNATURE_ARGUMENTS`). Each rank announces it with
    the start of the op; a rank that finds another in a peer's announcement records
    ``kErrorArgumentsDiffer`` (``ERROR_ARGUMENTS_DIFFER``)."""
    fields = ("combine", num_local_experts, hidden, num_topk, num_max_tokens, has_weights)
    return SIGNATURE_COMBINE | signature_digest(fields)


ERROR_ARGUMENTS_DIFFER = 3
"""``ep_core::kErrorArgumentsDiffer``: the record's ``peer`` called with another signature
than this rank, or is in another kind of op. At :data:`STAGE_DISPATCH_INFO` ``observed`` and
``expected`` are the two dispatch signatures; at the arrive stages they are the two arrive words
(``op number << 16 | signature``, see :func:`describe_disagreement`)."""

STAGE_DISPATCH_INFO = 1
"""``kStageDispatchInfo``: where a dispatch's receivers compare its signature with each
source's (before they read anything the source sent)."""


def describe_disagreement(rank: int, peer: int, stage: int, observed: int, expected: int) -> str:
    """The message of an ``ERROR_ARGUMENTS_DIFFER`` record: which ranks disagree, and on what."""
    covered = {"dispatch": SIGNATURE_ARGUMENTS, "combine": COMBINE_SIGNATURE_ARGUMENTS}
    if stage == STAGE_DISPATCH_INFO:  # two dispatch signatures
        return describe_signatures(rank, peer, observed, expected, family="", covered=covered)
    # Arrive words: the op number above bit 16, the signature below.
    return describe_signatures(
        rank,
        peer,
        observed & 0xFFFF,
        expected & 0xFFFF,
        family="",
        covered=covered,
        where=f" (high-throughput call {expected >> 16} of the buffer)",
    )


def _combine_launch(
    ctx: HtContext, num_topk: int, hidden: int, num_sms: int, num_max_tokens: int, el: int
) -> tuple[_Launch, Any]:
    """The combine kernel of this shape and its launch (the struct's fixed fields filled in,
    the signatures without and with weights), made at the first call of the shape."""
    r, k = ctx.num_ranks, num_topk
    splittable = use_split_combine(num_sms, r)
    key = ("combine", r, k, hidden, ctx.combine_override, splittable)
    found = _configured.get(key)
    if found is None:
        payload = combine_payload_bytes(hidden, k)
        if ctx.combine_override is not None:
            cfg = CombineConfig.from_override(ctx.combine_override, payload)
        else:
            cfg = combine_config(payload, split=splittable)
        found = _configured[key] = (cfg, build_kernel(_combine_spec(r, k, hidden, cfg)))
    cfg, kernel = found
    tkey = (key, num_max_tokens, el, num_sms, device_ptr(ctx.trace_combine))
    template = ctx.arg_templates.get(tkey)
    if template is None:
        t = HtCombineArgs()
        t.peer_bases = device_ptr(ctx.peer_bases)
        t.error = ctx.watchdog.record_ptr
        t.num_max_tokens = num_max_tokens
        t.num_local_experts, t.max_chunks = el, ctx.sizing.max_chunks
        t.timeout_ns, t.rank = ctx.watchdog.timeout_ns, ctx.rank
        t.lay = ctx.layout
        t.trace = device_ptr(ctx.trace_combine) or None
        t.num_push_ctas = cfg.num_push_ctas(num_sms) if cfg.split else 0
        if len(ctx.arg_templates) > 64:
            ctx.arg_templates.clear()
        shape = ((num_sms, 1, 1), (cfg.threads, 1, 1), cfg.smem_bytes())
        template = ctx.arg_templates[tkey] = _Launch(t, *shape)
        template.signatures = tuple(
            combine_signature(el, hidden, k, num_max_tokens, weighted) for weighted in (False, True)
        )
    return template, kernel


class CombinePlan:
    """A combine of one handle and one shape, prepared at its first call.

    The launch struct's fields that come from the handle (its layout, chunk rows and token
    count) and the shape (the signature, absent weights) are written when another call used
    the struct last; a call allocates the outputs, sets the operand addresses and makes the
    bound launch. The handle's tensors are held by the handle, which holds this plan.
    """

    __slots__ = ("device", "fixed", "hidden", "kernel", "num_tokens", "num_topk", "template")

    def __init__(
        self, ctx: HtContext, handle: Any, state: Any, *, hidden: int, weighted: bool, num_sms: int
    ) -> None:
        nmax, el = handle.num_max_tokens_per_rank, handle.num_local_experts
        self.num_topk, self.hidden = handle.num_topk, hidden
        self.template, self.kernel = _combine_launch(ctx, self.num_topk, hidden, num_sms, nmax, el)
        self.device = handle.topk_idx.device
        self.num_tokens = handle.num_tokens
        fixed = [
            ("signature", self.template.signatures[weighted]),
            ("psum_rank", device_ptr(handle.psum_num_recv_tokens_per_rank)),
            ("chunk_end", state.chunk_end.data_ptr()),
            ("nchunks", state.nchunks.data_ptr()),
            ("topk_idx", handle.topk_idx.data_ptr()),
            ("send_row", handle.send_row.data_ptr()),
            ("num_tokens", self.num_tokens),
        ]
        if not weighted:
            fixed += [("topk_weights", 0), ("out_weights", 0)]
        self.fixed = tuple(fixed)

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor | None, meta: torch.Tensor, bias: tuple
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Enqueues the combine on the current stream (``x`` and ``weights`` contiguous,
        ``meta`` the ``[M, 2]`` metadata); returns ``(out [T, H] bf16, out_w [T, k] or
        None)``."""
        template = self.template
        template.claim(self, self.fixed)
        a = template.args
        out = torch.empty((self.num_tokens, self.hidden), dtype=torch.bfloat16, device=self.device)
        a.x, a.src_meta, a.out = x.data_ptr(), meta.data_ptr(), out.data_ptr()
        out_w = None
        if weights is not None:
            out_w = torch.empty(
                (self.num_tokens, self.num_topk), dtype=torch.float32, device=self.device
            )
            a.topk_weights, a.out_weights = weights.data_ptr(), out_w.data_ptr()
        a.bias0 = bias[0].data_ptr() if len(bias) > 0 else 0
        a.bias1 = bias[1].data_ptr() if len(bias) > 1 else 0
        template.launch(self.kernel)
        return out, out_w
