"""``ep_elastic.compat.Buffer`` (DeepEP V1's API) against ``ElasticBuffer`` on the same inputs.

The call sequences follow the documented use of DeepEP V1 by vLLM and SGLang: normal mode
``get_dispatch_layout`` -> ``dispatch`` -> expert compute -> ``combine`` with
``previous_event`` / ``async_finish``, a cached dispatch with ``handle=``, ``num_worst_tokens``,
and low-latency dispatch/combine with ``return_recv_hook``. Every output is compared bit for bit
with ``ElasticBuffer``'s; each check raises inside the ranks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ep_elastic
from ep_core.fp8 import per_token_cast_to_fp8
from ep_elastic import ElasticBuffer
from ep_elastic.compat import Buffer, Config, DispatchHandle, EventOverlap
from ep_jit.testing import run_ranks

HIDDEN, K = 256, 4


def _raises(error: type[Exception], pattern: str, fn: Callable[[], Any]) -> None:
    with pytest.raises(error, match=pattern):
        fn()


def _routing(rank: int, num_tokens: int, num_experts: int, seed: int) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed * 131 + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    scores[:, : num_experts // 4] *= 3  # skewed towards rank 0's experts
    topk_idx = scores.topk(K, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand(num_tokens, K, generator=gen) < 0.15] = -1
    topk_weights = torch.rand(num_tokens, K, generator=gen)
    return x, topk_idx, topk_weights


def _expert(recv_x: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
    """A stand-in for the experts: the row scaled by its summed local weights."""
    return (recv_x.float() * (1 + recv_w.sum(dim=1, keepdim=True))).to(torch.bfloat16)


def _equal(name: str, a: Any, b: Any) -> None:
    if isinstance(a, tuple):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _equal(f"{name}[{i}]", u, v)
        return
    assert torch.equal(a, b), f"{name} differs"


def _normal(info: Any, buf: Buffer, ref: ElasticBuffer, tokens: list[int], seed: int) -> None:
    rank, num_ranks = info.rank, info.world_size
    num_experts = 4 * num_ranks
    nmax = max(max(tokens), 1)
    x, topk_idx, topk_weights = _routing(rank, tokens[rank], num_experts, seed)
    fp8 = seed % 2 == 1
    x_in: Any = per_token_cast_to_fp8(x) if fp8 else x
    alignment = 128 if fp8 else 1  # SGLang's DeepGEMM contiguous layout uses 128

    # vLLM / SGLang normal mode: layout, dispatch, experts, combine, with events.
    previous = Buffer.capture()
    per_rank, per_rdma_rank, per_expert, in_rank, event = buf.get_dispatch_layout(
        topk_idx, num_experts, previous_event=previous, async_finish=True,
        allocate_on_comm_stream=True,
    )  # fmt: skip
    event.current_stream_wait()
    assert per_rdma_rank is None and isinstance(event, EventOverlap)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        x_in,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=alignment,
        config=Buffer.get_dispatch_config(num_ranks),
        previous_event=event,
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    event.current_stream_wait()
    ref_x, ref_idx, ref_w, ref_handle, _ = ref.dispatch(
        x_in, topk_idx, topk_weights, num_experts=num_experts, num_max_tokens_per_rank=nmax,
        expert_alignment=alignment,
    )  # fmt: skip
    _equal("recv_x", recv_x, ref_x)
    _equal("recv_topk_idx", recv_idx, ref_idx)
    _equal("recv_topk_weights", recv_w, ref_w)
    assert counts == ref_handle.num_recv_tokens_per_expert_list and isinstance(counts, list)
    assert isinstance(handle, DispatchHandle) and len(handle) == 6
    prefix, _, _, src_idx, handle_in_rank, _ = handle
    _equal("rank_prefix_matrix", prefix[:, rank], ref_handle.psum_num_recv_tokens_per_rank)
    meta = ref_handle.recv_src_metadata
    _equal("recv_src_idx", src_idx, (meta[:, 0] - meta[:, 1] * nmax).int())
    _equal("is_token_in_rank", handle_in_rank, in_rank)

    y = _expert(ref_x[0].float().to(torch.bfloat16) if fp8 else ref_x, ref_w)
    bias = torch.randn(tokens[rank], HIDDEN).to(torch.bfloat16)
    combined, combined_w, event = buf.combine(
        y, handle, topk_weights=recv_w, bias=bias,
        config=Buffer.get_combine_config(num_ranks), previous_event=Buffer.capture(),
        async_finish=True, allocate_on_comm_stream=True,
    )  # fmt: skip
    event.current_stream_wait()
    ref_combined, ref_combined_w, _ = ref.combine(y, ref_handle, topk_weights=ref_w, bias=bias)
    _equal("combined_x", combined, ref_combined)
    _equal("combined_topk_weights", combined_w, ref_combined_w)

    # Cached dispatch (e.g. the backward of combine): same layout, new data.
    x2 = (x * 2).contiguous()
    cached = buf.dispatch(x2, handle=handle)
    assert cached[1:5] == (None, None, None, None)
    ref_cached, *_ = ref.dispatch(x2, handle=ref_handle)
    _equal("cached recv_x", cached[0], ref_cached)

    # num_worst_tokens: worst-case rows without a host sync, then combine on them.
    worst = nmax * num_ranks
    w_x, w_idx, w_w, w_counts, w_handle, _ = buf.dispatch(
        x_in, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        num_worst_tokens=worst,
    )  # fmt: skip
    rows = ref_idx.shape[0]
    assert w_counts == [] and w_idx is not None and w_idx.shape == (worst, K)
    _equal("worst recv_x", _head(w_x, rows), ref_x)
    _equal("worst recv_topk_idx", w_idx[:rows], ref_idx)
    assert bool((w_idx[rows:] == -1).all()), "rows past the received count must be -1"
    assert w_w is not None
    _equal("worst recv_topk_weights", w_w[:rows], ref_w)
    w_y = torch.cat([y, torch.zeros(worst - rows, HIDDEN, dtype=torch.bfloat16)])
    w_combined, _, _ = buf.combine(w_y, w_handle)
    _equal("worst combined_x", w_combined, ref.combine(y, ref_handle)[0])

    # V1's dispatch without top-k: routing from is_token_in_rank only.
    if not fp8:
        plain_x, plain_idx, plain_w, plain_counts, plain_handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, expert_alignment=alignment,
        )  # fmt: skip
        assert plain_idx is None and plain_w is None and plain_counts == counts
        _equal("no-topk recv_x", plain_x, ref_x)
        _equal("no-topk combine", buf.combine(y, plain_handle)[0], ref.combine(y, ref_handle)[0])


def _head(x: Any, rows: int) -> Any:
    return (x[0][:rows], x[1][:rows]) if isinstance(x, tuple) else x[:rows]


def _low_latency(info: Any, buf: Buffer, ref: ElasticBuffer, seed: int) -> None:
    rank, num_ranks = info.rank, info.world_size
    num_experts, nmax = 4 * num_ranks, 8
    x, topk_idx, topk_weights = _routing(rank, 6 + rank % 2, num_experts, seed)
    buf.clean_low_latency_buffer(nmax, HIDDEN, num_experts)  # SGLang: normal -> low latency
    stats = torch.zeros(num_experts // num_ranks, dtype=torch.int32)
    ref_stats = stats.clone()
    for use_fp8 in (True, False):
        recv, count, handle, event, hook = buf.low_latency_dispatch(
            x, topk_idx, nmax, num_experts, cumulative_local_expert_recv_stats=stats,
            use_fp8=use_fp8, round_scale=use_fp8, use_ue8m0=use_fp8, return_recv_hook=True,
        )  # fmt: skip
        assert hook is not None
        hook()
        event.current_stream_wait()
        ref_recv, ref_count, ref_handle, _, _ = ref.low_latency_dispatch(
            x, topk_idx, nmax, num_experts, cumulative_local_expert_recv_stats=ref_stats,
            use_fp8=use_fp8, round_scale=use_fp8, use_ue8m0=use_fp8,
        )  # fmt: skip
        _equal("ll recv_x", recv, ref_recv)
        _equal("ll recv_count", count, ref_count)
        src_info, layout_range, h_nmax, h_hidden, h_experts = handle
        _equal("ll src_info", src_info, ref_handle.recv_src_info)
        _equal("ll layout_range", layout_range, ref_handle.recv_layout_range)
        assert (h_nmax, h_hidden, h_experts) == (nmax, HIDDEN, num_experts)

        y = torch.randn(*ref_handle.recv_src_info.shape, HIDDEN).to(torch.bfloat16)
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        combined, _, hook = buf.low_latency_combine(
            y, topk_idx, topk_weights, handle, return_recv_hook=True, out=out
        )
        assert hook is not None
        hook()
        ref_combined, _, _ = ref.low_latency_combine(y, topk_idx, topk_weights, ref_handle)
        _equal("ll combined", combined, ref_combined)
        assert combined.data_ptr() == out.data_ptr()
        # Zero copy: the experts write into the next combine buffer.
        next_buffer = buf.get_next_low_latency_combine_buffer(handle)
        next_buffer.copy_(y)
        zero_copy, _, _ = buf.low_latency_combine(
            next_buffer, topk_idx, topk_weights, handle, zero_copy=True
        )
        _equal("ll zero-copy combined", zero_copy, ref_combined)
    _equal("cumulative stats", stats, ref_stats)


def match_worker(info: Any) -> None:
    group, num_ranks = info.group, info.world_size
    nmax = 12
    ref = ElasticBuffer(group, num_max_tokens_per_rank=nmax, hidden=HIDDEN)
    nvl_bytes = ElasticBuffer.get_buffer_size_hint(group, nmax, HIDDEN)
    buf = Buffer(group, num_nvl_bytes=nvl_bytes, low_latency_mode=True, num_qps_per_rank=4)
    assert buf.group_size == num_ranks and buf.rank == info.rank
    rounds = [
        [5 + r for r in range(num_ranks)],
        [0 if r == num_ranks - 1 else 9 for r in range(num_ranks)],  # a rank with no tokens
        [nmax] * num_ranks,
    ]
    for seed, tokens in enumerate(rounds):
        _normal(info, buf, ref, tokens, seed)
    _low_latency(info, buf, ref, seed=7)
    # One Buffer for both modes (SGLang's auto mode): normal again after low latency.
    _normal(info, buf, ref, rounds[0], seed=4)


@pytest.mark.parametrize("world_size", [2, 4])
def test_compat_matches_elastic_buffer(world_size: int) -> None:
    run_ranks(world_size, match_worker, timeout_s=300, use_gpu=False)


def _layout_args(buf: Buffer, topk_idx: torch.Tensor, num_experts: int) -> dict[str, Any]:
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    return {
        "num_tokens_per_rank": per_rank,
        "is_token_in_rank": in_rank,
        "num_tokens_per_expert": per_expert,
    }


def errors_worker(info: Any) -> None:
    group, rank = info.group, info.rank
    num_experts = 8
    # Construction: V1's rules, checked on every rank together.
    _raises(ValueError, "comm= .* is not supported", lambda: Buffer(None, comm=object()))
    _raises(ValueError, "Either 'group' or 'comm'", lambda: Buffer(None))
    _raises(ValueError, "num_nvl_bytes 100 is not a multiple of 128", lambda: Buffer(group, 100))
    _raises(
        ValueError,
        "num_qps_per_rank must be >= 1, got 0",
        lambda: Buffer(group, low_latency_mode=True, num_qps_per_rank=0),
    )
    mode = rank == 1
    _raises(
        ValueError,
        re.escape("low_latency_mode differs across ranks (rank 0: False, rank 1: True)"),
        lambda: Buffer(group, low_latency_mode=mode),
    )
    nvl = 100 if rank == 1 else 0
    pattern = "not a multiple of 128" if rank == 1 else "rank 1: ValueError: num_nvl_bytes 100"
    _raises(ValueError, pattern, lambda: Buffer(group, nvl))
    # Accepted without effect: RDMA bytes on one node, QPs, NVLink/MNNVL flags.
    quiet = Buffer(group, 0, 2**20, num_qps_per_rank=3, allow_mnnvl=True)
    assert quiet.num_rdma_bytes == 2**20 and quiet.elastic.num_bytes == 2 * 2**20
    _raises(ValueError, "explicitly_destroy=True", quiet.destroy)

    buf = Buffer(group, num_max_tokens_per_rank=8, hidden=HIDDEN)
    assert buf.elastic.num_max_tokens_per_rank == 8
    x, topk_idx, topk_weights = _routing(rank, 6, num_experts, seed=3)
    layout = _layout_args(buf, topk_idx, num_experts)
    good = {**layout, "topk_idx": topk_idx, "topk_weights": topk_weights}
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, **good)
    other_layout = _layout_args(buf, topk_idx.flip(0).contiguous(), num_experts)
    checks: list[tuple[type[Exception], str, Callable[[], Any]]] = [
        (
            ValueError,
            "needs num_tokens_per_rank, is_token_in_rank",
            lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights),
        ),
        (
            ValueError,
            "topk_idx and topk_weights must be given together",
            lambda: buf.dispatch(x, **{**good, "topk_weights": None}),
        ),
        (
            ValueError,
            "is_token_in_rank is not the layout of topk_idx",
            lambda: buf.dispatch(x, **{**good, **other_layout}),
        ),
        (
            TypeError,
            "is_token_in_rank must have dtype torch.bool",
            lambda: buf.dispatch(
                x, **{**good, "is_token_in_rank": layout["is_token_in_rank"].int()}
            ),
        ),
        (
            ValueError,
            "allocate_on_comm_stream=True requires previous_event and async_finish=True",
            lambda: buf.dispatch(x, **good, allocate_on_comm_stream=True),
        ),
        (
            TypeError,
            "previous_event must be an EventOverlap",
            lambda: buf.dispatch(x, **good, previous_event=1),  # type: ignore[arg-type]
        ),
        (
            TypeError,
            "config must be an ep_elastic.compat.Config",
            lambda: buf.dispatch(x, **good, config=(20, 6, 256)),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            "num_worst_tokens > 0 needs topk_idx",
            lambda: buf.dispatch(x, **layout, num_worst_tokens=16),
        ),
        (
            ValueError,
            "num_worst_tokens=4 over 2 ranks allows at most 2 per rank",
            lambda: buf.dispatch(x, **good, num_worst_tokens=4),
        ),
        (
            ValueError,
            "takes no topk_idx",
            lambda: buf.dispatch(x, handle=handle, topk_idx=topk_idx),
        ),
        (
            TypeError,
            "handle must be the handle returned by ep_elastic.compat.Buffer.dispatch, got tuple",
            lambda: buf.combine(recv_x, tuple(handle)),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            r"x must be \[\d+, H\]",
            lambda: buf.combine(recv_x[:-1], handle),
        ),
        (
            ValueError,
            "needs Buffer\\(low_latency_mode=True\\)",
            lambda: buf.low_latency_dispatch(x, topk_idx, 8, num_experts),
        ),
        (ValueError, "needs Buffer\\(enable_shrink=True\\)", buf.low_latency_clean_mask_buffer),
    ]
    for error, message, fn in checks:
        _raises(error, message, fn)
    plain = buf.dispatch(x, **layout)
    _raises(
        ValueError,
        "combine got topk_weights but the dispatch had no topk_idx",
        lambda: buf.combine(plain[0], plain[4], topk_weights=recv_w),
    )
    # One rank's bad input fails every rank instead of leaving the other waiting.
    bad_idx = topk_idx.clone()
    if rank == 1:
        bad_idx[0, 0] = num_experts
    pattern = "is outside" if rank == 1 else "rank 1: ValueError: topk_idx\\[0, 0\\]"
    _raises(ValueError, pattern, lambda: buf.dispatch(x, **{**good, "topk_idx": bad_idx}))
    # A dispatch the buffer cannot hold fails on every rank and names the size needed.
    small = Buffer(group, 2**21)
    big = torch.zeros(4096 if rank == 0 else 1, HIDDEN, dtype=torch.bfloat16)
    big_idx = torch.zeros(big.shape[0], 1, dtype=torch.int64)
    big_args = _layout_args(small, big_idx, num_experts)
    _raises(
        ValueError,
        "Nmax=4096 .* pass num_nvl_bytes >= ",
        lambda: small.dispatch(
            big, **big_args, topk_idx=big_idx, topk_weights=torch.ones(big.shape[0], 1)
        ),
    )

    ll = Buffer(group, low_latency_mode=True, enable_shrink=True, explicitly_destroy=True)
    (_, _), _, ll_handle, _, _ = ll.low_latency_dispatch(x, topk_idx, 8, num_experts)
    y = torch.zeros(num_experts // 2, 16, HIDDEN, dtype=torch.bfloat16)
    _raises(
        ValueError,
        "use_logfmt=True .* not supported",
        lambda: ll.low_latency_combine(y, topk_idx, topk_weights, ll_handle, use_logfmt=True),
    )
    _raises(
        TypeError,
        "low_latency_dispatch, got tuple",
        lambda: ll.low_latency_combine(y, topk_idx, topk_weights, tuple(ll_handle)),  # type: ignore[arg-type]
    )
    _raises(
        ValueError,
        r"dispatch_wait_recv_cost_stats must have shape \(2, 2\)",
        lambda: ll.low_latency_dispatch(
            x,
            topk_idx,
            8,
            num_experts,
            dispatch_wait_recv_cost_stats=torch.zeros(3, 2, dtype=torch.int64),
        ),
    )
    _raises(
        ValueError,
        "masking a rank is not supported",
        lambda: ll.low_latency_update_mask_buffer(1, True),
    )
    ll.low_latency_update_mask_buffer(1, False)
    status = torch.ones(2, dtype=torch.int32)
    ll.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0]
    ll.destroy()
    _raises(RuntimeError, "destroyed", lambda: ll.low_latency_dispatch(x, topk_idx, 8, num_experts))


def test_compat_errors() -> None:
    run_ranks(2, errors_worker, timeout_s=300, use_gpu=False)


def test_v1_configs_and_size_hints() -> None:
    # V1's formulas, evaluated by hand for DeepSeek-V3-like settings.
    config = Buffer.get_dispatch_config(8)
    assert (config.num_sms, config.num_max_nvl_chunked_recv_tokens) == (Buffer.num_sms, 256)
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8) == 335_709_824
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1_908_410_496
    assert Config(24, 6, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132  # V1 rounds up
    _raises(ValueError, "no tuned config for 3 ranks", lambda: Buffer.get_combine_config(3))
    _raises(ValueError, "must be less than", lambda: Config(20, 256, 256))
    _raises(ValueError, "at most half", lambda: Config(20, 6, 256, 128, 64))
    _raises(ValueError, "must be even", lambda: Buffer.set_num_sms(23))
    old = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_combine_config(4).num_sms == 24
    finally:
        Buffer.set_num_sms(old)
    assert ep_elastic.compat.EventOverlap is ep_elastic.EventOverlap
    assert ep_elastic.compat.topk_idx_t is torch.int64
