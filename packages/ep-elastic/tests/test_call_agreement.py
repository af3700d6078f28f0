"""Per-call agreement on gloo: a mistake on one rank makes every rank raise, at once.

Every collective call of the reference backend opens with a fixed-size header carrying the
call's signature (mode, num_experts, hidden, k, dtypes, sync flag, sequence number). A rank that
rejects its own input sends an "abort" signature; ranks that disagree on an argument all raise a
``ValueError`` naming it. Nobody waits for a timeout, nobody dies in gloo, nobody receives another
batch. Each scenario is followed by a correct batch whose rows are checked for their origin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ep_elastic import ElasticBuffer
from ep_jit.testing import run_ranks

NMAX, HIDDEN, K = 8, 256, 2
# Generous: a rank raising because it waited this long would fail the elapsed-time checks.
TIMEOUT_S = 30.0


def _batch(info: Any, batch: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose every value is ``batch * 16 + rank`` (exact in bf16), random routing."""
    gen = torch.Generator().manual_seed(1000 * batch + info.rank)
    x = torch.full((NMAX, HIDDEN), float(batch * 16 + info.rank), dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:K] for _ in range(NMAX)])
    return x, idx


def _check_origin(recv_x: torch.Tensor, src_rank: torch.Tensor, batch: int) -> None:
    """Every valid received row came from ``src_rank`` in this ``batch``."""
    valid = src_rank >= 0
    expected = (batch * 16 + src_rank[valid]).to(torch.float32)
    got = recv_x[valid].float()
    assert torch.equal(got, expected[:, None].expand_as(got)), "rows from another batch"


def _correct_round(buffer: ElasticBuffer, info: Any, batch: int, num_experts: int) -> None:
    """A dispatch, cached dispatch, combine and low-latency pair that must all be right."""
    x, idx = _batch(info, batch, num_experts)
    recv_x, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_experts=num_experts)
    _check_origin(recv_x, handle.recv_src_metadata[:, 1], batch)
    again, _, _, _, _ = buffer.dispatch(x, handle=handle)
    _check_origin(again, handle.recv_src_metadata[:, 1].long(), batch)
    combined, _, _ = buffer.combine(recv_x, handle)
    reached = handle.is_token_in_rank.sum(1, keepdim=True).float()
    assert torch.equal(combined.float(), x.float() * reached)
    recv, count, ll_handle, _, _ = buffer.low_latency_dispatch(
        x, idx, NMAX, num_experts, use_fp8=False
    )
    for e in range(count.numel()):
        rows = recv[e, : int(count[e])].float()
        src = ll_handle.recv_layout_range[e]
        sources = torch.repeat_interleave(
            torch.arange(info.world_size), (src >> 32).to(torch.int64)
        )
        assert torch.equal(rows[:, 0], (batch * 16 + sources).float()), "LL rows mis-paired"
    weights = torch.ones(NMAX, K, dtype=torch.float32)
    out, _, _ = buffer.low_latency_combine(recv, idx, weights, ll_handle)
    assert torch.equal(out.float(), x.float() * (idx >= 0).sum(1, keepdim=True).float())


def _expect_together(
    info: Any, bad_rank: int, own: str, peers: str, call: Callable[[bool], object]
) -> None:
    """``call(is_bad)`` raises ``own`` on ``bad_rank`` and ``peers`` elsewhere, without waiting."""
    is_bad = info.rank == bad_rank
    start = time.monotonic()
    with pytest.raises(
        (ValueError, TypeError) if is_bad else ValueError, match=own if is_bad else peers
    ):
        call(is_bad)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S / 3, f"rank {info.rank} raised after {elapsed:.1f} s"


def _one_rank_rejects(info: Any) -> None:
    """A rank rejects its own input in each call kind, catches the error and continues."""
    r, e = info.world_size, 2 * info.world_size
    buffer = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=K,
        num_cpu_timeout_secs=TIMEOUT_S,
    )  # fmt: skip
    bad = r - 1
    peers = rf"rank\(s\) \[{bad}\] rejected their input"
    batch = 0
    x, idx = _batch(info, batch, e)

    # Fresh dispatch: a non-contiguous x on one rank.
    _expect_together(
        info, bad, "contiguous", peers,
        lambda b: buffer.dispatch(
            x[:, : HIDDEN // 2] if b else x, topk_idx=idx, num_experts=e
        ),
    )  # fmt: skip
    batch += 1
    _correct_round(buffer, info, batch, e)

    # Cached dispatch: x with fewer tokens than the handle's.
    x, idx = _batch(info, batch, e)
    _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_experts=e)
    _expect_together(
        info, bad, "tokens but the handle", peers,
        lambda b: buffer.dispatch(x[:-1] if b else x, handle=handle),
    )  # fmt: skip
    # Combine: the wrong number of rows.
    recv_x, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_experts=e)
    _expect_together(
        info, bad, "rows", peers,
        lambda b: buffer.combine(torch.cat([recv_x, recv_x]) if b else recv_x, handle),
    )  # fmt: skip
    batch += 1
    _correct_round(buffer, info, batch, e)

    # Low-latency dispatch: more tokens than its Nmax.
    x, idx = _batch(info, batch, e)
    _expect_together(
        info, bad, "more than num_max_dispatch_tokens_per_rank", peers,
        lambda b: buffer.low_latency_dispatch(x, idx, NMAX // 2 if b else NMAX, e, use_fp8=False),
    )  # fmt: skip
    # Low-latency combine: float32 expert outputs.
    recv, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    weights = torch.ones(NMAX, K, dtype=torch.float32)
    _expect_together(
        info, bad, "dtype", peers,
        lambda b: buffer.low_latency_combine(recv.float() if b else recv, idx, weights, ll_handle),
    )  # fmt: skip
    batch += 1
    _correct_round(buffer, info, batch, e)
    buffer.destroy()


def _ranks_disagree(info: Any) -> None:
    """One rank calls with another argument: every rank names the argument and the ranks."""
    r, e = info.world_size, 2 * info.world_size
    buffer = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=4,
        num_cpu_timeout_secs=TIMEOUT_S,
    )  # fmt: skip
    odd = 0
    others = ", ".join(f"rank {q}" for q in range(1, r))
    x, idx = _batch(info, 0, 2 * e)
    small = _batch(info, 0, e)[1]  # valid routing for E and for 2E experts

    def differs(name: str, mine: object, theirs: object) -> str:
        first = f"rank 0: {mine!r}"
        return rf"{name} differs across ranks \({first}, {others.split(',')[0]}: {theirs!r}"

    # num_experts: the same routing, read against 2E or 4E experts.
    _expect_together(
        info, -1, "-", differs("num_experts", 2 * e, 4 * e),
        lambda _: buffer.dispatch(
            x, topk_idx=small,
            num_experts=2 * e if info.rank == odd else 4 * e,
        ),
    )  # fmt: skip
    # hidden: rank 0 sends half the columns.
    _expect_together(
        info, -1, "-", differs("hidden", HIDDEN // 2, HIDDEN),
        lambda _: buffer.dispatch(
            x[:, : HIDDEN // 2].contiguous() if info.rank == odd else x,
            topk_idx=idx, num_experts=2 * e,
        ),
    )  # fmt: skip
    # k: rank 0 routes with 3 experts per token.
    idx3 = torch.stack([torch.randperm(2 * e)[:3] for _ in range(NMAX)])
    _expect_together(
        info, -1, "-", differs("num_topk", 3, K),
        lambda _: buffer.dispatch(
            x, topk_idx=idx3 if info.rank == odd else idx, num_experts=2 * e
        ),
    )  # fmt: skip
    # do_cpu_sync.
    _expect_together(
        info, -1, "-", differs("do_cpu_sync", 0, 1),
        lambda _: buffer.dispatch(
            x, topk_idx=idx, num_experts=2 * e, do_cpu_sync=info.rank != odd
        ),
    )  # fmt: skip
    # Weights on one rank only.
    w = torch.rand(NMAX, K)
    _expect_together(
        info, -1, "-", differs("topk_weights", 1, 0),
        lambda _: buffer.dispatch(
            x, topk_idx=idx, topk_weights=w if info.rank == odd else None, num_experts=2 * e
        ),
    )  # fmt: skip
    # Low-latency: num_experts and FP8.
    _expect_together(
        info, -1, "-", differs("num_experts", e, 2 * e),
        lambda _: buffer.low_latency_dispatch(
            x, small, NMAX,
            e if info.rank == odd else 2 * e, use_fp8=False,
        ),
    )  # fmt: skip
    _expect_together(
        info, -1, "-", differs("x_dtype", "bfloat16", "float8_e4m3fn"),
        lambda _: buffer.low_latency_dispatch(x, idx, NMAX, 2 * e, use_fp8=info.rank != odd),
    )  # fmt: skip
    # One rank in combine while the others dispatch again.
    recv_x, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_experts=2 * e)
    _expect_together(
        info, -1, "-", differs("mode", "combine", "dispatch"),
        lambda _: buffer.combine(recv_x, handle)
        if info.rank == odd
        else buffer.dispatch(x, topk_idx=idx, num_experts=2 * e),
    )  # fmt: skip
    # Everyone agrees again: a correct batch.
    _correct_round(buffer, info, 5, 2 * e)
    # Two buffers on one group: rank 0 calls the other one (its calls are numbered apart).
    other = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=4,
        num_cpu_timeout_secs=TIMEOUT_S,
    )  # fmt: skip
    _expect_together(
        info, -1, "-", r"sequence differs across ranks \(rank 0: 1, rank 1: 15\b",
        lambda _: (other if info.rank == odd else buffer).dispatch(
            x, topk_idx=idx, num_experts=2 * e
        ),
    )  # fmt: skip
    # Rank 0 made one call fewer on `buffer`: its calls stay one behind there, so every later
    # call on it fails on every rank rather than pairing rank 0's batches with older ones.
    _expect_together(
        info, -1, "-", "sequence differs across ranks",
        lambda _: buffer.dispatch(x, topk_idx=idx, num_experts=2 * e),
    )  # fmt: skip
    other.destroy()
    buffer.destroy()


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_rank_that_rejects_its_input_fails_every_rank(world_size: int) -> None:
    run_ranks(world_size, _one_rank_rejects, timeout_s=120, use_gpu=False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_that_disagree_on_an_argument_all_name_it(world_size: int) -> None:
    run_ranks(world_size, _ranks_disagree, timeout_s=120, use_gpu=False)
