"""An Engram layer at inference: N-gram hashing, a sharded table fetch, a gate on the hidden state.

    python engram_layer.py                            # one process (CPU, or the current GPU)
    torchrun --nproc-per-node 2 engram_layer.py       # 2 ranks: CPU (gloo) or 2 GPUs (NCCL)
    torchrun --nproc-per-node 2 engram_layer.py --dtype fp8 --placement gpu

The lookup follows the N-gram hashing of DeepSeek's Engram demo, written independently:

1. For every n-gram order ``n`` in ``2..max_ngram`` and every hash head ``h`` of that order, the
   last ``n`` token ids before (and at) each position are mixed with a multiplicative-XOR hash
   (odd 64-bit multipliers, one per slot of the n-gram) and reduced modulo a prime ``p[n, h]``;
   every (order, head) has its own prime, so the heads address different tables.
2. Those per-head tables are laid end to end in one global id space (``offset[n, h] + hash %
   p[n, h]``), which :class:`ep_engram.EngramTable` shards over the ranks: rank ``r`` owns rows
   ``[r*E, (r+1)*E)``.
3. Each token fetches its ``K = (max_ngram - 1) * heads`` rows, concatenated (``[T, K*dim]``),
   which are projected to a key and a value; a sigmoid gate from the normalised hidden state
   and key scales the value, and the result is added to the hidden state.

Every rank can rebuild every shard from the shared seed, so the script also computes the layer
with a local table and prints, on rank 0, whether the two agree bit for bit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ep_engram import EngramTable
from ep_jit import knobs

SEED = 1234


def primes_from(start: int, count: int) -> list[int]:
    """The first ``count`` primes >= ``start`` (distinct table sizes, one per hash head)."""
    found: list[int] = []
    n = max(start, 2)
    while len(found) < count:
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            found.append(n)
        n += 1
    return found


class NgramHash:
    """Global row ids of every token: ``[B, S]`` token ids -> ``[B*S, K]`` int64.

    Args:
        max_ngram: Largest n-gram order (orders ``2..max_ngram``).
        heads: Hash heads per order.
        rows_per_head: About how many rows each head's table has (its prime is the next ones).
    """

    def __init__(self, max_ngram: int, heads: int, rows_per_head: int) -> None:
        self.orders = list(range(2, max_ngram + 1))
        self.heads = heads
        gen = torch.Generator().manual_seed(SEED)
        k = len(self.orders) * heads
        self.primes = torch.tensor(primes_from(rows_per_head, k), dtype=torch.int64)
        self.offsets = torch.cumsum(self.primes, 0) - self.primes
        self.num_rows = int(self.primes.sum())
        # One odd multiplier per (order, head, slot of the n-gram).
        raw = torch.randint(1, 1 << 62, (k, max_ngram), generator=gen, dtype=torch.int64)
        self.multipliers = raw * 2 + 1

    @property
    def rows_per_token(self) -> int:
        """``K``: rows each token fetches."""
        return len(self.orders) * self.heads

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        ids = tokens.long()
        cols = []
        col = 0
        for n in self.orders:
            # shifted[j] = token j positions back (0 before the start of the sequence).
            shifted = [torch.nn.functional.pad(ids, (j, 0))[:, :s] for j in range(n)]
            for _ in range(self.heads):
                mult = self.multipliers[col].to(ids.device)
                mixed = shifted[0] * mult[0]  # int64 products wrap around: a hash, not a value
                for j in range(1, n):
                    mixed = mixed ^ (shifted[j] * mult[j])
                prime = int(self.primes[col])
                cols.append(int(self.offsets[col]) + torch.remainder(mixed, prime))
                col += 1
        return torch.stack(cols, dim=-1).view(b * s, -1)


def table_shard(
    rank: int, entries: int, dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank ``rank``'s rows (and FP8 scales), from the shared seed."""
    gen = torch.Generator().manual_seed(SEED + 1 + rank)
    rows = torch.randn((entries, dim), generator=gen) * 0.5
    if dtype == torch.bfloat16:
        return rows.to(torch.bfloat16), None
    groups = rows.view(entries, -1, 128)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    q = (groups / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(entries, dim)
    return q, scale.float()


class EngramLayer(torch.nn.Module):
    """Fetch the hashed rows, project, gate, add (inference only)."""

    def __init__(self, table: EngramTable, hashing: NgramHash, hidden: int, dim: int) -> None:
        super().__init__()
        self.table = table
        self.hashing = hashing
        gen = torch.Generator().manual_seed(SEED + 999)
        width = hashing.rows_per_token * dim
        dev = table.device
        self.key = (torch.randn((width, hidden), generator=gen) / math.sqrt(width)).to(dev)
        self.value = (torch.randn((width, hidden), generator=gen) / math.sqrt(width)).to(dev)
        self.dim = dim

    def embed(self, rows: torch.Tensor, sf: torch.Tensor | None) -> torch.Tensor:
        """``[T, K*dim]`` fetched rows -> float32, dequantised with their scales for FP8."""
        if sf is None:
            return rows.float()
        t = rows.shape[0]
        groups = rows.float().view(t, -1, 128)
        return (groups * sf.float().view(t, -1, 1)).view(t, -1)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden.shape
        ids = self.hashing(tokens).to(self.table.device)
        rows, sf = self.table.fetch(ids)()  # [B*S, K*dim] (+ [B*S, K*P] scales for FP8)
        memory = self.embed(rows, sf)
        key, value = memory @ self.key, memory @ self.value
        x = hidden.reshape(b * s, h).float()
        norm = torch.nn.functional.rms_norm
        gate = torch.sigmoid((norm(x, (h,)) * norm(key, (h,))).sum(-1, keepdim=True) / math.sqrt(h))
        return (x + gate * value).view(b, s, h).to(hidden.dtype)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--heads", type=int, default=4, help="hash heads per n-gram order")
    p.add_argument("--rows-per-head", type=int, default=5000)
    p.add_argument("--dim", type=int, default=256, help="elements per row (FP8: a multiple of 128)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--placement", choices=("host", "gpu"), default="host")
    p.add_argument("--backend", default="auto")
    return p.parse_args(argv)


def run(args: argparse.Namespace, group: dist.ProcessGroup | None = None) -> dict[str, object]:
    """Builds the table and the layer, runs one batch, checks it; collective over ``group``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float8_e4m3fn
    hashing = NgramHash(args.max_ngram, args.heads, args.rows_per_head)
    entries = -(-hashing.num_rows // world)  # rows per rank; the last rank's tail is unused
    table = EngramTable(group, entries, args.dim, dtype, args.placement, args.backend)
    try:
        rows, sf = table_shard(rank, entries, args.dim, dtype)
        table.write(rows, sf)
        layer = EngramLayer(table, hashing, args.hidden, args.dim)
        gen = torch.Generator().manual_seed(SEED + 7 + rank)  # each rank its own batch
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        hidden = torch.randn((args.batch, args.seq, args.hidden), generator=gen).to(table.device)
        out = layer(hidden, tokens)

        # The same layer on a local copy of the whole table (every shard from the seed).
        shards = [table_shard(r, entries, args.dim, dtype) for r in range(world)]
        full = torch.cat([s[0] for s in shards]).to(table.device)
        ids = hashing(tokens).to(table.device)
        local_rows = full[ids.view(-1)].view(ids.shape[0], -1)
        local_sf = None
        if dtype == torch.float8_e4m3fn:
            full_sf = torch.cat([s[1] for s in shards if s[1] is not None]).to(table.device)
            local_sf = full_sf[ids.view(-1)].view(ids.shape[0], -1)
        memory = layer.embed(local_rows, local_sf)
        key, value = memory @ layer.key, memory @ layer.value
        x = hidden.reshape(-1, args.hidden).float()
        norm = torch.nn.functional.rms_norm
        gate = torch.sigmoid(
            (norm(x, (args.hidden,)) * norm(key, (args.hidden,))).sum(-1, keepdim=True)
            / math.sqrt(args.hidden)
        )
        want = (x + gate * value).view_as(out).to(out.dtype)
        diff = float((out.float() - want.float()).abs().max())
        return {
            "rank": rank,
            "tokens": tokens.numel(),
            "rows_per_token": hashing.rows_per_token,
            "table_rows": hashing.num_rows,
            "max_abs_diff": diff,
            "backend": table.backend_name,
        }
    finally:
        table.destroy()


def init_distributed() -> None:
    """Joins torchrun's job (NCCL on GPUs, gloo on CPUs), or makes a group of one process."""
    env = knobs.torchrun_env()
    local = env.local_rank if env is not None else 0
    if env is None:
        store = os.path.join(tempfile.mkdtemp(prefix="engram_layer_"), "store")
        init = {"init_method": f"file://{store}", "rank": 0, "world_size": 1}
    else:
        init = {}
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, **init)  # type: ignore[arg-type]
    else:
        dist.init_process_group("gloo", **init)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    init_distributed()
    try:
        result = run(args)
        results: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        ok = all(r["max_abs_diff"] == 0.0 for r in results)  # type: ignore[index]
        if dist.get_rank() == 0:
            print(
                f"engram_layer: {'ok' if ok else 'MISMATCH'}: {len(results)} ranks, backend "
                f"{result['backend']}, {result['tokens']} tokens per rank x "
                f"{result['rows_per_token']} rows of {args.dim} {args.dtype}, table of "
                f"{result['table_rows']} rows (placement {args.placement})"
            )
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
