"""Run a :class:`~ep_core.testing.Case` through a backend and compare it with the oracle.

Call these inside every rank of a job (e.g. from an ``ep_jit.testing.run_ranks`` worker). Each
rank rebuilds every rank's inputs from the case's seeds, so the oracle never relies on the
collectives under test. All comparisons are bitwise (``torch.equal``) on the rows the contract
defines; rows it leaves unspecified are never compared, and combine inputs carry NaN in every
row and lane combine must not read.
"""

from __future__ import annotations

from typing import Any

import torch

from ep_core.backend import DispatchResult, EPBackend
from ep_core.testing._inputs import Case, RankInputs, make_inputs, seeded
from ep_core.testing._oracle import (
    ExpectedDispatch,
    expected_combine,
    expected_dispatch,
    expected_low_latency_combine,
    expected_low_latency_dispatch,
)

__all__ = ["assert_equal", "run_case", "run_low_latency_case"]

# Compare floats by their bits: NaN == NaN and -0.0 != +0.0, as "bit for bit" means.
_BITS = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float8_e4m3fn: torch.uint8,
}


def assert_equal(what: str, actual: object, expected: object) -> None:
    """Raises ``AssertionError`` naming ``what`` unless both are bitwise equal."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
        actual = actual.cpu()
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            raise AssertionError(
                f"{what}: got {actual.dtype}{tuple(actual.shape)}, "
                f"expected {expected.dtype}{tuple(expected.shape)}"
            )
        bits = _BITS.get(expected.dtype)
        a = actual if bits is None else actual.view(bits)
        e = expected if bits is None else expected.view(bits)
        if not torch.equal(a, e):
            bad = (a != e).nonzero()
            raise AssertionError(
                f"{what}: {bad.shape[0]} elements differ bitwise, first at {bad[0].tolist()}: "
                f"got {actual[tuple(bad[0])].item()}, expected {expected[tuple(bad[0])].item()}"
            )
    elif actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


def _wide(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bf16 values whose float32 sums visibly depend on their order.

    A quarter are exactly +-2^20 (they cancel each other exactly), the rest spread over
    2^-24..2^24: ``(2^20 + s) - 2^20`` is 0 where ``(2^20 - 2^20) + s`` is ``s``.
    """
    exponent = torch.randint(-24, 25, values.shape, generator=gen).float()
    spread = values * torch.exp2(exponent)
    big = torch.where(torch.rand(values.shape, generator=gen) < 0.5, 2.0**20, -(2.0**20))
    pick = torch.rand(values.shape, generator=gen) < 0.25
    return torch.where(pick, big, spread).to(torch.bfloat16)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _check_dispatch(
    tag: str, res: DispatchResult, exp: ExpectedDispatch, case: Case, num_ranks: int, expand: bool
) -> None:
    h = res.handle
    per_rank = case.num_experts // num_ranks
    rows = exp.num_rows
    sync = h.do_cpu_sync
    assert_equal(
        f"{tag} psum per rank", h.psum_num_recv_tokens_per_rank.tolist(), exp.psum_per_rank
    )
    assert_equal(
        f"{tag} unaligned counts", h.num_unaligned_recv_tokens_per_expert.tolist(), exp.counts
    )
    assert_equal(
        f"{tag} aligned list", h.num_recv_tokens_per_expert_list, exp.aligned if sync else []
    )
    worst_rows = num_ranks * case.num_max_tokens_per_rank
    assert_equal(f"{tag} num_recv_tokens", h.num_recv_tokens, rows if sync else worst_rows)
    assert_equal(f"{tag} metadata", h.recv_src_metadata[:rows, :2], exp.src_metadata)
    align = case.expert_alignment
    if not expand:
        assert_equal(f"{tag} recv_x rows", res.recv_x.shape[0], h.num_recv_tokens)
        assert_equal(f"{tag} recv_x", res.recv_x[:rows], exp.recv_data)
        if exp.recv_scales is not None:
            assert_equal(f"{tag} recv scales", res.recv_x_scales[:rows], exp.recv_scales)  # type: ignore[index]
        assert_equal(f"{tag} recv_topk_idx", res.recv_topk_idx[:rows], exp.recv_topk_idx)  # type: ignore[index]
        if exp.recv_topk_weights is not None:
            assert_equal(f"{tag} recv weights", res.recv_topk_weights[:rows], exp.recv_topk_weights)  # type: ignore[index]
        psum = torch.tensor(exp.aligned).cumsum(0).tolist()
        assert_equal(f"{tag} psum per expert", h.psum_num_recv_tokens_per_expert.tolist(), psum)
        return
    worst = (
        -(-(worst_rows * min(case.num_topk, per_rank) + (align - 1) * per_rank) // align) * align
    )
    num_exp = exp.num_expanded
    assert_equal(f"{tag} num_expanded_tokens", h.num_expanded_tokens, num_exp if sync else worst)
    assert_equal(f"{tag} recv_x rows", res.recv_x.shape[0], h.num_expanded_tokens)
    assert_equal(f"{tag} recv_topk_idx", res.recv_topk_idx, None)
    assert_equal(f"{tag} expanded recv_x", res.recv_x[:num_exp], exp.exp_data)
    if exp.exp_scales is not None:
        assert_equal(f"{tag} expanded scales", res.recv_x_scales[:num_exp], exp.exp_scales)  # type: ignore[index]
    if exp.exp_weights is not None:
        assert_equal(f"{tag} expanded weights", res.recv_topk_weights[:num_exp], exp.exp_weights)  # type: ignore[index]
    expanded_row = torch.tensor(exp.expanded_row, dtype=torch.int32).view(rows, case.num_topk)
    assert_equal(f"{tag} metadata lanes", h.recv_src_metadata[:rows, 2:], expanded_row)
    starts = [sum(exp.aligned[:i]) for i in range(per_rank)]
    psum = [s + c for s, c in zip(starts, exp.counts, strict=True)]
    assert_equal(f"{tag} psum per expert", h.psum_num_recv_tokens_per_expert.tolist(), psum)


def _combine_inputs(
    case: Case, exp: ExpectedDispatch, rank: int, num_rows: int, expand: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine input of ``rank`` with NaN in every row/lane combine must ignore."""
    gen = seeded(case.seed, rank, 7, int(expand))
    y = _wide(torch.randn(num_rows, case.hidden, generator=gen), gen)
    # Signed zeros tell "start from the first term" from "start from 0.0" apart.
    y[:, :2] = -0.0
    w = torch.rand(num_rows, case.num_topk, generator=gen) if case.with_weights else None
    nan = float("nan")
    if expand:
        used = torch.zeros(num_rows, dtype=torch.bool)
        for lanes in exp.expanded_row:
            for row in lanes:
                if row >= 0:
                    used[row] = True
        y[~used] = nan
        if w is not None:
            w = torch.where(used, w[:, 0], nan)
        return y, w
    y[exp.num_rows :] = nan
    if w is not None:
        local = torch.zeros(num_rows, case.num_topk, dtype=torch.bool)
        local[: exp.num_rows] = exp.recv_topk_idx >= 0
        w = torch.where(local, w, nan)
    return y, w


def run_case(
    backend: EPBackend,
    case: Case,
    rank: int,
    num_ranks: int,
    device: torch.device,
    reference: EPBackend | None = None,
) -> None:
    """Fresh, cached (and, with ``reference``, cross-backend) dispatch and combine of ``case``.

    Both layouts (non-expanded and expanded) run. Raises ``AssertionError`` on any mismatch.
    ``reference`` (e.g. the torch backend when ``backend`` is the NVLink one) must give
    bitwise-equal outputs on every defined row.
    """
    inputs: list[RankInputs] = [make_inputs(case, r, num_ranks) for r in range(num_ranks)]
    kwargs: dict[str, Any] = {
        "num_experts": case.num_experts,
        "num_max_tokens_per_rank": case.num_max_tokens_per_rank,
        "expert_alignment": case.expert_alignment,
    }
    expected = [
        expected_dispatch(
            [i.data for i in inputs],
            [i.scales for i in inputs],
            [i.topk_idx for i in inputs],
            [i.topk_weights for i in inputs],
            rank=d,
            **kwargs,
        )
        for d in range(num_ranks)
    ]
    mine = inputs[rank]
    data, scales = mine.data.to(device), _to(mine.scales, device)
    topk_idx, topk_weights = mine.topk_idx.to(device), _to(mine.topk_weights, device)
    gen = seeded(case.seed, rank, 11)
    bias = tuple(
        _wide(torch.randn(case.tokens_of(rank), case.hidden, generator=gen), gen)
        for _ in range(case.num_bias)
    )
    for expand in (False, True):
        tag = f"[{case.name} rank {rank} expand={expand}]"
        runs = [("", backend)] + ([(" vs reference", reference)] if reference is not None else [])
        results = []
        for suffix, be in runs:
            res = be.dispatch(
                data,
                scales,
                topk_idx,
                topk_weights,
                **kwargs,
                do_expand=expand,
                do_cpu_sync=case.do_cpu_sync,
                handle=None,
                num_sms=0,
            )
            _check_dispatch(tag + suffix, res, expected[rank], case, num_ranks, expand)
            cached = be.dispatch(
                data,
                scales,
                res.handle.topk_idx,
                topk_weights,
                **kwargs,
                do_expand=expand,
                do_cpu_sync=False,
                handle=res.handle,
                num_sms=0,
            )
            if cached.handle is not res.handle:
                raise AssertionError(f"{tag}{suffix} cached dispatch returned a new handle")
            _check_dispatch(
                tag + suffix + " cached", cached, expected[rank], case, num_ranks, expand
            )
            results.append(res)
        # Every rank's combine input, rebuilt here for the oracle.
        inputs_y, inputs_w = [], []
        for d in range(num_ranks):
            exp_d = expected[d]
            if expand:
                n = (
                    exp_d.num_expanded
                    if case.do_cpu_sync
                    else results[0].handle.num_expanded_tokens
                )
            else:
                n = exp_d.num_rows if case.do_cpu_sync else results[0].handle.num_recv_tokens
            y, w = _combine_inputs(case, exp_d, d, n, expand)
            inputs_y.append(y)
            inputs_w.append(w)
        want, want_w = expected_combine(
            expected,
            inputs_y,
            inputs_w,
            mine.topk_idx,
            bias,
            rank=rank,
            num_experts=case.num_experts,
            do_expand=expand,
        )
        for (suffix, be), res in zip(runs, results, strict=True):
            out, out_w = be.combine(
                inputs_y[rank].to(device),
                res.handle,
                _to(inputs_w[rank], device),
                tuple(b.to(device) for b in bias),
                0,
            )
            assert_equal(f"{tag}{suffix} combined_x", out, want)
            assert_equal(f"{tag}{suffix} combined weights", out_w, want_w)


def run_low_latency_case(
    backend: EPBackend,
    case: Case,
    rank: int,
    num_ranks: int,
    device: torch.device,
    *,
    use_fp8: bool,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> None:
    """Low-latency dispatch and weighted combine of ``case`` against the oracle.

    Raises ``AssertionError`` on any mismatch. The combine's ``out`` is poisoned first.
    """
    inputs = [make_inputs(case, r, num_ranks, salt=3) for r in range(num_ranks)]
    nmax = case.num_max_tokens_per_rank
    opts = {"use_fp8": use_fp8, "round_scale": round_scale, "use_ue8m0": use_ue8m0}
    expected = [
        expected_low_latency_dispatch(
            [i.x for i in inputs],
            [i.topk_idx for i in inputs],
            rank=d,
            num_experts=case.num_experts,
            num_max_dispatch_tokens_per_rank=nmax,
            **opts,
        )
        for d in range(num_ranks)
    ]
    mine, exp = inputs[rank], expected[rank]
    tag = (
        f"[{case.name} rank {rank} low-latency fp8={use_fp8} round={round_scale} ue8m0={use_ue8m0}]"
    )
    res, _ = backend.low_latency_dispatch(
        mine.x.to(device),
        mine.topk_idx.to(device),
        num_max_dispatch_tokens_per_rank=nmax,
        num_experts=case.num_experts,
        **opts,
    )
    assert_equal(f"{tag} recv_count", res.recv_count.tolist(), exp.counts)
    assert_equal(f"{tag} layout range", res.handle.recv_layout_range, exp.layout_range)
    for e, count in enumerate(exp.counts):
        assert_equal(f"{tag} recv_x[{e}]", res.recv_x[e, :count], exp.recv_data[e, :count])
        src = torch.tensor([t for _, t in exp.rows[e]], dtype=torch.int32)
        assert_equal(f"{tag} src_info[{e}]", res.handle.recv_src_info[e, :count], src)
        if exp.recv_scales is not None:
            got = None if res.recv_x_scales is None else res.recv_x_scales[e, :count]
            assert_equal(f"{tag} scales[{e}]", got, exp.recv_scales[e, :count])
    if exp.recv_scales is not None:
        scales = res.recv_x_scales
        if scales is None or scales.stride(1) != 1:
            strides = None if scales is None else scales.stride()
            raise AssertionError(f"{tag} scales missing or not column-major: strides {strides}")
    slots = num_ranks * nmax
    ys = []
    for d in range(num_ranks):
        gen = seeded(case.seed, d, 5)
        y = _wide(
            torch.randn(case.num_experts // num_ranks, slots, case.hidden, generator=gen), gen
        )
        y[:, :, :2] = -0.0
        for e, count in enumerate(expected[d].counts):
            y[e, count:] = float("nan")
        ys.append(y)
    gen = seeded(case.seed, rank, 6)
    # Exact weights (1, 0.5) keep w * 2^20 exact, so cancellations stay order-sensitive.
    weights = torch.rand(mine.topk_idx.shape, generator=gen)
    exact = torch.where(torch.rand(weights.shape, generator=gen) < 0.5, 1.0, 0.5)
    weights = torch.where(torch.rand(weights.shape, generator=gen) < 0.6, exact, weights)
    want = expected_low_latency_combine(
        expected, ys, mine.topk_idx, weights, rank=rank, num_experts=case.num_experts
    )
    out = torch.full_like(want, float("nan")).to(device)
    got, _ = backend.low_latency_combine(
        ys[rank].to(device), mine.topk_idx.to(device), weights.to(device), res.handle, out
    )
    assert_equal(f"{tag} combined", got, want)
