"""Host waits with a deadline: a stuck GPU or peer becomes an exception, never a hang.

``torch.cuda.synchronize`` blocks without a limit. :func:`wait_stream` records an event on the
stream and polls it until the deadline, then raises :class:`~ep_jit.errors.HostTimeoutError`
naming what it waited for::

    ep_jit.wait_stream(what="dispatch counts", timeout_s=buffer.num_cpu_timeout_secs)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ep_jit import knobs
from ep_jit.errors import HostTimeoutError

__all__ = ["timeout_seconds", "wait_device", "wait_event", "wait_stream", "wait_until"]


def timeout_seconds(value: object) -> float:
    """A user's ``timeout_s`` argument as a float for these waits (``<= 0``: no limit).

    Raises:
        TypeError: Not a number (``bool`` included).
        ValueError: NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout_s must be a number of seconds or None, got {value!r}")
    if value != value:  # NaN
        raise ValueError("timeout_s must be a number of seconds, got nan")
    return float(value)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
    """Polls ``predicate()`` until it returns true or ``timeout_s`` passes (host-driven progress).

    The same pacing as :func:`wait_event`: no sleep for the first 2 ms, then sleeps doubling
    from 20 µs to 1 ms. ``predicate`` may do work that makes progress (poll a transport, reap
    completions); an exception it raises propagates at once.

    Args:
        predicate: Called repeatedly; true ends the wait.
        what: Named in the error.
        timeout_s: Limit in seconds; default ``EP_JIT_HOST_TIMEOUT_S``; ``<= 0`` waits forever.

    Raises:
        HostTimeoutError: ``predicate`` stayed false for ``timeout_s``.
    """
    limit = float(knobs.jit.host_timeout_s if timeout_s is None else timeout_s)
    if predicate():
        return
    start = time.monotonic()
    deadline = start + limit
    spin_until = start + 2e-3
    pause = 20e-6
    while not predicate():
        now = time.monotonic()
        if limit > 0 and now > deadline:
            raise HostTimeoutError(what, limit)
        if now > spin_until:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def wait_event(event: torch.cuda.Event, what: str, timeout_s: float | None = None) -> None:
    """Polls ``event`` until it completes or ``timeout_s`` passes.

    Polls without sleeping for the first 2 ms (a wait for a kernel's counts should cost no more
    than a stream synchronisation), then sleeps between polls, doubling from 20 µs to 1 ms, so a
    long wait leaves the core to other work.

    Args:
        event: A recorded CUDA event.
        what: Named in the error.
        timeout_s: Limit in seconds; default ``EP_JIT_HOST_TIMEOUT_S``; ``<= 0`` waits forever.

    Raises:
        HostTimeoutError: The event did not complete in time.
    """
    limit = float(knobs.jit.host_timeout_s if timeout_s is None else timeout_s)
    if event.query():
        return
    start = time.monotonic()
    deadline = start + limit
    spin_until = start + 2e-3
    pause = 20e-6
    while not event.query():
        now = time.monotonic()
        if limit > 0 and now > deadline:
            raise HostTimeoutError(what, limit)
        if now > spin_until:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def wait_stream(
    stream: torch.cuda.Stream | None = None,
    *,
    what: str = "the GPU stream",
    timeout_s: float | None = None,
) -> None:
    """Waits, with a deadline, for the work queued so far on ``stream`` (default: current).

    Raises:
        HostTimeoutError: The stream did not drain in time (its work keeps running).
    """
    stream = stream if stream is not None else torch.cuda.current_stream()
    event = torch.cuda.Event()
    event.record(stream)
    wait_event(event, what, timeout_s)


def wait_device(
    device: torch.device | int | None = None,
    *,
    what: str = "the GPU",
    timeout_s: float | None = None,
) -> None:
    """Like ``torch.cuda.synchronize(device)``, but the wait for the current stream is bounded.

    The current stream of ``device`` is drained with a deadline first (where a stuck kernel of
    ours would show), then the device is synchronised, which returns at once unless other
    streams still hold work.

    Raises:
        HostTimeoutError: The current stream did not drain in time.
    """
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        wait_stream(what=what, timeout_s=timeout_s)
        torch.cuda.synchronize()
