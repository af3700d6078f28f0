"""Host time of ElasticBuffer calls outside their kernels, on one GPU with 1 or more ranks.

    python tools/host_path.py [--ranks 1] [--tokens 512] [--hidden 7168] [--topk 8] [--experts 64]
                              [--calls 200] [--profile] [--phases] [--json out.json]

For each call kind (dispatch with CPU sync, cached dispatch, combine) it prints, per call:
  wall    host time from entering the call until it returns (the queue drained before each call;
          a dispatch with CPU sync returns after its kernels, so its wall includes them);
  kernel  GPU time of the call's kernels (torch profiler, summed per call);
  host    wall minus kernel for calls that wait for their kernels, else wall: the time the call
          costs the host beyond the GPU work;
  allocs  CUDA caching-allocator allocations per call (torch.cuda.memory_stats);
  loop    host time per call of calls made back to back without waiting in between (the host
          running ahead of the GPU, as in a training step; for the dispatch with CPU sync it
          includes the kernels).
With --profile, rank 0 also prints the functions with the most own time (cProfile) per kind.
With --phases (NVLink backend), rank 0 also prints, for the dispatch with CPU sync, when each
step returned, median microseconds from the call's start: the kernel launches, the count read's
copy enqueued, its wait done, and the call's return.
Ranks beyond one share the GPU (gloo group), so their kernel times include time slicing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ep_elastic import ElasticBuffer
from ep_jit.testing import RankInfo, run_ranks


def _kernel_us(fn: Callable[[], object], calls: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total += evt.device_time
    return total / calls


def _wall_us(fn: Callable[[], object], calls: int, group: dist.ProcessGroup) -> list[float]:
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return samples


def _loop_us(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _phases(buf: ElasticBuffer, fn: Callable[[], object], calls: int) -> dict[str, float]:
    """Median return time of each step of ``fn`` after its start (NVLink backend), in us."""
    from ep_core.nvlink import ht

    marks: list[tuple[str, float]] = []
    patched: list[tuple[Any, str, Any]] = []

    def mark_after(owner: Any, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            out = orig(*a, **k)
            marks.append((label, time.perf_counter()))
            return out

        patched.append((owner, name, orig))
        setattr(owner, name, wrapped)

    backend: Any = buf.backend  # the NVLink backend (its count read is wrapped)
    for name in ("launch_layout", "launch_dispatch"):
        mark_after(ht, name, name[len("launch_") :] + " launched")
    read = backend._read_counts

    def read_counts(block: torch.Tensor, n: int) -> Any:
        marks.append(("count read called", time.perf_counter()))
        out = read(block, n)
        marks.append(("count read done", time.perf_counter()))
        return out

    backend._read_counts = read_counts
    samples: dict[str, list[float]] = {}
    try:
        for _ in range(calls):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            fn()
            marks.append(("returned", time.perf_counter()))
            for label, t in marks:
                samples.setdefault(label, []).append((t - t0) * 1e6)
    finally:
        del backend._read_counts
        for owner, name, orig in patched:
            setattr(owner, name, orig)
    return {label: statistics.median(v) for label, v in samples.items()}


def _allocs(fn: Callable[[], object], calls: int) -> float:
    key = "allocation.all.allocated"
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats().get(key, 0)
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.memory_stats().get(key, 0) - before) / calls


def _hot(fn: Callable[[], object], calls: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def _worker(info: RankInfo, opts: dict[str, Any]) -> dict[str, Any]:
    rank, group, device = info.rank, info.group, info.device
    t, h, k, e = opts["tokens"], opts["hidden"], opts["topk"], opts["experts"]
    buf = ElasticBuffer(group, num_max_tokens_per_rank=t, hidden=h, num_topk=k, device=device)
    gen = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(t, h, generator=gen).to(device, torch.bfloat16)
    scores = torch.rand(t, e, generator=gen).to(device)
    topk_w, topk_idx = scores.topk(k, dim=-1)
    topk_w = topk_w.float()
    recv, _, _, handle, _ = buf.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=e, do_cpu_sync=True
    )

    assert isinstance(recv, torch.Tensor)  # bf16 dispatch
    recv_x = recv
    kinds: dict[str, tuple[Callable[[], object], bool]] = {
        "dispatch (cpu sync)": (
            lambda: buf.dispatch(
                x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=e, do_cpu_sync=True
            ),
            True,
        ),
        "dispatch (cached)": (lambda: buf.dispatch(x, handle=handle), False),
        "combine": (lambda: buf.combine(recv_x, handle), False),
    }
    calls = opts["calls"]
    result: dict[str, Any] = {"backend": buf.backend_name, "kinds": {}}
    for name, (fn, waits) in kinds.items():
        for _ in range(10):
            fn()
        wall = _wall_us(fn, calls, group)
        kernel = _kernel_us(fn, min(calls, 50))
        med = statistics.median(wall)
        entry: dict[str, Any] = {
            "wall_us": med,
            "wall_min_us": min(wall),
            "kernel_us": kernel,
            "host_us": med - kernel if waits else med,
            "allocs": _allocs(fn, min(calls, 20)),
            "loop_us": _loop_us(fn, calls),
        }
        if opts["phases"] and rank == 0 and waits and buf.backend_name == "nvlink":
            entry["phases_us"] = _phases(buf, fn, min(calls, 50))
        if opts["profile"] and rank == 0:
            entry["profile"] = _hot(fn, min(calls, 100))
        result["kinds"][name] = entry
    buf.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    opts = vars(args)
    # One rank: an NCCL group, as in production; several: a gloo group sharing the GPU.
    results = run_ranks(args.ranks, _worker, opts, use_gpu=True, ranks_per_gpu=args.ranks)
    first = results[0]
    print(
        f"ElasticBuffer host path, {torch.cuda.get_device_name()}, {args.ranks} rank(s) on one "
        f"GPU, {first['backend']} backend, T={args.tokens} H={args.hidden} k={args.topk} "
        f"E={args.experts}, {args.calls} calls"
    )
    print(
        f"  {'call':22s} {'wall us':>9s} {'kernel us':>10s} {'host us':>9s} {'allocs':>7s} "
        f"{'loop us':>8s}"
    )
    for name, entry in first["kinds"].items():
        print(
            f"  {name:22s} {entry['wall_us']:9.1f} {entry['kernel_us']:10.1f} "
            f"{entry['host_us']:9.1f} {entry['allocs']:7.1f} {entry['loop_us']:8.1f}"
        )
    for name, entry in first["kinds"].items():
        if "phases_us" in entry:
            steps = ", ".join(f"{k} {v:.1f}" for k, v in entry["phases_us"].items())
            print(f"  {name} phases (us from the start): {steps}")
    for name, entry in first["kinds"].items():
        if "profile" in entry:
            print(f"--- {name}: functions by own time (rank 0) ---")
            print(entry["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
