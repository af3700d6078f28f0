"""High-throughput case of ``ep-bench``: ``dispatch`` + ``combine`` at one SM count.

One case draws this rank's routing and tokens (seeded by the dtype's first case, so every SM
count of a sweep moves the same data), then:

1. correctness: the buffer under test and the reference buffer dispatch the same input with a CPU
   sync; received data, FP8 scales, local top-k ids and weights must be equal on the valid rows.
   Both then combine the same random BF16 rows (with the received weights); ``combined_x`` and
   ``combined_topk_weights`` must be equal. The ``all_to_all_single`` baseline is checked against
   the reference in the same way.
2. timing: per iteration a dispatch then the combine of its handle, for the buffer and then for the
   baseline, each after a barrier, in ``--repeats`` repeats of ``--iters`` iterations
   (:func:`~ep_elastic.bench_timing.time_repeated`; the speedup's range is over the repeats);
   then the buffer's pair again under the profiler for the device time of its kernels
   (:func:`~ep_elastic.bench_timing.kernel_times`, as DeepEP times its kernels).
"""

from __future__ import annotations

from typing import Any

from ep_elastic.bench_baseline import baseline_combine, baseline_dispatch
from ep_elastic.bench_cases import Case, make_tokens, tokens_in_rank
from ep_elastic.bench_context import RankContext, agree, cast_fp8, check_equal, measure, split_fp8
from ep_elastic.bench_timing import kernel_times, speedup, time_repeated

__all__ = ["KERNELS", "run_ht_case"]

KERNELS = {"dispatch": ("ep_ht_layout", "ep_ht_dispatch"), "combine": ("ep_ht_combine",)}
"""Name prefixes of the NVLink backend's kernels of each call (its kernel time, when it runs)."""

_FIELDS = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights")


def _compare_dispatch(got: Any, exp: Any, rows: int, prefix: str) -> list[str]:
    """Names of the dispatch outputs of ``got`` that differ from ``exp`` on the first rows."""
    got_x, got_s = split_fp8(got[0])
    exp_x, exp_s = split_fp8(exp[0])
    pairs = zip(
        _FIELDS, (got_x, got_s, got[1], got[2]), (exp_x, exp_s, exp[1], exp[2]), strict=True
    )
    return [f"{prefix}dispatch {name}" for name, a, b in pairs if not check_equal(a, b, rows)]


def _compare_combine(got: Any, exp: Any, prefix: str) -> list[str]:
    names = ("combined_x", "combined_topk_weights")
    pairs = zip(names, (got[0], got[1]), (exp[0], exp[1]), strict=True)
    return [f"{prefix}combine {name}" for name, a, b in pairs if not check_equal(a, b)]


def run_ht_case(
    ctx: RankContext, case: Case, buf: Any, ref: Any, seed_index: int
) -> list[dict[str, Any]]:
    """Checks and times one high-throughput case (collective).

    Args:
        ctx: The rank context.
        case: The case (``mode == "ht"``).
        buf: The buffer under test.
        ref: A buffer on the reference backend with the same configuration.
        seed_index: Seeds the routing and data (the same for every SM count of a dtype).

    Returns:
        Two result records, ``dispatch`` and ``combine``, identical on every rank.
    """
    cfg = ctx.cfg
    gen = ctx.gen(seed_index)
    topk_idx, topk_w = ctx.routing(case.num_tokens, gen)
    x = make_tokens(case.num_tokens, cfg.hidden, gen=gen, device=ctx.device)
    x_in: Any = cast_fp8(x) if case.dtype == "fp8" else x
    data, scales = split_fp8(x_in)
    kw: dict[str, Any] = {
        "topk_idx": topk_idx,
        "topk_weights": topk_w,
        "num_experts": cfg.num_experts,
        "num_sms": case.num_sms,
        "do_cpu_sync": True,
    }

    out = buf.dispatch(x_in, **kw)
    exp = ref.dispatch(x_in, **kw)
    rows_valid = split_fp8(exp[0])[0].shape[0]
    rows_got = split_fp8(out[0])[0].shape[0]
    bad = _compare_dispatch(out, exp, rows_valid, "")
    y = make_tokens(rows_got, cfg.hidden, gen=gen, device=ctx.device)
    y_ref = (
        y[:rows_valid]
        if rows_got >= rows_valid
        else make_tokens(rows_valid, cfg.hidden, gen=gen, device=ctx.device)
    )
    comb_ref = ref.combine(y_ref, exp[3], topk_weights=exp[2])
    comb = buf.combine(y, out[3], topk_weights=out[2], num_sms=case.num_sms)
    bad += _compare_combine(comb, comb_ref, "")
    base = baseline_dispatch(
        data, scales, topk_idx, topk_w, num_experts=cfg.num_experts, group=ctx.group
    )
    base_x = base.recv_x if base.recv_scales is None else (base.recv_x, base.recv_scales)
    base_out = (base_x, base.recv_topk_idx, base.recv_topk_weights)
    base_bad = _compare_dispatch(base_out, exp, rows_valid, "baseline ")
    if base.recv_x.shape[0] != rows_valid:
        base_bad.append("baseline dispatch row count")
    base_bad += _compare_combine(
        baseline_combine(y_ref, base.handle, base.recv_topk_weights, group=ctx.group),
        comb_ref,
        "baseline ",
    )
    bad_all, base_bad_all = agree(ctx, bad), agree(ctx, base_bad)
    num_sms_used = int(getattr(out[3], "num_sms", 0) or case.num_sms)
    del out, exp, comb, comb_ref, base, base_x, base_out

    state: dict[str, Any] = {}

    def buf_dispatch() -> None:
        state["buf"] = buf.dispatch(x_in, **kw)

    def buf_combine() -> None:
        res = state.pop("buf")
        buf.combine(y, res[3], topk_weights=res[2], num_sms=case.num_sms)

    def base_dispatch() -> None:
        state["base"] = baseline_dispatch(
            data, scales, topk_idx, topk_w, num_experts=cfg.num_experts, group=ctx.group
        )

    def base_combine() -> None:
        res = state.pop("base")
        baseline_combine(y_ref, res.handle, res.recv_topk_weights, group=ctx.group)

    steps = [
        ("dispatch", buf_dispatch),
        ("combine", buf_combine),
        ("base_dispatch", base_dispatch),
        ("base_combine", base_combine),
    ]
    t = time_repeated(
        steps,
        iters=cfg.iters,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        device=ctx.device,
        group=ctx.group,
        log=ctx.progress_log,
    )
    kern = kernel_times(
        steps[:2], KERNELS, iters=min(cfg.iters, 10), device=ctx.device, group=ctx.group
    )

    in_rank = tokens_in_rank(topk_idx, cfg.num_experts, ctx.num_ranks)
    rows = int(in_rank.sum())
    remote = rows - int(in_rank[:, ctx.rank].sum())
    scale_bytes = scales.shape[1] * scales.element_size() if scales is not None else 0
    d_logical = cfg.hidden * data.element_size() + scale_bytes
    row_bytes = {
        # DeepEP adds the int64 top-k ids and float32 weights every dispatched row carries.
        "dispatch": {"logical": d_logical, "deepep": d_logical + 12 * cfg.num_topk},
        # ... and the float32 weights every combined row carries back.
        "combine": {"logical": 2 * cfg.hidden, "deepep": 2 * cfg.hidden + 4 * cfg.num_topk},
    }
    records = []
    for op in ("dispatch", "combine"):
        op_bad = [b for b in bad_all if f": {op} " in b]
        op_base_bad = [b for b in base_bad_all if f"baseline {op} " in b]
        records.append(
            {
                "case": f"{case.label}/{op}",
                "mode": "ht",
                "op": op,
                "dtype": case.dtype,
                "num_sms": case.num_sms,
                "num_sms_used": num_sms_used,
                "num_tokens": case.num_tokens,
                "graph": False,
                "status": "FAIL" if op_bad else "PASS",
                "mismatches": op_bad,
                **measure(ctx, t[op], row_bytes[op], (rows, remote), kern[op]),
                "baseline": {
                    "status": "FAIL" if op_base_bad else "PASS",
                    "mismatches": op_base_bad,
                    **measure(ctx, t[f"base_{op}"], row_bytes[op], (rows, remote)),
                },
                "speedup": speedup(t[op], t[f"base_{op}"]),
            }
        )
    return records
