"""Context parallelism: causal attention over a sequence split across ranks, K/V all-gathered.

    torchrun --nproc-per-node 2 ring_attention.py            # CPU ranks (gloo) or 2 GPUs
    python ring_attention.py --ranks 2 --ranks-per-gpu 2     # 2 ranks sharing one GPU

Rank ``r`` holds tokens ``[r*S, (r+1)*S)`` of a sequence of ``R*S`` tokens. Every layer computes
Q, K and V for its own tokens, writing K and V straight into ``CopyEngineBuffer``'s in-place
views, and all-gathers them. While the copies fly, the rank attends to its own chunk (the causal
diagonal block, which needs only local K/V); then it waits on the handle and attends to the
chunks of the ranks before it, merging the partial results with their log-sum-exp. The output
is compared with single-process causal attention over the whole sequence (every rank can build
the whole input and the weights from a seed); the script prints one line on rank 0.

On GPUs, CUDA loads kernels lazily, and a first kernel load while the communication stream waits
for a peer's flag blocks the process until the flag arrives; so the script runs one layer's
arithmetic once, on the same shapes, before its first session.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from cp_copyengine import CopyEngineBuffer, session_bytes_hint
from ep_jit.testing import RankInfo, run_from_env, run_ranks

TOLERANCE = 3e-2  # K/V and the layer outputs are carried in bf16


def weights(layers: int, hidden: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per layer ``wq, wk, wv, wo``: ``[hidden, hidden]`` float32 CPU tensors from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(hidden)
    return [
        {n: torch.randn(hidden, hidden, generator=gen) * scale for n in ("wq", "wk", "wv", "wo")}
        for _ in range(layers)
    ]


def sequence(tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """The whole input sequence ``[tokens, hidden]`` float32 (CPU)."""
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))


def reference(x: torch.Tensor, ws: list[dict[str, torch.Tensor]], heads: int) -> torch.Tensor:
    """Single-process causal attention layers over the whole sequence, float32."""
    tokens, hidden = x.shape
    for w in ws:
        q, k, v = ((x @ w[n]).view(tokens, heads, -1).transpose(0, 1) for n in ("wq", "wk", "wv"))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + o.transpose(0, 1).reshape(tokens, hidden) @ w["wo"]
    return x


def _partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised attention of ``q`` ``[H, S, D]`` over one chunk: (``exp``-weighted V, LSE)."""
    scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse) @ v, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combines per-chunk results: softmax over all chunks = LSE-weighted sum of each."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    return sum(torch.exp(lse - total) * o for o, lse in parts)  # type: ignore[return-value]


def layer(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    heads: int,
    rank: int,
    buf: CopyEngineBuffer | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One layer on this rank's chunk ``x`` ``[S, hidden]`` float32; ``buf=None`` is a dry run
    with the same arithmetic on the same shapes and no communication (kernel warm-up)."""
    tokens, hidden = x.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [H, S, D], float32
        return t.float().view(tokens, heads, -1).transpose(0, 1)

    q = split(x @ w["wq"])
    if buf is None:
        k_mine = (x @ w["wk"]).to(dtype)
        v_mine = (x @ w["wv"]).to(dtype)
        k_all = torch.stack([k_mine] * (rank + 1))
        v_all = torch.stack([v_mine] * (rank + 1))
        handle = None
    else:
        k_mine, v_mine = buf.get_inplace_tensor([(tokens, hidden)] * 2, dtype)
        k_mine.copy_(x @ w["wk"])  # produced in place: no self copy in the all-gather
        v_mine.copy_(x @ w["wv"])
        (k_all, v_all), handle = buf.all_gather([k_mine, v_mine])  # type: ignore[misc]
    # Overlap: the diagonal block needs only this rank's own K/V.
    parts = [_partial(q, split(k_mine), split(v_mine), causal=True)]
    if handle is not None:
        handle()
    parts += [_partial(q, split(k_all[p]), split(v_all[p]), causal=False) for p in range(rank)]
    o = _merge(parts).transpose(0, 1).reshape(tokens, hidden)
    return (x + o @ w["wo"]).to(dtype).float()


def run(info: RankInfo, args: argparse.Namespace) -> dict[str, Any]:
    """One rank of the example: its chunk through every layer, checked against the reference."""
    dev, rank, world = info.device, info.rank, info.world_size
    dtype = torch.bfloat16
    ws = weights(args.layers, args.hidden, args.seed)
    full = sequence(world * args.tokens, args.hidden, args.seed)
    chunk = full[rank * args.tokens : (rank + 1) * args.tokens]
    ws_dev = [{n: t.to(dev) for n, t in w.items()} for w in ws]
    budget = session_bytes_hint(world, [(args.tokens, args.hidden)] * 2, dtype)
    buf = CopyEngineBuffer(info.group, budget, num_max_ops_per_session=1, device=dev)
    x = chunk.to(dev)
    if dev.type == "cuda":
        layer(x, ws_dev[0], args.heads, rank, None, dtype)  # load every kernel first
        torch.cuda.synchronize(dev)
    for w in ws_dev:
        with buf.new_session():
            x = layer(x, w, args.heads, rank, buf, dtype)
    out = x.cpu()
    backend = buf.backend
    buf.destroy()
    want = reference(full, ws, args.heads)[rank * args.tokens : (rank + 1) * args.tokens]
    err = ((out - want).abs().max() / want.abs().max()).item()
    return {"rank": rank, "error": err, "backend": backend, "device": str(dev)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="ranks to spawn without torchrun")
    p.add_argument("--ranks-per-gpu", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="CPU ranks (gloo) even with a GPU")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the example (under torchrun, or spawning ``--ranks`` ranks); returns each rank's
    result; exits with 1 when the output differs from the reference."""
    args = parse_args(argv)
    from ep_jit import knobs

    if knobs.torchrun_env() is not None:
        results = [run_from_env(run, args, backend="gloo" if args.cpu else None)]
    else:
        use_gpu = torch.cuda.is_available() and not args.cpu
        results = run_ranks(
            args.ranks,
            run,
            args,
            use_gpu=use_gpu,
            ranks_per_gpu=args.ranks_per_gpu if use_gpu else 1,
            timeout_s=600,
        )
    worst = max(r["error"] for r in results)
    ok = worst <= TOLERANCE
    if results[0]["rank"] == 0:
        print(
            f"ring attention on {len(results) if len(results) > 1 else 'torchrun'} rank(s), "
            f"backend {results[0]['backend']} ({results[0]['device']}): max relative error "
            f"{worst:.2e} vs single-process attention: {'OK' if ok else 'MISMATCH'}"
        )
    if not ok:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
