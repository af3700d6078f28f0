"""Benchmark of PipeBuffer per backend, beside torch.distributed send/recv in the same run.

    python -m pp_rdma.bench                          # CPU: gloo ranks, torch + nixl
    python -m pp_rdma.bench --ranks-per-gpu 2        # one GPU shared by both ranks
    python -m pp_rdma.bench --out bench.json --plot bench.png

Measures, between rank 0 and rank 1: one-way latency of a 4 KiB message (ping-pong / 2), and
bandwidth of a stream of messages from 1 MiB up to ``--max-mib``; on GPU also the slowdown of a
bf16 GEMM on a side stream of rank 0 while rank 0 sends (the "no SM" check: on one GPU the copy
engines and the GEMM still share HBM, so only a multi-GPU run shows the SM effect alone).
Timings are host wall clock after the last transfer is synchronised (stream included).
Progress goes to stderr, the JSON result to ``--out`` (or stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ep_jit.testing import RankInfo, run_ranks
from pp_rdma.buffer import PipeBuffer

__all__ = ["main"]

LATENCY_BYTES = 4096


def _log(info: RankInfo, text: str) -> None:
    if info.rank == 0:
        print(f"[pp_rdma.bench] {text}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        from ep_jit.hostwait import wait_stream

        wait_stream(what="bench step", timeout_s=120)


class _Baseline:
    """torch.distributed send/recv with the same calls as PipeBuffer (NCCL or gloo)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.staged = device.type == "cuda" and "nccl" not in str(dist.get_backend(group))

    def send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t.cpu() if self.staged else t, group=self.group, group_dst=dst)

    def recv(self, out: torch.Tensor, src: int) -> None:
        if self.staged:
            tmp = torch.empty(out.shape, dtype=out.dtype)
            dist.recv(tmp, group=self.group, group_src=src)
            out.copy_(tmp)
        else:
            dist.recv(out, group=self.group, group_src=src)

    def synchronize(self) -> None:
        pass

    def destroy(self) -> None:
        pass


def _latency(pipe: Any, info: RankInfo, iters: int) -> float:
    t = torch.zeros(LATENCY_BYTES, dtype=torch.uint8, device=info.device)
    peer = 1 - info.rank
    for _ in range(5):
        _pingpong(pipe, info, t, peer)
    _sync(info.device)
    dist.barrier(info.group)
    start = time.perf_counter()
    for _ in range(iters):
        _pingpong(pipe, info, t, peer)
    pipe.synchronize()
    _sync(info.device)
    return (time.perf_counter() - start) / (2 * iters) * 1e6


def _pingpong(pipe: Any, info: RankInfo, t: torch.Tensor, peer: int) -> None:
    if info.rank == 0:
        pipe.send(t, peer)
        pipe.recv(t, peer)
    else:
        pipe.recv(t, peer)
        pipe.send(t, peer)


def _bandwidth(pipe: Any, info: RankInfo, nbytes: int, reps: int) -> float:
    t = torch.ones(nbytes, dtype=torch.uint8, device=info.device)
    _stream(pipe, info, t, 2)
    dist.barrier(info.group)
    start = time.perf_counter()
    _stream(pipe, info, t, reps)
    elapsed = time.perf_counter() - start
    times: list[Any] = [None] * info.world_size
    dist.all_gather_object(times, elapsed, group=info.group)
    return nbytes * reps / max(float(x) for x in times) / 1e9


def _stream(pipe: Any, info: RankInfo, t: torch.Tensor, reps: int) -> None:
    for _ in range(reps):
        if info.rank == 0:
            pipe.send(t, 1)
        elif info.rank == 1:
            pipe.recv(t, 0)
    pipe.synchronize()
    _sync(info.device)


def _gemm_slowdown(pipe: Any, info: RankInfo, nbytes: int) -> float | None:
    """Percent slowdown of rank 0's GEMM loop on a side stream while it sends ``nbytes``."""
    if info.device.type != "cuda":
        return None
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=info.device)
    side = torch.cuda.Stream()
    t = torch.ones(nbytes, dtype=torch.uint8, device=info.device)

    def gemms(n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record()
            for _ in range(n):
                a @ a
            end.record()
        return start, end

    with torch.cuda.stream(side):
        a @ a  # loaded before any pending wait
    _sync(info.device)
    side.synchronize()
    alone = gemms(50)
    side.synchronize()
    dist.barrier(info.group)
    busy = gemms(50)
    _stream(pipe, info, t, 8)
    side.synchronize()
    ratio = float(busy[0].elapsed_time(busy[1])) / float(alone[0].elapsed_time(alone[1]))
    return (ratio - 1.0) * 100.0


def _worker(info: RankInfo, args: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sizes = []
    size = 1 << 20
    while size <= args["max_mib"] << 20:
        sizes.append(size)
        size *= 4 if size < (64 << 20) else 2
    for name in args["backends"]:
        if name == "baseline":
            pipe: Any = _Baseline(info.group, info.device)
            label = f"baseline ({dist.get_backend(info.group)} send/recv)"
        else:
            try:
                pipe = PipeBuffer(
                    info.group, sizes[-1], 2, backend=name, timeout_s=120, device=info.device
                )
            except ValueError as exc:
                _log(info, f"{name}: skipped ({exc})")
                rows.append({"backend": name, "skipped": str(exc)})
                continue
            label = name
        _log(info, f"{label}: latency at 4 KiB")
        row: dict[str, Any] = {
            "backend": label,
            "latency_us_4KiB": _latency(pipe, info, args["iters"]),
        }
        row["bandwidth_GBps"] = {}
        for nbytes in sizes:
            _log(info, f"{label}: bandwidth at {nbytes >> 20} MiB")
            reps = max(2, min(20, (256 << 20) // nbytes))
            row["bandwidth_GBps"][str(nbytes)] = _bandwidth(pipe, info, nbytes, reps)
        if info.device.type == "cuda":
            _log(info, f"{label}: concurrent GEMM")
            row["gemm_slowdown_pct"] = _gemm_slowdown(pipe, info, sizes[-1])
        pipe.destroy()
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['backend']:<36} skipped: {r['skipped']}")
            continue
        bw = ", ".join(f"{int(k) >> 20}M:{v:.2f}" for k, v in r["bandwidth_GBps"].items())
        gemm = r.get("gemm_slowdown_pct")
        extra = "" if gemm is None else f"  gemm +{gemm:.1f}%"
        lines.append(f"{r['backend']:<36} 4KiB {r['latency_us_4KiB']:8.1f} us  GB/s {bw}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module doc)."""
    parser = argparse.ArgumentParser(
        prog="python -m pp_rdma.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--backends", default=None, help="comma list; default: all + baseline")
    parser.add_argument(
        "--max-mib", type=int, default=None, help="largest message (default CPU 16, GPU 256)"
    )
    parser.add_argument("--iters", type=int, default=200, help="ping-pongs for the latency")
    parser.add_argument("--ranks-per-gpu", type=int, default=1, help="2: both ranks on one GPU")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks even where CUDA exists")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout)")
    parser.add_argument("--plot", default=None, help="PNG of bandwidth by size (matplotlib)")
    args = parser.parse_args(argv)
    use_gpu = torch.cuda.is_available() and not args.cpu
    names = (
        args.backends.split(",")
        if args.backends
        else (
            ["copy_engine", "nixl", "torch", "baseline"]
            if use_gpu
            else ["nixl", "torch", "baseline"]
        )
    )
    config = {
        "backends": names,
        "max_mib": args.max_mib or (256 if use_gpu else 16),
        "iters": args.iters,
    }
    results = run_ranks(
        2, _worker, config, use_gpu=use_gpu, ranks_per_gpu=args.ranks_per_gpu, timeout_s=3600
    )
    rows = results[0]
    meta = {
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu",
        "ranks_per_gpu": args.ranks_per_gpu,
    }
    text = json.dumps({"meta": meta, "rows": rows}, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(_table(rows), file=sys.stderr)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot needs matplotlib (pip install 'pp-rdma[plot]')", file=sys.stderr)
            return 1
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            if "bandwidth_GBps" in r:
                xs = [int(k) >> 20 for k in r["bandwidth_GBps"]]
                ax.plot(xs, list(r["bandwidth_GBps"].values()), marker="o", label=r["backend"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message MiB")
        ax.set_ylabel("GB/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
