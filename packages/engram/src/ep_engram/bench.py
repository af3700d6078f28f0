"""Benchmark of Engram fetches: ``python -m ep_engram.bench``.

For each placement (host, gpu), row size (256 B, 2 KiB, 7168 B; BF16 rows) and CTA count, times
one fetch of ``T x K`` random rows through the intranode kernel (each variant), beside
``torch.index_select`` on the same mapped memory (all SMs) and beside the reference backend.
Prints progress lines to stderr, a table and JSON (``--json``) with rows per second (millions,
DeepEP's MPPS) and GB/s; ``--plot`` draws GB/s against CTAs (needs matplotlib).

    python -m ep_engram.bench                         # one GPU, the full sweep
    python -m ep_engram.bench --placements host --row-bytes 256 --ctas 4 8 16
    python -m ep_engram.bench --smoke                 # tiny, on CPU (reference backend only)
    python -m ep_engram.bench --placements host --row-bytes 256 --ctas 8 --probe --no-reference

``--variants`` picks the kernels (``ilp``, ``warp``, ``bulk``, ``tile``, ``ring``, ``ring_bulk``,
``tile_sorted``, ``wide``; ``--unrolls`` applies to ``ilp``, ``tile``, ``tile_sorted`` and
``wide``); after the table the bench prints which kernel meets which of the package's rate goals
with how many CTAs (one CTA per SM). ``--probe`` adds the same kernels launched directly with
random, sorted, small-footprint and sequential ids: for host placement on the host segment and on
a plain ``torch`` pinned table, for GPU placement on the segment (sequential ids: the kernels'
rate for one contiguous range). See :mod:`ep_engram._probe`.

Every configuration is first checked bit for bit against ``index_select``. Times are the median
of CUDA-event timings with the L2 flushed before each call (``ep_jit.testing.bench``); the hook's
host wait is off while timing (``EP_ENGRAM_CHECK_ERRORS=0``), so the numbers are the kernel's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ep_engram.kernels import UNROLLED, VARIANTS

__all__ = ["GOALS", "goal_report", "main"]

GOALS = (
    # (placement, smallest row bytes, largest row bytes or 0, GB/s at least, SMs at most)
    ("host", 256, 256, 40.0, 8),
    ("host", 2048, 0, 48.0, 4),
    ("gpu", 2048, 0, 600.0, 8),
)
"""Rate goals of the intranode kernel; :func:`goal_report` says which results meet them."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ep_engram.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--placements", nargs="+", default=["host", "gpu"], choices=["host", "gpu"])
    p.add_argument("--row-bytes", nargs="+", type=int, default=[256, 2048, 7168])
    p.add_argument("--ctas", nargs="+", type=int, default=[4, 8, 16, 32])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--unrolls",
        nargs="+",
        type=int,
        default=[8],
        help="EP_ENGRAM_UNROLL values (ilp and tile kernels)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="the kernels launched directly with random, sorted, small-footprint and sequential "
        "ids (host placement: on the host segment and on a torch pinned table)",
    )
    p.add_argument("--probe-ctas", nargs="+", type=int, default=[8], help="CTAs of --probe")
    p.add_argument(
        "--probe-unrolls",
        nargs="+",
        type=int,
        default=[2, 8],
        help="unrolls of --probe (unrolled variants): fewer and more rows in flight per SM",
    )
    p.add_argument(
        "--probe-row-bytes", nargs="+", type=int, default=[256], help="row sizes of --probe"
    )
    p.add_argument("--tokens", type=int, default=4096, help="T (DeepEP's test: 512)")
    p.add_argument("--k", type=int, default=24, help="rows per token (DeepEP's test: 24)")
    p.add_argument("--table-mib", type=int, default=2048, help="table size per rank, MiB")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip the reference backend")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (matplotlib)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, reference backend")
    args = p.parse_args(argv)
    if args.smoke:
        args.placements, args.row_bytes, args.ctas = ["host"], [256, 2048], [1]
        args.tokens, args.k, args.table_mib, args.iters, args.warmup = 16, 4, 1, 3, 1
    return args


def variant_runs(variants: Sequence[str], unrolls: Sequence[int]) -> list[tuple[str, int]]:
    """``(variant, unroll)`` pairs to measure: every unroll for the unrolled variants."""
    return [(v, u) for v in variants for u in (unrolls if v in UNROLLED else [1])]


def kernel_name(variant: str, unroll: int) -> str:
    """The result's ``kind``: ``kernel-<variant>[<unroll>]``."""
    return f"kernel-{variant}" + (f"{unroll}" if variant in UNROLLED else "")


def goal_report(results: list[dict[str, Any]]) -> list[str]:
    """One line per goal of :data:`GOALS`: the kernels (``kind`` at the fewest CTAs) meeting it.

    Only plain fetch measurements count (``kind`` starting with ``kernel-``, CTAs known).
    """
    lines = []
    for placement, lo, hi, gbps, sms in GOALS:
        rows = f"{lo} B rows" if hi == lo else f"rows of {lo} B or more"
        met: dict[tuple[str, int], tuple[int, float]] = {}
        for r in results:
            rb = r["row_bytes"]
            if r["placement"] != placement or rb < lo or (hi and rb > hi):
                continue
            if not str(r["kind"]).startswith("kernel-") or not r["ctas"] or r["ctas"] > sms:
                continue
            if r["gb_per_s"] < gbps:
                continue
            key = (r["kind"], rb)
            if key not in met or r["ctas"] < met[key][0]:
                met[key] = (r["ctas"], r["gb_per_s"])
        head = f"goal {placement}, {rows}: >= {gbps:g} GB/s with <= {sms} SMs:"
        if not met:
            lines.append(f"{head} not met")
            continue
        # tile_sorted's torch.sort runs before its kernel on every SM (a few microseconds).
        found = ", ".join(
            f"{kind} ({rb} B, {ctas} CTAs{' + sort' if 'sorted' in kind else ''}: {g:.1f} GB/s)"
            for (kind, rb), (ctas, g) in sorted(met.items())
        )
        lines.append(f"{head} MET by {found}")
    return lines


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rate(rows: int, row_bytes: int, seconds: float) -> dict[str, float]:
    return {
        "us": seconds * 1e6,
        "mrows_per_s": rows / seconds / 1e6,
        "gb_per_s": rows * row_bytes / seconds / 1e9,
    }


def _table_for(group: Any, placement: str, backend: str, row_bytes: int, mib: int) -> Any:
    from ep_engram import EngramTable

    hidden = row_bytes // 2
    entries = max(64, (mib << 20) // row_bytes)
    return EngramTable(group, entries, hidden, torch.bfloat16, placement, backend)


def _fill(table: Any) -> torch.Tensor:
    """Writes pattern rows; returns them (on the device for a CUDA table)."""
    e, rb = table.num_entries_per_rank, table.hidden * 2
    dev = table.device
    rows = torch.empty((e, rb), dtype=torch.uint8, device=dev)
    step = 1 << 16
    cols = torch.arange(rb, device=dev, dtype=torch.int32)
    for s in range(0, e, step):
        r = torch.arange(s, min(s + step, e), device=dev, dtype=torch.int32)
        rows[s : s + step] = ((r[:, None] * 131 + cols[None, :] * 7) & 255).to(torch.uint8)
    table.write(rows.view(torch.bfloat16))
    return rows


class _Recorder:
    """Collects results and prints one progress line per measurement."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def __call__(
        self, head: str, base: dict[str, Any], kind: str, ctas: int | None, s: float
    ) -> None:
        entry = {**base, "kind": kind, "ctas": ctas, **_rate(base["rows"], base["row_bytes"], s)}
        self.results.append(entry)
        where = f" ctas={ctas}" if ctas else ""
        _progress(
            f"{head} {kind}{where}: {entry['gb_per_s']:.1f} GB/s, "
            f"{entry['mrows_per_s']:.1f} M rows/s ({entry['us']:.1f} us) "
            f"[{time.perf_counter() - self.t0:.0f} s]"
        )


def _bench_table(
    info: Any, args: argparse.Namespace, backend: str, placement: str, row_bytes: int,
    head: str, seed: int, record: _Recorder,
) -> None:  # fmt: skip
    from ep_engram import knobs
    from ep_jit.testing import bench

    table = _table_for(info.group, placement, backend, row_bytes, args.table_mib)
    stored = _fill(table)
    rows_n = args.tokens * args.k
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, table.num_rows, (args.tokens, args.k), generator=gen).to(table.device)
    want = stored.index_select(0, idx.view(-1).to(stored.device))
    shape = (args.tokens, args.k * table.hidden)
    out = torch.empty(shape, dtype=torch.bfloat16, device=table.device)
    base = {"placement": placement, "row_bytes": row_bytes, "rows": rows_n}
    timing = {"warmup": args.warmup, "iters": args.iters, "device": table.device}
    if backend == "reference":
        data, _ = table.fetch(idx, out=out)()
        if not torch.equal(data.view(torch.uint8).view(rows_n, -1).cpu(), want.cpu()):
            raise AssertionError(f"{head} reference: wrong rows")
        stats = bench(lambda: table.fetch(idx, out=out)(), **timing)
        record(head, base, "reference", None, stats.median)
    else:
        mapped = table._backend.rows_view(info.rank)
        flat = idx.view(-1)
        got = torch.empty((rows_n, row_bytes), dtype=torch.uint8, device=table.device)
        torch.index_select(mapped, 0, flat, out=got)
        if not torch.equal(got, want):
            raise AssertionError(f"{head}: index_select on the mapped rows differs")
        stats = bench(lambda: torch.index_select(mapped, 0, flat, out=got), **timing)
        record(head, base, "index_select", None, stats.median)
        for variant, unroll in variant_runs(args.variants, args.unrolls):
            knobs.engram.kernel = variant
            knobs.engram.unroll = unroll
            name = kernel_name(variant, unroll)
            for ctas in args.ctas:
                out.view(torch.uint8).fill_(0xA5)
                data, _ = table.fetch(idx, out=out, num_ctas=ctas)()
                if not torch.equal(data.view(torch.uint8).view(rows_n, -1), want):
                    raise AssertionError(f"{head} {variant} ctas={ctas}: wrong rows")
                stats = bench(functools.partial(table.fetch, idx, out=out, num_ctas=ctas), **timing)
                record(head, base, name, ctas, stats.median)
        if args.probe and row_bytes in args.probe_row_bytes:
            from ep_engram._probe import probe_table

            probe_table(table, stored, args, head, base, record)
    table.destroy()
    del stored
    if info.device.type == "cuda":
        torch.cuda.empty_cache()


def _worker(info: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from ep_engram import knobs

    cuda = info.device.type == "cuda"
    knobs.engram.check_errors = False
    record = _Recorder()
    steps = len(args.placements) * len(args.row_bytes)
    step = 0
    for placement in args.placements:
        for row_bytes in args.row_bytes:
            step += 1
            head = f"[{step}/{steps}] {placement} {row_bytes} B rows"
            backends = (["intranode"] if cuda else []) + (
                [] if args.no_reference else ["reference"]
            )
            for backend in backends:
                _bench_table(info, args, backend, placement, row_bytes, head, step, record)
    return record.results


def _print_table(results: list[dict[str, Any]]) -> None:
    head = ("placement", "row B", "kind", "CTAs", "us", "M rows/s", "GB/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 6, 28, 5, 9, 9, 8), strict=True)))
    for r in results:
        ctas = str(r["ctas"]) if r["ctas"] else ("all" if "index_select" in r["kind"] else "-")
        print(
            f"{r['placement']:>9} {r['row_bytes']:>6} {r['kind']:>28} {ctas:>5} "
            f"{r['us']:>9.1f} {r['mrows_per_s']:>9.1f} {r['gb_per_s']:>8.1f}"
        )


def _plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _progress("no plot: matplotlib is not installed (pip install matplotlib)")
        return
    panels = sorted({(r["placement"], r["row_bytes"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (placement, rb) in zip(axes[0], panels, strict=True):
        mine = [r for r in results if r["placement"] == placement and r["row_bytes"] == rb]
        for kind in sorted({r["kind"] for r in mine}):
            pts = [r for r in mine if r["kind"] == kind]
            if pts[0]["ctas"] is None:
                ax.axhline(pts[0]["gb_per_s"], linestyle="--", label=f"{kind} (all SMs)")
            else:
                ax.plot(
                    [r["ctas"] for r in pts], [r["gb_per_s"] for r in pts], marker="o", label=kind
                )
        ax.set_title(f"{placement}, {rb} B rows")
        ax.set_xlabel("CTAs (SMs)")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _progress(f"plot written to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (one rank); returns the exit status."""
    from ep_jit.testing import run_ranks

    args = _parse(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        _progress("no CUDA device: running the CPU smoke mode (--smoke)")
        args = _parse([*(argv or []), "--smoke"])
    device = torch.cuda.get_device_name() if cuda else "cpu"
    _progress(
        f"ep_engram.bench on {device}: T={args.tokens} K={args.k}, {args.table_mib} MiB per table"
    )
    (results,) = run_ranks(1, _worker, args, use_gpu=cuda, timeout_s=3600)
    _print_table(results)
    goals = goal_report(results)
    for line in goals:
        print(line)
    payload = {
        "device": device,
        "torch": torch.__version__,
        "args": vars(args),
        "results": results,
        "goals": goals,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        _progress(f"JSON written to {args.json}")
    if args.plot:
        _plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
