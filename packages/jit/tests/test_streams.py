"""The comm stream, events and run_on_comm_stream: the CPU no-op path and the CUDA protocol."""

from __future__ import annotations

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
