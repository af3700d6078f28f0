"""The comm stream, events and run_on_comm_stream: the CPU no-op path and the CUDA protocol."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ep_jit import knobs
from ep_jit.streams import (
    EventHandle,
    EventOverlap,
    get_comm_stream,
    run_on_comm_stream,
    tensors_in,
)


class _Holder:
    def __init__(self, *ts: torch.Tensor) -> None:
        self._ts = ts

    def tensors(self) -> list[torch.Tensor]:
        return list(self._ts)


def test_event_overlap_runs_hooks_once_and_releases() -> None:
    calls: list[int] = []
    overlap = EventOverlap(extra_tensors=(torch.zeros(1),))
    overlap.register_hook_after_wait(lambda: calls.append(1))
    with overlap as entered:
        assert entered is overlap
    overlap.current_stream_wait()
    assert calls == [1]
    overlap.register_hook_after_wait(lambda: calls.append(2))
    overlap.current_stream_wait(release_handle=True)
    assert calls == [1, 2]
    assert overlap.event is None and overlap.extra_tensors is None


def test_event_handle_is_empty_without_cuda_context() -> None:
    handle = EventHandle()
    assert handle.event is None or torch.cuda.is_initialized()
    if handle.event is None:
        handle.current_stream_wait()  # no-ops, no CUDA needed
        handle.stream_wait(None)  # type: ignore[arg-type]


def test_tensors_in_looks_one_level_deep() -> None:
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    found = tensors_in([a, (b, None, 3), [c], _Holder(d), None, 5, ((a,),)])
    assert [t.item() for t in found] == [0.0, 1.0, 2.0, 3.0]


def test_run_on_comm_stream_on_cpu_is_synchronous() -> None:
    x = torch.arange(4.0)
    for async_ in (False, True):
        result, event = run_on_comm_stream(
            torch.device("cpu"),
            lambda: x * 2,
            [x],
            lambda r: [r],
            previous_event=None,
            async_with_compute_stream=async_,
        )
        assert torch.equal(result, x * 2)
        assert event.event is None and event.extra_tensors is None


def test_avoid_record_stream_knob() -> None:
    assert knobs.describe("ep_jit")
    rows = {r.name: r for r in knobs.describe("ep_jit")}
    assert rows["EP_AVOID_RECORD_STREAM"].type == "bool"
    with knobs.jit.scope():
        knobs.jit.avoid_record_stream = True
        assert knobs.jit.avoid_record_stream is True
        knobs.jit.avoid_record_stream = None
        assert knobs.jit.avoid_record_stream is False


@pytest.mark.gpu
def test_comm_stream_is_one_per_device() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    stream = get_comm_stream(dev)
    assert get_comm_stream(torch.device("cuda")) is stream
    assert stream != torch.cuda.current_stream(dev)
    assert stream.priority <= torch.cuda.current_stream(dev).priority


@pytest.mark.gpu
@pytest.mark.parametrize("avoid", [False, True])
def test_run_on_comm_stream_cuda(avoid: bool) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    comm = get_comm_stream(dev)
    x = torch.randn(1 << 20, device=dev)
    with knobs.jit.scope():
        knobs.jit.avoid_record_stream = avoid
        # Synchronous: the compute stream waits, the result is ready to read there.
        seen: list[torch.cuda.Stream] = []

        def fn() -> torch.Tensor:
            seen.append(torch.cuda.current_stream(dev))
            return x * 2

        result, event = run_on_comm_stream(
            dev, fn, [x], lambda r: [r], previous_event=None, async_with_compute_stream=False
        )
        assert seen == [comm] and event.event is None
        torch.testing.assert_close(result, x * 2)

        # Asynchronous, ordered after a previous event: the caller waits on the returned event.
        before = EventHandle()
        result, event = run_on_comm_stream(
            dev,
            lambda: x + 1,
            [x],
            lambda r: [r],
            previous_event=before,
            async_with_compute_stream=True,
        )
        assert event.event is not None and event.event.event is not None
        if avoid:
            assert event.extra_tensors is not None
            assert any(t is x for t in event.extra_tensors)
            assert any(t is result for t in event.extra_tensors)
        else:
            assert event.extra_tensors is None
        event.current_stream_wait(release_handle=True)
        torch.testing.assert_close(result, x + 1)
        torch.cuda.synchronize(dev)


# ---- CallOrder ------------------------------------------------------------------------------


class _FakeStream:
    def __init__(self, handle: int, log: list[tuple[object, ...]]) -> None:
        self.cuda_stream = handle
        self._log = log

    def wait_event(self, event: _FakeEvent) -> None:
        self._log.append(("wait", self.cuda_stream, event.on))


class _FakeEvent:
    def __init__(self) -> None:
        self.on: int | None = None

    def record(self, stream: _FakeStream) -> None:
        self.on = stream.cuda_stream


class _FakeCuda:
    """The CUDA side of CallOrder, replaced: streams by handle, a log of waits, comm calls and
    record_stream calls, and a switch for graph capture."""

    COMM = 99

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from ep_jit import streams

        self.log: list[tuple[object, ...]] = []
        self.current = 0
        self.capturing = False
        self.streams: dict[int, _FakeStream] = {}
        monkeypatch.setattr(streams, "current_device", lambda: 0)
        monkeypatch.setattr(streams, "current_stream_handle", lambda device: self.current)
        monkeypatch.setattr(streams, "current_stream", lambda device: self.stream(self.current))
        monkeypatch.setattr(streams, "get_comm_stream", lambda device: self.stream(self.COMM))
        monkeypatch.setattr(streams, "_record", self._record)
        monkeypatch.setattr(streams, "run_on_comm_stream", self._comm)
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)

    def stream(self, handle: int) -> _FakeStream:
        return self.streams.setdefault(handle, _FakeStream(handle, self.log))

    def _record(self, tensors: list[torch.Tensor], stream: _FakeStream) -> None:
        self.log.append(("record", len(tensors), stream.cuda_stream))

    def _comm(self, device, fn, inputs, outputs_of, *, previous_event, async_with_compute_stream):  # type: ignore[no-untyped-def]
        self.log.append(("comm", previous_event is not None, async_with_compute_stream))
        return fn(), EventOverlap()


def test_call_order_direct_lane_and_stream_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from ep_jit.streams import CallOrder

    cuda = _FakeCuda(monkeypatch)
    order = CallOrder()
    dev = torch.device("cuda", 0)
    x = torch.zeros(2)
    runs: list[int] = []

    def call(*, prev: object = None, async_: bool = False) -> list[tuple[object, ...]]:
        cuda.log.clear()
        result, event = order.run(
            dev,
            lambda: runs.append(cuda.current) or 7,
            (x, _Holder(x)),
            lambda r: [],
            previous_event=prev,  # type: ignore[arg-type]
            async_with_compute_stream=async_,
        )
        assert result == 7 and event.event is None
        return list(cuda.log)

    # The default stream (handle 0) first: nothing to wait for; again: nothing either.
    assert call() == [] and call() == []
    # Another stream: it waits for the default stream's work once, the operands recorded there.
    cuda.current = 5
    assert call() == [("wait", 5, 0), ("record", 2, 5)]
    assert call() == []
    # Asynchronous: the comm stream protocol (which orders the comm stream after stream 5).
    assert call(async_=True) == [("comm", False, True)]
    # The next synchronous call on stream 5 waits for the comm stream's work, once.
    assert call() == [("wait", 5, cuda.COMM), ("record", 2, 5)]
    assert call() == []
    # previous_event: the comm stream waits for the event and, here, for stream 5's last call.
    assert call(prev=object()) == [
        ("wait", cuda.COMM, 5),
        ("record", 2, cuda.COMM),
        ("comm", True, False),
    ]
    # Synchronous with previous_event: afterwards the caller's stream waited; no wait needed.
    assert call() == []
    # A new stream while capturing a CUDA graph: no wait on work outside the capture.
    cuda.current, cuda.capturing = 8, True
    assert call() == []
    cuda.capturing = False
    # Back on the default stream after the capture stream: ordered after it.
    cuda.current = 0
    assert call() == [("wait", 0, 8), ("record", 2, 0)]
    assert runs == [0, 0, 5, 5, 5, 5, 5, 5, 5, 8, 0]


def test_call_order_comm_stream_after_a_direct_call_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An asynchronous call from stream 3 after a synchronous one on stream 2: the comm stream
    # waits for stream 2 (the protocol itself only orders it after stream 3).
    from ep_jit.streams import CallOrder

    cuda = _FakeCuda(monkeypatch)
    order = CallOrder()
    dev = torch.device("cuda", 0)

    def run(fn: Callable[[], object], prev: object = None, async_: bool = False) -> None:
        order.run(dev, fn, (), lambda r: [], previous_event=prev, async_with_compute_stream=async_)  # type: ignore[arg-type]

    cuda.current = 2
    run(lambda: 1)
    cuda.current = 3
    cuda.log.clear()
    run(lambda: 1, async_=True)
    assert cuda.log == [("wait", cuda.COMM, 2), ("record", 0, cuda.COMM), ("comm", False, True)]
    # A failing synchronous comm-stream call leaves its work ordered on the comm stream only.

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(boom, prev=object())
    cuda.log.clear()
    run(lambda: 1)
    assert cuda.log == [("wait", 3, cuda.COMM), ("record", 0, 3)]


def test_call_order_on_cpu_runs_the_call() -> None:
    from ep_jit.streams import CallOrder

    x = torch.arange(3.0)
    for async_ in (False, True):
        result, event = CallOrder().run(
            torch.device("cpu"),
            lambda: x + 1,
            [x],
            lambda r: [r],
            previous_event=None,
            async_with_compute_stream=async_,
        )
        assert torch.equal(result, x + 1) and event.event is None


@pytest.mark.gpu
def test_call_order_cuda_orders_calls_across_streams() -> None:
    # Each call writes the buffer-like tensor `shared` after a long sleep on its stream; the
    # next call (another stream, or after an asynchronous call on the comm stream) must see it.
    from ep_jit.streams import CallOrder

    dev = torch.device("cuda", torch.cuda.current_device())
    order = CallOrder()
    shared = torch.zeros(1 << 20, device=dev)
    side = torch.cuda.Stream(dev)
    seen: list[torch.cuda.Stream] = []

    def write(value: float) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            seen.append(torch.cuda.current_stream(dev))
            before = shared.clone()
            torch.cuda._sleep(50_000_000)
            shared.fill_(value)
            return before

        return fn

    def run(fn: Callable[[], torch.Tensor], async_: bool = False) -> torch.Tensor:
        # The event of an asynchronous call is not waited for: ordering the next call after it
        # is CallOrder's work. Results are read after a device synchronisation.
        out, _ = order.run(
            dev, fn, [shared], lambda r: [r], previous_event=None, async_with_compute_stream=async_
        )
        return out

    main = torch.cuda.current_stream(dev)
    first = run(write(1.0))  # direct, on the current stream
    with torch.cuda.stream(side):
        second = run(write(2.0))  # direct, on the side stream: after the first call
    third = run(write(3.0), async_=True)  # comm stream: after the side stream's call
    fourth = run(write(4.0))  # direct again: after the comm stream's call
    torch.cuda.synchronize(dev)
    for got, want in ((first, 0.0), (second, 1.0), (third, 2.0), (fourth, 3.0), (shared, 4.0)):
        assert bool((got == want).all()), (float(got[0]), want)
    comm = get_comm_stream(dev)
    assert seen == [main, side, comm, main]
