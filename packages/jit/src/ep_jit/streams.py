"""Events, the communication stream, and running a collective call on it.

On CUDA every communication call of the packages built on ep-jit runs on one process-global,
high-priority communication stream per device. The comm stream first waits for
``previous_event`` (or for the current compute stream). Afterwards either the compute stream
waits for the comm stream (synchronous use), or an :class:`EventOverlap` recorded on the comm
stream is returned and the operands are kept alive (``record_stream``, or held by the event with
``EP_AVOID_RECORD_STREAM=1``). On CPU all of this is a no-op: calls complete before they return
and events are empty. Importing this module initialises no CUDA context.

:class:`CallOrder` adds a direct lane for one buffer's synchronous calls: a call with neither
``previous_event`` nor ``async_with_compute_stream`` runs on the caller's current stream (no
stream switch, no events, no ``record_stream``), ordered after the buffer's earlier calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from ep_jit import knobs
from ep_jit._cuda import current_device, current_stream_handle

__all__ = [
    "CallOrder",
    "EventHandle",
    "EventOverlap",
    "current_stream",
    "get_comm_stream",
    "run_on_comm_stream",
]

T = TypeVar("T")

_COMM_STREAMS: dict[int, torch.cuda.Stream] = {}

_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}
"""``torch.cuda.Stream`` objects by (device, raw ``cudaStream_t``): the raw handle is what a
stream is, and looking it up costs a fraction of building the object anew."""

_local = threading.local()
"""Per thread: the two events of :func:`run_on_comm_stream`'s stream edges, by device."""


def current_stream(device: int) -> torch.cuda.Stream:
    """torch's current stream on CUDA device ``device`` (an index), as ``torch.cuda.Stream``.

    Equal to ``torch.cuda.current_stream(device)`` at a fraction of its host cost.
    """
    key = (device, current_stream_handle(device))
    stream = _STREAMS.get(key)
    if stream is None:
        stream = torch.cuda.current_stream(device)
        if len(_STREAMS) > 256:
            _STREAMS.clear()
        _STREAMS[key] = stream
    return stream


def _edge_events(device: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """This thread's (compute -> comm, comm -> compute) events of ``device``, made once.

    Re-recording an event is safe: a stream wait takes the event's state at the time it is
    enqueued, so each wait orders after the record just before it.
    """
    events: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] | None = getattr(
        _local, "events", None
    )
    if events is None:
        events = _local.events = {}
    pair = events.get(device)
    if pair is None:
        pair = events[device] = (torch.cuda.Event(), torch.cuda.Event())
    return pair


def get_comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The process-global high-priority communication stream of a CUDA device.

    Args:
        device: A CUDA device; without an index, the current device.

    Returns:
        The same stream for every call with that device (created on first use).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COMM_STREAMS.get(index)
    if stream is None:
        # Out-of-range priorities map to the nearest valid one: this is the highest.
        stream = torch.cuda.Stream(device=torch.device("cuda", index), priority=-(2**10))
        _COMM_STREAMS[index] = stream
    return stream


class EventHandle:
    """A point on a CUDA stream: a ``torch.cuda.Event`` recorded at creation.

    Args:
        stream: Where to record; ``None`` uses the current stream when CUDA is initialised. On a
            machine without an initialised CUDA context the handle is empty (already complete).
    """

    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self.event: torch.cuda.Event | None = None
        if stream is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def current_stream_wait(self) -> None:
        """Makes the current CUDA stream wait for this point (no-op when empty; asynchronous)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: torch.cuda.Stream) -> None:
        """Makes ``stream`` wait for this point (no-op when empty; asynchronous)."""
        if self.event is not None:
            stream.wait_event(self.event)


class EventOverlap:
    """The completion of an asynchronous call, for overlapping communication with compute.

    ``current_stream_wait()`` (or leaving a ``with`` block) makes the current stream wait for
    it. An empty ``EventOverlap()`` (synchronous calls, CPU) waits for nothing.

    Args:
        event: The point on the comm stream, or ``None``.
        extra_tensors: Tensors kept alive until the wait (``EP_AVOID_RECORD_STREAM=1``).
    """

    def __init__(
        self,
        event: EventHandle | None = None,
        extra_tensors: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self._hooks: list[Callable[[], None]] = []

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """Makes the current stream wait, then runs (once) the hooks registered after wait.

        Args:
            release_handle: Drop the event and the tensors it keeps alive afterwards.
        """
        if self.event is not None:
            self.event.current_stream_wait()
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()
        if release_handle:
            self.event = None
            self.extra_tensors = None

    def register_hook_after_wait(self, hook: Callable[[], None]) -> None:
        """Runs ``hook()`` once, right after the next :meth:`current_stream_wait`."""
        self._hooks.append(hook)

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.current_stream_wait()


def tensors_in(values: Iterable[Any]) -> list[torch.Tensor]:
    """Tensors among ``values``, one level into tuples/lists and objects with ``tensors()``."""
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple | list):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
        elif hasattr(v, "tensors"):
            out.extend(v.tensors())
    return out


def run_on_comm_stream(
    device: torch.device,
    fn: Callable[[], T],
    inputs: Iterable[Any],
    outputs_of: Callable[[T], Iterable[Any]],
    *,
    previous_event: EventHandle | None,
    async_with_compute_stream: bool,
) -> tuple[T, EventOverlap]:
    """Runs ``fn`` on ``device``'s comm stream with the stream protocol of the module doc.

    Args:
        device: Where the operands live; CPU runs ``fn`` directly.
        fn: The call; tensors it allocates belong to the comm stream.
        inputs: Operands read by ``fn`` (tensors, tuples of them, objects with ``tensors()``).
        outputs_of: Picks the tensors to keep alive from ``fn``'s result.
        previous_event: The comm stream waits for it instead of the compute stream.
        async_with_compute_stream: Return an event instead of making compute wait.

    Returns:
        ``(fn's result, EventOverlap)``; the event is empty unless asynchronous on CUDA.
    """
    if device.type != "cuda":
        return fn(), EventOverlap()
    index = device.index
    # On the current device (the usual case): streams by their raw handles, the stream switch
    # without a context manager and the waits through this thread's two reused events; these
    # cost a fraction of the general path's host time.
    fast = index is not None and index == current_device()
    compute = current_stream(index) if fast else torch.cuda.current_stream(device)
    comm = get_comm_stream(device)
    if previous_event is not None:
        previous_event.stream_wait(comm)
    elif fast:
        to_comm = _edge_events(index)[0]
        to_comm.record(compute)
        comm.wait_event(to_comm)
    else:
        comm.wait_stream(compute)
    if fast:
        torch.cuda.set_stream(comm)
        try:
            result = fn()
        finally:
            torch.cuda.set_stream(compute)
    else:
        with torch.cuda.stream(comm):
            result = fn()
    outputs = tensors_in(outputs_of(result))
    avoid = knobs.jit.avoid_record_stream
    if async_with_compute_stream:
        ins = tensors_in(inputs)
        if avoid:
            return result, EventOverlap(EventHandle(comm), tuple(ins + outputs))
        _record(ins, comm)
        _record(outputs, compute)
        return result, EventOverlap(EventHandle(comm))
    if fast:
        to_compute = _edge_events(index)[1]
        to_compute.record(comm)
        compute.wait_event(to_compute)
    else:
        compute.wait_stream(comm)
    if not avoid:
        _record(outputs, compute)
    return result, EventOverlap()


def _record(tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """``record_stream`` once per allocation: views of one base share its allocation."""
    seen: set[int] = set()
    for t in tensors:
        base = t._base if t._base is not None else t
        key = id(base)
        if key not in seen:
            seen.add(key)
            t.record_stream(stream)


class CallOrder:
    """Orders one buffer's calls after each other, with a direct lane for synchronous calls.

    A call with ``previous_event=None`` and ``async_with_compute_stream=False`` on the current
    CUDA device runs ``fn`` on the caller's current stream: its outputs belong to that stream
    and the call returns an empty :class:`EventOverlap`, as a synchronous
    :func:`run_on_comm_stream` does. Other calls take :func:`run_on_comm_stream`'s protocol.

    The buffer's memory is reused by every call, so each call must run after the previous one's
    work. The object remembers the stream that the last call's work is ordered on (the caller's
    stream after a synchronous call, the comm stream after an asynchronous one). A call on that
    same stream needs nothing more: the fast path is one comparison of raw stream handles. When
    the stream differs, the new call's stream first waits for the remembered one (an event
    recorded there now, so also covering work enqueued after the call), and the operands of the
    call are recorded on the stream that uses them. While the current stream is being captured
    into a CUDA graph that wait is left out: nothing runs during a capture, and a capture may
    not wait for work outside it.

    Not thread-safe: one buffer's calls come from one thread at a time.
    """

    def __init__(self) -> None:
        self._after: int | None = None
        """Raw handle of the stream the last call's work is ordered on (``None``: no call yet;
        torch's default stream is handle 0)."""
        self._after_stream: torch.cuda.Stream | None = None
        self._event: torch.cuda.Event | None = None

    @property
    def last_stream(self) -> torch.cuda.Stream | None:
        """The stream the last call's work is ordered on (``None`` before any CUDA call)."""
        return self._after_stream

    def run(
        self,
        device: torch.device,
        fn: Callable[[], T],
        inputs: Iterable[Any],
        outputs_of: Callable[[T], Iterable[Any]],
        *,
        previous_event: EventHandle | None,
        async_with_compute_stream: bool,
    ) -> tuple[T, EventOverlap]:
        """Runs ``fn`` directly on the current stream or through :func:`run_on_comm_stream`.

        Args: as :func:`run_on_comm_stream`.

        Returns:
            ``(fn's result, EventOverlap)``; the event is empty unless asynchronous on CUDA.
        """
        if device.type != "cuda":
            return fn(), EventOverlap()
        index = device.index
        direct = previous_event is None and not async_with_compute_stream
        if direct and index is not None and index == current_device():
            if current_stream_handle(index) == self._after:
                return fn(), EventOverlap()
            compute = current_stream(index)
            self._order_after_last(compute, inputs)
            self._after, self._after_stream = compute.cuda_stream, compute
            return fn(), EventOverlap()
        comm = get_comm_stream(device)
        fast = index is not None and index == current_device()
        compute = current_stream(index) if fast else torch.cuda.current_stream(device)
        if self._after not in (None, comm.cuda_stream) and (
            previous_event is not None or self._after != compute.cuda_stream
        ):
            self._order_after_last(comm, inputs)
        # Until the caller's stream has waited for the comm stream (not on an error, nor when
        # asynchronous), the call's work is ordered on the comm stream only.
        self._after, self._after_stream = comm.cuda_stream, comm
        result = run_on_comm_stream(
            device,
            fn,
            inputs,
            outputs_of,
            previous_event=previous_event,
            async_with_compute_stream=async_with_compute_stream,
        )
        if not async_with_compute_stream:
            self._after, self._after_stream = compute.cuda_stream, compute
        return result

    def _order_after_last(self, stream: torch.cuda.Stream, inputs: Iterable[Any]) -> None:
        """``stream`` waits for the remembered stream's work so far (not while capturing)."""
        last = self._after_stream
        if last is None or last.cuda_stream == stream.cuda_stream:
            return
        if torch.cuda.is_current_stream_capturing():
            return
        event = self._event
        if event is None:
            event = self._event = torch.cuda.Event()
        event.record(last)
        stream.wait_event(event)
        # Operands made on the other stream (a handle's tensors) are now also used here.
        _record(tensors_in(inputs), stream)
