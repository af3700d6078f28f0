"""Kernel-level timing of the NVLink high-throughput dispatch/combine (developer tool).

``ep-bench`` (ep-elastic) is the user-facing benchmark; this script drives the backend directly
so kernel variants can be compared quickly on the device machine:

    PYTHONPATH=packages/jit/src:packages/ep-core/src \
        python packages/ep-core/benchmarks/bench_nvlink_ht.py --num-processes 4 --sms 12,24 --graph
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from ep_jit.testing import RankInfo, capture_graph, run_ranks, start_line


def _time(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return times


def _kernel_us(fn, iters: int) -> dict[str, float]:
    """Mean device time per call of every kernel ``fn`` launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t:
            out[e.key[:40]] = t / iters
    return out


def _cpu_us(fn, iters: int) -> float:
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def _graph_us(fn, iters: int, label: str = "") -> float:
    """Median time of replaying ``fn`` captured in a CUDA graph (no host overhead).

    With a ``label``, also prints (rank 0) the device time of every kernel in the graph.
    """
    g = capture_graph(fn)
    us = _median(_time(g.replay, iters, 2))
    if label:
        kern = _kernel_us(g.replay, 5)
        if dist.get_rank() == 0:
            print(
                f"[graph kernels] {label}: "
                + "; ".join(f"{k}={v:.1f}" for k, v in sorted(kern.items(), key=lambda kv: -kv[1]))
            )
    return us


def _trace_summary(trace: torch.Tensor) -> dict[str, object]:
    """Per warp index and CTA parity, over CTAs: loop end, drain, waits and rows.

    ``trace`` is ``[CTAs, 32, 8]`` as the kernels write it (``ht_trace`` in
    smxx_ht_common.cuh): 0 start, 1 loop done, 2 drained (%globaltimer ns), 3..5 ns spent in
    the kernel's three kinds of wait, 6 rows handled. Times are us from the earliest start.
    Keys ``e<w>`` / ``o<w>``: warp ``w`` of the even / odd CTAs (the two roles of a split
    dispatch). ``raw`` keeps the whole tensor for offline analysis.
    """
    t = trace.cpu().double()
    started = t[:, :, 0] > 0
    t0 = t[:, :, 0][started].min()
    out: dict[str, object] = {
        "skew_us": float((t[:, :, 0][started].max() - t0) / 1e3),
        "raw": trace.cpu().tolist(),
    }
    for parity, name in ((0, "e"), (1, "o")):
        tp, sp = t[parity::2], started[parity::2]
        for w in range(32):
            if not bool(sp[:, w].any()):
                continue
            col = tp[:, w, :][sp[:, w]]
            end = (col[:, 1] - t0) / 1e3
            out[f"{name}{w}"] = {
                "loop_end": [round(float(end.median()), 1), round(float(end.max()), 1)],
                "drained_max": round(float(((col[:, 2] - t0) / 1e3).max()), 1),
                "wait_us": [round(float((col[:, p] / 1e3).median()), 1) for p in (3, 4, 5)],
                "rows": round(float(col[:, 6].median()), 1),
            }
    return out


def _traced(be, attr: str, fn, n_sms: int) -> dict[str, object]:
    """One CUDA-graph replay of ``fn`` with the backend's developer trace ``attr`` set.

    The graph is captured with the trace on; the timed replay starts on every rank at once (a
    sleep kernel, then a one-element all-reduce as the GPU start line), so the trace shows no
    host launch skew between ranks.
    """
    trace = torch.zeros((n_sms, 32, 8), dtype=torch.int64, device=be.device)
    setattr(be.ht, attr, trace)
    try:
        g = capture_graph(fn)
    finally:
        setattr(be.ht, attr, None)
    trace.zero_()
    start_line(torch.zeros(1, device=be.device))
    g.replay()
    torch.cuda.synchronize()
    return _trace_summary(trace)


def _check_same(label: str, ref, got) -> None:
    """Prints a line when a dispatch variant's outputs differ from the default's."""
    same = (
        torch.equal(ref.recv_x.view(torch.uint8), got.recv_x.view(torch.uint8))
        and torch.equal(ref.recv_topk_idx, got.recv_topk_idx)
        and torch.equal(ref.handle.recv_src_metadata, got.handle.recv_src_metadata)
        and (ref.recv_x_scales is None or torch.equal(ref.recv_x_scales, got.recv_x_scales))
        and (
            ref.recv_topk_weights is None
            or torch.equal(ref.recv_topk_weights, got.recv_topk_weights)
        )
    )
    if not same:
        print(f"[rank {dist.get_rank()}] MISMATCH {label}", flush=True)


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2]


def _worker(info: RankInfo, args: argparse.Namespace, out: list) -> None:
    from ep_core.backend import BackendConfig
    from ep_core.fp8 import per_token_cast_to_fp8
    from ep_core.nvlink import NvlinkBackend

    r, dev = info.world_size, info.device
    t, h, k, e = args.num_tokens, args.hidden, args.num_topk, args.num_experts
    cfg = BackendConfig(
        rank=info.rank,
        num_ranks=r,
        device=dev,
        num_bytes=0,
        num_max_tokens_per_rank=t,
        hidden=h,
        num_topk=k,
        use_fp8_dispatch=True,
        num_cpu_timeout_secs=60,
        num_gpu_timeout_secs=60,
    )
    be = NvlinkBackend.from_config(info.group, cfg)
    gen = torch.Generator(device=dev).manual_seed(info.rank)
    x = torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16)
    scores = torch.rand(t, e, device=dev, generator=gen)
    idx = scores.topk(k, dim=1).indices.to(torch.int64)
    w = torch.rand(t, k, device=dev, generator=gen)
    xq, sf = per_token_cast_to_fp8(x)
    rows = []
    dcfgs = [tuple(int(v) for v in c.split(",") if v) for c in args.dispatch_configs.split(";")]
    ccfgs = [tuple(int(v) for v in c.split(",") if v) for c in args.combine_configs.split(";")]
    for n_sms in [int(s) for s in args.sms.split(",")]:
        for dtype in args.dtypes.split(","):
            # One eager dispatch per (SMs, format): the handle, row counts and bytes per row.
            xin, sin = (xq, sf) if dtype == "fp8" else (x, None)
            kw = {
                "num_experts": e,
                "num_max_tokens_per_rank": t,
                "expert_alignment": 1,
                "do_expand": False,
                "handle": None,
                "num_sms": n_sms,
            }
            res = be.dispatch(xin, sin, idx, w, do_cpu_sync=True, **kw)
            m = res.handle.num_recv_tokens
            row_bytes = h * xin.element_size() + (0 if sin is None else sin.shape[1] * 4)
            remote = m - int((res.handle.recv_src_metadata[:, 1] == info.rank).sum())
            if args.graph:
                from ep_core.nvlink import ht as nk
                from ep_core.nvlink.layout import dispatch_payload_bytes

                payload = dispatch_payload_bytes(
                    h * xin.element_size(), 0 if sin is None else sin.shape[1], k
                )
                for dcfg in dcfgs:
                    if (
                        len(dcfg) >= 4
                        and nk.DispatchConfig.from_override(dcfg, payload, r).smem_bytes(e // r)
                        > nk.SMEM_LIMIT
                    ):
                        continue
                    be.ht.dispatch_override = dcfg if len(dcfg) >= 4 else None
                    _check_same(
                        f"dispatch-{dtype}-{dcfg}",
                        res,
                        be.dispatch(xin, sin, idx, w, do_cpu_sync=True, **kw),
                    )
                    gu = _graph_us(
                        lambda: be.dispatch(xin, sin, idx, w, do_cpu_sync=False, **kw),  # noqa: B023
                        args.iters,
                        f"dispatch-{dtype}-{dcfg}" if args.profile else "",
                    )
                    rows.append(
                        {
                            "op": f"graph-dispatch-{dtype}-{'x'.join(map(str, dcfg)) or 'auto'}",
                            "sms": n_sms,
                            "us": gu,
                            "us_sync": gu,
                            "recv_rows": m,
                            "remote_rows": remote,
                            "row_bytes": row_bytes,
                            "trace": _traced(
                                be,
                                "trace_dispatch",
                                lambda: be.dispatch(xin, sin, idx, w, do_cpu_sync=False, **kw),  # noqa: B023
                                n_sms,
                            )
                            if args.trace
                            else {},
                        }
                    )
                be.ht.dispatch_override = None
                if dtype == "bf16":
                    y = torch.randn(res.recv_x.shape, device=dev).to(torch.bfloat16)
                    be.ht.combine_override = None
                    ref_out = be.combine(y, res.handle, None, (), n_sms)[0].clone()
                    for ccfg in ccfgs:
                        be.ht.combine_override = ccfg if len(ccfg) >= 3 else None
                        got = be.combine(y, res.handle, None, (), n_sms)[0]
                        if not torch.equal(got, ref_out):
                            print(f"[rank {info.rank}] MISMATCH combine-{ccfg}", flush=True)
                        gu = _graph_us(
                            lambda: be.combine(y, res.handle, None, (), n_sms),  # noqa: B023
                            args.iters,
                            f"combine-{ccfg}" if args.profile else "",
                        )
                        rows.append(
                            {
                                "op": f"graph-combine-{'x'.join(map(str, ccfg)) or 'auto'}",
                                "sms": n_sms,
                                "us": gu,
                                "us_sync": gu,
                                "recv_rows": m,
                                "remote_rows": remote,
                                "row_bytes": h * 2,
                                "trace": _traced(
                                    be,
                                    "trace_combine",
                                    lambda: be.combine(y, res.handle, None, (), n_sms),  # noqa: B023
                                    n_sms,
                                )
                                if args.trace
                                else {},
                            }
                        )
                    be.ht.combine_override = None
            if args.graph_only:
                continue
            td = _time(
                lambda: be.dispatch(xin, sin, idx, w, do_cpu_sync=False, **kw),  # noqa: B023
                args.iters,
                args.warmup,
            )
            ts = _time(
                lambda: be.dispatch(xin, sin, idx, w, do_cpu_sync=True, **kw),  # noqa: B023
                args.iters,
                args.warmup,
            )
            if args.profile:
                f = lambda: be.dispatch(xin, sin, idx, w, do_cpu_sync=False, **kw)  # noqa: B023, E731
                if info.rank == 0 and dtype == "fp8" and n_sms == int(args.sms.split(",")[0]):
                    import cProfile
                    import pstats

                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(20):
                        f()
                    pr.disable()
                    torch.cuda.synchronize()
                    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
                kern = _kernel_us(f, 5)
                cpu = _cpu_us(f, 5)
                if info.rank == 0:
                    print(
                        f"[profile] dispatch-{dtype} sms={n_sms} T={t}: cpu/call {cpu:.0f} us; "
                        + "; ".join(
                            f"{k}={v:.0f}"
                            for k, v in sorted(kern.items(), key=lambda kv: -kv[1])[:8]
                        ),
                        flush=True,
                    )
            rows.append(
                {
                    "op": f"dispatch-{dtype}",
                    "sms": n_sms,
                    "us": _median(td),
                    "us_sync": _median(ts),
                    "recv_rows": m,
                    "remote_rows": remote,
                    "row_bytes": row_bytes,
                }
            )
            if dtype == "bf16":
                y = torch.randn(res.recv_x.shape, device=dev, dtype=torch.float32).to(
                    torch.bfloat16
                )
                tc = _time(
                    lambda: be.combine(y, res.handle, None, (), n_sms),  # noqa: B023
                    args.iters,
                    args.warmup,
                )
                if args.profile:
                    f = lambda: be.combine(y, res.handle, None, (), n_sms)  # noqa: B023, E731
                    kern = _kernel_us(f, 5)
                    cpu = _cpu_us(f, 5)
                    if info.rank == 0:
                        print(
                            f"[profile] combine sms={n_sms} T={t}: cpu/call {cpu:.0f} us; "
                            + "; ".join(
                                f"{k}={v:.0f}"
                                for k, v in sorted(kern.items(), key=lambda kv: -kv[1])[:8]
                            ),
                            flush=True,
                        )
                rows.append(
                    {
                        "op": "combine",
                        "sms": n_sms,
                        "us": _median(tc),
                        "us_sync": _median(tc),
                        "recv_rows": m,
                        "remote_rows": remote,
                        "row_bytes": h * 2,
                    }
                )
    # NCCL baseline: all_to_all_single moving the same bytes as the bf16 dispatch.
    m = max(rw["recv_rows"] for rw in rows)
    buf = torch.empty(m * h * 2, dtype=torch.uint8, device=dev)
    recv = torch.empty_like(buf)
    tb = _time(lambda: dist.all_to_all_single(recv, buf), args.iters, args.warmup)
    rows.append(
        {
            "op": "nccl-a2a-bf16",
            "sms": 0,
            "us": _median(tb),
            "us_sync": _median(tb),
            "recv_rows": m,
            "remote_rows": m * (r - 1) // r,
            "row_bytes": h * 2,
        }
    )
    # Worst rank decides.
    gathered = [None] * r
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        final = []
        for i, row in enumerate(rows):
            us = max(g[i]["us"] for g in gathered)
            us_sync = max(g[i]["us_sync"] for g in gathered)
            rr = min(g[i]["recv_rows"] for g in gathered)
            rem = min(g[i]["remote_rows"] for g in gathered)
            final.append(
                dict(
                    row,
                    us=us,
                    us_sync=us_sync,
                    gbps=rr * row["row_bytes"] / us / 1e3,
                    gbps_sync=rr * row["row_bytes"] / us_sync / 1e3,
                    nvlink_gbps=rem * row["row_bytes"] / us / 1e3,
                    trace=[g[i].get("trace", {}) for g in gathered],
                )
            )
        print(
            f"{'op':16s} {'sms':>4s} {'us':>9s} {'GB/s':>8s} {'us(sync)':>9s} "
            f"{'GB/s(sync)':>10s} {'NVL GB/s':>9s}"
        )
        for f in final:
            print(
                f"{f['op']:16s} {f['sms']:4d} {f['us']:9.1f} {f['gbps']:8.1f} {f['us_sync']:9.1f} "
                f"{f['gbps_sync']:10.1f} {f['nvlink_gbps']:9.1f}"
            )
        for i, row in enumerate(rows):
            if row.get("trace"):
                # Per warp index (median over CTAs): loop end med/max | drained max,
                # waits 3/4/5 (us), rows. Every rank.
                for rk, g in enumerate(gathered):
                    tr = g[i]["trace"]
                    print(
                        f"  trace {row['op']} sms={row['sms']} rank {rk}: skew "
                        f"{tr['skew_us']:.1f} us"
                    )
                    for k, v in tr.items():
                        if k[0] in "eo" and k[1:].isdigit():
                            wt = "/".join(f"{x:.0f}" for x in v["wait_us"])
                            print(
                                f"    {k:>3s} end {v['loop_end'][0]:.0f}/{v['loop_end'][1]:.0f}"
                                f"|{v['drained_max']:.0f} waits {wt} rows {v['rows']:.0f}"
                            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {"args": vars(args), "rows": final, "device": torch.cuda.get_device_name()},
                    fh,
                    indent=1,
                )
    be.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=torch.cuda.device_count())
    p.add_argument("--num-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--sms", default="24")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--profile", action="store_true", help="print kernel times (torch profiler)")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    p.add_argument("--graph-only", action="store_true", help="only the CUDA-graph timings")
    p.add_argument(
        "--dispatch-configs",
        default="",
        help="';'-separated send_warps,recv_warps,send_slots,recv_slots ('' = auto)",
    )
    p.add_argument("--combine-configs", default="", help="';'-separated push,reduce,slots")
    p.add_argument(
        "--trace",
        action="store_true",
        help="with --graph: per-warp kernel timeline of one eager call per config",
    )
    args = p.parse_args(argv)
    run_ranks(args.num_processes, _worker, args, [], timeout_s=900)
    return 0


if __name__ == "__main__":
    sys.exit(main())
