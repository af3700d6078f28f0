"""Timing of collective calls: every rank starts each timed call together, rank stats are merged.

:func:`~ep_jit.testing.bench` times back-to-back calls of one function on one rank; a
communication benchmark also needs all ranks to start each call at the same moment (otherwise the
time a rank waits for a late peer is counted as transfer time) and needs the slowest rank's time.

:func:`start_line` gives every rank the same start: a device synchronisation and
``dist.barrier()``, then on CUDA a ~1 ms sleep kernel (the host enqueues the timed call meanwhile)
and a one-element all-reduce as a GPU-side start line, as DeepEP's tests do. Host launch overhead
is thus hidden, but host synchronisation inside a call still counts.

:func:`time_steps` runs, for every timed call, an L2 flush, the start line, then the call
bracketed by CUDA events (``time.perf_counter`` on CPU). Several steps (a dispatch, then the
combine that consumes its handle) run in turn inside one iteration, so stateful APIs see the order
they expect. Per rank the median and the 10th/90th percentiles are taken over the iterations; the
reported value of each is the maximum over ranks. :func:`kernel_times` runs the same loop under
``torch.profiler`` and reports the device time of each step's own kernels.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_jit.testing._bench import L2_FLUSH_BYTES, BenchStats

__all__ = [
    "START_LINE_SLEEP_CYCLES",
    "RankTiming",
    "allgather_floats",
    "kernel_times",
    "per_call_kernel_us",
    "start_line",
    "time_steps",
]

START_LINE_SLEEP_CYCLES = 2_000_000
"""Cycles of the sleep kernel of :func:`start_line` (about 1 ms on H100/H200)."""

Steps = Sequence[tuple[str, Callable[[], object]]]
"""``(name, fn)`` pairs; ``fn()`` launches one call of the step (asynchronously on CUDA)."""

ContextFactory = Callable[[], AbstractContextManager[object]]
"""Makes a fresh context manager each time it is called (e.g. a ``contextmanager`` function)."""


@dataclass(frozen=True)
class RankTiming:
    """Timing of one step over all ranks, in microseconds.

    Attributes:
        median_us: Max over ranks of each rank's median.
        p10_us: Max over ranks of each rank's 10th percentile.
        p90_us: Max over ranks of each rank's 90th percentile.
        per_rank_median_us: Each rank's median, by rank.
        samples: Timed calls per rank.
    """

    median_us: float
    p10_us: float
    p90_us: float
    per_rank_median_us: tuple[float, ...]
    samples: int

    def to_json(self) -> dict[str, object]:
        """The timing as a JSON-ready dict."""
        return {
            "median": self.median_us,
            "p10": self.p10_us,
            "p90": self.p90_us,
            "per_rank_median": list(self.per_rank_median_us),
            "samples": self.samples,
        }


def allgather_floats(
    values: Sequence[float], *, device: torch.device, group: dist.ProcessGroup | None = None
) -> list[list[float]]:
    """Gathers one list of floats per rank (same length on every rank); blocks the host.

    Args:
        values: This rank's values.
        device: Where the exchange tensor lives (``cuda:<i>`` for NCCL, ``cpu`` for gloo).
        group: The process group; ``None`` is the default group.

    Returns:
        ``out[r]`` = the values of rank ``r``.
    """
    local = torch.tensor(list(values), dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [t.tolist() for t in gathered]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_line(align: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> None:
    """Makes every rank's next work start together (collective; blocks the host).

    Synchronises ``align``'s device and passes ``dist.barrier()``; on CUDA it then enqueues, on
    the current stream, a sleep kernel of :data:`START_LINE_SLEEP_CYCLES` (the host enqueues the
    timed work behind it meanwhile) and a one-element all-reduce of ``align``, so the GPU work
    enqueued next starts on every rank at the same moment and a rank's time does not include a
    peer's host-side launch delay. On CPU the barrier is the start line.

    Args:
        align: A one-element tensor on the rank's device (any float dtype; its value changes).
        group: The process group; ``None`` is the default group.
    """
    _sync(align.device)
    dist.barrier(group=group)
    if align.device.type == "cuda":
        torch.cuda._sleep(START_LINE_SLEEP_CYCLES)
        dist.all_reduce(align, group=group)


def time_steps(
    steps: Steps,
    *,
    iters: int,
    warmup: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    context: ContextFactory | None = None,
) -> dict[str, RankTiming]:
    """Times each step of ``steps``, ``iters`` times, every call behind a :func:`start_line`.

    One iteration runs every step once, in order. Before each call (warm-up included) the L2 is
    flushed (CUDA: :data:`~ep_jit.testing.L2_FLUSH_BYTES` zeroed on the current stream) and the
    ranks pass the start line; the call is bracketed by CUDA events on the current stream, so the
    time covers the host-side launch work and any host synchronisation inside the call as well
    as the kernels. Collective: every rank must call it with the same steps.

    Args:
        steps: ``(name, fn)`` pairs; ``fn()`` launches one call (asynchronously on CUDA).
        iters: Timed iterations (>= 1).
        warmup: Untimed iterations first (>= 0).
        device: The rank's device.
        group: The process group the steps communicate over; ``None`` is the default group.
        context: Called once; the context manager it returns is held around the warm-up and
            timed calls (not around the exchange of results), e.g. one that switches a package's
            input checks off while timing.

    Returns:
        ``{name: RankTiming}``, identical on every rank.

    Raises:
        ValueError: ``iters`` < 1 or ``warmup`` < 0.
    """
    _check_counts(iters, warmup)
    with _enter(context):
        samples = _run(steps, iters=iters, warmup=warmup, device=device, group=group)
    stats = [BenchStats(tuple(samples[name]), device.type) for name, _ in steps]
    local = [v * 1e6 for s in stats for v in (s.median, s.p10, s.p90)]
    per_rank = allgather_floats(local, device=device, group=group)
    out: dict[str, RankTiming] = {}
    for i, (name, _) in enumerate(steps):
        rows = [r[3 * i : 3 * i + 3] for r in per_rank]
        out[name] = RankTiming(
            median_us=max(r[0] for r in rows),
            p10_us=max(r[1] for r in rows),
            p90_us=max(r[2] for r in rows),
            per_rank_median_us=tuple(r[0] for r in rows),
            samples=iters,
        )
    dist.barrier(group=group)
    return out


def kernel_times(
    steps: Steps,
    kernels: Mapping[str, tuple[str, ...]],
    *,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    context: ContextFactory | None = None,
) -> dict[str, float | None]:
    """Device time per call of each step's own kernels, as DeepEP's tests time their kernels.

    Runs the loop of :func:`time_steps` (flush and start line before every call) ``iters`` times
    under ``torch.profiler`` with CUDA activity only, then sums the durations of the kernels whose
    names start with one of ``kernels[name]`` (every kernel a backend launches for that step, e.g.
    a routing-layout kernel and the dispatch kernel), per call. Host work and host
    synchronisation inside a call are not in this number; it shows what the GPU spends, beside
    the whole-call time of :func:`time_steps`. Collective on CUDA; off CUDA it returns at once.

    Args:
        steps: As for :func:`time_steps`.
        kernels: Kernel-name prefixes per step name; steps missing here are run but not
            reported.
        iters: Profiled iterations (>= 1), after one profiled warm-up iteration that is dropped.
        device: The rank's device.
        group: The process group; ``None`` is the default group.
        context: As for :func:`time_steps`; held around both profiled sessions.

    Returns:
        ``{name: us or None}`` for every name of ``kernels``: the max over ranks of each rank's
        :func:`per_call_kernel_us` (medians, so one delayed call does not move it); ``None``
        (on every rank) when not on CUDA or when some rank saw none of the step's kernels.

    Raises:
        ValueError: ``iters`` < 1.
    """
    _check_counts(iters, 0)
    if device.type != "cuda":
        return dict.fromkeys(kernels)
    from torch.profiler import ProfilerActivity, profile

    with _enter(context):
        # The first profiling session of a process also starts CUPTI; its numbers are dropped.
        with profile(activities=[ProfilerActivity.CUDA]):
            _run(steps, iters=1, warmup=0, device=device, group=group)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _run(steps, iters=iters, warmup=0, device=device, group=group)
    durations: dict[str, list[float]] = {}
    for event in prof.events():
        t = float(getattr(event, "device_time_total", 0.0) or 0.0)
        if t > 0:
            durations.setdefault(event.name, []).append(t)
    per_call = per_call_kernel_us(durations, kernels, iters)
    names = list(kernels)
    per_rank = allgather_floats([per_call[n] for n in names], device=device, group=group)
    dist.barrier(group=group)
    out: dict[str, float | None] = {}
    for i, n in enumerate(names):
        vals = [r[i] for r in per_rank]
        out[n] = max(vals) if min(vals) > 0 else None
    return out


def per_call_kernel_us(
    durations: Mapping[str, Sequence[float]],
    kernels: Mapping[str, tuple[str, ...]],
    iters: int,
) -> dict[str, float]:
    """Device time per call of each step from profiled kernel durations (us), robustly.

    For every kernel name that starts with one of the step's prefixes: the median of its
    durations times how often it ran per call (``len / iters``); the step's time is the sum over
    those kernels (a dispatch = its routing-layout kernel + the dispatch kernel). A median
    rather than a mean, so one delayed call among ``iters`` does not move the number.

    Args:
        durations: Durations (us) of every profiled launch, by kernel name.
        kernels: Kernel-name prefixes per step name.
        iters: Calls of each step during the profiled run (>= 1).

    Returns:
        ``{name: us}`` for every name of ``kernels``; 0 for a step whose kernels never ran.
    """
    out = dict.fromkeys(kernels, 0.0)
    for kname, values in durations.items():
        if not values:
            continue
        median = statistics.median(values)
        for name, prefixes in kernels.items():
            if kname.startswith(prefixes):
                out[name] += median * len(values) / iters
    return out


def _check_counts(iters: int, warmup: int) -> None:
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _enter(context: ContextFactory | None) -> AbstractContextManager[object]:
    return contextlib.nullcontext() if context is None else context()


def _run(
    steps: Steps,
    *,
    iters: int,
    warmup: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> dict[str, list[float]]:
    """The timing loop of :func:`time_steps`; returns each step's samples in seconds."""
    is_cuda = device.type == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if is_cuda else None
    align = torch.zeros(1, dtype=torch.float32, device=device)
    samples: dict[str, list[float]] = {name: [] for name, _ in steps}
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    for it in range(warmup + iters):
        timed = it >= warmup
        for name, fn in steps:
            if flush is not None:
                flush.zero_()
            start_line(align, group=group)
            if is_cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                if timed:
                    events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if timed:
                    samples[name].append(dt)
    _sync(device)
    for name, start, end in events:
        samples[name].append(start.elapsed_time(end) * 1e-3)
    return samples
