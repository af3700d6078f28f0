"""Grouping of row ids by table page on a few CTAs (``<ep_engram/smxx_bucket.cuh>``).

Random rows of a large host table are read at the rate of address translation (about 21 GB/s
for 256-byte rows on one H100); the same rows read page by page go at the link's rate. The
``tile_sorted`` gather therefore reads the ids grouped first: ids fall in buckets of about
:data:`BUCKET_BYTES` of rows (``id >> shift``), and a counting sort on the gather's own CTAs
(count per CTA, then scan and scatter; two launches on the current stream, no host
synchronisation, graph-capturable) gives the ids grouped by bucket, values unchanged, and
``order``, the flat position each grouped id came from. Rows of one bucket may come in any
order; the gather writes each row to ``order[i]``, so its output does not depend on it.

:func:`group_reference` is the pure-torch equivalent (a stable sort by bucket) and
:func:`grouping_error` checks any grouping of ids against the definition.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ep_engram import knobs
from ep_engram.kernels import register_include_root

__all__ = [
    "BUCKET_BYTES",
    "BUCKET_THREADS",
    "MAX_BUCKETS",
    "BucketGrouper",
    "bucket_shift",
    "bucket_spec",
    "buckets_of",
    "build_bucket",
    "group_reference",
    "grouping_error",
    "num_buckets",
    "shipped_bucket_kernels",
]

BUCKET_BYTES = 2 << 20
"""Target bytes of rows per bucket: the 2 MiB translation granule of the host segment."""
MAX_BUCKETS = 8192
"""Buckets a grouping may have (a counter each in shared memory: 32 KiB); larger tables get
larger buckets (the probe's 64 MiB footprint of random ids still ran at the link's rate)."""
BUCKET_THREADS = 1024
"""Threads per CTA of both grouping kernels (each owns ``MAX_BUCKETS / 1024`` buckets in the
scan)."""

_PARAMS = {
    "count": (
        "const void* ids",
        "int* counts",
        "long long num_items",
        "long long num_rows",
        "int shift",
        "int num_buckets",
    ),
    "scatter": (
        "const void* ids",
        "void* grouped",
        "long long* order",
        "const int* counts",
        "long long num_items",
        "long long num_rows",
        "int shift",
        "int num_buckets",
    ),
}


def bucket_shift(row_bytes: int, num_rows: int) -> int:
    """The shift of ``bucket = id >> shift`` for a table.

    The largest shift whose bucket holds at most :data:`BUCKET_BYTES` of rows (at least one
    row), raised until the valid ids need at most ``MAX_BUCKETS - 1`` buckets (the last one holds
    ``-1`` and bad ids).

    Args:
        row_bytes: Bytes of one row (positive).
        num_rows: Rows of the whole table (positive).

    Raises:
        ValueError: A row size or row count that is not positive.
    """
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be positive, got {row_bytes}")
    if num_rows <= 0:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    shift = max(0, (BUCKET_BYTES // row_bytes).bit_length() - 1)
    while ((num_rows - 1) >> shift) + 2 > MAX_BUCKETS:
        shift += 1
    return shift


def num_buckets(num_rows: int, shift: int) -> int:
    """Buckets of a grouping: those of the valid ids, and one for ``-1`` and bad ids (last)."""
    return ((num_rows - 1) >> shift) + 2


def buckets_of(ids: torch.Tensor, num_rows: int, shift: int) -> torch.Tensor:
    """The bucket of each id (int64, same shape and device): ``id >> shift`` for valid ids, the
    last bucket for ``-1`` and any id outside ``[0, num_rows)``."""
    wide = ids.long()
    valid = (wide >= 0) & (wide < num_rows)
    return torch.where(valid, wide >> shift, num_buckets(num_rows, shift) - 1)


def group_reference(
    ids: torch.Tensor, num_rows: int, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch grouping: ``(grouped, order)`` by a stable sort of the buckets.

    Args:
        ids: ``[N]`` int32/int64 ids (any device).
        num_rows: Rows of the table (valid ids are ``[0, num_rows)``).
        shift: From :func:`bucket_shift`.

    Returns:
        ``grouped`` (``ids``' dtype, ``[N]``): the ids in bucket order, values unchanged;
        ``order`` (int64 ``[N]``): ``grouped[i] == ids[order[i]]``.
    """
    flat = ids.reshape(-1)
    _, order = torch.sort(buckets_of(flat, num_rows, shift), stable=True)
    return flat[order], order


def grouping_error(
    ids: torch.Tensor, grouped: torch.Tensor, order: torch.Tensor, num_rows: int, shift: int
) -> str | None:
    """What is wrong with ``(grouped, order)`` as a grouping of ``ids``, or ``None``.

    A grouping is valid when ``order`` is a permutation of ``[0, N)``, ``grouped[i] ==
    ids[order[i]]`` (same dtype) and the buckets of ``grouped`` never decrease.
    """
    flat = ids.reshape(-1)
    n = flat.numel()
    if grouped.dtype != flat.dtype or order.dtype != torch.int64:
        return f"dtypes {grouped.dtype}/{order.dtype}, expected {flat.dtype}/torch.int64"
    if grouped.numel() != n or order.numel() != n:
        return f"{grouped.numel()} grouped ids and {order.numel()} positions for {n} ids"
    if n == 0:
        return None
    cpu = order.reshape(-1).cpu()
    if int(cpu.min()) < 0 or int(cpu.max()) >= n:
        return f"order holds positions outside [0, {n})"
    if not torch.equal(torch.sort(cpu).values, torch.arange(n)):
        return "order is not a permutation"
    got = grouped.reshape(-1).cpu()
    want = flat.cpu()[cpu]
    if not torch.equal(got, want):
        bad = int(torch.nonzero(got != want)[0])
        return f"grouped[{bad}] = {int(got[bad])} but ids[order[{bad}]] = {int(want[bad])}"
    b = buckets_of(got, num_rows, shift)
    if n > 1 and bool((b[1:] < b[:-1]).any()):
        at = int(torch.nonzero(b[1:] < b[:-1])[0])
        return f"buckets decrease at {at}: {int(b[at])} then {int(b[at + 1])}"
    return None


def bucket_spec(step: str, *, index64: bool) -> Any:
    """The ``KernelSpec`` of one grouping step, ``"count"`` or ``"scatter"``.

    Both launch with ``grid = num_ctas``, ``block = BUCKET_THREADS``, no dynamic shared memory.
    count: ids (``[N]`` int32/int64), counts (int32 ``[num_ctas, num_buckets]``, written whole),
    N, num_rows, shift, num_buckets. scatter: ids, grouped (``[N]``, the ids' dtype), order (int64
    ``[N]``), counts (as count wrote them, same grid), N, num_rows, shift, num_buckets.

    Raises:
        ValueError: An unknown step.
    """
    from ep_jit import KernelSpec

    if step not in _PARAMS:
        raise ValueError(f"step must be 'count' or 'scatter', got {step!r}")
    return KernelSpec(
        name=f"ep_engram_bucket_{step}_{'i64' if index64 else 'i32'}",
        includes=["ep_engram/smxx_bucket.cuh"],
        template=f"ep_engram::bucket_{step}",
        params=_PARAMS[step],
        constants={"IndexT": "long long" if index64 else "int", "kMaxBuckets": MAX_BUCKETS},
        launch_bounds=(BUCKET_THREADS, 1),
    )


@functools.cache
def build_bucket(step: str, index64: bool) -> Any:
    """The compiled kernel of :func:`bucket_spec` (built on first use, cached on disk)."""
    from ep_jit import build

    register_include_root()
    return build(bucket_spec(step, index64=index64))


class BucketGrouper:
    """Groups ids by bucket with the two kernels; keeps its scratch between calls.

    The scratch (per-CTA counts, grouped ids, positions) grows to the largest call and is reused,
    so steady-state calls allocate nothing. Calls are ordered on the stream they run on: a
    result stays valid until the next call that is enqueued after its consumer (a fetch's
    gather, on the same stream).

    Args:
        device: The CUDA device the ids live on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._counts = torch.empty(0, dtype=torch.int32, device=device)
        self._grouped: dict[torch.dtype, torch.Tensor] = {}
        self._order = torch.empty(0, dtype=torch.int64, device=device)

    def _scratch(self, n: int, dtype: torch.dtype, counts: int) -> tuple[torch.Tensor, ...]:
        if self._counts.numel() < counts:
            self._counts = torch.empty(counts, dtype=torch.int32, device=self.device)
        grouped = self._grouped.get(dtype)
        if grouped is None or grouped.numel() < n:
            grouped = self._grouped[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        if self._order.numel() < n:
            self._order = torch.empty(n, dtype=torch.int64, device=self.device)
        return self._counts, grouped[:n], self._order[:n]

    def group(
        self, ids: torch.Tensor, num_rows: int, shift: int, num_ctas: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Enqueues the grouping of ``ids`` on the current stream (asynchronous).

        Args:
            ids: ``[N]`` contiguous int32/int64 ids on ``device``; any values (ids outside
                ``[0, num_rows)`` go to the last bucket unchanged). ``N < 2**31``.
            num_rows: Rows of the table.
            shift: From :func:`bucket_shift` for this table.
            num_ctas: CTAs (SMs) of each of the two launches.

        Returns:
            ``(grouped, order)``: views of the scratch, ``[N]`` of ``ids``' dtype and int64 ``[N]``
            (see :func:`group_reference` for their meaning; order inside a bucket may vary).

        Raises:
            TypeError: Ids that are not a contiguous int32/int64 CUDA tensor.
            ValueError: Too many ids, a shift with too many buckets, or ``num_ctas < 1``.
        """
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
        if ids.dim() != 1 or not ids.is_contiguous() or ids.device.type != "cuda":
            raise TypeError("ids must be a contiguous 1-D CUDA tensor")
        n = ids.numel()
        if n >= 1 << 31:
            raise ValueError(f"at most 2**31 - 1 ids can be grouped, got {n}")
        buckets = num_buckets(num_rows, shift)
        if not 2 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"shift {shift} gives {buckets} buckets (2..{MAX_BUCKETS} allowed)")
        if num_ctas < 1:
            raise ValueError(f"num_ctas must be >= 1, got {num_ctas}")
        counts, grouped, order = self._scratch(n, ids.dtype, num_ctas * buckets)
        if n == 0:
            return grouped, order
        index64 = ids.dtype == torch.int64
        args = (n, num_rows, shift, buckets)
        build_bucket("count", index64).launch(num_ctas, BUCKET_THREADS, ids, counts, *args)
        build_bucket("scatter", index64).launch(
            num_ctas, BUCKET_THREADS, ids, grouped, order, counts, *args
        )
        return grouped, order

    def arrange(
        self, ids: torch.Tensor, num_rows: int, shift: int, num_ctas: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids as the ``tile_sorted`` gather reads them, and their positions.

        ``EP_ENGRAM_SORT=bucket``: :meth:`group`; ``torch``: ``torch.sort`` (ascending ids, on
        every SM). Same arguments and results as :meth:`group`.
        """
        if knobs.engram.sort == "torch":
            return torch.sort(ids)
        return self.group(ids, num_rows, shift, num_ctas)


def shipped_bucket_kernels() -> list[Any]:
    """Both steps for both id types (compile-only checks, see ``kernels.shipped_kernels``)."""
    return [bucket_spec(s, index64=w) for s in ("count", "scatter") for w in (False, True)]
