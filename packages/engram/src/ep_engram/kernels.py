"""Kernel specs of the intranode gather (``<ep_engram/smxx_gather.cuh>``) and their builds."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

__all__ = [
    "BULK_THREADS",
    "ILP_THREADS",
    "MAX_RANKS",
    "RING_THREADS",
    "UNROLLED",
    "VARIANTS",
    "WARP_THREADS",
    "build_gather",
    "bulk_shape",
    "gather_spec",
    "register_include_root",
    "ring_shape",
    "shipped_kernels",
    "smem_of",
    "threads_of",
]

VARIANTS = ("ilp", "warp", "bulk", "tile", "ring", "ring_bulk", "tile_sorted", "wide")
"""Gather kernel variants (see ``<ep_engram/smxx_gather.cuh>``)."""
UNROLLED = ("ilp", "tile", "tile_sorted", "wide")
"""Variants that take ``unroll`` (16-byte loads in flight per thread)."""
ILP_THREADS = 512
"""Threads per CTA of the ``ilp`` variant (registers hold ``unroll`` 16-byte chunks each)."""
WARP_THREADS = 1024
"""Threads per CTA of the ``warp`` variant (32 warps, one row each at a time)."""
BULK_THREADS = 128
"""Threads per CTA of the ``bulk`` variant (4 warps, each with its own stages of rows)."""
RING_THREADS = 256
"""Threads per CTA of the ``ring`` and ``ring_bulk`` variants (8 warps, a ring of slots each)."""
_RING_MAX_STAGES = 16  # kStages bound of the header's static mbarrier array (32 warps x 16)
_BULK_STAGE_BYTES = 16 << 10  # rows per stage: as many as fit (at most 32, at least 1)
_BULK_SMEM_BYTES = 192 << 10  # shared memory of the stages of one CTA (H100: 227 KiB usable)


def bulk_shape(row_bytes: int) -> tuple[int, int, int]:
    """``(rows_per_stage, stages, dynamic shared memory bytes)`` of the bulk variant.

    Raises:
        ValueError: A row too large for one stage of every warp in shared memory.
    """
    rows = max(1, min(32, _BULK_STAGE_BYTES // row_bytes))
    warps = BULK_THREADS // 32
    stages = min(8, _BULK_SMEM_BYTES // (warps * rows * row_bytes))
    if stages < 1:
        raise ValueError(
            f"rows of {row_bytes} bytes are too large for the bulk gather kernel "
            f"(at most {_BULK_SMEM_BYTES // warps} bytes); use EP_ENGRAM_KERNEL=ilp"
        )
    return rows, stages, warps * stages * rows * row_bytes


def ring_shape(row_bytes: int, bulk_store: bool) -> tuple[int, int, int]:
    """``(rows_per_slot, slots, dynamic shared memory bytes)`` of the ring variants.

    Aims at 4 slots per warp (6 with bulk stores, which hold a slot one step longer), each of as
    many rows as then fit in the shared memory budget (1..32).

    Raises:
        ValueError: A row too large for the ring's minimum of slots in shared memory.
    """
    warps = RING_THREADS // 32
    want = 6 if bulk_store else 4
    rows = max(1, min(32, _BULK_SMEM_BYTES // (warps * want * row_bytes)))
    slots = min(_RING_MAX_STAGES, _BULK_SMEM_BYTES // (warps * rows * row_bytes))
    least = 3 if bulk_store else 2
    if slots < least:
        name = "ring_bulk" if bulk_store else "ring"
        raise ValueError(
            f"rows of {row_bytes} bytes are too large for the {name} gather kernel "
            f"(at most {_BULK_SMEM_BYTES // (warps * least)} bytes); use EP_ENGRAM_KERNEL=ilp"
        )
    return rows, slots, warps * slots * rows * row_bytes


_PARAMS = (
    "const void* indices",
    "void* out",
    "void* out_sf",
    "long long* error_pos",
    "const unsigned long long* rows_base",
    "const unsigned long long* sf_base",
    "long long num_items",
    "long long entries",
    "long long per_token",
    "long long sf_ld",
    "int num_ranks",
    "const long long* order",
)

MAX_RANKS = 64
"""Ranks (owners) the gather kernel addresses: ``kMaxRanks`` of the header."""


def register_include_root() -> None:
    """Makes ``#include <ep_engram/...>`` resolvable for ep-jit (idempotent)."""
    from ep_jit import include_roots
    from ep_jit import register_include_root as register

    if "ep_engram" not in include_roots():
        register("ep_engram", Path(__file__).resolve().parent / "include")


def gather_spec(
    *,
    index64: bool,
    row_bytes: int,
    num_sf_packs: int,
    sf_col_major: bool,
    variant: str = "ilp",
    unroll: int = 8,
) -> Any:
    """The ``KernelSpec`` of one gather instantiation.

    Launch with ``grid = num_ctas``, ``block = threads_of(variant, unroll)`` and ``smem =
    smem_of(variant, row_bytes)``; arguments: indices
    (``[T*K]`` int32/int64), out (``[T*K, row_bytes]``), out_sf (scale output base or
    ``None``), error_pos (int64 ``[1]``, INT64_MAX before the launch), rows_base and sf_base
    (int64 ``[R]`` device addresses of every owner's rows and scales), ``T*K``, ``E``, ``K`` and
    the scale column stride, the number of owners, and ``order`` (``tile_sorted``: int64
    ``[T*K]``, the output position of each id of the sorted ``indices``; else ``None``).

    Raises:
        ValueError: A row that is not a multiple of 16 bytes, a bad variant or unroll.
    """
    from ep_jit import KernelSpec

    if row_bytes <= 0 or row_bytes % 16:
        raise ValueError(f"row_bytes must be a positive multiple of 16, got {row_bytes}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 1 <= unroll <= 16:
        raise ValueError(f"unroll must be in [1, 16], got {unroll}")
    u = unroll if variant in UNROLLED else 1
    rows, stages = _stages_of(variant, row_bytes)
    tag = f"{'i64' if index64 else 'i32'}_r{row_bytes}_p{num_sf_packs}{'c' if sf_col_major else ''}"
    return KernelSpec(
        name=f"ep_engram_gather_{variant}{u}_{tag}",
        includes=["ep_engram/smxx_gather.cuh"],
        template="ep_engram::gather",
        params=_PARAMS,
        constants={
            "IndexT": "long long" if index64 else "int",
            "kRowBytes": row_bytes,
            "kNumSfPacks": num_sf_packs,
            "kSfColMajor": sf_col_major,
            "kUnroll": u,
            "kVariant": VARIANTS.index(variant),
            "kStages": stages,
            "kRowsPerStage": rows,
        },
        launch_bounds=(threads_of(variant, u), 1),
    )


def _stages_of(variant: str, row_bytes: int) -> tuple[int, int]:
    if variant == "bulk":
        return bulk_shape(row_bytes)[:2]
    if variant in ("ring", "ring_bulk"):
        return ring_shape(row_bytes, variant == "ring_bulk")[:2]
    return 1, 1


def auto_variant(placement: str, row_bytes: int) -> str:
    """The gather variant ``EP_ENGRAM_KERNEL=auto`` picks for a table.

    From one H100's sweep (``python -m ep_engram.bench``, random ids over a 1 GiB table, 4 and 8
    CTAs; docs/benchmarks.md): rows of 1 KiB or more go fastest with ``ring`` (GPU memory, 2 KiB
    rows: 393 GB/s with 8 CTAs against ``warp``'s 363; host memory: the PCIe limit, 51 GB/s,
    from 4 CTAs with every variant); smaller rows in GPU memory with ``wide`` (256 B: 294 GB/s
    with 8 CTAs at unroll 4, 280 at 8, against ``tile``'s 256); smaller rows in host memory with
    ``tile_sorted``, whose grouping turns random reads of a large table into nearby ones (256 B:
    45 GB/s with 8 CTAs, the grouping included, against 21 for every ungrouped kernel). The cut
    at 1 KiB lies between the measured 256 B and 2 KiB. Rows too large for the ring's slots in
    shared memory (above 12 KiB) take ``warp`` (363 GB/s with 8 CTAs at 2 KiB).
    """
    if row_bytes >= 1024:
        try:
            ring_shape(row_bytes, bulk_store=False)
        except ValueError:
            return "warp"
        return "ring"
    return "tile_sorted" if placement == "host" else "wide"


def threads_of(variant: str, unroll: int = 8) -> int:
    """Threads per CTA of a variant (``tile``: 1024, or 512 above 8 loads per thread, which
    would not fit the 64 registers a thread of 1024 has)."""
    if variant in ("tile", "tile_sorted"):
        return 1024 if unroll <= 8 else 512
    if variant == "wide":
        return 1024 if unroll <= 4 else 512
    return {
        "ilp": ILP_THREADS,
        "warp": WARP_THREADS,
        "bulk": BULK_THREADS,
        "ring": RING_THREADS,
        "ring_bulk": RING_THREADS,
    }[variant]


def smem_of(variant: str, row_bytes: int) -> int:
    """Dynamic shared memory bytes of a launch of a variant."""
    if variant == "bulk":
        return bulk_shape(row_bytes)[2]
    if variant in ("ring", "ring_bulk"):
        return ring_shape(row_bytes, variant == "ring_bulk")[2]
    return 0


@functools.cache
def build_gather(**kwargs: Any) -> Any:
    """The compiled kernel of :func:`gather_spec` (built on first use, cached on disk)."""
    from ep_jit import build

    register_include_root()
    return build(gather_spec(**kwargs))


def shipped_kernels() -> list[Any]:
    """Representative instantiations for compile-only checks (``ep_jit.kernels`` entry point)."""
    register_include_root()
    specs = []
    for variant in VARIANTS:
        specs.append(
            gather_spec(
                index64=False,
                row_bytes=256,
                num_sf_packs=0,
                sf_col_major=False,
                variant=variant,
            )
        )
        specs.append(
            gather_spec(
                index64=True,
                row_bytes=7168,
                num_sf_packs=56,
                sf_col_major=True,
                variant=variant,
            )
        )
    for variant in UNROLLED:
        specs.append(
            gather_spec(
                index64=False,
                row_bytes=2048,
                num_sf_packs=4,
                sf_col_major=False,
                variant=variant,
                unroll=16,
            )
        )
    from ep_engram.bucket import shipped_bucket_kernels  # the grouping ahead of tile_sorted

    return specs + shipped_bucket_kernels()
