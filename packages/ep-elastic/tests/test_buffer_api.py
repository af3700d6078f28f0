"""ElasticBuffer's contract besides the data: agreement, validation, lifetime, events, sizing.

Everything runs inside one 2-rank CPU job; each check raises on failure inside the ranks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ep_elastic
from ep_core import knobs as core_knobs
from ep_core.sizing import BUFFER_ALIGNMENT
from ep_elastic import ElasticBuffer, EventHandle
from ep_jit import streams
from ep_jit.testing import gpu_placements, run_ranks

NMAX, HIDDEN, E = 8, 256, 8


def _raises(error: type[Exception], pattern: str, fn: Callable[[], Any]) -> None:
    with pytest.raises(error, match=pattern):
        fn()


def _agreement(info: Any) -> None:
    # Every rank raises the same error (nobody hangs in a later collective).
    nmax = 16 if info.rank == 0 else 32
    msg = re.escape("num_max_tokens_per_rank differs across ranks (rank 0: 16, rank 1: 32)")
    _raises(
        ValueError,
        msg,
        lambda: ElasticBuffer(info.group, num_max_tokens_per_rank=nmax, hidden=HIDDEN),
    )
    fp8 = info.rank == 1
    _raises(
        ValueError,
        "use_fp8_dispatch differs",
        lambda: ElasticBuffer(
            info.group, num_max_tokens_per_rank=8, hidden=HIDDEN, use_fp8_dispatch=fp8
        ),
    )
    # A mistake on one rank only fails every rank (the others name it) instead of hanging.
    hidden = 96 if info.rank == 1 else HIDDEN
    pattern = "hidden 96 is unsupported" if info.rank == 1 else "rank 1: ValueError: hidden 96"
    _raises(
        ValueError,
        pattern,
        lambda: ElasticBuffer(info.group, num_max_tokens_per_rank=8, hidden=hidden),
    )
    # The group is still usable afterwards.
    ElasticBuffer(info.group, num_max_tokens_per_rank=8, hidden=HIDDEN).barrier()


def _construction(info: Any) -> None:
    group = info.group
    _raises(
        ValueError,
        "backend='nvlink' cannot be used: not every rank is on a CUDA device",
        lambda: ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN, backend="nvlink"),
    )
    _raises(
        ValueError,
        "backend must be one of",
        lambda: ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN, backend="cuda"),
    )
    _raises(ValueError, "give num_bytes", lambda: ElasticBuffer(group, hidden=HIDDEN))
    _raises(
        ValueError,
        "not a multiple of 2 MiB",
        lambda: ElasticBuffer(group, 1000, num_max_tokens_per_rank=8),
    )
    _raises(
        ValueError,
        "hidden 96 is unsupported",
        lambda: ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=96),
    )
    _raises(
        ValueError,
        "num_topk 33 exceeds",
        lambda: ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN, num_topk=33),
    )
    with core_knobs.ep.scope():
        core_knobs.ep.backend = "torch"
        buf = ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN)
        assert buf.backend_name == "torch"
    hint = ElasticBuffer.get_buffer_size_hint(group, NMAX, HIDDEN, 4, True)
    assert hint % BUFFER_ALIGNMENT == 0 and hint >= 2 * NMAX * HIDDEN
    assert buf.num_bytes == ElasticBuffer.get_buffer_size_hint(group, 8, HIDDEN)
    sms = buf.get_theoretical_num_sms(64, 8)
    assert sms % 2 == 0 and 4 <= sms <= 24
    assert buf.get_comm_stream() is None
    event = ElasticBuffer.capture()
    assert isinstance(event, EventHandle)
    assert event.event is None or torch.cuda.is_initialized()
    buf.barrier(with_cpu_sync=True)
    assert buf.group is group
    buf.destroy()
    buf.destroy()
    _raises(RuntimeError, "destroyed", buf.barrier)
    # The destroyed buffer no longer holds the group (a group outliving
    # destroy_process_group() can abort a gloo process at exit).
    assert buf._group is None
    _raises(RuntimeError, "destroyed", lambda: buf.group)
    leaky = ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN, explicitly_destroy=True)
    with pytest.warns(ResourceWarning, match="without destroy"):
        leaky.__del__()


def _bad_inputs(info: Any) -> None:
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=4)
    gen = torch.Generator().manual_seed(info.rank)
    x = torch.randn(6, HIDDEN, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=gen)[:4] for _ in range(6)])
    w = torch.rand(6, 4, generator=gen)
    ok = {"topk_idx": idx, "topk_weights": w, "num_experts": E}

    def dispatch(x_: Any = x, **kw: Any) -> Any:
        return buf.dispatch(x_, **{**ok, **kw})

    bad_id = idx.clone()
    bad_id[2, 1] = E
    dup = idx.clone()
    dup[3, 1] = dup[3, 0]
    fp8 = torch.zeros(6, HIDDEN, dtype=torch.float8_e4m3fn)
    checks: list[tuple[type[Exception], str, Callable[[], Any]]] = [
        (
            TypeError,
            "x must have dtype torch.bfloat16, got torch.float32",
            lambda: dispatch(x.float()),
        ),
        (ValueError, "x must be 2-D", lambda: dispatch(x[0])),
        (
            ValueError,
            "x must be contiguous",
            lambda: dispatch(torch.zeros(6, 2 * HIDDEN, dtype=torch.bfloat16)[:, ::2]),
        ),
        (
            ValueError,
            "is on meta but the operation runs on cpu",
            lambda: dispatch(torch.zeros(6, HIDDEN, dtype=torch.bfloat16, device="meta")),
        ),
        (
            ValueError,
            "9 tokens, more than num_max_tokens_per_rank = 8",
            lambda: dispatch(
                torch.zeros(9, HIDDEN, dtype=torch.bfloat16),
                topk_idx=torch.zeros(9, 4, dtype=torch.int64),
                topk_weights=None,
            ),
        ),
        (
            ValueError,
            rf"topk_idx\[2, 1\] = {E} is outside \[-1, {E}\)",
            lambda: dispatch(topk_idx=bad_id),
        ),
        (
            ValueError,
            f"row 3 selects expert {int(dup[3, 0])} more than once",
            lambda: dispatch(topk_idx=dup),
        ),
        (
            TypeError,
            "topk_idx must have dtype torch.int64, got torch.int32",
            lambda: dispatch(topk_idx=idx.int()),
        ),
        (
            ValueError,
            "num_experts 7 is not a multiple of the number of ranks 2",
            lambda: dispatch(num_experts=7),
        ),
        (
            ValueError,
            "k = 33 columns",
            lambda: dispatch(topk_idx=torch.full((6, 33), -1), topk_weights=None),
        ),
        (
            ValueError,
            "k = 0 columns",
            lambda: dispatch(topk_idx=torch.zeros(6, 0, dtype=torch.int64), topk_weights=None),
        ),
        (
            ValueError,
            "k = 5 exceeds the buffer's num_topk 4",
            lambda: dispatch(topk_idx=torch.full((6, 5), -1), topk_weights=None),
        ),
        (
            ValueError,
            "hidden size of x 96 is unsupported for BF16",
            lambda: dispatch(torch.zeros(6, 96, dtype=torch.bfloat16)),
        ),
        (
            ValueError,
            "hidden size of x 192 is unsupported for FP8",
            lambda: dispatch((torch.zeros(6, 192, dtype=torch.float8_e4m3fn), torch.zeros(6, 2))),
        ),
        (
            ValueError,
            "hidden size 512 exceeds the buffer's hidden 256",
            lambda: dispatch(torch.zeros(6, 512, dtype=torch.bfloat16)),
        ),
        (
            TypeError,
            "x scales must have dtype torch.float32 or torch.int32, got torch.float64",
            lambda: dispatch((fp8, torch.zeros(6, 2, dtype=torch.float64))),
        ),
        (ValueError, r"x scales must be \[T=6, P\]", lambda: dispatch((fp8, torch.zeros(6, 9)))),
        (
            ValueError,
            "FP8 x must be a \\(data, scales\\) pair, got 3",
            lambda: dispatch((fp8, fp8, fp8)),
        ),
        (
            TypeError,
            "topk_weights must have dtype torch.float32, got torch.bfloat16",
            lambda: dispatch(topk_weights=w.bfloat16()),
        ),
        (
            ValueError,
            r"topk_weights has shape \(6, 3\)",
            lambda: dispatch(topk_weights=w[:, :3].contiguous()),
        ),
        (ValueError, "expert_alignment must be >= 1, got 0", lambda: dispatch(expert_alignment=0)),
        (ValueError, "num_experts is required", lambda: dispatch(num_experts=None)),
        (ValueError, "topk_idx is required", lambda: dispatch(topk_idx=None)),
        (
            ValueError,
            "num_max_tokens_per_rank 16 exceeds the buffer's 8",
            lambda: dispatch(num_max_tokens_per_rank=16),
        ),
    ]
    for error, pattern, fn in checks:
        _raises(error, pattern, fn)

    recv, _, _, handle, _ = dispatch()
    good = torch.zeros_like(recv)
    combine_checks: list[tuple[type[Exception], str, Callable[[], Any]]] = [
        (
            ValueError,
            f"x has {recv.shape[0] + 1} rows but the handle's dispatch produced {recv.shape[0]}",
            lambda: buf.combine(
                torch.zeros(recv.shape[0] + 1, HIDDEN, dtype=torch.bfloat16), handle
            ),
        ),
        (
            TypeError,
            "x must have dtype torch.bfloat16, got torch.float32",
            lambda: buf.combine(good.float(), handle),
        ),
        (TypeError, "handle must be an EPHandle, got tuple", lambda: buf.combine(good, (1, 2))),  # type: ignore[arg-type]
        (
            ValueError,
            r"bias\[0\] must have shape \(6, 256\), got \(5, 256\)",
            lambda: buf.combine(good, handle, bias=x[:5]),
        ),
        (
            TypeError,
            r"bias\[1\] must have dtype torch.bfloat16, got torch.float32",
            lambda: buf.combine(good, handle, bias=(x, x.float())),
        ),
        (
            ValueError,
            "bias takes at most 2 tensors, got 3",
            lambda: buf.combine(good, handle, bias=(x, x, x)),
        ),
        (
            TypeError,
            "topk_weights must have dtype torch.float32",
            lambda: buf.combine(
                good, handle, topk_weights=torch.zeros(recv.shape[0], 4, dtype=torch.float64)
            ),
        ),
        (
            ValueError,
            "topk_idx must be None for a cached dispatch",
            lambda: buf.dispatch(x, topk_idx=idx, handle=handle),
        ),
        (
            ValueError,
            "do_cpu_sync=True is not allowed for a cached dispatch",
            lambda: buf.dispatch(x, handle=handle, do_cpu_sync=True),
        ),
        (
            ValueError,
            "do_expand=True differs from the handle's False",
            lambda: buf.dispatch(x, handle=handle, do_expand=True),
        ),
        (
            ValueError,
            "num_experts=16 differs from the handle's 8",
            lambda: buf.dispatch(x, handle=handle, num_experts=16),
        ),
        (
            ValueError,
            "x has 5 tokens but the handle's dispatch had 6",
            lambda: buf.dispatch(x[:5], handle=handle),
        ),
        (
            ValueError,
            "use_ue8m0=True requires round_scale=True",
            lambda: buf.low_latency_dispatch(x, idx, NMAX, E, use_ue8m0=True),
        ),
        (
            ValueError,
            "6 tokens, more than num_max_dispatch_tokens_per_rank = 4",
            lambda: buf.low_latency_dispatch(x, idx, 4, E),
        ),
        (
            ValueError,
            "hidden size of x 64 is unsupported for FP8",
            lambda: buf.low_latency_dispatch(x[:, :64].contiguous(), idx, NMAX, E),
        ),
        (
            ValueError,
            rf"topk_idx\[2, 1\] = {E} is outside",
            lambda: buf.low_latency_dispatch(x, bad_id, NMAX, E),
        ),
    ]
    for error, pattern, fn in combine_checks:
        _raises(error, pattern, fn)
    # The valid calls still work after all the rejected ones (no rank was left half-way).
    out, weights, _ = buf.combine(good, handle, topk_weights=torch.zeros(recv.shape[0], 4))
    assert out.shape == (6, HIDDEN) and weights is not None
    (_ll_x, _), _, ll_handle, _, _ = buf.low_latency_dispatch(x, idx, NMAX, E)
    _raises(
        ValueError,
        r"x must have shape \(4, 16, 256\)",
        lambda: buf.low_latency_combine(
            torch.zeros(1, 16, HIDDEN, dtype=torch.bfloat16), idx, w, ll_handle
        ),
    )
    _raises(
        ValueError,
        r"out must have shape \(6, 256\)",
        lambda: buf.low_latency_combine(
            torch.zeros(4, 16, HIDDEN, dtype=torch.bfloat16), idx, w, ll_handle, out=x[:5]
        ),
    )
    buf.destroy()


def api_worker(info: Any) -> None:
    _agreement(info)
    _construction(info)
    _bad_inputs(info)


def test_buffer_api() -> None:
    run_ranks(2, api_worker, timeout_s=300, use_gpu=False)


def test_event_names_are_ep_jit_streams() -> None:
    from ep_elastic import event

    for name in event.__all__:
        assert getattr(event, name) is getattr(streams, name)
    assert ep_elastic.EventOverlap is streams.EventOverlap
    assert ep_elastic.EventHandle is streams.EventHandle


def _buffer_debug_worker(info: Any) -> list[str]:
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("ep_elastic").addHandler(Keep())
    with core_knobs.ep.scope():
        core_knobs.ep.buffer_debug = True
        buf = ElasticBuffer(info.group, num_max_tokens_per_rank=8, hidden=HIDDEN)
    buf.destroy()
    return records


def test_buffer_debug_goes_through_logging() -> None:
    (records,) = run_ranks(1, _buffer_debug_worker, timeout_s=120, use_gpu=False)
    assert len(records) == 1, records
    assert "rank 0/1: backend=torch" in records[0]
    assert "allocated by region: none (no buffer)" in records[0]


def _value_check_worker(info: Any) -> list[bool]:
    # A backend that checks topk_idx's values on the device (in the one read of a dispatch with
    # CPU sync) spares the buffer the host checks there, and only there.
    from ep_elastic import _dispatch_checks

    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=4)
    seen: list[bool] = []
    original = _dispatch_checks.check_topk_idx

    def spy(*args: Any, values: bool = True, **kwargs: Any) -> torch.Tensor:
        seen.append(values)
        return original(*args, values=values, **kwargs)

    _dispatch_checks.check_topk_idx = spy  # type: ignore[assignment]
    try:
        x = torch.zeros(6, HIDDEN, dtype=torch.bfloat16)
        idx = torch.arange(24).reshape(6, 4) % E
        buf.dispatch(x, topk_idx=idx, num_experts=E, do_cpu_sync=True)
        buf.backend.checks_topk_idx_on_device = True  # type: ignore[attr-defined]
        buf.dispatch(x, topk_idx=idx, num_experts=E, do_cpu_sync=True)
        buf.dispatch(x, topk_idx=idx, num_experts=E, do_cpu_sync=False)
        buf.dispatch(x, topk_idx=idx, num_experts=E)  # do_cpu_sync=None: a sync dispatch
    finally:
        _dispatch_checks.check_topk_idx = original  # type: ignore[assignment]
        buf.destroy()
    return seen


def test_value_checks_left_to_a_backend_that_checks_on_device() -> None:
    seen = run_ranks(1, _value_check_worker, timeout_s=120, use_gpu=False)[0]
    assert seen == [True, False, True, False]


def _memo_worker(info: Any) -> dict[str, int]:
    # A call whose arguments look like the last accepted call's skips the checks; any other
    # call is checked in full, and host value checks of a fresh topk_idx are never skipped.
    from ep_elastic import _dispatch_checks, _high_throughput

    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=4)
    counts = {"x": 0, "combine_x": 0}
    check_x, check_combine_x = _dispatch_checks.check_dispatch_x, _high_throughput.check_combine_x

    def spy_x(*args: Any, **kwargs: Any) -> Any:
        counts["x"] += 1
        return check_x(*args, **kwargs)

    def spy_combine_x(*args: Any, **kwargs: Any) -> Any:
        counts["combine_x"] += 1
        return check_combine_x(*args, **kwargs)

    _dispatch_checks.check_dispatch_x = spy_x  # type: ignore[assignment]
    _high_throughput.check_combine_x = spy_combine_x  # type: ignore[assignment]
    try:
        x = torch.randn(6, HIDDEN).to(torch.bfloat16)
        idx = torch.arange(24).reshape(6, 4) % E
        bad = idx.clone()
        bad[2, 1] = E
        # Host value checks (this backend does not check on the device): every call.
        buf.dispatch(x, topk_idx=idx, num_experts=E)
        _raises(
            ValueError,
            r"topk_idx\[2, 1\] = 8",
            lambda: buf.dispatch(x, topk_idx=bad, num_experts=E),
        )
        assert counts["x"] == 2
        buf.backend.checks_topk_idx_on_device = True  # type: ignore[attr-defined]
        _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=E)
        recv, _, _, handle2, _ = buf.dispatch(x, topk_idx=idx, num_experts=E)
        assert counts["x"] == 3  # the second call was like the first
        # Another x: checked (and rejected) in full.
        _raises(
            ValueError,
            "hidden size of x 96",
            lambda: buf.dispatch(
                torch.zeros(6, 96, dtype=torch.bfloat16), topk_idx=idx[:, :4], num_experts=E
            ),
        )
        _raises(
            ValueError,
            "more than num_max_tokens_per_rank",
            lambda: buf.dispatch(
                torch.zeros(NMAX + 1, HIDDEN, dtype=torch.bfloat16), topk_idx=idx, num_experts=E
            ),
        )
        # Cached dispatches: the second with the same handle skips the checks, not another's.
        before = counts["x"]
        out1 = buf.dispatch(x, handle=handle)[0]
        out2 = buf.dispatch(x, handle=handle)[0]
        buf.dispatch(x, handle=handle2)
        assert counts["x"] == before + 2
        assert torch.equal(out1, out2)  # type: ignore[arg-type]
        _raises(
            ValueError,
            "x has 5 tokens but the handle's dispatch had 6",
            lambda: buf.dispatch(x[:5].contiguous(), handle=handle2),
        )
        _raises(ValueError, "topk_idx must be None", lambda: buf.dispatch(x, idx, handle=handle2))
        # Combine: the same.
        assert isinstance(recv, torch.Tensor)
        a = buf.combine(recv, handle2)[0]
        b = buf.combine(recv, handle2)[0]
        assert counts["combine_x"] == 1 and torch.equal(a, b)
        _raises(ValueError, "rows", lambda: buf.combine(recv[:-1].contiguous(), handle2))
        _raises(ValueError, "rows", lambda: buf.combine(recv[:-1].contiguous(), handle2))
        assert counts["combine_x"] == 3
    finally:
        _dispatch_checks.check_dispatch_x = check_x  # type: ignore[assignment]
        _high_throughput.check_combine_x = check_combine_x  # type: ignore[assignment]
        buf.destroy()
    return counts


def test_repeated_calls_skip_the_checks_of_their_arguments() -> None:
    run_ranks(1, _memo_worker, timeout_s=120, use_gpu=False)


class _FakeTensor:
    """Enough of a tensor for the comm stream's bookkeeping: a base and a record log."""

    def __init__(self, log: list[object], base: _FakeTensor | None = None) -> None:
        self._base, self.log = base, log

    def record_stream(self, stream: object) -> None:
        self.log.append((self._base or self, stream))


def test_comm_stream_records_each_allocation_once() -> None:
    # Views of one allocation (a dispatch's small outputs) need one record_stream between them.
    log: list[object] = []
    a, b = _FakeTensor(log), _FakeTensor(log)
    views = [_FakeTensor(log, a), _FakeTensor(log, a), _FakeTensor(log, b)]
    streams._record([a, *views, b], "s")  # type: ignore[list-item, arg-type]
    assert log == [(a, "s"), (b, "s")]


def _boom() -> None:
    raise RuntimeError("boom")


@pytest.mark.gpu
def test_comm_stream_orders_after_the_callers_stream_and_restores_it() -> None:
    # The fast path of run_on_comm_stream (cached stream objects, reused events, set_stream) on a
    # caller's side stream: the comm stream waits for the side stream's work, the side stream
    # for the comm stream's, and the side stream is current again afterwards, also on an error.
    dev = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(dev)
    comm = streams.get_comm_stream(dev)
    with torch.cuda.stream(side):
        assert streams.current_stream(dev.index) == side
        y = torch.zeros(1 << 22, device=dev)
        torch.cuda._sleep(100_000_000)  # the fill below lands late on the side stream
        y.fill_(3.0)
        seen: list[torch.cuda.Stream] = []

        def twice() -> torch.Tensor:
            seen.append(torch.cuda.current_stream(dev))
            return y * 2

        for _ in range(3):  # the reused events serve every call
            out, event = streams.run_on_comm_stream(
                dev, twice, [y], lambda r: [r], previous_event=None, async_with_compute_stream=False
            )
            assert torch.cuda.current_stream(dev) == side and event.event is None
            assert bool((out == 6.0).all())
        assert seen == [comm] * 3
        with pytest.raises(RuntimeError, match="boom"):
            streams.run_on_comm_stream(
                dev, _boom, [], lambda r: [], previous_event=None, async_with_compute_stream=False
            )
        assert torch.cuda.current_stream(dev) == side
    assert streams.current_stream(dev.index) == torch.cuda.current_stream(dev)
    torch.cuda.synchronize(dev)


def _bad_routing_on_one_rank_worker(info: Any) -> None:
    # NVLink backend, dispatch with CPU sync: rank 1 passes an id outside [-1, E). ElasticBuffer
    # leaves the value checks to the backend, which sends every rank's verdict to its peers
    # inside the dispatch, so every rank raises after the one call; compat.Buffer checks on the
    # host and all-gathers the verdicts before any kernel. Both buffers serve the next call.
    from ep_elastic.compat import Buffer

    dev = info.device
    e = 4 * info.world_size
    gen = torch.Generator().manual_seed(11 + info.rank)
    x = torch.randn(NMAX, HIDDEN, generator=gen).to(torch.bfloat16).to(dev)
    good = torch.rand(NMAX, e, generator=gen).topk(4, dim=1).indices.to(dev)
    bad = good.clone()
    bad[NMAX - 1, 2] = e
    idx = bad if info.rank == 1 else good
    own = rf"topk_idx\[{NMAX - 1}, 2\] = {e} is outside"
    peer = r"^dispatch: rank 1 passed invalid topk_idx \(see rank 1's error\)"

    buf = ElasticBuffer(
        info.group,
        num_max_tokens_per_rank=NMAX,
        hidden=HIDDEN,
        num_topk=4,
        backend="nvlink",
        device=dev,
    )
    with pytest.raises(ValueError, match=own if info.rank == 1 else peer):
        buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=True)
    recv_x, _, _, handle, _ = buf.dispatch(x, topk_idx=good, num_experts=e, do_cpu_sync=True)
    out, _, _ = buf.combine(recv_x, handle)
    torch.cuda.synchronize()
    # Each token comes back once from every rank holding one of its experts, unweighted.
    ranks_hit = torch.zeros(NMAX, dtype=torch.float32, device=dev)
    for r in range(info.world_size):
        lo, hi = r * (e // info.world_size), (r + 1) * (e // info.world_size)
        ranks_hit += ((good >= lo) & (good < hi)).any(dim=1).float()
    assert torch.equal(out, (x.float() * ranks_hit[:, None]).to(torch.bfloat16))
    buf.destroy()

    compat = Buffer(
        info.group,
        explicitly_destroy=True,
        num_max_tokens_per_rank=NMAX,
        hidden=HIDDEN,
        num_topk=4,
        backend="nvlink",
        device=dev,
    )
    per_rank, _, per_expert, in_rank, _ = compat.get_dispatch_layout(good, e)
    weights = torch.ones(NMAX, 4, device=dev)
    args = {
        "num_tokens_per_rank": per_rank,
        "is_token_in_rank": in_rank,
        "num_tokens_per_expert": per_expert,
        "topk_weights": weights,
    }
    with pytest.raises(ValueError, match=own if info.rank == 1 else "rank 1: ValueError: " + own):
        compat.dispatch(x, topk_idx=idx, **args)
    recv = compat.dispatch(x, topk_idx=good, **args)
    assert recv[0].shape[0] == int(recv[4].elastic.num_recv_tokens)
    compat.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_bad_routing_on_one_rank_raises_on_every_rank_nvlink(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _bad_routing_on_one_rank_worker, timeout_s=180, ranks_per_gpu=per_gpu)


def _stream_order_worker(info: Any) -> None:
    # NVLink backend: synchronous calls run on the caller's stream, ordered after the buffer's
    # previous call wherever it ran (an asynchronous one on the comm stream, a side stream);
    # dispatch + combine captured in a CUDA graph after eager calls replay like eager calls.
    dev, e, k = info.device, 4 * info.world_size, 4
    gen = torch.Generator().manual_seed(23 + info.rank)

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(NMAX, HIDDEN, generator=gen).to(torch.bfloat16).to(dev)
        return x, torch.rand(NMAX, e, generator=gen).topk(k, dim=1).indices.to(dev)

    def expected(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Each token comes back once from every rank holding one of its experts, unweighted.
        hit = torch.zeros(NMAX, dtype=torch.float32, device=dev)
        for r in range(info.world_size):
            lo, hi = r * (e // info.world_size), (r + 1) * (e // info.world_size)
            hit += ((idx >= lo) & (idx < hi)).any(dim=1).float()
        return (x.float() * hit[:, None]).to(torch.bfloat16)

    buf = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=k, backend="nvlink",
        device=dev,
    )  # fmt: skip
    main = torch.cuda.current_stream(dev)
    x, idx = inputs()
    recv, _, _, handle, event = buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=True)
    assert event.event is None
    out, _, event = buf.combine(recv, handle)
    assert event.event is None
    # Asynchronous (comm stream), not waited for; then a cached dispatch on a side stream: it
    # must run after the asynchronous call, which reuses the same buffer.
    recv2, _, _, handle2, event2 = buf.dispatch(
        x, topk_idx=idx, num_experts=e, do_cpu_sync=False, async_with_compute_stream=True
    )
    side = torch.cuda.Stream(dev)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        recv3 = buf.dispatch(x, handle=handle)[0]
        out3 = buf.combine(recv3, handle)[0]  # type: ignore[arg-type]
    event2.current_stream_wait()
    main.wait_stream(side)
    out2 = buf.combine(recv2, handle2)[0]  # type: ignore[arg-type]
    torch.cuda.synchronize(dev)
    want = expected(x, idx)
    assert torch.equal(out, want) and torch.equal(out2, want) and torch.equal(out3, want)
    assert torch.equal(recv3, recv)  # type: ignore[arg-type]

    # CUDA graph: captured on torch's capture stream after the eager calls above.
    xs, idxs = x.clone(), idx.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        got, _, _, got_handle, _ = buf.dispatch(xs, topk_idx=idxs, num_experts=e, do_cpu_sync=False)
        got_out = buf.combine(got, got_handle)[0]  # type: ignore[arg-type]
    for _ in range(3):
        x, idx = inputs()
        xs.copy_(x)
        idxs.copy_(idx)
        graph.replay()
        eager, _, _, eager_handle, _ = buf.dispatch(
            x, topk_idx=idx, num_experts=e, do_cpu_sync=False
        )
        eager_out = buf.combine(eager, eager_handle)[0]  # type: ignore[arg-type]
        torch.cuda.synchronize(dev)
        rows = int(eager_handle.psum_num_recv_tokens_per_rank[-1])
        assert int(got_handle.psum_num_recv_tokens_per_rank[-1]) == rows
        assert torch.equal(got[:rows], eager[:rows])  # type: ignore[index]
        assert torch.equal(got_out, expected(x, idx)) and torch.equal(eager_out, got_out)
    buf.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((1, 2), dedicated=False))
def test_sync_calls_run_on_the_callers_stream_in_order_nvlink(
    world_size: int, per_gpu: int
) -> None:
    run_ranks(world_size, _stream_order_worker, timeout_s=180, ranks_per_gpu=per_gpu)


def _agreement_inputs(info: Any, seed: int) -> tuple[int, int, torch.Tensor, torch.Tensor, Any]:
    """``(E, k, x, topk_idx, topk_weights)`` of one rank for the failing-together tests below."""
    dev, e, k = info.device, 4 * info.world_size, 4
    gen = torch.Generator().manual_seed(seed + info.rank)
    x = torch.randn(NMAX, HIDDEN, generator=gen).to(torch.bfloat16).to(dev)
    idx = torch.rand(NMAX, e, generator=gen).topk(k, dim=1).indices.to(dev)
    return e, k, x, idx, torch.rand(NMAX, k, generator=gen).to(dev)


def _rejected_input_worker(info: Any, call: str) -> None:
    # NVLink backend: rank 1 rejects its own input to one collective call (a float32 x). Its host
    # writes its abort value into every rank's abort words, so rank 0's kernels of that call stop
    # at once instead of waiting num_gpu_timeout_secs (60 s here) for rank 1, and every rank
    # raises ValueError naming rank 1: rank 0 in the call itself for a dispatch with CPU sync,
    # else at its next call. The buffer then serves no more calls, on any rank.
    import time

    dev = info.device
    e, k, x, idx, _ = _agreement_inputs(info, 31)
    wrong = x.float() if info.rank == 1 else x
    ll = call == "low_latency_dispatch"
    buf = ElasticBuffer(
        info.group,
        num_max_tokens_per_rank=0 if ll else NMAX,
        hidden=HIDDEN,
        num_topk=k,
        backend="nvlink",
        device=dev,
        num_gpu_timeout_secs=60,
        low_latency_mode=ll,
        num_max_dispatch_tokens_per_rank=NMAX if ll else 0,
        num_experts=e if ll else 0,
    )
    peer = r"rank 1 rejected its input to a collective call of this buffer"
    start = time.monotonic()
    if call == "dispatch":
        with pytest.raises((ValueError, TypeError), match=None if info.rank == 1 else peer):
            buf.dispatch(wrong, topk_idx=idx, num_experts=e, do_cpu_sync=True)
    else:
        if call == "combine":
            recv, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=True)
            torch.cuda.synchronize(dev)
            start = time.monotonic()
            rows = recv.float() if info.rank == 1 else recv  # type: ignore[union-attr]

            def failing() -> object:
                return buf.combine(rows, handle)
        else:

            def failing() -> object:
                return buf.low_latency_dispatch(wrong, idx, NMAX, e, use_fp8=False)

        if info.rank == 1:
            with pytest.raises((ValueError, TypeError)):
                failing()
        else:
            failing()  # returns; its kernels stop when they see rank 1's abort
            torch.cuda.synchronize(dev)
    # The next call raises on every rank (rank 0 names rank 1; rank 1 names itself).
    with pytest.raises(ValueError, match=peer if info.rank == 0 else "rank 1 \\(this rank\\)"):
        if ll:
            buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
        else:
            buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=True)
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"rank {info.rank} took {elapsed:.1f} s to raise"
    buf.destroy()


@pytest.mark.parametrize("call", ["dispatch", "combine", "low_latency_dispatch"])
@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_rejected_input_on_one_rank_stops_every_rank_nvlink(
    world_size: int, per_gpu: int, call: str
) -> None:
    run_ranks(
        world_size,
        _rejected_input_worker,
        call,
        timeout_s=120,
        ranks_per_gpu=per_gpu,
    )


def _arguments_differ_worker(info: Any, what: str) -> None:
    # NVLink backend, dispatch with CPU sync: rank 1 passes arguments that are valid on their
    # own but differ from rank 0's (num_experts, or the hidden size). Each rank announces a
    # signature of its arguments with its token count; every rank finds a peer's signature
    # different from its own, stops its kernels and raises ValueError, in the call and after.
    dev = info.device
    e, k, x, idx, _ = _agreement_inputs(info, 41)
    num_experts = e
    if info.rank == 1:
        if what == "num_experts":
            num_experts = 2 * e
        else:
            x = x[:, : HIDDEN // 2].contiguous()
    buf = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=k, backend="nvlink",
        device=dev, num_gpu_timeout_secs=60,
    )  # fmt: skip
    differ = r"dispatch configuration must agree on every rank: rank \d called with other arguments"
    for _ in range(2):
        with pytest.raises(ValueError, match=differ):
            buf.dispatch(x, topk_idx=idx, num_experts=num_experts, do_cpu_sync=True)
    buf.destroy()


@pytest.mark.parametrize("what", ["num_experts", "hidden"])
@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_dispatch_arguments_that_differ_raise_on_every_rank_nvlink(
    world_size: int, per_gpu: int, what: str
) -> None:
    run_ranks(world_size, _arguments_differ_worker, what, timeout_s=120, ranks_per_gpu=per_gpu)


def _every_next_call_raises(
    info: Any, buf: ElasticBuffer, call: Callable[[], object], pattern: str, start: float
) -> None:
    """The next two calls raise ``pattern``, within 30 s of ``start``; then destroys ``buf``."""
    import time

    for _ in range(2):
        with pytest.raises(ValueError, match=pattern):
            call()
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"rank {info.rank} took {elapsed:.1f} s to raise"
    buf.destroy()


def _calls_differ_worker(info: Any, what: str) -> None:
    # NVLink backend, after one agreed dispatch: rank 1 combines with a narrower x
    # ("combine_hidden") or sends weights back that rank 0 does not ("combine_weights"), or
    # calls combine while rank 0 calls a dispatch ("kind"). Each rank announces its call's kind
    # and signature with the start of the op and compares its peers' with its own: every rank
    # stops that op's kernels, and raises ValueError at its next call (and the one after).
    import time

    dev = info.device
    e, k, x, idx, w = _agreement_inputs(info, 51)
    buf = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=k, backend="nvlink",
        device=dev, num_gpu_timeout_secs=60,
    )  # fmt: skip
    recv, _, recv_w, handle, _ = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=e, do_cpu_sync=True
    )
    assert isinstance(recv, torch.Tensor)
    torch.cuda.synchronize(dev)
    start = time.monotonic()
    if what == "kind" and info.rank == 0:
        buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=False)
    elif what == "combine_hidden" and info.rank == 1:
        buf.combine(recv[:, : HIDDEN // 2].contiguous(), handle)
    elif what == "combine_weights" and info.rank == 1:
        buf.combine(recv, handle, topk_weights=recv_w)
    else:
        buf.combine(recv, handle)
    torch.cuda.synchronize(dev)
    if what == "kind":
        pattern = r"rank \d called (combine|dispatch) while rank \d called (dispatch|combine)"
    else:
        pattern = r"combine configuration must agree on every rank: rank \d called with other"
    _every_next_call_raises(
        info,
        buf,
        lambda: buf.dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=True),
        pattern,
        start,
    )


@pytest.mark.parametrize("what", ["combine_hidden", "combine_weights", "kind"])
@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_calls_that_differ_raise_on_every_rank_nvlink(
    world_size: int, per_gpu: int, what: str
) -> None:
    run_ranks(world_size, _calls_differ_worker, what, timeout_s=120, ranks_per_gpu=per_gpu)


def _low_latency_calls_differ_worker(info: Any, what: str) -> None:
    # NVLink backend, low latency, after one agreed dispatch: rank 1 dispatches FP8 while rank 0
    # dispatches BF16 ("fp8"), or rank 1 combines while rank 0 dispatches ("kind"). Every op
    # writes its signature where a dispatch writes its token count, and every reader compares it
    # with its own: both ranks stop the op and raise at their next call (and the one after).
    import time

    dev = info.device
    e, k, x, idx, w = _agreement_inputs(info, 61)
    buf = ElasticBuffer(
        info.group, num_max_tokens_per_rank=0, hidden=HIDDEN, num_topk=k, backend="nvlink",
        device=dev, num_gpu_timeout_secs=60, low_latency_mode=True,
        num_max_dispatch_tokens_per_rank=NMAX, num_experts=e,
    )  # fmt: skip
    recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    assert isinstance(recv, torch.Tensor)
    torch.cuda.synchronize(dev)
    start = time.monotonic()
    if what == "kind" and info.rank == 1:
        buf.low_latency_combine(recv, idx, w, handle)
    else:
        buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=what == "fp8" and info.rank == 1)
    torch.cuda.synchronize(dev)
    if what == "kind":
        pattern = r"rank \d called low_latency_(combine|dispatch) while rank \d called"
    else:
        pattern = r"low_latency_dispatch configuration must agree on every rank: rank \d called"
    _every_next_call_raises(
        info,
        buf,
        lambda: buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False),
        pattern,
        start,
    )


@pytest.mark.parametrize("what", ["fp8", "kind"])
@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_low_latency_calls_that_differ_raise_on_every_rank_nvlink(
    world_size: int, per_gpu: int, what: str
) -> None:
    run_ranks(
        world_size, _low_latency_calls_differ_worker, what, timeout_s=120, ranks_per_gpu=per_gpu
    )
