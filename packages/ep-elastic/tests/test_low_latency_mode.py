"""Receive hooks and ``low_latency_mode`` (the low-latency pair built at construction).

CPU tests (gloo): the hook plumbing of every layer (a callable hook, outputs and statistics right
after it, one call only, no ``async_finish`` with it) and the constructor's low-latency
arguments and limits, raised on every rank. GPU tests (ranks sharing one GPU): on the NVLink
backend a call with a hook returns after the send while a peer still sleeps, the results after
the hook equal the reference backend's bit for bit, and the first low-latency dispatch + combine
of a buffer can be captured in a CUDA graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ep_elastic import ElasticBuffer
from ep_elastic.compat import Buffer
from ep_jit.testing import gpu_placements, run_ranks

NMAX, HIDDEN, TOPK = 8, 128, 2


def _raises(error: type[Exception], pattern: str, fn: Callable[[], Any]) -> None:
    with pytest.raises(error, match=pattern):
        fn()


def _inputs(rank: int, num_tokens: int, hidden: int, num_experts: int, k: int, device: Any):
    gen = torch.Generator().manual_seed(100 + rank)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(torch.bfloat16)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(k, dim=1).indices
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
    w = torch.rand(num_tokens, k, generator=gen)
    return x.to(device), idx.to(torch.int64).to(device), w.to(device)


def _expert_outputs(rank: int, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + rank)
    return (torch.randn(shape, generator=gen) * 2).to(torch.bfloat16).to(device)


def _valid(recv_x: torch.Tensor, count: torch.Tensor) -> list[torch.Tensor]:
    return [recv_x[e, : int(c)].cpu() for e, c in enumerate(count.tolist())]


def _same(tag: str, got: Any, want: Any) -> None:
    if isinstance(want, list):
        assert len(got) == len(want), tag
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(f"{tag}[{i}]", g, w)
        return
    got, want = got.cpu().contiguous(), want.cpu().contiguous()
    assert got.dtype == want.dtype and got.shape == want.shape, tag
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{tag} differs"


# ---- CPU ----------------------------------------------------------------------------------------


def _hooks_worker(info: Any) -> None:
    r, e = info.world_size, 4 * info.world_size
    buf = ElasticBuffer(
        info.group,
        hidden=HIDDEN,
        num_topk=TOPK,
        low_latency_mode=True,
        num_max_dispatch_tokens_per_rank=NMAX,
        num_experts=e,
        device=info.device,
    )
    assert buf.low_latency_mode and buf.num_max_dispatch_tokens_per_rank == NMAX
    x, idx, w = _inputs(info.rank, NMAX - info.rank, HIDDEN, e, TOPK, info.device)
    el = e // r
    stats = torch.zeros(el, dtype=torch.int32)
    want_x, want_count, want_handle, _, no_hook = buf.low_latency_dispatch(
        x, idx, NMAX, e, use_fp8=False
    )
    assert no_hook is None
    recv_x, count, handle, event, hook = buf.low_latency_dispatch(
        x,
        idx,
        NMAX,
        e,
        use_fp8=False,
        cumulative_local_expert_recv_stats=stats,
        return_recv_hook=True,
    )
    assert callable(hook) and event.event is None
    assert stats.sum() == 0  # the statistics count the receive, which the hook completes
    hook()
    _raises(RuntimeError, "already called", hook)
    _same("recv_count", count, want_count)
    _same("recv_x", _valid(recv_x, count), _valid(want_x, want_count))
    _same("stats", stats, want_count)

    y = _expert_outputs(info.rank, (el, r * NMAX, HIDDEN), info.device)
    want, _, none = buf.low_latency_combine(y, idx, w, want_handle)
    assert none is None
    out = torch.full_like(want, float("nan"))
    got, _, hook = buf.low_latency_combine(y, idx, w, handle, out=out, return_recv_hook=True)
    assert callable(hook) and got is out
    hook()
    _same("combined", got, want)

    _raises(
        ValueError,
        "async_finish=True and return_recv_hook=True",
        lambda: buf.low_latency_dispatch(
            x, idx, NMAX, e, use_fp8=False, async_finish=True, return_recv_hook=True
        ),
    )
    _raises(
        ValueError,
        "async_finish=True and return_recv_hook=True",
        lambda: buf.low_latency_combine(
            y, idx, w, handle, async_finish=True, return_recv_hook=True
        ),
    )
    # Both ranks rejected the same call; the buffer stays usable.
    again, _, _, _, _ = buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    _same("after rejections", _valid(again, want_count), _valid(want_x, want_count))

    # The reference backend's own hook (ep-core level): a callable, or None without a hook.
    res, backend_hook = buf.backend.low_latency_dispatch(
        x,
        idx,
        num_max_dispatch_tokens_per_rank=NMAX,
        num_experts=e,
        use_fp8=False,
        round_scale=False,
        use_ue8m0=False,
        return_recv_hook=True,
    )
    assert callable(backend_hook)
    backend_hook()
    _same("backend recv_count", res.recv_count, want_count)
    combined, backend_hook = buf.backend.low_latency_combine(y, idx, w, res.handle, None)
    assert backend_hook is None
    _same("backend combined", combined, want)
    buf.destroy()


def test_recv_hooks_on_the_reference_backend() -> None:
    run_ranks(2, _hooks_worker, timeout_s=300, use_gpu=False)


def _mode_args_worker(info: Any) -> None:
    g, dev = info.group, info.device
    e = 4 * info.world_size

    def make(**kw: Any) -> ElasticBuffer:
        args: dict[str, Any] = {"hidden": HIDDEN, "num_topk": TOPK, "device": dev}
        args.update(kw)
        return ElasticBuffer(g, **args)

    _raises(
        ValueError,
        "needs num_max_dispatch_tokens_per_rank, num_experts > 0",
        lambda: make(low_latency_mode=True),
    )
    _raises(
        ValueError,
        "needs num_experts > 0",
        lambda: make(low_latency_mode=True, num_max_dispatch_tokens_per_rank=NMAX),
    )
    _raises(
        ValueError,
        "pass them with low_latency_mode=True",
        lambda: make(num_max_dispatch_tokens_per_rank=NMAX, num_experts=e),
    )
    _raises(
        ValueError,
        "not a multiple",
        lambda: make(low_latency_mode=True, num_max_dispatch_tokens_per_rank=NMAX, num_experts=3),
    )
    _raises(
        ValueError,
        r"num_max_dispatch_tokens_per_rank must be in \[1, 65535\]",
        lambda: make(low_latency_mode=True, num_max_dispatch_tokens_per_rank=70000, num_experts=e),
    )
    # Only one rank asks for the low-latency pair: every rank raises naming the field.
    _raises(
        ValueError,
        "low_latency_mode",
        lambda: make(
            num_bytes=2 << 20,
            low_latency_mode=info.rank == 0,
            num_max_dispatch_tokens_per_rank=NMAX if info.rank == 0 else 0,
            num_experts=e if info.rank == 0 else 0,
        ),
    )

    # Without num_max_tokens_per_rank or num_bytes a low-latency buffer still sizes itself.
    buf = make(low_latency_mode=True, num_max_dispatch_tokens_per_rank=NMAX, num_experts=e)
    assert buf.num_bytes > 0 and buf.num_experts == e
    x, idx, _ = _inputs(info.rank, 4, HIDDEN, e, TOPK, dev)
    too_many = NMAX * 2
    _raises(
        ValueError,
        f"num_max_dispatch_tokens_per_rank {too_many} exceeds the buffer's {NMAX}",
        lambda: buf.low_latency_dispatch(x, idx, too_many, e, use_fp8=False),
    )
    x2, idx2, _ = _inputs(info.rank, 4, HIDDEN, 2 * e, TOPK, dev)
    _raises(
        ValueError,
        f"num_experts {2 * e} exceeds the buffer's {e}",
        lambda: buf.low_latency_dispatch(x2, idx2, NMAX, 2 * e, use_fp8=False),
    )
    x3, idx3, _ = _inputs(info.rank, 4, HIDDEN, e, TOPK + 1, dev)
    _raises(
        ValueError,
        f"num_topk {TOPK + 1} exceeds the buffer's {TOPK}",
        lambda: buf.low_latency_dispatch(x3, idx3, NMAX, e, use_fp8=False),
    )
    # One rank over its limit: it raises its own error, the peer raises naming it.
    n = too_many if info.rank == 1 else NMAX
    _raises(
        ValueError,
        "exceeds the buffer.s" if info.rank == 1 else r"rank\(s\) \[1\] rejected",
        lambda: buf.low_latency_dispatch(x, idx, n, e, use_fp8=False),
    )
    # Within the limits the calls run.
    _, count, _, _, _ = buf.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    assert count.shape == (e // info.world_size,)
    buf.destroy()

    # compat.Buffer: sized low-latency use is built at construction, with the same limits.
    compat = Buffer(
        g,
        low_latency_mode=True,
        hidden=HIDDEN,
        num_max_dispatch_tokens_per_rank=NMAX,
        num_experts=e,
        num_topk=TOPK,
        device=dev,
    )
    assert compat.elastic.low_latency_mode and compat.elastic.num_experts == e
    _raises(
        ValueError,
        "exceeds the buffer's",
        lambda: compat.low_latency_dispatch(x, idx, too_many, e, use_fp8=False),
    )
    _, _, handle, _, hook = compat.low_latency_dispatch(
        x, idx, NMAX, e, use_fp8=False, return_recv_hook=True
    )
    assert callable(hook)
    hook()
    assert handle is not None
    _raises(
        ValueError,
        "pass it with low_latency_mode=True",
        lambda: Buffer(g, num_max_dispatch_tokens_per_rank=NMAX, device=dev),
    )
    # V1's form without sizes keeps working (built at the first call on kernel backends).
    plain = Buffer(g, low_latency_mode=True, device=dev)
    assert not plain.elastic.low_latency_mode
    _, count, _, _, _ = plain.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    assert count.shape == (e // info.world_size,)


def test_low_latency_mode_arguments_and_limits() -> None:
    run_ranks(2, _mode_args_worker, timeout_s=300, use_gpu=False)


def test_nvlink_backend_refuses_calls_beyond_the_declared_engine() -> None:
    from ep_core.nvlink.backend import NvlinkBackend

    backend = NvlinkBackend.__new__(NvlinkBackend)
    backend._ll_declared = True
    backend._ll = SimpleNamespace(num_max_tokens=64, hidden=2048, num_experts=16, num_topk=4)
    assert backend._ll_engine(64, 2048, 16, 4) is backend._ll
    for args, name in (
        ((65, 2048, 16, 4), "num_max_dispatch_tokens_per_rank 65 exceeds the buffer's 64"),
        ((64, 4096, 16, 4), "hidden 4096 exceeds the buffer's 2048"),
        ((64, 2048, 32, 4), "num_experts 32 exceeds the buffer's 16"),
        ((64, 2048, 16, 8), "num_topk 8 exceeds the buffer's 4"),
    ):
        _raises(ValueError, name, lambda a=args: backend._ll_engine(*a))


# ---- GPU ----------------------------------------------------------------------------------------

SLEEP_CYCLES = 4_000_000_000
"""At most 2 GHz on the GPUs tested: the peer sleeps at least 2 s."""
SLEEP_S = 2.0
GPU_NMAX, GPU_HIDDEN, GPU_TOPK = 32, 1024, 4


def _gpu_buffers(info: Any) -> tuple[ElasticBuffer, ElasticBuffer, int]:
    e = 8 * info.world_size
    common: dict[str, Any] = {
        "hidden": GPU_HIDDEN,
        "num_topk": GPU_TOPK,
        "device": info.device,
        "explicitly_destroy": True,
        "low_latency_mode": True,
        "num_max_dispatch_tokens_per_rank": GPU_NMAX,
        "num_experts": e,
    }
    fast = ElasticBuffer(info.group, backend="nvlink", **common)
    ref = ElasticBuffer(info.group, backend="torch", **common)
    return fast, ref, e


def _wait_event(event: torch.cuda.Event, limit_s: float) -> float:
    start = time.monotonic()
    while not event.query():
        if time.monotonic() - start > limit_s:
            return -1.0
        time.sleep(0.001)
    return time.monotonic() - start


def _gpu_hook_worker(info: Any) -> None:
    fast, ref, e = _gpu_buffers(info)
    r, dev = info.world_size, info.device
    el = e // r
    eng = fast.backend._ll  # built at construction
    assert eng is not None
    eng.poison_outputs = True  # outputs the receive has not written read as -7 / NaN
    for fp8 in (False, True):
        x, idx, w = _inputs(info.rank, GPU_NMAX - info.rank, GPU_HIDDEN, e, GPU_TOPK, dev)
        want_x, want_count, want_handle, _, _ = ref.low_latency_dispatch(
            x, idx, GPU_NMAX, e, use_fp8=fp8
        )
        y = _expert_outputs(info.rank, (el, r * GPU_NMAX, GPU_HIDDEN), dev)
        want, _, _ = ref.low_latency_combine(y, idx, w, want_handle)
        torch.cuda.synchronize()
        dist.barrier(info.group)
        start = time.monotonic()
        if info.rank == 1:
            torch.cuda._sleep(SLEEP_CYCLES)  # the peer's send is queued behind ~2 s
        recv_x, count, handle, _, hook = fast.low_latency_dispatch(
            x, idx, GPU_NMAX, e, use_fp8=fp8, return_recv_hook=True
        )
        after_send = torch.cuda.Event()
        after_send.record()
        if info.rank == 0:
            # The call and its send completed while the peer still sleeps; nothing is received.
            waited = _wait_event(after_send, SLEEP_S / 2)
            assert waited >= 0, "the send waited for the sleeping peer"
            assert count.tolist() == [-7] * el, "recv_count was written before the hook"
            hook()
            after_recv = torch.cuda.Event()
            after_recv.record()
            if time.monotonic() - start < SLEEP_S / 2:
                assert not after_recv.query(), "the receive finished while the peer slept"
        else:
            hook()
        torch.cuda.synchronize()
        tag = f"[fp8={fp8} rank {info.rank}]"
        _same(f"{tag} recv_count", count, want_count)
        got_x = recv_x[0] if fp8 else recv_x
        ref_x = want_x[0] if fp8 else want_x
        _same(f"{tag} recv_x", _valid(got_x, count), _valid(ref_x, want_count))
        if fp8:
            got_sf, ref_sf = recv_x[1], want_x[1]
            _same(f"{tag} scales", _valid(got_sf, count), _valid(ref_sf, want_count))
        out = torch.full((x.shape[0], GPU_HIDDEN), float("nan"), dtype=torch.bfloat16, device=dev)
        got, _, chook = fast.low_latency_combine(y, idx, w, handle, out=out, return_recv_hook=True)
        assert chook is not None
        chook()
        torch.cuda.synchronize()
        _same(f"{tag} combined", got, want)
    eng.check_error()
    fast.destroy()
    ref.destroy()


def _gpu_first_call_graph_worker(info: Any) -> None:
    fast, ref, e = _gpu_buffers(info)
    r, dev = info.world_size, info.device
    el = e // r
    num_tokens = GPU_NMAX - info.rank
    sx = torch.zeros(num_tokens, GPU_HIDDEN, dtype=torch.bfloat16, device=dev)
    sidx = torch.full((num_tokens, GPU_TOPK), -1, dtype=torch.int64, device=dev)
    sy = torch.zeros(el, r * GPU_NMAX, GPU_HIDDEN, dtype=torch.bfloat16, device=dev)
    sw = torch.ones(num_tokens, GPU_TOPK, device=dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # The buffer's first low-latency calls, captured without any warm-up call.
    with torch.cuda.graph(graph):
        g_x, g_count, g_handle, _, _ = fast.low_latency_dispatch(
            sx, sidx, GPU_NMAX, e, use_fp8=False
        )
        g_out, _, _ = fast.low_latency_combine(sy, sidx, sw, g_handle)
    torch.cuda.synchronize()
    for i in range(3):
        gen = torch.Generator().manual_seed(31 * i + info.rank)
        x, idx, w = _inputs(info.rank + 7 * i, num_tokens, GPU_HIDDEN, e, GPU_TOPK, dev)
        y = (torch.randn(sy.shape, generator=gen) * (i + 1)).to(torch.bfloat16).to(dev)
        want_x, want_count, want_handle, _, _ = ref.low_latency_dispatch(
            x, idx, GPU_NMAX, e, use_fp8=False
        )
        want, _, _ = ref.low_latency_combine(y, idx, w, want_handle)
        sx.copy_(x)
        sidx.copy_(idx)
        sy.copy_(y)
        sw.copy_(w)
        g_x.view(torch.uint8).fill_(0x7F)
        g_count.fill_(-7)
        g_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        tag = f"[graph replay {i} rank {info.rank}]"
        _same(f"{tag} recv_count", g_count, want_count)
        _same(f"{tag} recv_x", _valid(g_x, g_count), _valid(want_x, want_count))
        _same(f"{tag} combined", g_out, want)
    del graph
    fast.backend._ll.check_error()
    fast.destroy()
    ref.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,), dedicated=False))
def test_nvlink_hook_returns_before_the_receive(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _gpu_hook_worker, timeout_s=300, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,), dedicated=False))
def test_first_low_latency_calls_captured_in_a_cuda_graph(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _gpu_first_call_graph_worker, timeout_s=300, ranks_per_gpu=per_gpu)
