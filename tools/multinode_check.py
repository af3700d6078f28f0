"""Multi-node check of ElasticBuffer: run under torchrun as several (simulated) nodes.

    python tools/run_multinode.py --nnodes 2 --nproc-per-node 2 -- tools/multinode_check.py

Each rank joins the job through ``ep_jit.testing.run_from_env`` (gloo on CPU, NCCL on GPUs), makes
an ``ElasticBuffer`` with ``backend="auto"`` and checks, on fresh seeded inputs of several shapes
(uniform routing, a rank with no tokens, ``-1`` slots, every token routed to one remote rank):

* the process layout torchrun gave (``LOCAL_RANK``/``GROUP_RANK`` differ from ``RANK``);
* ``dispatch`` (fresh with a CPU sync, and cached from its handle) and ``combine``;
* ``low_latency_dispatch`` (BF16) and ``low_latency_combine``;

each bit for bit against an oracle computed from every rank's all-gathered inputs, following the
semantics of ``docs/design.md``; then the standard scenario set of the test suites
(``ep_core.testing.run_standard_cases``: routings, FP8 formats, alignments, no-CPU-sync,
biases, ``-1`` slots, empty ranks, zero tokens, the low-latency pair) through the reference
backend on the same process group. Any mismatch raises, which fails the launcher.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_core import TorchBackend
from ep_core.testing import run_standard_cases
from ep_elastic import ElasticBuffer
from ep_jit.testing import RankInfo, run_from_env

HIDDEN = 256
NUM_EXPERTS_PER_RANK = 4
NUM_TOPK = 4
NMAX = 48


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: tuple[int, ...]  # per rank
    holes: float = 0.0  # share of top-k slots set to -1
    hot_rank: int | None = None  # every token routed only to this rank's experts


def _cases(world: int) -> list[Case]:
    return [
        Case("uniform", tuple(NMAX - 3 * r for r in range(world))),
        Case("rank-1-empty", tuple(0 if r == 1 else 17 + r for r in range(world))),
        Case("minus-one-slots", tuple(29 for _ in range(world)), holes=0.4),
        Case("all-to-last-rank", tuple(11 + 5 * r for r in range(world)), hot_rank=world - 1),
    ]


def _inputs(
    case: Case, index: int, rank: int, world: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``x [T, H] bf16``, ``topk_idx [T, k] int64`` and ``weights [T, k] float32``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + rank)
    num_tokens = case.num_tokens[rank]
    num_experts = NUM_EXPERTS_PER_RANK * world
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    if case.hot_rank is None:
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        idx = scores.argsort(dim=1)[:, :NUM_TOPK]
    else:
        first = case.hot_rank * NUM_EXPERTS_PER_RANK
        scores = torch.rand(num_tokens, NUM_EXPERTS_PER_RANK, generator=gen)
        idx = first + scores.argsort(dim=1)[:, :NUM_TOPK]
    if case.holes:
        idx[torch.rand(idx.shape, generator=gen) < case.holes] = -1
        if num_tokens:
            idx[0] = -1  # a token sent nowhere
    weights = torch.rand(num_tokens, NUM_TOPK, generator=gen)
    return x, idx.to(torch.int64).contiguous(), weights


def _all_gather(t: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's ``t`` (first dim ``counts[r]``), exact bits (padded to NMAX rows)."""
    # gloo has no 16-bit integer collectives: move bf16 rows as int32 pairs.
    bits = t.view(torch.int32) if t.dtype == torch.bfloat16 else t
    padded = torch.zeros((NMAX, *bits.shape[1:]), dtype=bits.dtype, device=bits.device)
    padded[: bits.shape[0]] = bits
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded, group=group)
    return [
        (o[:n].view(torch.bfloat16) if t.dtype == torch.bfloat16 else o[:n]).cpu()
        for o, n in zip(out, counts, strict=True)
    ]


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _check_case(info: RankInfo, case: Case, index: int, seed: int) -> tuple[int, str]:
    rank, world, group = info.rank, info.world_size, info.group
    el, num_experts = NUM_EXPERTS_PER_RANK, NUM_EXPERTS_PER_RANK * world
    x, idx, w = _inputs(case, index, rank, world, seed)
    counts = list(case.num_tokens)
    all_x = _all_gather(x.to(info.device), counts, group)
    all_idx = _all_gather(idx.to(info.device), counts, group)
    all_w = _all_gather(w.to(info.device), counts, group)
    tag = f"[{case.name}, rank {rank}]"

    # ---- oracle of this rank's received rows (source rank ascending, then source token)
    src_rows = [
        (s, t)
        for s in range(world)
        for t in range(counts[s])
        if any(int(e) >= 0 and int(e) // el == rank for e in all_idx[s][t])
    ]
    exp_x = torch.stack([all_x[s][t] for s, t in src_rows]) if src_rows else x[:0]
    exp_idx = torch.stack([all_idx[s][t] for s, t in src_rows]) if src_rows else idx[:0]
    exp_w = torch.stack([all_w[s][t] for s, t in src_rows]) if src_rows else w[:0]
    local = (exp_idx >= 0) & (exp_idx // el == rank)
    exp_idx = torch.where(local, exp_idx - rank * el, torch.full_like(exp_idx, -1))
    exp_w = torch.where(local, exp_w, torch.zeros_like(exp_w))

    buffer = ElasticBuffer(
        group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=NUM_TOPK, backend="auto"
    )
    checks = 0
    try:
        dev = info.device
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(
            x.to(dev), topk_idx=idx.to(dev), topk_weights=w.to(dev), num_experts=num_experts
        )
        m = len(src_rows)
        _expect(handle.num_recv_tokens == m, f"{tag} received {handle.num_recv_tokens}, not {m}")
        _expect(torch.equal(recv_x[:m].cpu(), exp_x), f"{tag} dispatch recv_x")
        _expect(torch.equal(recv_idx[:m].cpu(), exp_idx), f"{tag} dispatch recv_topk_idx")
        _expect(torch.equal(recv_w[:m].cpu(), exp_w), f"{tag} dispatch recv_topk_weights")
        per_src = torch.tensor([sum(1 for s, _ in src_rows if s == d) for d in range(world)])
        psum = handle.psum_num_recv_tokens_per_rank.cpu().to(torch.int64)
        _expect(torch.equal(psum, per_src.cumsum(0)), f"{tag} psum_num_recv_tokens_per_rank")
        per_expert = [int((exp_idx == e).any(dim=1).sum()) for e in range(el)]
        _expect(
            list(handle.num_recv_tokens_per_expert_list) == per_expert,
            f"{tag} num_recv_tokens_per_expert_list {handle.num_recv_tokens_per_expert_list}"
            f" != {per_expert}",
        )
        checks += 1

        # Cached dispatch replays the layout on new data.
        x2 = (x.float() * -2).to(torch.bfloat16)
        recv_x2, _, _, _, _ = buffer.dispatch(x2.to(dev), handle=handle)
        exp_x2 = (exp_x.float() * -2).to(torch.bfloat16)
        _expect(torch.equal(recv_x2[:m].cpu(), exp_x2), f"{tag} cached dispatch recv_x")
        checks += 1

        # Combine: rank d returns bf16(row * (d + 1)); the source sums over d ascending in fp32.
        y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w)
        exp_out = torch.zeros(x.shape, dtype=torch.float32)
        for t in range(x.shape[0]):
            dests = sorted({int(e) // el for e in idx[t] if int(e) >= 0})
            acc: torch.Tensor | None = None
            for d in dests:
                part = (x[t].float() * (d + 1)).to(torch.bfloat16).float()
                acc = part if acc is None else acc + part
            if acc is not None:
                exp_out[t] = acc
        _expect(torch.equal(combined.cpu(), exp_out.to(torch.bfloat16)), f"{tag} combine x")
        exp_cw = torch.where(idx >= 0, w, torch.zeros_like(w))
        _expect(
            combined_w is not None and torch.equal(combined_w.cpu(), exp_cw),
            f"{tag} combined_topk_weights",
        )
        checks += 1

        # Low-latency (BF16): per local expert, rows packed by source rank then source token.
        ll_x, ll_count, ll_handle, _, _ = buffer.low_latency_dispatch(
            x.to(dev), idx.to(dev), NMAX, num_experts, use_fp8=False
        )
        ll_x = ll_x.cpu()
        for e in range(el):
            expert = rank * el + e
            rows = [all_x[s][t] for s, t in src_rows if bool((all_idx[s][t] == expert).any())]
            n = int(ll_count[e])
            _expect(n == len(rows), f"{tag} LL recv_count[{e}] = {n}, expected {len(rows)}")
            if rows:
                _expect(torch.equal(ll_x[e, :n], torch.stack(rows)), f"{tag} LL recv_x[{e}]")
        checks += 1

        ll_y = (ll_x.float() * (rank + 1)).to(torch.bfloat16)
        ll_out, _, _ = buffer.low_latency_combine(ll_y.to(dev), idx.to(dev), w.to(dev), ll_handle)
        exp_ll = torch.zeros(x.shape, dtype=torch.float32)
        for t in range(x.shape[0]):
            total = torch.zeros(HIDDEN, dtype=torch.float32)
            for d in range(world):
                lanes = [j for j in range(NUM_TOPK) if int(idx[t, j]) >= 0 and idx[t, j] // el == d]
                if not lanes:
                    continue
                row = (x[t].float() * (d + 1)).to(torch.bfloat16).float()
                part = torch.zeros(HIDDEN, dtype=torch.float32)
                for j in lanes:
                    part = part + w[t, j] * row
                total = total + part.to(torch.bfloat16).float()
            exp_ll[t] = total
        _expect(torch.equal(ll_out.cpu(), exp_ll.to(torch.bfloat16)), f"{tag} LL combine")
        checks += 1
    finally:
        buffer.destroy()
    return checks, buffer.backend_name


def _worker(info: RankInfo, seed: int) -> int:
    world = info.world_size
    _expect(world >= 2, "run with at least 2 ranks")
    _expect(
        info.node_rank == info.rank // info.local_world_size
        and info.local_rank == info.rank % info.local_world_size,
        f"rank {info.rank}: torchrun layout local_rank={info.local_rank} node={info.node_rank}",
    )
    checks, backend = 0, "?"
    for index, case in enumerate(_cases(world)):
        done, backend = _check_case(info, case, index, seed)
        checks += done
        dist.barrier(group=info.group)
        if info.rank == 0:
            print(f"multinode_check: {case.name}: ok", flush=True)
    reference = TorchBackend(info.group, info.rank, world)
    scenarios = run_standard_cases(reference, info.rank, world, info.device)
    reference.destroy()
    dist.barrier(group=info.group)
    if info.rank == 0:
        print(f"multinode_check: {scenarios} standard scenarios: ok", flush=True)
    checks += scenarios
    totals = torch.tensor([checks], dtype=torch.int64, device=info.device)
    dist.all_reduce(totals, group=info.group)
    if info.rank == 0:
        print(
            f"multinode_check: {int(totals)} checks passed on {world} ranks "
            f"({info.num_nodes} nodes x {info.local_world_size} ranks, process group "
            f"{info.backend}, ElasticBuffer backend {backend!r})",
            flush=True,
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run_from_env(_worker, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
