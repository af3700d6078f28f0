"""Timing helpers shared by every benchmark: CUDA events and an L2 flush, or perf_counter on CPU.

:func:`capture_graph` captures the work to time in a CUDA graph, so its replays carry no host
launch overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["L2_FLUSH_BYTES", "BenchStats", "bench", "capture_graph"]

L2_FLUSH_BYTES = 256 << 20
"""Bytes written before each timed call to evict the L2 (H200's L2 is 50 MiB)."""


def _quantile(sorted_samples: tuple[float, ...], q: float) -> float:
    # Linear interpolation between closest ranks, as numpy's default.
    pos = q * (len(sorted_samples) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


@dataclass(frozen=True)
class BenchStats:
    """Per-call times of one benchmark, in seconds.

    Attributes:
        samples: Every timed call, in the order they ran.
        device: ``"cuda"`` (CUDA events) or ``"cpu"`` (``time.perf_counter``).
    """

    samples: tuple[float, ...]
    device: str

    @property
    def _sorted(self) -> tuple[float, ...]:
        return tuple(sorted(self.samples))

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples)

    @property
    def p10(self) -> float:
        """10th percentile, seconds."""
        return _quantile(self._sorted, 0.10)

    @property
    def p90(self) -> float:
        """90th percentile, seconds."""
        return _quantile(self._sorted, 0.90)

    @property
    def mean(self) -> float:
        """Mean seconds per call."""
        return statistics.fmean(self.samples)

    @property
    def min(self) -> float:
        """Fastest call, seconds."""
        return min(self.samples)

    def __str__(self) -> str:
        us = 1e6
        return (
            f"median {self.median * us:.2f} us (p10 {self.p10 * us:.2f}, p90 {self.p90 * us:.2f}, "
            f"n={len(self.samples)}, {self.device})"
        )


def bench(
    fn: Callable[[], Any],
    *,
    warmup: int = 5,
    iters: int = 30,
    flush_l2: bool = True,
    device: torch.device | str | None = None,
) -> BenchStats:
    """Times ``fn()`` call by call.

    On CUDA each call is bracketed by two events recorded on the current stream; with
    ``flush_l2`` a 256 MiB buffer is zeroed on that stream before every call (outside the
    events) so data does not stay in L2 between calls. The host synchronises once, after the
    last call. On CPU each call is timed with ``time.perf_counter`` (``flush_l2`` is ignored).
    Multi-rank benchmarks should put a barrier inside ``fn`` or before calling ``bench``.

    Args:
        fn: The work to time, taking no arguments; launched asynchronously on CUDA.
        warmup: Untimed calls first (compiles, caches, allocator warm-up).
        iters: Timed calls (>= 1).
        flush_l2: Evict the L2 before every timed call (CUDA only).
        device: ``"cuda"``/``cuda:<i>`` or ``"cpu"``; ``None`` means CUDA when available.

    Returns:
        BenchStats with one sample per timed call.

    Raises:
        ValueError: ``iters`` < 1 or ``warmup`` < 0.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return BenchStats(tuple(samples), "cpu")

    with torch.cuda.device(dev):
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=dev) if flush_l2 else None
        event = torch.cuda.Event
        starts = [event(enable_timing=True) for _ in range(iters)]  # type: ignore[no-untyped-call, unused-ignore]
        ends = [event(enable_timing=True) for _ in range(iters)]  # type: ignore[no-untyped-call, unused-ignore]
        torch.cuda.synchronize(dev)
        for start, end in zip(starts, ends, strict=True):
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        samples = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)]
    return BenchStats(tuple(samples), "cuda")


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Runs ``fn`` once on a side stream, then captures a second call of it in a CUDA graph.

    The first call is the warm-up (kernel compilation, allocator, lazy state) and runs on a
    fresh stream ordered after the current one, as graph capture requires; the device is
    synchronised before and after the capture. The capture uses ``capture_error_mode=
    "thread_local"`` so other threads (the NCCL watchdog polling its work) may keep calling
    CUDA meanwhile. Replay the result with ``graph.replay()`` on the current stream.

    Args:
        fn: The work to capture, taking no arguments; it must launch on the current stream and
            not synchronise the host (no ``.item()``, no ``torch.cuda.synchronize``).

    Returns:
        The captured graph; ``fn`` has run once (the warm-up), the captured call has not run.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    torch.cuda.synchronize()
    return graph
