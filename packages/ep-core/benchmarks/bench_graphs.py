"""Pieces shared by the developer benchmarks of this folder (imported by them, not installed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

SLEEP_CYCLES = 2_000_000
"""Cycles of the sleep kernel before a timed call (about 1 ms on H100/H200)."""


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` run once on a side stream (warm-up, compilation), then captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread keeps polling while this thread captures.
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        fn()
    torch.cuda.synchronize()
    return g


def start_line(align: torch.Tensor) -> None:
    """Makes every rank's next GPU work start together (collective).

    A host barrier, then on the current stream a sleep kernel (the host enqueues the timed work
    meanwhile) and a one-element all-reduce of ``align``.
    """
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(SLEEP_CYCLES)
    dist.all_reduce(align)
