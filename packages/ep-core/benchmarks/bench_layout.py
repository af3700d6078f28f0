"""Routing layout kernel alone on one GPU: outputs checked against the reference, then timed.

Developer tool (the dispatch's kernel time in ``ep-bench`` includes this kernel). Each case runs
the shipped ``ep_ht_layout`` kernel on random top-k ids (10 % of them -1) and on a skewed routing
(every token to expert 0 only), compares ``send_row``, ``is_in`` and ``chunk_prefix`` with the
reference backend's routing layout (``ep_core.layout.get_dispatch_layout``, chunk prefixes
from its ``is_token_in_rank``), then times one launch with CUDA events after an L2 flush (median
of ``--iters``).

    PYTHONPATH=packages/jit/src:packages/ep-core/src \\
        python packages/ep-core/benchmarks/bench_layout.py --ranks 2,4,8 --topk 6,8,16
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ep_core.layout import get_dispatch_layout
from ep_core.nvlink import ht as nk
from ep_core.nvlink.layout import CHUNK_TOKENS


def _expected(idx: torch.Tensor, ranks: int, local: int) -> tuple[torch.Tensor, ...]:
    layout = get_dispatch_layout(idx, ranks * local, ranks)
    is_in, send_row = layout.is_token_in_rank, layout.send_row
    nch = -(-idx.shape[0] // CHUNK_TOKENS)
    prefix = torch.zeros((nch + 1, ranks), dtype=torch.int32, device=idx.device)
    if idx.shape[0]:
        # Rows sent to each rank by the tokens before token t (exclusive running count).
        before = torch.cumsum(is_in.to(torch.int32), 0) - is_in.to(torch.int32)
        prefix[:nch] = before[::CHUNK_TOKENS]
        prefix[nch] = layout.num_tokens_per_rank
    return send_row, is_in, prefix


def _outputs(tokens: int, ranks: int) -> tuple[torch.Tensor, ...]:
    nch = -(-tokens // CHUNK_TOKENS)
    return (
        torch.full((tokens, ranks), -7, dtype=torch.int32, device="cuda"),
        torch.zeros((tokens, ranks), dtype=torch.bool, device="cuda"),
        torch.full((nch + 1, ranks), -7, dtype=torch.int32, device="cuda"),
    )


def _ids(tokens: int, topk: int, experts: int, skewed: bool) -> torch.Tensor:
    if skewed:
        idx = torch.full((tokens, topk), -1, dtype=torch.int64, device="cuda")
        idx[:, 0] = 0
        return idx
    idx = torch.argsort(torch.rand((tokens, experts), device="cuda"), dim=1)[:, :topk]
    idx = idx.contiguous()
    idx[torch.rand((tokens, topk), device="cuda") < 0.1] = -1
    return idx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--topk", default="8")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--tokens", default="1,128,1000,4096,8192,16384")
    p.add_argument("--iters", type=int, default=60)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bad = 0
    print(f"{'ranks':>5s} {'topk':>4s} {'tokens':>6s} {'us':>8s}")
    for ranks in (int(v) for v in args.ranks.split(",")):
        local = args.experts // ranks
        for topk in (int(v) for v in args.topk.split(",")):
            for tokens in (int(v) for v in args.tokens.split(",")):
                for skewed in (False, True):
                    idx = _ids(tokens, topk, args.experts, skewed)
                    out = _outputs(tokens, ranks)
                    nk.launch_layout(ranks, topk, idx, local, *out)
                    if not all(
                        torch.equal(a, b)
                        for a, b in zip(out, _expected(idx, ranks, local), strict=True)
                    ):
                        bad += 1
                        print(f"MISMATCH ranks={ranks} topk={topk} tokens={tokens} skewed={skewed}")
                idx = _ids(tokens, topk, args.experts, False)
                out = _outputs(tokens, ranks)
                times = []
                for _ in range(args.iters):
                    flush.zero_()
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    nk.launch_layout(ranks, topk, idx, local, *out)
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1000)
                print(
                    f"{ranks:5d} {topk:4d} {tokens:6d} {statistics.median(times):8.2f}", flush=True
                )
    print("mismatches:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
