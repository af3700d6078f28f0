"""Probe of raw NVLink write throughput from SMs (developer tool, see docs/kernels.md).

Every rank writes ``rows`` rows into each of its peers at once; prints remote GB/s per GPU for
TMA bulk stores and for 16-byte lane stores at several SM counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ep_jit.testing import RankInfo, run_ranks


def _worker(info: RankInfo, args: argparse.Namespace) -> None:
    import ep_jit
    from ep_core import nvlink_kernels as nk

    nk.register_include_root()
    if "probe" not in ep_jit.include_roots():
        ep_jit.register_include_root("probe", Path(__file__).parent)
    r, rows, row_bytes = info.world_size, args.rows, args.row_bytes
    sym = ep_jit.SymmetricBuffer(info.group, r * rows * row_bytes, device=info.device)
    results = []
    for mode in (0, 1):
        for warps, slots in ((4, 4), (8, 2), (16, 1)) if mode == 0 else ((8, 1), (16, 1), (32, 1)):
            spec = ep_jit.KernelSpec(
                name="probe_peer_write",
                includes=["probe/peer_write_probe.cuh"],
                template="probe::peer_write",
                params=["const uint64_t* peers", "int64_t me", "int64_t num_ranks", "int64_t rows"],
                constants={"kMode": mode, "kWarps": warps, "kSlots": slots, "kRowBytes": row_bytes},
                launch_bounds=(warps * 32, 1),
            )
            k = ep_jit.build(spec)
            smem = (warps * slots if mode == 0 else 1) * row_bytes
            for sms in [int(s) for s in args.sms.split(",")]:

                def run(k=k, sms=sms, warps=warps, smem=smem) -> None:
                    k.launch(
                        (sms, 1, 1),
                        (warps * 32, 1, 1),
                        sym.peer_ptrs_dev,
                        info.rank,
                        r,
                        rows,
                        smem=smem,
                    )

                run()
                times = []
                for _ in range(args.iters):
                    dist.barrier()
                    torch.cuda.synchronize()
                    a, b = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    a.record()
                    run()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1e3)
                us = sorted(times)[len(times) // 2]
                gbps = (r - 1) * rows * row_bytes / us / 1e3
                results.append((mode, warps, slots, sms, us, gbps))
    allres = [None] * r
    dist.all_gather_object(allres, results)
    if info.rank == 0:
        print("mode(0=tma,1=st) warps slots sms  us  remoteGB/s(min over ranks)")
        for i, row in enumerate(results):
            worst = min(g[i][5] for g in allres)
            print(f"{row[0]} {row[1]:3d} {row[2]:2d} {row[3]:4d} {row[4]:8.1f} {worst:7.1f}")
    torch.cuda.synchronize()
    dist.barrier()
    sym.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=torch.cuda.device_count())
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--row-bytes", type=int, default=14336)
    p.add_argument("--sms", default="8,16,24,32,48")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    run_ranks(args.num_processes, _worker, args, timeout_s=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
