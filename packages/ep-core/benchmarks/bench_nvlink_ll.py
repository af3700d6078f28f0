"""Latency of the NVLink low-latency kernels, with a per-phase trace (developer tool).

``ep-bench --mode low-latency`` is the user-facing benchmark. This script drives
:class:`ep_core.nvlink.ll.LowLatencyEngine` directly so launch variants can be compared in one
run: CTA counts, cooperative or plain launches. Every timed call is a CUDA-graph replay started
as in ep-bench (L2 flush, barrier, sleep kernel, one-element all-reduce as the start line, events
around the replay). After the timings one more replay of each graph records the kernels'
``%globaltimer`` trace (``LowLatencyEngine.enable_trace``), printed per phase as offsets from the
earliest CTA start of the rank (median and max over CTAs, worst rank). An empty kernel with the
same grid gives the launch floor of this timing method.

    PYTHONPATH=packages/jit/src:packages/ep-core/src \\
        python packages/ep-core/benchmarks/bench_nvlink_ll.py --tokens 1,128 --ctas 32,64
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ep_jit.testing import L2_FLUSH_BYTES, RankInfo, capture_graph, run_ranks, start_line


def _time(replay: Callable[[], object], iters: int, flush: torch.Tensor) -> list[float]:
    """Event time (us) of ``replay`` after a common GPU start line, ``iters`` times."""
    align = torch.zeros(1, device=flush.device)
    events = []
    for it in range(iters + 2):
        flush.zero_()
        start_line(align)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        if it >= 2:
            events.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 for a, b in events]


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2] if s else float("nan")


def _trace_rows(trace: torch.Tensor, names: dict[int, str]) -> dict[int, tuple[float, float]]:
    """Per point: (median, max) over CTAs of the offset (us) from the earliest CTA start."""
    t = trace.cpu().double()
    t0 = t[:, 0][t[:, 0] > 0].min()
    out = {}
    for p in names:
        col = t[:, p]
        col = col[col > 0]
        if col.numel():
            d = (col - t0) / 1e3
            out[p] = (float(d.median()), float(d.max()))
    return out


def _worker(info: RankInfo, args: argparse.Namespace) -> None:
    import ep_jit
    from ep_core.nvlink._common import register_include_root
    from ep_core.nvlink.ll import TRACE_NAMES, LowLatencyEngine

    register_include_root()
    if "probe" not in ep_jit.include_roots():
        ep_jit.register_include_root("probe", Path(__file__).parent)
    r, dev = info.world_size, info.device
    h, k, e = args.hidden, args.num_topk, args.num_experts
    tokens = [int(v) for v in args.tokens.split(",")]
    nmax = max(tokens)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=dev)
    results: list[dict] = []
    coops = [c == "1" for c in args.cooperative.split(",")]

    for ctas in [int(v) for v in args.ctas.split(",")]:
        # Launch floor: an empty kernel, same grid and block, as one graph node.
        empty = ep_jit.build(
            ep_jit.KernelSpec(
                name="probe_empty",
                includes=["probe/empty_probe.cuh"],
                template="probe::empty",
                params=["int64_t unused"],
                launch_bounds=(256, 1),
            )
        )
        for coop in coops:
            g = capture_graph(lambda: empty.launch((ctas, 1, 1), (256, 1, 1), 0, cooperative=coop))  # noqa: B023
            results.append(
                {
                    "op": "empty",
                    "ctas": ctas,
                    "coop": coop,
                    "tokens": 0,
                    "us": _median(_time(g.replay, args.iters, flush)),
                    "trace": {},
                }
            )
        for coop in coops:
            eng = LowLatencyEngine(
                info.group,
                rank=info.rank,
                num_ranks=r,
                num_max_dispatch_tokens_per_rank=nmax,
                hidden=h,
                num_experts=e,
                num_topk=k,
                device=dev,
                num_gpu_timeout_secs=30,
                num_sms=ctas,
                cooperative=coop,
            )
            trace = eng.enable_trace()
            for t in tokens:
                gen = torch.Generator(device=dev).manual_seed(1000 * info.rank + t)
                x = torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16)
                idx = torch.rand(t, e, device=dev, generator=gen).topk(k, dim=1).indices
                w = torch.rand(t, k, device=dev, generator=gen)
                res, _ = eng.dispatch(
                    x, idx, num_max_dispatch_tokens_per_rank=nmax, num_experts=e, use_fp8=True
                )
                y = torch.randn(e // r, r * nmax, h, device=dev).to(torch.bfloat16)
                out = torch.empty(t, h, dtype=torch.bfloat16, device=dev)
                kw = {"num_max_dispatch_tokens_per_rank": nmax, "num_experts": e}
                steps = {
                    "dispatch-fp8": partial(eng.dispatch, x, idx, use_fp8=True, **kw),
                    "dispatch-bf16": partial(eng.dispatch, x, idx, use_fp8=False, **kw),
                    "combine": partial(eng.combine, y, idx, w, res.handle, out=out),
                }
                for name, fn in steps.items():
                    g = capture_graph(fn)
                    us = _time(g.replay, args.iters, flush)
                    trace.zero_()
                    _time(g.replay, 1, flush)
                    kind = "combine" if name == "combine" else "dispatch"
                    results.append(
                        {
                            "op": name,
                            "ctas": ctas,
                            "coop": coop,
                            "tokens": t,
                            "us": _median(us),
                            "trace": _trace_rows(trace, TRACE_NAMES[kind]),
                        }
                    )
            torch.cuda.synchronize()
            dist.barrier()
            eng.destroy()

    gathered: list = [None] * r
    dist.all_gather_object(gathered, results)
    if info.rank != 0:
        return
    final = []
    for i, row in enumerate(results):
        us = max(g[i]["us"] for g in gathered)
        tr: dict[int, tuple[float, float]] = {}
        for g in gathered:
            for p, (med, mx) in g[i]["trace"].items():
                old = tr.get(p, (0.0, 0.0))
                tr[p] = (max(old[0], med), max(old[1], mx))
        final.append(dict(row, us=us, trace={str(p): v for p, v in sorted(tr.items())}))
    print(f"{'op':14s} {'ctas':>4s} {'coop':>4s} {'tok':>4s} {'us':>7s}  trace (point: med/max us)")
    for f in final:
        tr = " ".join(f"{p}:{m:.1f}/{x:.1f}" for p, (m, x) in f["trace"].items())
        head = f"{f['op']:14s} {f['ctas']:4d} {int(f['coop']):4d} {f['tokens']:4d}"
        print(f"{head} {f['us']:7.1f}  {tr}")
    print("trace points:", json.dumps(TRACE_NAMES))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": final}, fh, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=torch.cuda.device_count())
    p.add_argument("--tokens", default="1,32,128,256")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--ctas", default="128")
    p.add_argument("--cooperative", default="1,0", help="comma list of 1 (cooperative) / 0")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    run_ranks(args.num_processes, _worker, args, timeout_s=900)
    return 0


if __name__ == "__main__":
    sys.exit(main())
