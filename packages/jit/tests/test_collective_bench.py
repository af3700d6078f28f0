from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from ep_jit.testing import (
    RankInfo,
    RankTiming,
    allgather_floats,
    capture_graph,
    kernel_times,
    per_call_kernel_us,
    run_ranks,
    start_line,
    time_steps,
)

_SLOW_S = 0.02
"""Extra seconds rank 1 spends in step ``b`` of the timing worker."""


def _allgather_worker(info: RankInfo) -> list[list[float]]:
    return allgather_floats([info.rank, info.rank + 0.5], device=info.device, group=info.group)


def _start_line_worker(info: RankInfo) -> tuple[float, float]:
    """Rank 1 arrives late; returns (wall time before the start line, wall time after it)."""
    if info.rank == 1:
        time.sleep(0.3)
    before = time.time()
    start_line(torch.zeros(1, device=info.device), group=info.group)
    return before, time.time()


_log: list[str] = []


@contextlib.contextmanager
def _logged_context() -> Iterator[None]:
    _log.append("enter")
    yield
    _log.append("exit")


def _time_steps_worker(info: RankInfo) -> tuple[dict[str, RankTiming], list[str]]:
    _log.clear()

    def step(name: str) -> None:
        _log.append(name)
        if name == "b" and info.rank == 1:
            time.sleep(_SLOW_S)

    steps = [("a", lambda: step("a")), ("b", lambda: step("b"))]
    out = time_steps(
        steps, iters=4, warmup=1, device=info.device, group=info.group, context=_logged_context
    )
    return out, list(_log)


@pytest.mark.slow
def test_allgather_floats() -> None:
    results = run_ranks(2, _allgather_worker, use_gpu=False, timeout_s=120)
    assert results == [[[0.0, 0.5], [1.0, 1.5]]] * 2


@pytest.mark.slow
def test_start_line_waits_for_every_rank_on_cpu() -> None:
    (_, after0), (before1, _) = run_ranks(2, _start_line_worker, use_gpu=False, timeout_s=120)
    assert after0 >= before1


@pytest.mark.slow
def test_time_steps_on_cpu() -> None:
    results = run_ranks(2, _time_steps_worker, use_gpu=False, timeout_s=120)
    (out0, log0), (out1, log1) = results
    assert out0 == out1
    assert set(out0) == {"a", "b"}
    # The steps run in order, warm-up included, all inside one entry of the context.
    assert log0 == log1 == ["enter", *(["a", "b"] * 5), "exit"]
    b = out0["b"]
    assert b.samples == 4 and len(b.per_rank_median_us) == 2
    # Rank 1 is slow in step b and the reported value is the slowest rank's.
    assert b.per_rank_median_us[1] >= _SLOW_S * 1e6
    assert b.median_us == max(b.per_rank_median_us)
    assert b.p10_us <= b.median_us <= b.p90_us
    assert out0["a"].median_us < _SLOW_S * 1e6
    assert b.to_json() == {
        "median": b.median_us,
        "p10": b.p10_us,
        "p90": b.p90_us,
        "per_rank_median": list(b.per_rank_median_us),
        "samples": 4,
    }


def test_counts_are_checked() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        time_steps([], iters=0, warmup=0, device=cpu)
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        time_steps([], iters=1, warmup=-1, device=cpu)
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        kernel_times([], {}, iters=0, device=cpu)


def test_kernel_times_off_cuda() -> None:
    calls: list[str] = []
    entered: list[bool] = []

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        entered.append(True)
        yield

    out = kernel_times(
        [("a", lambda: calls.append("a"))],
        {"a": ("ep_",)},
        iters=3,
        device=torch.device("cpu"),
        context=context,
    )
    # Off CUDA nothing runs and no process group is needed.
    assert out == {"a": None} and calls == [] and entered == []


def test_per_call_kernel_us_sums_medians_per_kernel() -> None:
    durations = {
        "ep_ht_layout_r4": [14.0, 15.0, 13.0, 14.0],
        "ep_ht_dispatch_fp8": [400.0, 410.0, 2000.0, 405.0],  # one delayed call
        "ep_ht_combine": [600.0, 610.0, 605.0, 620.0],
        "elementwise_kernel": [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
        "ep_ll_combine_p3": [10.0, 12.0, 11.0, 10.0, 12.0, 11.0, 10.0, 12.0],  # twice per call
        "ep_ht_never": [],
    }
    kernels = {
        "dispatch": ("ep_ht_layout", "ep_ht_dispatch"),
        "combine": ("ep_ht_combine",),
        "ll": ("ep_ll_combine",),
        "absent": ("ep_nothing",),
        "never": ("ep_ht_never",),
    }
    out = per_call_kernel_us(durations, kernels, iters=4)
    assert out["dispatch"] == pytest.approx(14.0 + 407.5)  # the outlier does not move it
    assert out["combine"] == pytest.approx(607.5)
    assert out["ll"] == pytest.approx(2 * 11.0)
    assert out["absent"] == 0.0 and out["never"] == 0.0


@pytest.mark.gpu
def test_capture_graph_replays() -> None:
    x = torch.ones(1024, device="cuda")
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        x.mul_(2)

    graph = capture_graph(fn)
    assert len(calls) == 2  # the warm-up and the captured call
    torch.testing.assert_close(x, torch.full_like(x, 2.0))  # only the warm-up ran
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x, torch.full_like(x, 8.0))


def _cuda_worker(info: RankInfo) -> tuple[dict[str, RankTiming], dict[str, float | None]]:
    x = torch.ones(1 << 20, device=info.device)

    def step() -> None:
        x.mul_(1.0)
        dist.all_reduce(x, group=info.group)

    steps = [("mul", step)]
    out = time_steps(steps, iters=5, warmup=2, device=info.device, group=info.group)
    kern = kernel_times(
        steps, {"mul": ("void at::native",), "none": ("ep_",)}, iters=3, device=info.device
    )
    return out, kern


@pytest.mark.gpu
@pytest.mark.parametrize(
    "world_size", [1, pytest.param(2, marks=pytest.mark.multigpu(2))], ids=["1rank", "2ranks"]
)
def test_time_steps_on_cuda(world_size: int) -> None:
    results = run_ranks(world_size, _cuda_worker, use_gpu=True, timeout_s=300)
    out0, kern0 = results[0]
    assert all(r == results[0] for r in results)
    assert out0["mul"].samples == 5 and len(out0["mul"].per_rank_median_us) == world_size
    assert out0["mul"].median_us > 0
    assert kern0["none"] is None
    assert kern0["mul"] is not None and kern0["mul"] > 0
