"""Timing loop of ``ep-bench``: ep-jit's collective timing with ep-core's input checks off.

The loop itself (L2 flush, barrier, sleep kernel and one-element all-reduce as a GPU start line,
CUDA events, max over ranks) is :func:`ep_jit.testing.time_steps` and
:func:`ep_jit.testing.kernel_times`; see ``ep_jit.testing`` for what it measures. What ``ep-bench``
adds: the input value checks of the buffer (``EP_CHECK_INPUTS``: host reads of the expert ids) are
off while timing, as DeepEP has none; the correctness pass before the timings runs with them.
:class:`RankTiming`, :func:`allgather_floats` and :func:`per_call_kernel_us` are re-exported from
``ep_jit.testing``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ep_core import knobs as core_knobs
from ep_jit import testing as jit_testing
from ep_jit.testing import RankTiming as RankTiming
from ep_jit.testing import allgather_floats as allgather_floats
from ep_jit.testing import per_call_kernel_us as per_call_kernel_us

__all__ = [
    "RankTiming",
    "allgather_floats",
    "input_checks_off",
    "kernel_times",
    "per_call_kernel_us",
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
