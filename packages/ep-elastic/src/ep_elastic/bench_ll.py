"""Low-latency case of ``ep-bench``: ``low_latency_dispatch`` + ``low_latency_combine``.

The buffer under test works on fixed input tensors. On a GPU, unless its backend is the
reference one (``"torch"``, not graph-capturable), both calls are captured once in CUDA graphs and
every run (checks and timings) is a graph replay; fresh routing, tokens and combine rows are
copied into the captured input tensors before each checked replay. Each replay is compared with
the reference backend called on the same inputs: per-expert counts, the valid rows of every
expert (data and FP8 scales), and the combined tokens, all bit for bit. The baseline is the
``all_to_all_single`` pipeline at the same size (FP8 cast included when the dispatch casts), not
graph-captured since it synchronises the host.

A replay of a graph that holds one call also pays the graph's launch on the device (about 4-5 us
on an H200, more than an empty kernel takes). A serving step replays one graph holding many
calls, so each case also times graphs of :data:`IN_GRAPH_CALLS` dispatches and of as many
combines (of the last dispatch's handle), replayed whole, and reports the time per call
(``in_graph_us``): the kernel plus the gap to the next kernel, one launch shared by all.
"""

from __future__ import annotations

from typing import Any

import torch

from ep_elastic.bench_baseline import baseline_combine, baseline_dispatch
from ep_elastic.bench_cases import Case, make_tokens, tokens_in_rank
from ep_elastic.bench_context import RankContext, agree, cast_fp8, check_equal, measure, split_fp8
from ep_elastic.bench_report import IN_GRAPH_CALLS
from ep_elastic.bench_timing import kernel_times, speedup, time_repeated, time_steps

__all__ = ["CHECK_REPLAYS", "KERNELS", "run_ll_case"]

KERNELS = {"dispatch": ("ep_ll_dispatch",), "combine": ("ep_ll_combine",)}
"""Name prefixes of the NVLink backend's low-latency kernels (its kernel time, when it runs)."""

CHECK_REPLAYS = 3
"""Replays with fresh inputs compared with the reference in each low-latency case."""


def _hook(result: tuple[Any, ...]) -> None:
    """Calls the receive hook a low-latency call returns last, when there is one."""
    if callable(result[-1]):
        result[-1]()


class _LowLatencyRunner:
    """Runs the buffer's low-latency pair on fixed inputs, eagerly or as CUDA graph replays."""

    def __init__(
        self, buf: Any, inputs: dict[str, torch.Tensor], num_tokens: int, case_args: dict[str, Any]
    ) -> None:
        self.buf = buf
        self.inputs = inputs
        self.num_tokens = num_tokens
        self.case_args = case_args
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self.d_out: tuple[Any, ...] = ()
        self.c_out: tuple[Any, ...] = ()

    def _dispatch(self) -> None:
        i = self.inputs
        self.d_out = self.buf.low_latency_dispatch(
            i["x"],
            i["topk_idx"],
            self.num_tokens,
            self.case_args["num_experts"],
            use_fp8=self.case_args["use_fp8"],
        )
        _hook(self.d_out)

    def _combine(self) -> None:
        i = self.inputs
        self.c_out = self.buf.low_latency_combine(
            i["y"], i["topk_idx"], i["topk_weights"], self.d_out[2]
        )
        _hook(self.c_out)

    def capture(self, device: torch.device) -> None:
        """Warms up eagerly, then captures dispatch and combine in two graphs."""
        self._dispatch()
        self._combine()
        torch.cuda.synchronize(device)
        graph_d, graph_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may query events while the main thread captures.
        with torch.cuda.graph(graph_d, capture_error_mode="thread_local"):
            self._dispatch()
        with torch.cuda.graph(graph_c, capture_error_mode="thread_local"):
            self._combine()
        torch.cuda.synchronize(device)
        self.graphs = (graph_d, graph_c)

    def capture_chains(self, calls: int) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        """Two graphs: ``calls`` dispatches, and ``calls`` combines of the last one's handle.

        Call after the checks and timings of the one-call graphs: :attr:`d_out` then belongs to
        the last captured dispatch.
        """
        graph_d, graph_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_d, capture_error_mode="thread_local"):
            for _ in range(calls):
                self._dispatch()
        with torch.cuda.graph(graph_c, capture_error_mode="thread_local"):
            for _ in range(calls):
                self._combine()
        return graph_d, graph_c

    def dispatch(self) -> None:
        """One dispatch: a graph replay when captured; outputs in :attr:`d_out`."""
        if self.graphs is not None:
            self.graphs[0].replay()
        else:
            self._dispatch()

    def combine(self) -> None:
        """One combine of the last dispatch's handle; outputs in :attr:`c_out`."""
        if self.graphs is not None:
            self.graphs[1].replay()
        else:
            self._combine()


def _valid_rows(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows ``[V, *]`` of ``t`` ``[El, L, *]`` where ``valid`` ``[El, L]`` is set."""
    if t.dtype.is_floating_point and t.element_size() == 1:
        t = t.view(torch.uint8)
    return t[valid]


def _compare_dispatch(got: tuple[Any, ...], exp: tuple[Any, ...]) -> list[str]:
    if not check_equal(got[1], exp[1]):
        return ["ll_dispatch recv_count"]
    (got_x, got_s), (exp_x, exp_s) = split_fp8(got[0]), split_fp8(exp[0])
    valid = torch.arange(exp_x.shape[1], device=exp_x.device)[None, :] < exp[1][:, None].long()
    bad = []
    for name, a, b in (("recv_x", got_x, exp_x), ("recv_x_scales", got_s, exp_s)):
        if a is None or b is None:
            same = a is None and b is None
        else:
            same = a.shape == b.shape and check_equal(_valid_rows(a, valid), _valid_rows(b, valid))
        if not same:
            bad.append(f"ll_dispatch {name}")
    return bad


def _try_capture(ctx: RankContext, runner: _LowLatencyRunner) -> str:
    """Captures on every rank; returns ``""`` or why graphs are not used (same on all ranks)."""
    error: list[str] = []
    try:
        runner.capture(ctx.device)
    except Exception as exc:  # fall back to eager calls, reported in the table and the JSON
        error.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    failed = agree(ctx, error)
    if not failed:
        return ""
    runner.graphs = None
    note = f"CUDA graph capture failed, eager calls timed ({failed[0]})"
    ctx.log(f"      {note}")
    return note


def _time_in_graph(ctx: RankContext, runner: _LowLatencyRunner) -> dict[str, float]:
    """Per-call time (us, max over ranks of the medians) inside graphs of several calls."""
    error: list[str] = []
    try:
        chains = runner.capture_chains(IN_GRAPH_CALLS)
    except Exception as exc:  # a failed capture must not lose the case's other numbers
        error.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    failed = agree(ctx, error)
    if failed:
        ctx.log(f"      in-graph timing skipped ({failed[0]})")
        return {}
    steps = [("dispatch", chains[0].replay), ("combine", chains[1].replay)]
    t = time_steps(
        steps, iters=ctx.cfg.iters, warmup=ctx.cfg.warmup, device=ctx.device, group=ctx.group
    )
    del chains
    return {op: t[op].median_us / IN_GRAPH_CALLS for op in ("dispatch", "combine")}


def run_ll_case(
    ctx: RankContext, index: int, case: Case, buf: Any, ref: Any
) -> list[dict[str, Any]]:
    """Checks and times one low-latency case (collective).

    Args:
        ctx: The rank context.
        index: Position of the case in the sweep (seeds its inputs).
        case: The case (``mode == "ll"``); ``case.num_tokens`` is also the dispatch capacity.
        buf: The buffer under test.
        ref: A buffer on the reference backend with the same configuration.

    Returns:
        Two result records, ``dispatch`` and ``combine``, identical on every rank.
    """
    cfg = ctx.cfg
    n, hidden, num_ranks = case.num_tokens, cfg.hidden, ctx.num_ranks
    num_local = cfg.num_experts // num_ranks
    dev = ctx.device
    inputs = {
        "x": torch.empty(n, hidden, dtype=torch.bfloat16, device=dev),
        "topk_idx": torch.empty(n, cfg.num_topk, dtype=torch.int64, device=dev),
        "topk_weights": torch.empty(n, cfg.num_topk, dtype=torch.float32, device=dev),
        "y": torch.empty(num_local, num_ranks * n, hidden, dtype=torch.bfloat16, device=dev),
    }
    use_fp8 = case.dtype == "fp8"

    def fill(replay: int) -> None:
        gen = ctx.gen(index, replay)
        idx, weights = ctx.routing(n, gen)
        inputs["topk_idx"].copy_(idx)
        inputs["topk_weights"].copy_(weights)
        inputs["x"].copy_(make_tokens(n, hidden, gen=gen, device=dev))
        y = make_tokens(num_local * num_ranks * n, hidden, gen=gen, device=dev)
        inputs["y"].copy_(y.view(num_local, num_ranks * n, hidden))

    fill(0)
    runner = _LowLatencyRunner(buf, inputs, n, {"num_experts": cfg.num_experts, "use_fp8": use_fp8})
    graph_note = "reference backend: not captured, eager calls timed"
    backend_name = str(getattr(buf, "backend_name", cfg.backend))
    if not ctx.is_cuda:
        graph_note = "CPU: eager calls timed"
    elif backend_name != "torch":
        graph_note = _try_capture(ctx, runner) or "CUDA graph replays timed"

    bad: list[str] = []
    for replay in range(1, CHECK_REPLAYS + 1):
        fill(replay)
        runner.dispatch()
        exp = ref.low_latency_dispatch(
            inputs["x"], inputs["topk_idx"], n, cfg.num_experts, use_fp8=use_fp8
        )
        _hook(exp)
        bad += [f"{b} (replay {replay})" for b in _compare_dispatch(runner.d_out, exp)]
        runner.combine()
        exp_c = ref.low_latency_combine(
            inputs["y"], inputs["topk_idx"], inputs["topk_weights"], exp[2]
        )
        _hook(exp_c)
        if not check_equal(runner.c_out[0], exp_c[0]):
            bad.append(f"ll_combine combined_x (replay {replay})")
        del exp, exp_c
    bad_all = agree(ctx, bad)

    state: dict[str, Any] = {}

    def base_dispatch() -> None:
        x_in: Any = cast_fp8(inputs["x"]) if use_fp8 else (inputs["x"], None)
        state["base"] = baseline_dispatch(
            x_in[0],
            x_in[1],
            inputs["topk_idx"],
            inputs["topk_weights"],
            num_experts=cfg.num_experts,
            group=ctx.group,
        )

    base_dispatch()
    # Combine input of the baseline: one BF16 row per row its dispatch receives (M <= R * n).
    base_y = inputs["y"].view(-1, hidden)[: state.pop("base").recv_x.shape[0]]

    def base_combine() -> None:
        baseline_combine(base_y, state.pop("base").handle, None, group=ctx.group)

    steps = [
        ("dispatch", runner.dispatch),
        ("combine", runner.combine),
        ("base_dispatch", base_dispatch),
        ("base_combine", base_combine),
    ]
    t = time_repeated(
        steps,
        iters=cfg.iters,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        device=dev,
        group=ctx.group,
        log=ctx.progress_log,
    )
    kern = kernel_times(steps[:2], KERNELS, iters=min(cfg.iters, 10), device=dev, group=ctx.group)
    in_graph = _time_in_graph(ctx, runner) if runner.graphs is not None else {}

    idx = inputs["topk_idx"]
    selected = idx >= 0
    rows = int(selected.sum())
    remote = rows - int((selected & (idx // num_local == ctx.rank)).sum())
    in_rank = tokens_in_rank(idx, cfg.num_experts, num_ranks)
    base_rows = int(in_rank.sum())
    base_remote = base_rows - int(in_rank[:, ctx.rank].sum())
    d_logical = hidden + 4 * (hidden // 128) if use_fp8 else 2 * hidden
    row_bytes = {
        # DeepEP's low-latency test counts 16 metadata bytes per FP8 row.
        "dispatch": {"logical": d_logical, "deepep": d_logical + (16 if use_fp8 else 0)},
        "combine": {"logical": 2 * hidden, "deepep": 2 * hidden},
    }
    graph = runner.graphs is not None
    records = []
    for op in ("dispatch", "combine"):
        op_bad = [b for b in bad_all if f": ll_{op} " in b]
        records.append(
            {
                "case": f"{case.label}/{op}",
                "mode": "ll",
                "op": op,
                "dtype": case.dtype,
                "num_sms": 0,
                "num_sms_used": None,
                "num_tokens": n,
                "graph": graph,
                "graph_note": graph_note,
                "status": "FAIL" if op_bad else "PASS",
                "mismatches": op_bad,
                **measure(ctx, t[op], row_bytes[op], (rows, remote), kern[op]),
                "in_graph_us": in_graph.get(op),
                "in_graph_calls": IN_GRAPH_CALLS if op in in_graph else None,
                "baseline": {
                    "status": "not checked (different layout)",
                    "mismatches": [],
                    **measure(ctx, t[f"base_{op}"], row_bytes[op], (base_rows, base_remote)),
                },
                "speedup": speedup(t[op], t[f"base_{op}"]),
            }
        )
    runner.graphs = None
    return records
