"""Timing loop of ``ep-bench``: ep-jit's collective timing with ep-core's input checks off.

The loop itself (L2 flush, barrier, sleep kernel and one-element all-reduce as a GPU start line,
CUDA events, max over ranks) is :func:`ep_jit.testing.time_steps` and
:func:`ep_jit.testing.kernel_times`; see ``ep_jit.testing`` for what it measures. What ``ep-bench``
adds: the input value checks of the buffer (``EP_CHECK_INPUTS``: host reads of the expert ids) are
off while timing, as DeepEP has none; the correctness pass before the timings runs with them;
:func:`time_repeated` times the steps in several repeats, so the spread of a ratio of two steps
(the speedup over the baseline) can be shown; :class:`Progress` reports how far a long loop has
got. :class:`RankTiming`, :func:`allgather_floats` and :func:`per_call_kernel_us` are
re-exported from ``ep_jit.testing``.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ep_core import knobs as core_knobs
from ep_jit import testing as jit_testing
from ep_jit.testing import RankTiming as RankTiming
from ep_jit.testing import allgather_floats as allgather_floats
from ep_jit.testing import per_call_kernel_us as per_call_kernel_us

__all__ = [
    "Progress",
    "RankTiming",
    "RepeatedTiming",
    "allgather_floats",
    "format_seconds",
    "input_checks_off",
    "kernel_times",
    "merge_repeats",
    "per_call_kernel_us",
    "speedup",
    "time_repeated",
    "time_steps",
]


@contextlib.contextmanager
def input_checks_off() -> Iterator[None]:
    """Switches ep-core's ``EP_CHECK_INPUTS`` off inside the block, restoring it on exit."""
    with core_knobs.ep.scope():
        core_knobs.ep.check_inputs = False
        yield


def time_steps(
    steps: Sequence[tuple[str, Callable[[], object]]],
    *,
    iters: int,
    warmup: int,
    device: torch.device,
    group: dist.ProcessGroup,
) -> dict[str, RankTiming]:
    """:func:`ep_jit.testing.time_steps` with ep-core's input checks off; collective.

    Args:
        steps: ``(name, fn)`` pairs; ``fn()`` launches one call (asynchronously on CUDA).
        iters: Timed iterations (>= 1).
        warmup: Untimed iterations first.
        device: The rank's device.
        group: The process group the steps communicate over.

    Returns:
        ``{name: RankTiming}``, identical on every rank.
    """
    return jit_testing.time_steps(
        steps, iters=iters, warmup=warmup, device=device, group=group, context=input_checks_off
    )


def kernel_times(
    steps: Sequence[tuple[str, Callable[[], object]]],
    kernels: Mapping[str, tuple[str, ...]],
    *,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup,
) -> dict[str, float | None]:
    """:func:`ep_jit.testing.kernel_times` with ep-core's input checks off; collective on CUDA.

    Args:
        steps: As for :func:`time_steps`.
        kernels: Kernel-name prefixes per step name (every kernel a backend launches for it).
        iters: Profiled iterations (>= 1).
        device: The rank's device.
        group: The process group.

    Returns:
        ``{name: us or None}`` for every name of ``kernels``; ``None`` off CUDA or when some rank
        saw none of the step's kernels (the reference backend launches none of ours).
    """
    return jit_testing.kernel_times(
        steps, kernels, iters=iters, device=device, group=group, context=input_checks_off
    )


def format_seconds(seconds: float) -> str:
    """``"8 s"``, ``"2 min 05 s"`` or ``"1 h 02 min"``: a duration for progress lines."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Reports, from a background thread, how far a long timing loop has got, with an ETA.

    Nothing is printed for a loop that ends within ``first_after_s``; after that one line every
    ``every_s`` seconds: iterations done, time so far, time left at the rate so far. The loop
    calls :meth:`tick` once per iteration (a counter increment, nothing else, so the timed calls
    are not disturbed; the line is written by the thread between them).

    Args:
        log: Writes one line (rank 0's ``RankContext.log``); ``None`` reports nothing.
        what: What is running, e.g. ``"timing"``.
        total: Iterations the loop will run.
        first_after_s: Seconds before the first line.
        every_s: Seconds between lines.
    """

    def __init__(
        self,
        log: Callable[[str], None] | None,
        what: str,
        total: int,
        *,
        first_after_s: float = 5.0,
        every_s: float = 10.0,
    ) -> None:
        self.log = log
        self.what = what
        self.total = total
        self.done = 0
        self.first_after_s = first_after_s
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def tick(self) -> None:
        """Counts one finished iteration."""
        self.done += 1

    def line(self, elapsed: float) -> str:
        """The progress line after ``elapsed`` seconds."""
        done = min(self.done, self.total)
        text = f"      {self.what}: {done}/{self.total} iterations, {format_seconds(elapsed)}"
        if done > 0:
            left = elapsed / done * (self.total - done)
            text += f", about {format_seconds(left)} left"
        return text

    def _run(self) -> None:
        assert self.log is not None
        wait = self.first_after_s
        while not self._stop.wait(wait):
            self.log(self.line(time.monotonic() - self._start))
            wait = self.every_s

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self.log is not None:
            self._thread = threading.Thread(target=self._run, name="ep-bench-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True)
class RepeatedTiming:
    """One step timed in several repeats of ``iters`` calls each.

    Attributes:
        merged: ``median_us``, ``p10_us``, ``p90_us``: the median over the repeats of each
            repeat's value (max over ranks), the lower middle one for an even count, so it is a
            measured value; ``per_rank_median_us``: per rank the median over the repeats of that
            rank's median; ``samples``: timed calls per rank, all repeats together.
        repeats: Each repeat's timing, in order.
    """

    merged: RankTiming
    repeats: tuple[RankTiming, ...]

    @property
    def median_us(self) -> float:
        """``merged.median_us``."""
        return self.merged.median_us

    def to_json(self) -> dict[str, object]:
        """:meth:`RankTiming.to_json` of :attr:`merged` plus ``repeats`` and ``repeat_medians``."""
        out = self.merged.to_json()
        out["repeats"] = len(self.repeats)
        out["repeat_medians"] = [r.median_us for r in self.repeats]
        return out


def merge_repeats(timings: Sequence[RankTiming]) -> RepeatedTiming:
    """Merges the repeats of one step (see :class:`RepeatedTiming`); ``timings`` is not empty."""
    if not timings:
        raise ValueError("merge_repeats needs at least one timing")
    num_ranks = len(timings[0].per_rank_median_us)
    median = statistics.median_low(t.median_us for t in timings)
    merged = RankTiming(
        median_us=median,
        # Medians of the three series need not stay ordered; keep p10 <= median <= p90.
        p10_us=min(statistics.median_low(t.p10_us for t in timings), median),
        p90_us=max(statistics.median_low(t.p90_us for t in timings), median),
        per_rank_median_us=tuple(
            statistics.median(t.per_rank_median_us[r] for t in timings) for r in range(num_ranks)
        ),
        samples=sum(t.samples for t in timings),
    )
    return RepeatedTiming(merged, tuple(timings))


def speedup(ours: RepeatedTiming, base: RepeatedTiming) -> dict[str, Any]:
    """How many times faster ``ours`` is than ``base``, and the spread of that over the repeats.

    The two steps run in the same iterations (one call of each in turn), so each repeat's ratio
    compares calls made under the same conditions; the spread over the repeats shows how far
    one measurement of the ratio can be trusted. The value, a ratio of the two lower medians
    over the repeats, always lies between the lowest and the highest repeat.

    Returns:
        ``{"value": base median / ours median (merged), "min", "max", "per_repeat"}``; a ratio
        is 0 where a time is 0.
    """

    def ratio(o: float, b: float) -> float:
        return b / o if o > 0 else 0.0

    ratios = [
        ratio(o.median_us, b.median_us) for o, b in zip(ours.repeats, base.repeats, strict=True)
    ]
    return {
        "value": ratio(ours.median_us, base.median_us),
        "min": min(ratios),
        "max": max(ratios),
        "per_repeat": ratios,
    }


def time_repeated(
    steps: Sequence[tuple[str, Callable[[], object]]],
    *,
    iters: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    group: dist.ProcessGroup,
    log: Callable[[str], None] | None = None,
) -> dict[str, RepeatedTiming]:
    """:func:`time_steps` ``repeats`` times (warm-up before the first only); collective.

    Args:
        steps: As for :func:`time_steps`.
        iters: Timed iterations per repeat (>= 1).
        warmup: Untimed iterations before the first repeat.
        repeats: Repeats (>= 1).
        device: The rank's device.
        group: The process group the steps communicate over.
        log: Where :class:`Progress` writes its lines (rank 0), or ``None``.

    Returns:
        ``{name: RepeatedTiming}``, identical on every rank.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    progress = Progress(log, "timing", warmup + iters * repeats)
    last_name, last_fn = steps[-1]

    def counted() -> object:
        out = last_fn()
        progress.tick()  # an integer increment: the thread writes the line between calls
        return out

    counted_steps = [*steps[:-1], (last_name, counted)]
    runs: list[dict[str, RankTiming]] = []
    with progress:
        for i in range(repeats):
            runs.append(
                time_steps(
                    counted_steps,
                    iters=iters,
                    warmup=warmup if i == 0 else 0,
                    device=device,
                    group=group,
                )
            )
    return {name: merge_repeats([run[name] for run in runs]) for name, _ in steps}
