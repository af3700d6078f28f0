"""Host-side mirror of the NVLink kernels' data structures (``include/ep_core/smxx_ht_common.cuh``).

The symmetric buffer of every rank holds a control block, one word per peer for the start-of-op
handshake, and two alternating regions (op ``e`` writes region ``e % 2`` of its peers). This
module computes the byte offsets for a buffer configuration and builds the ``ctypes`` structures
passed by value to the kernels; field order and types must match the CUDA structs exactly (every
field is 8 bytes wide, so there is no padding to get wrong).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ep_jit.regions import RegionPlan, double_buffered

__all__ = [
    "CHUNK_TOKENS",
    "HtCombineArgs",
    "HtDispatchArgs",
    "NvlinkSizing",
    "SymLayout",
    "combine_payload_bytes",
    "compute_layout",
    "dispatch_payload_bytes",
    "meta_bytes",
]

CHUNK_TOKENS = 8
"""Tokens per chunk: the unit of flags between sender and receiver warps."""

_ALIGN = 128
_CTRL_BYTES = 64
_HEADER_BYTES = 4096
_MAX_RANKS = 32


def _align(value: int, alignment: int = _ALIGN) -> int:
    return (value + alignment - 1) // alignment * alignment


def meta_bytes(num_topk: int) -> int:
    """Bytes of one dispatched row's metadata: source token, top-k ids (int64) and weights."""
    return _align(8 + 12 * num_topk, 16)


def dispatch_payload_bytes(row_bytes: int, num_scale_packs: int, num_topk: int) -> int:
    """Bytes of one staged dispatch row: data, scale packs, metadata (``HtDispatch::kPayload``)."""
    return _align(row_bytes + _align(num_scale_packs * 4, 16) + meta_bytes(num_topk), 128)


def combine_payload_bytes(hidden: int, num_topk: int) -> int:
    """Bytes of one staged combine row: bf16 data and weights (``HtCombine::kPayload``)."""
    return _align(hidden * 2 + _align(num_topk * 4, 16), 128)


class SymLayout(ctypes.Structure):
    """Byte offsets inside one rank's symmetric buffer (mirror of ``ep_core::SymLayout``)."""

    _fields_ = [
        ("ctrl", ctypes.c_int64),
        ("arrive", ctypes.c_int64),
        ("region0", ctypes.c_int64),
        ("region1", ctypes.c_int64),
        ("info", ctypes.c_int64),
        ("dflag", ctypes.c_int64),
        ("drstart", ctypes.c_int64),
        ("cflag", ctypes.c_int64),
        ("data", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class NvlinkSizing:
    """What one NVLink buffer is sized for.

    Attributes:
        num_ranks: ``R`` (at most 32).
        num_max_tokens_per_rank: ``Nmax``.
        hidden: Largest hidden size ``H``.
        num_topk: Largest ``k``.
    """

    num_ranks: int
    num_max_tokens_per_rank: int
    hidden: int
    num_topk: int

    @property
    def max_chunks(self) -> int:
        """``Cmax``: chunks of the largest token count."""
        return max(1, -(-self.num_max_tokens_per_rank // CHUNK_TOKENS))

    @property
    def max_scale_packs(self) -> int:
        """Worst-case 4-byte scale columns per row (one pack per 32 channels)."""
        return -(-self.hidden // 32)


def compute_layout(sizing: NvlinkSizing) -> tuple[SymLayout, int]:
    """Returns the offsets and the total bytes of one rank's symmetric buffer.

    Raises:
        ValueError: When the group is larger than the kernels support.
    """
    if not 1 <= sizing.num_ranks <= _MAX_RANKS:
        raise ValueError(
            f"the NVLink backend supports 1..{_MAX_RANKS} ranks, got {sizing.num_ranks}"
        )
    r, nmax, cmax = sizing.num_ranks, sizing.num_max_tokens_per_rank, sizing.max_chunks
    lay = SymLayout()
    lay.ctrl = 0
    lay.arrive = _CTRL_BYTES
    payload = max(
        dispatch_payload_bytes(sizing.hidden * 2, sizing.max_scale_packs, sizing.num_topk),
        combine_payload_bytes(sizing.hidden, sizing.num_topk),
    )
    plan = RegionPlan(align=_ALIGN)
    lay.info = plan.add("info", r * 16)
    lay.dflag = plan.add("dispatch flags", r * cmax * 8)
    lay.drstart = plan.add("dispatch row starts", r * cmax * 4)
    lay.cflag = plan.add("combine flags", r * cmax * 8)
    lay.data = plan.add("rows", r * nmax * payload)
    regions = double_buffered(plan.padded(_ALIGN), _HEADER_BYTES)
    lay.region0, lay.region1 = regions.starts
    total = regions.total
    return lay, total


class HtDispatchArgs(ctypes.Structure):
    """Mirror of ``ep_core::HtDispatchArgs`` (pointers as 64-bit integers)."""

    _fields_ = [
        ("x", ctypes.c_uint64),
        ("x_sf", ctypes.c_uint64),
        ("topk_idx", ctypes.c_uint64),
        ("topk_weights", ctypes.c_uint64),
        ("send_row", ctypes.c_uint64),
        ("chunk_prefix", ctypes.c_uint64),
        ("peer_bases", ctypes.c_uint64),
        ("out_x", ctypes.c_uint64),
        ("out_sf", ctypes.c_uint64),
        ("out_topk_idx", ctypes.c_uint64),
        ("out_topk_weights", ctypes.c_uint64),
        ("out_src_meta", ctypes.c_uint64),
        ("out_counts", ctypes.c_uint64),
        ("out_chunk_end", ctypes.c_uint64),
        ("out_nchunks", ctypes.c_uint64),
        ("error", ctypes.c_uint64),
        ("sf_stride_t", ctypes.c_int64),
        ("sf_stride_p", ctypes.c_int64),
        ("num_tokens", ctypes.c_int64),
        ("num_max_tokens", ctypes.c_int64),
        ("num_local_experts", ctypes.c_int64),
        ("max_chunks", ctypes.c_int64),
        ("expert_alignment", ctypes.c_int64),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int64),
        ("lay", SymLayout),
        ("trace", ctypes.c_void_p),
        ("num_send_ctas", ctypes.c_int64),
        ("topk_bad", ctypes.c_uint64),
        ("num_topk_bad", ctypes.c_int64),
        ("out_src_bad", ctypes.c_uint64),
        ("signature", ctypes.c_int64),
        ("count_experts", ctypes.c_int64),
    ]


class HtCombineArgs(ctypes.Structure):
    """Mirror of ``ep_core::HtCombineArgs`` (pointers as 64-bit integers)."""

    _fields_ = [
        ("x", ctypes.c_uint64),
        ("topk_weights", ctypes.c_uint64),
        ("src_meta", ctypes.c_uint64),
        ("psum_rank", ctypes.c_uint64),
        ("chunk_end", ctypes.c_uint64),
        ("nchunks", ctypes.c_uint64),
        ("topk_idx", ctypes.c_uint64),
        ("send_row", ctypes.c_uint64),
        ("bias0", ctypes.c_uint64),
        ("bias1", ctypes.c_uint64),
        ("peer_bases", ctypes.c_uint64),
        ("out", ctypes.c_uint64),
        ("out_weights", ctypes.c_uint64),
        ("error", ctypes.c_uint64),
        ("num_tokens", ctypes.c_int64),
        ("num_max_tokens", ctypes.c_int64),
        ("num_local_experts", ctypes.c_int64),
        ("max_chunks", ctypes.c_int64),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int64),
        ("lay", SymLayout),
        ("trace", ctypes.c_void_p),
        ("num_push_ctas", ctypes.c_int64),
        ("signature", ctypes.c_int64),
    ]
