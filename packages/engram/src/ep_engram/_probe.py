"""``python -m ep_engram.bench --probe``: what limits gathers.

For a host-placement table the same gather kernels are launched directly (no ``fetch`` around
them) on two copies of the rows: the ep-jit host segment (host-NUMA ``cuMemCreate`` memory
mapped into the GPU) and a plain ``torch`` pinned tensor (``cudaHostAlloc``), each with three id
patterns of the same count:

- ``random``: uniform over the whole table (what the main sweep measures);
- ``sorted``: the same ids in ascending order (consecutive reads share pages);
- ``small``: uniform over the first 64 MiB of the table (few pages in all);
- ``sequential``: ``0, 1, 2, ...`` (one contiguous range: the link's rate for the kernel).

``torch.index_select`` on the mapped segment (all SMs) runs beside them with each pattern. If
``sorted`` and ``small`` are much faster than ``random`` for every kernel and for
``index_select``, the limit is address translation of the host pages (GPU TLB or the host's
IOMMU), not the number of rows in flight per SM; if the pinned table differs from the segment,
it is the segment's mapping; if the direct launch beats the ``fetch`` of the main sweep, the
timed region held more than the gather. The allocation granularities and the host NUMA node
are printed first.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from ep_engram.bucket import BucketGrouper, bucket_shift
from ep_engram.kernels import build_gather, smem_of, threads_of
from ep_engram.layout import sf_col_stride

__all__ = ["SMALL_FOOTPRINT_BYTES", "id_patterns", "probe_table"]

SMALL_FOOTPRINT_BYTES = 64 << 20
"""Bytes of the table the ``small`` id pattern draws from."""

_NO_ERROR = (1 << 63) - 1


def id_patterns(n: int, entries: int, row_bytes: int, seed: int) -> dict[str, torch.Tensor]:
    """The probe's id patterns: ``n`` int64 ids each (CPU), named as in the module doc."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, entries, (n,), generator=gen)
    small_rows = max(1, min(entries, SMALL_FOOTPRINT_BYTES // row_bytes))
    return {
        "random": rand,
        "sorted": rand.sort().values,
        "small": torch.randint(0, small_rows, (n,), generator=gen),
        "sequential": torch.arange(n, dtype=torch.int64) % entries,
    }


def _host_facts(device: torch.device) -> list[str]:
    """Where the host segment lives and its page sizes (best effort: the driver's answers)."""
    facts = [f"CPUs this process may run on: {len(os.sched_getaffinity(0))}"]
    try:
        from cuda.bindings import driver

        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID
        err, dev = driver.cuDeviceGet(int(device.index or 0))
        err, numa = driver.cuDeviceGetAttribute(attr, dev)
        facts.append(f"host NUMA node of the GPU: {numa}")
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
        prop.location.id = max(int(numa), 0)
        flags = driver.CUmemAllocationGranularity_flags
        for name in ("MINIMUM", "RECOMMENDED"):
            flag = getattr(flags, f"CU_MEM_ALLOC_GRANULARITY_{name}")
            err, gran = driver.cuMemGetAllocationGranularity(prop, flag)
            facts.append(f"host-NUMA allocation granularity ({name.lower()}): {gran} ({err})")
    except Exception as exc:  # the facts are informative only
        facts.append(f"driver facts unavailable: {exc!r}")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            facts.append(f"transparent huge pages: {f.read().strip()}")
    except OSError:
        pass
    facts.append(f"IOMMU groups present: {os.path.isdir('/sys/kernel/iommu_groups')}")
    return facts


def _device_pointer(host: torch.Tensor) -> int:
    """The device address of a pinned CPU tensor (its own address under unified addressing)."""
    try:
        from cuda.bindings import driver

        err, ptr = driver.cuMemHostGetDevicePointer(host.data_ptr(), 0)
        if err == driver.CUresult.CUDA_SUCCESS:
            return int(ptr)
    except Exception:
        pass
    return host.data_ptr()


def _pinned_copy(rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``rows`` in ``torch`` pinned host memory (``cudaHostAlloc``)."""
    pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    pinned.copy_(rows)
    return pinned


def _launcher(
    variant: str, unroll: int, row_bytes: int, entries: int, k: int, tokens: int
) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    kernel = build_gather(
        index64=True,
        row_bytes=row_bytes,
        num_sf_packs=0,
        sf_col_major=False,
        variant=variant,
        unroll=unroll,
    )
    threads = threads_of(variant, unroll)
    smem = smem_of(variant, row_bytes)
    groupers: dict[torch.device, BucketGrouper] = {}

    def launch(
        ctas: int, ids: torch.Tensor, out: torch.Tensor, err: torch.Tensor, bases: torch.Tensor
    ) -> None:
        order = None
        if variant == "tile_sorted":  # as the intranode backend does it, inside the timing
            num_rows = entries * bases.numel()
            grouper = groupers.get(ids.device)
            if grouper is None:
                grouper = groupers[ids.device] = BucketGrouper(ids.device)
            shift = bucket_shift(row_bytes, num_rows)
            ids, order = grouper.arrange(ids, num_rows, shift, ctas)
        kernel.launch(
            ctas,
            threads,
            ids,
            out,
            None,
            err,
            bases,
            bases,
            ids.numel(),
            entries,
            k,
            sf_col_stride(tokens),
            bases.numel(),
            order,
            smem=smem,
        )

    return launch


def probe_table(
    table: Any,
    stored: torch.Tensor,
    args: argparse.Namespace,
    head: str,
    base: dict[str, Any],
    record: Callable[[str, dict[str, Any], str, int | None, float], None],
) -> None:
    """Runs the probe on a filled table (one rank); results go to ``record``.

    On a GPU-placement table only the segment is probed (no pinned copy, no host facts): the
    ``sequential`` pattern then gives each kernel's rate for one contiguous range, the ceiling of
    its SMs for a copy.

    Args:
        table: An intranode ``EngramTable`` (``placement`` host or gpu) on one rank.
        stored: ``[E, row_bytes]`` uint8, the rows written into it (on the GPU).
        args: The bench's arguments (variants, probe_unrolls, probe_ctas, tokens, k, iters,
            warmup).
        head: Progress line prefix.
        base: Result fields shared by every measurement (placement, row_bytes, rows).
        record: The bench's recorder.

    Raises:
        AssertionError: A kernel whose rows differ from ``index_select``'s.
    """
    from ep_engram.bench import kernel_name, variant_runs
    from ep_jit.testing import bench

    dev = table.device
    host = table._backend.cfg.placement == "host"
    if host:
        for line in _host_facts(dev):
            print(f"probe: {line}", flush=True)
    entries, row_bytes = table.num_entries_per_rank, table.hidden * 2
    n = args.tokens * args.k
    seg = table._backend.rows_base  # [1] int64: this rank's segment address
    mapped = table._backend.rows_view(0)
    memories = {"seg": seg}
    pinned = None
    if host:
        pinned = _pinned_copy(stored)
        memories["pin"] = torch.tensor([_device_pointer(pinned)], dtype=torch.int64, device=dev)
    patterns = id_patterns(n, entries, row_bytes, seed=n + row_bytes)
    timing = {"warmup": args.warmup, "iters": args.iters, "device": dev}
    out = torch.empty((n, row_bytes), dtype=torch.uint8, device=dev)
    err = torch.full((1,), _NO_ERROR, dtype=torch.int64, device=dev)
    runs = variant_runs(args.variants, args.probe_unrolls)
    for pattern, ids_cpu in patterns.items():
        ids = ids_cpu.to(dev)
        want = stored.index_select(0, ids)
        got = torch.empty_like(want)
        stats = bench(lambda: torch.index_select(mapped, 0, ids, out=got), **timing)  # noqa: B023
        if not torch.equal(got, want):
            raise AssertionError(f"{head} probe {pattern}: index_select on the segment differs")
        record(head, base, f"probe-index_select-{pattern}", None, stats.median)
        for variant, unroll in runs:
            launch = _launcher(variant, unroll, row_bytes, entries, args.k, args.tokens)
            for mem, bases in memories.items():
                kind = f"probe-{mem}-{pattern}-{kernel_name(variant, unroll)[7:]}"
                for ctas in args.probe_ctas:
                    out.fill_(0xA5)
                    launch(ctas, ids, out, err, bases)
                    if not torch.equal(out, want) or int(err.item()) != _NO_ERROR:
                        raise AssertionError(f"{head} {kind} ctas={ctas}: wrong rows")
                    stats = bench(
                        lambda: launch(ctas, ids, out, err, bases),  # noqa: B023
                        **timing,
                    )
                    record(head, base, kind, ctas, stats.median)
    del pinned
