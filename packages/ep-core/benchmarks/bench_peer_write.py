"""Probe of raw NVLink throughput between GPUs (developer tool, see docs/kernels.md).

Every active rank moves ``rows`` rows of ``row_bytes`` to or from each of its partners at once,
and rank 0 prints GB/s per GPU for each way of moving them (``--modes``):

- ``tma``: TMA bulk stores from shared memory into the peer's buffer (push, SMs);
- ``st``: 16-byte lane stores into the peer's buffer (push, SMs);
- ``pull_tma``: TMA bulk loads from the peer's buffer into a shared-memory ring (pull, SMs);
- ``pull_ld``: 16-byte lane loads from the peer's buffer (pull, SMs);
- ``ce_push`` / ``ce_pull``: ``Tensor.copy_`` to / from the peer's buffer, one CUDA stream per
  peer, all started together (copy engines, no kernel of ours).

Patterns (``--pattern``): ``all`` (every rank with every peer at once, the all-to-all case),
``pair`` (data flows from rank 0 to rank 1 only: rank 0 pushes, or rank 1 pulls) and
``pair-bidir`` (ranks 0 and 1 both ways). Ranks outside the pattern launch nothing but join
every barrier. GB/s is the bytes each active GPU moves in one direction (sent by push modes,
received by pull modes) per microsecond of one step, the minimum over the active ranks.

    PYTHONPATH=packages/jit/src:packages/ep-core/src \
        python packages/ep-core/benchmarks/bench_peer_write.py --pattern all --sms 16,24,32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ep_jit.testing import RankInfo, run_ranks

KERNEL_MODES = {"tma": 0, "st": 1, "pull_tma": 2, "pull_ld": 3}
"""Kernel mode names and their ``kMode`` in ``probe/peer_write_probe.cuh``."""
CE_MODES = ("ce_push", "ce_pull")
PULL_MODES = frozenset({"pull_tma", "pull_ld", "ce_pull"})
MODES = (*KERNEL_MODES, *CE_MODES)
PATTERNS = ("all", "pair", "pair-bidir")

# (warps, slots) per block for each kernel mode. Slots: bulk copies in flight per warp (tma,
# pull_tma) or 16-byte loads in flight per lane (pull_ld); unused by st.
_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "tma": ((4, 4), (8, 2), (16, 1)),
    "st": ((8, 1), (16, 1), (32, 1)),
    "pull_tma": ((4, 4), (8, 2), (16, 1)),
    "pull_ld": ((8, 4), (16, 4), (32, 4), (16, 8)),
}
_MAX_THREADS = 1024


def peer_mask(pattern: str, rank: int, world_size: int, pull: bool) -> int:
    """The ranks this rank exchanges rows with, as a bit mask (bit ``d``: rank ``d``).

    Push modes write the rows into those ranks, pull modes read them from there; ``0`` means
    this rank sits the pattern out.

    Args:
        pattern: One of :data:`PATTERNS`.
        rank: This rank.
        world_size: Ranks in the job.
        pull: Whether the mode pulls (the data still flows from rank 0 to rank 1 in ``pair``).
    """
    if pattern == "all":
        return ((1 << world_size) - 1) & ~(1 << rank)
    if pattern == "pair-bidir":
        return {0: 1 << 1, 1: 1 << 0}.get(rank, 0)
    if pattern == "pair":
        if pull:
            return 1 << 0 if rank == 1 else 0
        return 1 << 1 if rank == 0 else 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def smem_bytes(mode: int, warps: int, slots: int, row_bytes: int) -> int:
    """Dynamic shared memory of one block of ``probe::peer_write<mode, warps, slots, ...>``."""
    if mode == 0:
        return warps * slots * row_bytes
    if mode == 1:
        return row_bytes
    if mode == 2:
        return warps * slots * (row_bytes + 8)  # ring slots, then one mbarrier per slot
    return 0


def _time_us(run: Callable[[], None], active: bool, sym: Any, iters: int) -> float | None:
    """Median microseconds of ``run`` on this rank (``None`` when inactive).

    Every rank takes part in every barrier, active or not; a GPU barrier right before the start
    event lines the GPUs up within microseconds, so the ranks' steps overlap.
    """
    if active:
        run()  # warm-up (first launch loads the module)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        sym.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if active:
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2] if active else None


def _ce_run(
    sym: Any,
    mode: str,
    mask: int,
    rank: int,
    nbytes: int,
    local: torch.Tensor,
    streams: list[torch.cuda.Stream],
) -> Callable[[], None]:
    """One copy per peer in ``mask``, each on its own stream, all waiting on the current one."""
    r = sym.world_size
    copies = []  # (dst, src)
    for k in range(1, r):
        d = (rank + k) % r
        if not (mask >> d) & 1:
            continue
        # The same rows the kernels move: peer d's buffer at rank * nbytes.
        remote = sym.peer_tensor(d, rank * nbytes, [nbytes], torch.uint8)
        mine = local[d * nbytes : (d + 1) * nbytes]
        copies.append((remote, mine) if mode == "ce_push" else (mine, remote))

    def run() -> None:
        cur = torch.cuda.current_stream()
        for (dst, src), s in zip(copies, streams, strict=False):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                dst.copy_(src, non_blocking=True)
        for s in streams[: len(copies)]:
            cur.wait_stream(s)

    return run


def _worker(info: RankInfo, args: argparse.Namespace) -> None:
    import ep_jit
    from ep_core.nvlink._common import register_include_root

    register_include_root()
    if "probe" not in ep_jit.include_roots():
        ep_jit.register_include_root("probe", Path(__file__).parent)
    r, rows, row_bytes = info.world_size, args.rows, args.row_bytes
    nbytes = rows * row_bytes
    modes = args.modes.split(",")
    sms_list = [int(s) for s in args.sms.split(",")]
    sym = ep_jit.SymmetricBuffer(info.group, r * nbytes, device=info.device)
    sink = torch.zeros(max(sms_list) * _MAX_THREADS, dtype=torch.int32, device=info.device)
    local = None
    if any(m in CE_MODES for m in modes):
        local = torch.full((r * nbytes,), 7, dtype=torch.uint8, device=info.device)
    streams = [torch.cuda.Stream(device=info.device) for _ in range(r - 1)]
    props = torch.cuda.get_device_properties(info.device)
    smem_limit = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for pattern in args.pattern.split(","):
        for mode in modes:
            mask = peer_mask(pattern, info.rank, r, mode in PULL_MODES)
            active = mask != 0
            moved = bin(mask).count("1") * nbytes
            row: dict[str, Any] = {"pattern": pattern, "mode": mode, "bytes": moved}
            if mode in CE_MODES:
                assert local is not None
                run = _ce_run(sym, mode, mask, info.rank, nbytes, local, streams)
                us = _time_us(run, active, sym, args.iters)
                results.append(dict(row, warps=None, slots=None, sms=None, us=us))
                continue
            kmode = KERNEL_MODES[mode]
            for warps, slots in _SHAPES[mode]:
                smem = smem_bytes(kmode, warps, slots, row_bytes)
                if smem > smem_limit:
                    skipped.append(f"{mode} {warps}x{slots} ({smem} B of shared memory)")
                    continue
                spec = ep_jit.KernelSpec(
                    name="probe_peer_write",
                    includes=["probe/peer_write_probe.cuh"],
                    template="probe::peer_write",
                    params=[
                        "const uint64_t* peers",
                        "int64_t me",
                        "int64_t num_ranks",
                        "int64_t rows",
                        "int64_t peer_mask",
                        "uint32_t* sink",
                    ],
                    constants={
                        "kMode": kmode,
                        "kWarps": warps,
                        "kSlots": slots,
                        "kRowBytes": row_bytes,
                    },
                    launch_bounds=(warps * 32, 1),
                )
                k = ep_jit.build(spec)
                for sms in sms_list:

                    def run(k=k, sms=sms, warps=warps, smem=smem, mask=mask) -> None:
                        k.launch(
                            (sms, 1, 1),
                            (warps * 32, 1, 1),
                            sym.peer_ptrs_dev,
                            info.rank,
                            r,
                            rows,
                            mask,
                            sink,
                            smem=smem,
                        )

                    us = _time_us(run, active, sym, args.iters)
                    results.append(dict(row, warps=warps, slots=slots, sms=sms, us=us))
    for res in results:
        res["gbps"] = res["bytes"] / res["us"] / 1e3 if res["us"] else None
    allres: list[list[dict[str, Any]] | None] = [None] * r
    dist.all_gather_object(allres, results)
    if info.rank == 0:
        _report(args, allres, sorted(set(skipped)), torch.cuda.get_device_name(info.device))
    torch.cuda.synchronize()
    dist.barrier()
    sym.destroy()


def _report(
    args: argparse.Namespace, allres: list[Any], skipped: list[str], device: str
) -> list[dict[str, Any]]:
    """Prints the table (min GB/s and max us over the active ranks) and writes ``--json``."""
    final = []
    for i, row in enumerate(allres[0]):
        per_rank = [g[i] for g in allres]
        active = [g for g in per_rank if g["us"] is not None]
        final.append(
            {
                "pattern": row["pattern"],
                "mode": row["mode"],
                "warps": row["warps"],
                "slots": row["slots"],
                "sms": row["sms"],
                "us": max(g["us"] for g in active) if active else None,
                "gbps": min(g["gbps"] for g in active) if active else None,
                "bytes_per_gpu": row["bytes"],
                "active_ranks": [rank for rank, g in enumerate(per_rank) if g["us"] is not None],
                "gbps_per_rank": [g["gbps"] for g in per_rank],
            }
        )

    def cell(v: Any, width: int, fmt: str = "d") -> str:
        return f"{'-':>{width}s}" if v is None else f"{v:{width}{fmt}}"

    print(f"{device}, {len(allres)} ranks, {args.rows} rows x {args.row_bytes} B per peer")
    print(
        f"{'pattern':10s} {'mode':8s} {'warps':>5s} {'slots':>5s} {'sms':>4s} {'us':>9s} "
        f"{'GB/s/GPU':>9s}"
    )
    for f in final:
        print(
            f"{f['pattern']:10s} {f['mode']:8s} {cell(f['warps'], 5)} {cell(f['slots'], 5)} "
            f"{cell(f['sms'], 4)} {cell(f['us'], 9, '.1f')} {cell(f['gbps'], 9, '.1f')}"
        )
    for s in skipped:
        print(f"skipped {s}: over the shared-memory limit")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "device": device, "world_size": len(allres), "rows": final},
                fh,
                indent=1,
            )
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=torch.cuda.device_count())
    p.add_argument("--rows", type=int, default=4096, help="rows per (rank, peer) pair")
    p.add_argument("--row-bytes", type=int, default=14336, help="multiple of 16")
    p.add_argument("--sms", default="8,16,24,32,48", help="comma list of blocks (one per SM)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--pattern", default="all", help=f"comma list of {', '.join(PATTERNS)} (default all)"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes")
    p.add_argument("--json", default="", help="also write the table's rows to this file")
    args = p.parse_args(argv)
    for name in args.modes.split(","):
        if name not in MODES:
            p.error(f"unknown mode {name!r}; expected some of {', '.join(MODES)}")
    for name in args.pattern.split(","):
        if name not in PATTERNS:
            p.error(f"unknown pattern {name!r}; expected some of {', '.join(PATTERNS)}")
    if args.row_bytes <= 0 or args.row_bytes % 16:
        p.error("--row-bytes must be a positive multiple of 16")
    if args.rows <= 0 or args.iters <= 0:
        p.error("--rows and --iters must be positive")
    if args.num_processes < 2:
        p.error("needs at least 2 processes (GPUs)")
    run_ranks(args.num_processes, _worker, args, timeout_s=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
