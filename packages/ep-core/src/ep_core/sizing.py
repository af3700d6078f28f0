"""Buffer sizing and the analytical SM count of the NVLink backend.

The size hint is what the NVLink backend allocates for its high-throughput buffer: the larger of
its actual layout (:func:`ep_core.nvlink.layout.compute_layout`: a control header and two
double-buffered regions of flags and ``R * Nmax`` row slots, each padded to 2 MiB) and the slot
formula below, rounded up to 2 MiB. A buffer given ``num_bytes`` allocates exactly that many
bytes, which must be at least the hint of its settings. The reference backend allocates nothing
but applies the same checks, so code that fits on one backend fits on the other. The
low-latency buffer of the NVLink backend is separate (sized by the low-latency calls).

Buffer size (direct NVLink layout: every source owns ``Nmax`` slots at every receiver, both for
dispatch and for combine, so data can be written before counts are known)::

    slot_d = a32(H * elem) + a32(P_max * 4) + a32(k * 4 + k * 4 + 4 + k * 4)
    # data, FP8 scales (P_max = ceil(H / 32) 4-byte packs, 0 for BF16),
    # metadata: top-k ids (int32), weights (float32), source index, linked-list index
    # a BF16 dispatch slot, so every buffer also fits a BF16 dispatch (the backward of
    # combine is a BF16 cached dispatch, even with an FP8-sized buffer)
    slot_c = a32(H * 2) + a32(k * 4 + k * 4 + 4 + k * 4)
    bytes = a2MiB(max(R * Nmax * slot_d, R * Nmax * slot_c))

with ``a32``/``a2MiB`` rounding up to 32 bytes / 2 MiB and ``k = 32`` when ``num_topk == 0``.
The result is monotone in every argument.

SM count (DeepEP V2's model, direct mode, balanced routing): with ``T = expected_topk(R)`` the
expected number of distinct ranks a token reaches, per unit of scale-up traffic an SM reads
``1 / T`` and writes ``1`` token; NVLink carries ``1 - 1 / R``. Then
``n = max(bw / nvl * read / read_bw, bw / nvl * write / write_bw)``, rounded to
``align(max(4, ceil(1.25 * n)), 2)`` and capped at the device's SM count.
"""

from __future__ import annotations

import functools
import math

from ep_core.layout import align_up

__all__ = [
    "BUFFER_ALIGNMENT",
    "CPU_NOMINAL_NUM_SMS",
    "DEFAULT_NVLINK_GBS",
    "combine_slot_bytes",
    "dispatch_slot_bytes",
    "expected_topk",
    "get_buffer_size_hint",
    "get_theoretical_num_sms",
]

BUFFER_ALIGNMENT = 2 << 20
"""Buffers are multiples of 2 MiB."""

SLOT_ALIGNMENT = 32
"""Every part of a slot is aligned to 32 bytes (TMA)."""

SIZING_TOPK = 32
"""``k`` assumed when the buffer is sized with ``num_topk == 0``."""

SIZING_HIDDEN = 8192
"""``H`` the NVLink backend's layout assumes when the buffer is built with ``hidden == 0``."""

MAX_NVLINK_RANKS = 32
"""Largest group the NVLink backend runs on (larger groups get the slot formula only)."""

DEFAULT_NVLINK_GBS = 405.0
"""Usable one-way NVLink bandwidth per GPU in GB/s (0.9 x 450 GB/s, Hopper NV18)."""

CPU_NOMINAL_NUM_SMS = 24
"""SM count reported when there is no CUDA device (the reference backend ignores it)."""


def dispatch_slot_bytes(hidden: int, num_topk: int, use_fp8: bool) -> int:
    """Bytes of one dispatch slot (see module doc)."""
    k = num_topk or SIZING_TOPK
    data = align_up(hidden * (1 if use_fp8 else 2), SLOT_ALIGNMENT)
    scales = align_up(-(-hidden // 32) * 4, SLOT_ALIGNMENT) if use_fp8 else 0
    meta = align_up(k * 4 * 3 + 4, SLOT_ALIGNMENT)
    return data + scales + meta


def combine_slot_bytes(hidden: int, num_topk: int) -> int:
    """Bytes of one combine slot: a BF16 dispatch slot (see module doc)."""
    return dispatch_slot_bytes(hidden, num_topk, use_fp8=False)


@functools.lru_cache(maxsize=256)
def get_buffer_size_hint(
    num_ranks: int,
    num_max_tokens_per_rank: int,
    hidden: int,
    num_topk: int = 0,
    use_fp8_dispatch: bool = False,
) -> int:
    """Bytes the NVLink backend allocates for these settings (2 MiB aligned, monotone).

    Args:
        num_ranks: ``R``.
        num_max_tokens_per_rank: ``Nmax``.
        hidden: ``H``.
        num_topk: ``k``; 0 sizes for 32.
        use_fp8_dispatch: Size dispatch slots for e4m3 data plus scales.
    """
    if min(num_ranks, num_max_tokens_per_rank, hidden) < 0 or num_topk < 0:
        raise ValueError("buffer sizes are computed from non-negative integers")
    slots = num_ranks * num_max_tokens_per_rank
    # BF16 combine (and BF16 cached dispatch in backward) always runs: never below a BF16 slot.
    dispatch = slots * dispatch_slot_bytes(hidden, num_topk, use_fp8_dispatch)
    combine = slots * combine_slot_bytes(hidden, num_topk)
    layout = 0
    if 1 <= num_ranks <= MAX_NVLINK_RANKS:
        from ep_core.nvlink.layout import NvlinkSizing, compute_layout

        sizing = NvlinkSizing(
            num_ranks=num_ranks,
            num_max_tokens_per_rank=num_max_tokens_per_rank,
            hidden=hidden or SIZING_HIDDEN,
            num_topk=num_topk or SIZING_TOPK,
        )
        layout = compute_layout(sizing)[1]
    return align_up(max(dispatch, combine, layout, 1), BUFFER_ALIGNMENT)


def expected_topk(num_groups: int, num_experts: int, num_topk: int) -> float:
    """Expected number of distinct groups (of ``E / G`` experts) hit by ``k`` distinct experts."""
    if num_groups <= 1:
        return 1.0
    per_group = num_experts // num_groups
    miss = math.comb(num_experts - per_group, num_topk) / math.comb(num_experts, num_topk)
    return num_groups * (1.0 - miss)


@functools.lru_cache(maxsize=256)
def get_theoretical_num_sms(
    num_ranks: int,
    num_experts: int,
    num_topk: int,
    device_num_sms: int,
    *,
    nvlink_gbs: float = DEFAULT_NVLINK_GBS,
    sm_read_gbs: float = 200.0,
    sm_write_gbs: float = 50.0,
    prefer_overlap_with_compute: bool = True,
) -> int:
    """SMs that saturate NVLink in direct mode (model in module doc); even, >= 4, <= device.

    A single rank (no NVLink traffic) gets every SM (rounded down to even).

    Args:
        num_ranks: ``R``.
        num_experts: ``E`` (0 = unknown: assume each token reaches one rank).
        num_topk: ``k`` (0 = unknown, as above).
        device_num_sms: SMs of the device (the cap).
        nvlink_gbs: Usable one-way NVLink bandwidth per GPU.
        sm_read_gbs: Bandwidth one SM reads at.
        sm_write_gbs: Bandwidth one SM writes to peers at.
        prefer_overlap_with_compute: When False use at least 64 SMs.
    """
    if num_experts > 0 and num_topk > 0:
        reach = expected_topk(num_ranks, num_experts, min(num_topk, num_experts))
    else:
        reach = 1.0
    cap = device_num_sms - device_num_sms % 2
    nvl_traffic = 1.0 - 1.0 / num_ranks
    if nvl_traffic <= 0.0:
        return cap
    scale = nvlink_gbs / nvl_traffic
    needed = max(scale * (1.0 / reach) / sm_read_gbs, scale * 1.0 / sm_write_gbs)
    num_sms = align_up(max(4, math.ceil(1.25 * needed)), 2)
    if not prefer_overlap_with_compute:
        num_sms = max(num_sms, 64)
    return min(num_sms, cap)
