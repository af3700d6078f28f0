"""Benchmark: all-gather on the copy engines beside NCCL, and what it costs a GEMM beside it.

    python -m cp_copyengine.bench                          # ranks = GPUs, 1 MiB .. 1 GiB per rank
    python -m cp_copyengine.bench --ranks 2 --ranks-per-gpu 2 --max-mib 64   # two ranks, one GPU
    python -m cp_copyengine.bench --cpu --ranks 2          # smoke test on CPU ranks (gloo)
    torchrun --nproc-per-node 8 -m cp_copyengine.bench --json ag.json --plot ag.png

For every size per rank and every mode (in place or not, batched or not) one session runs
``--tensors`` all-gathers of that size; the time is the session's (CUDA events after an L2
flush and a common start line for all ranks; the slowest rank's median), and GB/s is DeepEP's
measure: gathered bytes per rank per second (``R * size * tensors / time``). The baseline of the
same run is NCCL's ``all_gather_into_tensor`` (gloo's ``all_gather`` on CPU; none when ranks
share a GPU, where NCCL cannot run). With a GPU, ``gemm slowdown`` is how much longer a bf16
GEMM loop on another stream takes while the collective runs. The host cost of the API is
measured too: per ``all_gather`` call (the first of a session, and the later ones of the same
session: the steady state), per ``handle()`` and per session (create + destroy), input checks off
and on; ``--host-profile N`` prints where it goes (cProfile's N costliest functions). Progress
goes to stderr; ``--json`` writes every number; ``--plot`` draws GB/s by size (needs matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cp_copyengine import CopyEngineBuffer, knobs
from cp_copyengine.plan import align_up
from ep_jit.testing import RankInfo, run_from_env, run_ranks, start_line, time_steps

__all__ = ["main", "parse_args"]

MODES = [(False, False), (False, True), (True, False), (True, True)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m cp_copyengine.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--ranks", type=int, default=0, help="ranks to spawn (default: GPUs, or 2 on CPU)"
    )
    p.add_argument("--ranks-per-gpu", type=int, default=1, help="ranks sharing each GPU")
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo): a smoke test")
    p.add_argument("--backend", default="auto", choices=knobs.BACKEND_CHOICES)
    p.add_argument("--min-mib", type=float, default=None, help="smallest size per rank (MiB)")
    p.add_argument("--max-mib", type=float, default=None, help="largest size per rank (MiB)")
    p.add_argument("--tensors", type=int, default=4, help="all-gathers per session")
    p.add_argument(
        "--max-session-gib", type=float, default=8.0, help="cap of the session area per rank"
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-gemm", action="store_true", help="skip the concurrent GEMM column")
    p.add_argument("--gemm-n", type=int, default=8192, help="the GEMM is n x n x n bf16")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw GB/s by size into this image")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="profile the host cost loop (cProfile) and print its N costliest functions",
    )
    args = p.parse_args(argv)
    if args.min_mib is None:
        args.min_mib = 1 / 256 if args.cpu else 1.0
    if args.max_mib is None:
        args.max_mib = 1 / 16 if args.cpu else 1024.0
    if args.min_mib <= 0 or args.max_mib < args.min_mib:
        p.error("need 0 < --min-mib <= --max-mib")
    if args.tensors < 1 or args.iters < 1 or args.warmup < 0 or args.ranks < 0:
        p.error("--tensors and --iters must be >= 1, --warmup and --ranks >= 0")
    return args


def _sizes(args: argparse.Namespace) -> list[int]:
    sizes, s = [], int(args.min_mib * (1 << 20))
    while s <= int(args.max_mib * (1 << 20)):
        sizes.append(s)
        s *= 4
    return sizes


def _log(info: RankInfo, args: argparse.Namespace, text: str) -> None:
    if info.rank == 0 and not args.quiet:
        print(text, file=sys.stderr, flush=True)


class _Gemm:
    """A bf16 GEMM loop on its own stream, timed alone and beside a collective."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.stream = torch.cuda.Stream(device)
        self.run(None, 2)  # loads the GEMM kernels before any stream wait exists

    def run(self, beside: Callable[[], object] | None, count: int) -> float:
        """Seconds per GEMM of ``count`` GEMMs, while ``beside()`` runs on the current stream."""
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            start.record()
            for _ in range(count):
                torch.mm(self.a, self.b)
            end.record()
        if beside is not None:
            beside()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end)) * 1e-3 / count


def _worker(info: RankInfo, args: argparse.Namespace) -> dict[str, Any] | None:
    dev, world, group = info.device, info.world_size, info.group
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)
    gemm = _Gemm(dev, args.gemm_n) if cuda and not args.no_gemm else None
    start_line(torch.zeros(1, device=dev), group=group)  # loads its kernels before any wait
    sizes = _sizes(args)
    biggest = max(sizes)
    cap = int(args.max_session_gib * (1 << 30))
    tensors_for = {s: max(1, min(args.tensors, cap // (world * s))) for s in sizes}
    session_bytes = max(world * s * tensors_for[s] for s in sizes)
    nccl = cuda and "nccl" in str(dist.get_backend(group)).lower()
    with knobs.cp.scope():
        knobs.cp.check_inputs = False  # timing the transfers, not the cross-rank checks
        # 16 calls a session at least, so the host cost has a steady state to measure.
        buf = CopyEngineBuffer(group, session_bytes, max(args.tensors, 16), args.backend)
        rows: list[dict[str, Any]] = []
        plan = [(s, m) for s in sizes for m in MODES]
        began = time.monotonic()
        data = torch.randn(biggest * args.tensors // 4 + 1, device=dev).view(torch.uint8)
        for n, (size, (inplace, batched)) in enumerate(plan):
            t = tensors_for[size]
            xs = [data[i * size : (i + 1) * size] for i in range(t)]
            session = _session_fn(buf, xs, inplace, batched)
            timing = time_steps(
                [("prepare", session[0]), ("gather", session[1])],
                iters=args.iters,
                warmup=args.warmup,
                device=dev,
                group=group,
            )["gather"]
            sec = timing.median_us * 1e-6
            row = {
                "size_bytes": size,
                "tensors": t,
                "inplace": inplace,
                "batched": batched,
                "us_per_session": timing.median_us,
                "us_per_all_gather": timing.median_us / t,
                "gbps": world * size * t / sec / 1e9,
                "p10_us": timing.p10_us,
                "p90_us": timing.p90_us,
            }
            if gemm is not None:
                row["gemm_slowdown"] = _slowdown(gemm, _both(*session), sec)
            rows.append(row)
            done = n + 1
            eta = (time.monotonic() - began) / done * (len(plan) - done)
            _log(
                info,
                args,
                f"[{done}/{len(plan)}] {size / 2**20:9.3f} MiB in-place={int(inplace)} "
                f"batched={int(batched)}: {row['us_per_all_gather']:10.1f} us/all-gather "
                f"{row['gbps']:8.2f} GB/s" + _gemm_text(row) + f"  (eta {eta:.0f} s)",
            )
        baseline = _baseline(info, args, sizes, tensors_for, nccl, gemm)
        host, profiles = _host_cost(buf, dev, args)
        for name, text in profiles.items():
            _log(info, args, f"host profile of the API calls, input checks {name[7:]}:\n{text}")
        backend = buf.backend
        buf.destroy()
    if info.rank != 0:
        return None
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "world_size": world,
        "ranks_per_gpu": info.ranks_per_gpu,
        "backend": backend,
        "baseline_name": "nccl all_gather_into_tensor"
        if nccl
        else ("gloo all_gather" if not cuda else None),
        "rows": rows,
        "baseline": baseline,
        "host_cost_us": host,
        "host_profile": profiles,
    }


def _session_fn(
    buf: CopyEngineBuffer, xs: list[torch.Tensor], inplace: bool, batched: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(prepare: open the session, copy into the in-place views; gather: the timed part)."""
    state: dict[str, Any] = {}

    def prepare() -> None:
        buf.create_session()
        if inplace:
            views = buf.get_inplace_tensor([tuple(x.shape) for x in xs], torch.uint8)
            for v, x in zip(views, xs, strict=True):
                v.copy_(x)
            state["ins"] = list(views)
        else:
            state["ins"] = xs

    def gather() -> None:
        ins = state["ins"]
        handles = [buf.all_gather(ins)[1]] if batched else [buf.all_gather(x)[1] for x in ins]
        for h in handles:
            h()
        buf.destroy_session()

    return prepare, gather


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        first()
        second()

    return run


def _slowdown(gemm: _Gemm, collective: Callable[[], object], seconds: float) -> float:
    """Relative increase of a GEMM's time while ``collective`` runs (0.1 = 10 % slower)."""
    alone = gemm.run(None, 4)
    count = max(2, min(200, int(seconds / max(alone, 1e-6)) + 1))
    base = gemm.run(None, count)
    beside = gemm.run(collective, count)
    return beside / base - 1.0


def _gemm_text(row: dict[str, Any]) -> str:
    return f"  gemm +{100 * row['gemm_slowdown']:5.1f}%" if "gemm_slowdown" in row else ""


def _baseline(
    info: RankInfo,
    args: argparse.Namespace,
    sizes: list[int],
    tensors_for: dict[int, int],
    nccl: bool,
    gemm: _Gemm | None,
) -> list[dict[str, Any]]:
    dev, world, group = info.device, info.world_size, info.group
    if dev.type == "cuda" and not nccl:
        _log(info, args, "baseline: none (NCCL needs one GPU per rank)")
        return []
    rows = []
    for size in sizes:
        t = tensors_for[size]
        xs = [torch.zeros(size, dtype=torch.uint8, device=dev) for _ in range(t)]
        outs = [torch.empty(world * size, dtype=torch.uint8, device=dev) for _ in range(t)]

        def step(xs: list[torch.Tensor] = xs, outs: list[torch.Tensor] = outs) -> None:
            for x, o in zip(xs, outs, strict=True):
                if nccl:
                    dist.all_gather_into_tensor(o, x, group=group)
                else:
                    dist.all_gather(list(o.view(world, -1).unbind(0)), x, group=group)

        timing = time_steps(
            [("baseline", step)], iters=args.iters, warmup=args.warmup, device=dev, group=group
        )["baseline"]
        sec = timing.median_us * 1e-6
        row = {
            "size_bytes": size,
            "tensors": t,
            "us_per_all_gather": timing.median_us / t,
            "gbps": world * size * t / sec / 1e9,
        }
        if gemm is not None:
            row["gemm_slowdown"] = _slowdown(gemm, step, sec)
        rows.append(row)
        _log(
            info,
            args,
            f"baseline {size / 2**20:9.3f} MiB: {row['us_per_all_gather']:10.1f} us/all-gather "
            f"{row['gbps']:8.2f} GB/s" + _gemm_text(row),
        )
    return rows


def _host_cost(
    buf: CopyEngineBuffer, dev: torch.device, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, str]]:
    """Host microseconds of the API calls, input checks off and on, and (``--host-profile``)
    where they go.

    Per all_gather: the first call of a session (it also enqueues the wait for the peers' end of
    the last session) and the later calls of the same session (steady state), each a 1 KiB
    tensor, not in place; per session: ``create_session()`` + ``destroy_session()`` with no call
    between; per ``handle()`` call.
    """
    x = torch.zeros(1024, dtype=torch.uint8, device=dev)
    per_call = align_up(buf.world_size * x.numel())
    calls = max(1, min(buf.num_max_ops_per_session, buf.num_max_session_bytes // per_call))
    out: dict[str, float] = {}
    profiles: dict[str, str] = {}
    for checks in (False, True):
        knobs.cp.check_inputs = checks
        times: dict[str, list[float]] = {"first": [], "steady": [], "session": [], "handle": []}

        def loop(times: dict[str, list[float]] = times) -> None:
            for _ in range(max(args.iters, 3)):
                t0 = time.perf_counter()
                buf.create_session()
                buf.destroy_session()
                times["session"].append(time.perf_counter() - t0)
                buf.create_session()
                for k in range(calls):
                    t0 = time.perf_counter()
                    _, h = buf.all_gather(x)
                    t1 = time.perf_counter()
                    h()
                    times["handle"].append(time.perf_counter() - t1)
                    times["steady" if k else "first"].append(t1 - t0)
                buf.destroy_session()

        suffix = "checks_on" if checks else "checks_off"
        loop()
        if args.host_profile:  # a second pass: the profiler's overhead stays out of the numbers
            spare: dict[str, list[float]] = {k: [] for k in times}
            profiles[suffix] = _profiled(functools.partial(loop, spare), args.host_profile)
        for what, values in times.items():
            if values:
                name = f"all_gather_{what}" if what in ("first", "steady") else what
                out[f"{name}_{suffix}"] = statistics.median(values) * 1e6
    out["calls_per_session"] = float(calls)
    knobs.cp.check_inputs = False
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, profiles


def _profiled(fn: Callable[[], None], top: int) -> str:
    """Runs ``fn`` under cProfile; the ``top`` functions by own time, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"cp_copyengine.bench: {result['world_size']} ranks on {result['device']} "
        f"(ranks per GPU {result['ranks_per_gpu']}), backend {result['backend']}",
        f"{'MiB/rank':>9} {'inpl':>4} {'batch':>5} {'us/ag':>10} {'GB/s':>8} {'gemm':>7}"
        f" | {'base us/ag':>10} {'base GB/s':>9} {'base gemm':>9}",
    ]
    base = {r["size_bytes"]: r for r in result["baseline"]}
    for r in result["rows"]:
        b = base.get(r["size_bytes"], {})
        gemm = f"{100 * r['gemm_slowdown']:6.1f}%" if "gemm_slowdown" in r else "      -"
        bgemm = f"{100 * b['gemm_slowdown']:8.1f}%" if "gemm_slowdown" in b else "        -"
        bus = f"{b['us_per_all_gather']:10.1f}" if b else "         -"
        bgb = f"{b['gbps']:9.2f}" if b else "        -"
        lines.append(
            f"{r['size_bytes'] / 2**20:9.3f} {int(r['inplace']):>4} {int(r['batched']):>5} "
            f"{r['us_per_all_gather']:10.1f} {r['gbps']:8.2f} {gemm} | {bus} {bgb} {bgemm}"
        )
    host = result["host_cost_us"]
    for checks in ("off", "on"):
        key = f"checks_{checks}"
        steady = host.get(f"all_gather_steady_{key}")
        lines.append(
            f"host us, input checks {checks}: all_gather {host[f'all_gather_first_{key}']:.1f} "
            "(first of a session), "
            + (f"{steady:.1f} (steady state)" if steady is not None else "- (steady state)")
            + f"; handle() {host[f'handle_{key}']:.1f}; create+destroy session "
            f"{host[f'session_{key}']:.1f}"
        )
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot drawn", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for inplace, batched in MODES:
        rows = [r for r in result["rows"] if (r["inplace"], r["batched"]) == (inplace, batched)]
        label = f"copy engine, in place={int(inplace)} batched={int(batched)}"
        ax.plot(
            [r["size_bytes"] / 2**20 for r in rows], [r["gbps"] for r in rows], "o-", label=label
        )
    if result["baseline"]:
        rows = result["baseline"]
        ax.plot(
            [r["size_bytes"] / 2**20 for r in rows],
            [r["gbps"] for r in rows],
            "k--",
            label=result["baseline_name"],
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MiB per rank")
    ax.set_ylabel("GB/s (gathered bytes per rank)")
    ax.set_title(f"all-gather, {result['world_size']} ranks, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns rank 0's results (also printed, and written with --json)."""
    args = parse_args(argv)
    if knobs_torchrun():
        result = run_from_env(_worker, args, backend="gloo" if args.cpu else None)
        if result is None:
            return {}
    else:
        use_gpu = not args.cpu and torch.cuda.is_available()
        ranks = args.ranks or (torch.cuda.device_count() * args.ranks_per_gpu if use_gpu else 2)
        rpg = args.ranks_per_gpu if use_gpu else 1
        result = run_ranks(
            ranks, _worker, args, use_gpu=use_gpu, ranks_per_gpu=rpg, timeout_s=3600
        )[0]
    print(_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        _plot(result, args.plot)
    return result


def knobs_torchrun() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    from ep_jit import knobs as jit_knobs

    return jit_knobs.torchrun_env() is not None


if __name__ == "__main__":
    main()
