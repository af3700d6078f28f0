"""``ep-bench``: correctness and speed of ElasticBuffer's dispatch/combine on this host.

Starts one rank per local GPU (NCCL), or 4 CPU ranks over gloo when there is none, runs
``dispatch``/``combine`` (``--mode ht``) and ``low_latency_dispatch``/``low_latency_combine``
(``--mode ll``) for a MoE shape, checks every result bit for bit against the reference backend
(``backend="torch"``), and times it beside a plain ``all_to_all_single`` pipeline in the same
run. Prints a table (and PASS/FAIL per case); exits 1 on any mismatch, 2 on bad options::

    ep-bench                                   # 4096 tokens/rank, H=7168, top-8 of 256, FP8
    ep-bench --num-sms 0,16,24,32,48,64 --plot sweep.png --json sweep.json
    ep-bench --mode ll --ll-tokens 1,32,128,256 --dtype both
    ep-bench --quick                           # small shapes: a CPU smoke run
    python -m ep_elastic.bench --help

Without GPUs the shape defaults are smaller (512 tokens/rank, H=2048, top-8 of 64), with a note
saying so: the GPU shapes take many minutes on CPUs. Timing: CUDA events around each whole call
after warm-up, an L2 flush and a ``dist.barrier()`` before every timed call, in ``--repeats``
repeats of ``--iters`` calls; each repeat's time is the max over ranks of each rank's median
(p10/p90 likewise), the median over the repeats is reported, and the speedup over the baseline
with its range over the repeats. A case that runs for more than a few seconds prints its
progress (iterations, time left). Byte counting is explained under the table and in the JSON
(``byte_counting``). Ctrl-C stops every rank and exits with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ep_core.validation import check_hidden
from ep_elastic.bench_cases import ROUTINGS, BenchConfig, check_routing, enumerate_cases
from ep_elastic.bench_context import (
    RankContext,
    destroy_buffer,
    device_name,
    make_buffer,
)
from ep_elastic.bench_ht import run_ht_case
from ep_elastic.bench_ll import run_ll_case
from ep_elastic.bench_plot import require_matplotlib, write_plot
from ep_elastic.bench_report import TABLE_WIDTH, build_document, format_table, write_json
from ep_elastic.bench_timing import format_seconds
from ep_jit.testing import RankInfo, run_ranks

__all__ = [
    "INTERRUPTED_STATUS",
    "build_parser",
    "defaults_note",
    "main",
    "resolve_config",
    "run_bench_rank",
]

CPU_RANKS = 4
"""Ranks started on a host without GPUs."""

_DEFAULTS: dict[str, Any] = {
    "num_tokens": 4096,
    "hidden": 7168,
    "num_topk": 8,
    "num_experts": 256,
    "num_sms": "0",
    "ll_tokens": "1,32,128,256",
    "iters": 20,
    "warmup": 5,
    "repeats": 5,
}
_CPU: dict[str, Any] = {
    "num_tokens": 512,
    "hidden": 2048,
    "num_topk": 8,
    "num_experts": 64,
    "num_sms": "0",
    "ll_tokens": "1,16,64",
    "iters": 10,
    "warmup": 2,
    "repeats": 5,
}
"""Defaults without GPUs: the GPU shapes take many minutes per case on CPU ranks."""
_QUICK: dict[str, Any] = {
    "num_tokens": 128,
    "hidden": 256,
    "num_topk": 4,
    "num_experts": 16,
    "num_sms": "0",
    "ll_tokens": "1,32",
    "iters": 20,
    "warmup": 3,
    "repeats": 5,
}
_SHAPE_OPTIONS = ("num_tokens", "hidden", "num_topk", "num_experts", "ll_tokens")

INTERRUPTED_STATUS = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``ep-bench`` argument parser (shape options default to ``None`` until resolved)."""
    p = argparse.ArgumentParser(
        prog="ep-bench",
        description="Check ElasticBuffer dispatch/combine against the reference backend and "
        "time it beside an all_to_all_single baseline.",
    )
    p.add_argument(
        "--mode",
        choices=("ht", "ll", "both"),
        default="both",
        help="high-throughput, low-latency or both (default: both)",
    )
    p.add_argument(
        "--num-tokens", type=int, help="tokens per rank, high-throughput (4096; CPU: 512)"
    )
    p.add_argument("--hidden", type=int, help="hidden size, a multiple of 64 (7168; CPU: 2048)")
    p.add_argument("--num-topk", type=int, help="experts per token (8)")
    p.add_argument("--num-experts", type=int, help="experts in total (256; CPU: 64)")
    p.add_argument("--num-sms", help="SM counts to sweep, e.g. 0,12,24; 0 = analytical default")
    p.add_argument("--routing", choices=ROUTINGS, default="uniform", help="gate (uniform)")
    p.add_argument(
        "--dtype",
        choices=("fp8", "bf16", "both"),
        help="dispatch format (fp8 on GPUs, bf16 on CPU)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "nvlink"),
        default="auto",
        help="backend of the buffer under test (auto)",
    )
    p.add_argument("--iters", type=int, help="timed calls per repeat (20; CPU: 10)")
    p.add_argument("--warmup", type=int, help="untimed calls first (5; CPU: 2)")
    p.add_argument(
        "--repeats",
        type=int,
        help="measurements of --iters calls per case; the speedup's range is over them (5)",
    )
    p.add_argument(
        "--ll-tokens",
        help="tokens per rank of the low-latency cases (1,32,128,256; CPU: 1,16,64)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="ranks on GPUs (NCCL) or CPU (gloo); auto = GPUs when present",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        help=f"ranks (default: one per GPU, else {CPU_RANKS} CPU ranks)",
    )
    p.add_argument("--json", metavar="PATH", help="write every result and the run's metadata")
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG (needs matplotlib: python -m pip install matplotlib)",
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="print every column (DeepEP-style and remote bytes, baseline GB/s); "
        "the default table fits 100 columns and leaves out those that do not apply",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes for a CPU smoke run (128 tokens, H=256, top-4 of 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed of the inputs (0)")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before the run is abandoned (1800)"
    )
    return p


def _int_list(
    parser: argparse.ArgumentParser, option: str, text: str, minimum: int
) -> tuple[int, ...]:
    values = []
    for item in text.split(","):
        try:
            value = int(item.strip())
        except ValueError:
            parser.error(f"{option}: {item.strip()!r} is not an integer (expected e.g. 0,12,24)")
        if value < minimum:
            parser.error(f"{option}: {value} is below the minimum {minimum}")
        values.append(value)
    if len(set(values)) != len(values):
        parser.error(f"{option}: {text!r} repeats a value")
    return tuple(values)


def resolve_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, result_path: str = ""
) -> BenchConfig:
    """Applies the defaults and validates; calls ``parser.error`` on bad input.

    The defaults are ``--quick``'s, else the GPU ones with GPUs, else smaller CPU ones; the names
    of the options they filled are left in ``args.defaulted``.
    """
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and num_gpus == 0:
        parser.error("--device cuda: no CUDA device is visible")
    use_gpu = num_gpus > 0 and args.device != "cpu"
    kind = "quick" if args.quick else "gpu" if use_gpu else "cpu"
    defaults = {"quick": _QUICK, "gpu": _DEFAULTS, "cpu": _CPU}[kind]
    args.defaulted = [key for key in defaults if getattr(args, key) is None]
    for key in args.defaulted:
        setattr(args, key, defaults[key])
    world = args.num_processes
    if world is None:
        world = num_gpus if use_gpu else CPU_RANKS
    if world < 1:
        parser.error(f"--num-processes must be >= 1, got {world}")
    if args.backend == "nvlink" and not use_gpu:
        parser.error("--backend nvlink needs GPUs (the CPU ranks run the 'torch' reference)")
    if use_gpu and world > num_gpus:
        parser.error(f"--num-processes {world}: only {num_gpus} GPUs (one rank per GPU)")
    dtypes = {"both": ("fp8", "bf16"), None: ("fp8",) if use_gpu else ("bf16",)}.get(
        args.dtype, (args.dtype,)
    )
    for name in ("num_tokens", "hidden", "num_topk", "num_experts", "iters", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.hidden % 64 != 0:
        parser.error(f"--hidden {args.hidden} is not a multiple of 64")
    if "fp8" in dtypes and args.hidden % 128 != 0:
        parser.error(f"--hidden {args.hidden}: FP8 needs a multiple of 128 (one scale per 128)")
    try:
        check_hidden(args.hidden, fp8="fp8" in dtypes, name="--hidden")
    except ValueError as exc:
        parser.error(str(exc))
    if args.num_experts % world != 0:
        parser.error(f"--num-experts {args.num_experts} is not a multiple of the {world} ranks")
    if args.num_topk > args.num_experts:
        parser.error(f"--num-topk {args.num_topk} exceeds --num-experts {args.num_experts}")
    try:
        check_routing(args.routing, args.num_experts, args.num_topk)
    except ValueError as exc:
        parser.error(str(exc))
    num_sms = _int_list(parser, "--num-sms", args.num_sms, 0)
    if use_gpu:
        limit = torch.cuda.get_device_properties(0).multi_processor_count
        if max(num_sms) > limit:
            parser.error(f"--num-sms {max(num_sms)} exceeds the {limit} SMs of the GPU")
    return BenchConfig(
        modes=("ht", "ll") if args.mode == "both" else (args.mode,),
        dtypes=dtypes,
        num_tokens=args.num_tokens,
        hidden=args.hidden,
        num_topk=args.num_topk,
        num_experts=args.num_experts,
        num_sms=num_sms,
        ll_tokens=_int_list(parser, "--ll-tokens", args.ll_tokens, 1),
        routing=args.routing,
        backend=args.backend,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        world_size=world,
        use_gpu=use_gpu,
        result_path=result_path,
        defaults=kind,
    )


def defaults_note(cfg: BenchConfig, defaulted: Sequence[str]) -> str | None:
    """The line that says a CPU run took smaller shapes than a GPU run would, or ``None``."""
    if cfg.defaults != "cpu" or not set(defaulted) & set(_SHAPE_OPTIONS):
        return None
    shape = f"{cfg.num_tokens} tokens/rank, H={cfg.hidden}, top-{cfg.num_topk} of {cfg.num_experts}"
    gpu = _DEFAULTS
    return (
        f"ep-bench: no GPU, so CPU-sized defaults: {shape}, ll tokens "
        f"{','.join(map(str, cfg.ll_tokens))}; the GPU shapes (--num-tokens {gpu['num_tokens']} "
        f"--hidden {gpu['hidden']} --num-topk {gpu['num_topk']} --num-experts "
        f"{gpu['num_experts']}) take many minutes per case on CPUs"
    )


def _case_line(r: dict[str, Any]) -> str:
    sp = r["speedup"]
    return (
        f"      {r['op']:<8} {r['status']}  {r['latency_us']['median']:10.1f} us"
        f"   baseline {r['baseline']['latency_us']['median']:10.1f} us"
        f"   speedup {sp['value']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})"
    )


def run_bench_rank(info: RankInfo, cfg: BenchConfig) -> None:
    """Body of every rank: all cases in order; rank 0 writes the records to ``cfg.result_path``.

    Args:
        info: From :func:`ep_jit.testing.run_ranks`.
        cfg: The resolved options, identical on every rank.
    """
    # Ctrl-C reaches every process of the terminal's group: the CLI process stops the ranks, so
    # they neither raise half-way through a collective nor print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = RankContext(info, cfg)
    cases = enumerate_cases(cfg)
    records: list[dict[str, Any]] = []
    backend_name = cfg.backend
    for dtype in cfg.dtypes:
        buf = make_buffer(ctx, dtype, cfg.backend)
        ref = make_buffer(ctx, dtype, "torch")
        backend_name = str(getattr(buf, "backend_name", cfg.backend))
        try:
            # Every SM count of a dtype moves the same data, so the sweep points compare.
            seed_index = next(i for i, c in enumerate(cases) if c.dtype == dtype)
            for i, case in enumerate(cases):
                if case.dtype != dtype:
                    continue
                ctx.log(f"[{i + 1}/{len(cases)}] {case.label} ({backend_name}) ...")
                start = time.monotonic()
                if case.mode == "ht":
                    out = run_ht_case(ctx, case, buf, ref, seed_index)
                else:
                    out = run_ll_case(ctx, i, case, buf, ref)
                for r in out:
                    ctx.log(_case_line(r))
                ctx.log(f"      ({format_seconds(time.monotonic() - start)})")
                records.extend(out)
        finally:
            destroy_buffer(buf)
            destroy_buffer(ref)
    if ctx.rank == 0:
        meta = {
            "device": device_name(ctx.device),
            "num_ranks": ctx.num_ranks,
            "backend_name": backend_name,
            "torch": torch.__version__,
            "dist_backend": info.backend,
        }
        Path(cfg.result_path).write_text(json.dumps({"meta": meta, "cases": records}))
    dist.barrier(group=ctx.group)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ep-bench``; returns the exit status: 0 all PASS, 1 any mismatch, 130 Ctrl-C.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Raises:
        SystemExit: Status 2 with a message naming the bad option (or saying that ``--plot``
            needs matplotlib). Ctrl-C is no exception: every rank is stopped, one line says so
            and the status is :data:`INTERRUPTED_STATUS`.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # run_ranks has stopped the ranks by now (its cleanup runs before this handler).
        print("ep-bench: interrupted (Ctrl-C); every rank stopped", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    full_argv = list(sys.argv) if argv is None else ["ep-bench", *argv]
    if args.plot:
        try:
            require_matplotlib()
        except RuntimeError as exc:
            print(f"ep-bench: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    cfg = resolve_config(parser, args)
    note = defaults_note(cfg, args.defaulted)
    if note:
        print(textwrap.fill(note, TABLE_WIDTH, subsequent_indent="    "), file=sys.stderr)
    # Referenced through the package so a `python -m` run hands the spawned ranks an importable
    # function rather than one of `__main__`.
    worker = importlib.import_module("ep_elastic.bench").run_bench_rank
    with tempfile.TemporaryDirectory(prefix="ep-bench-") as tmp:
        cfg = replace(cfg, result_path=str(Path(tmp) / "results.json"))
        run_ranks(cfg.world_size, worker, cfg, timeout_s=args.timeout, use_gpu=cfg.use_gpu)
        raw = json.loads(Path(cfg.result_path).read_text())
    config = {k: v for k, v in asdict(cfg).items() if k != "result_path"}
    doc = build_document(raw["meta"], config, raw["cases"], full_argv)
    print(format_table(doc, wide=args.wide), flush=True)
    if args.json:
        write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(doc, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if doc["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
