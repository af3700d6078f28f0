"""Expert parallelism in one pass: dispatch -> expert GEMM -> combine, checked locally.

    torchrun --nproc-per-node 2 dispatch_combine.py     # 2 ranks: CPU (gloo) or 2 GPUs (NCCL)
    torchrun --nproc-per-node 4 dispatch_combine.py

Every rank owns ``EXPERTS_PER_RANK`` experts, each a single ``[H, H]`` weight matrix (a stand-in
for an expert MLP), and holds its own batch of tokens. A router picks the top-k experts of each
token; ``ElasticBuffer.dispatch`` sends every token to the ranks that own its experts, each rank
runs its experts on what it received, and ``ElasticBuffer.combine`` brings the results back to
the token's rank and sums them. Since every rank can rebuild every expert's weights from a shared
seed, it can also compute the MoE output of its own tokens without any communication; the script
compares the two and prints one line, on rank 0, saying whether they match.

Without CUDA the ranks run on CPU over gloo (``ElasticBuffer`` then uses its reference backend,
built on ``torch.distributed``); with CUDA each rank takes the GPU of its ``LOCAL_RANK`` over NCCL
and ``ElasticBuffer`` picks the NVLink kernels when all GPUs share one NVLink domain.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ep_elastic import ElasticBuffer

HIDDEN = 256  # H: a multiple of 64 for BF16 dispatch
EXPERTS_PER_RANK = 4  # E = EXPERTS_PER_RANK * world size experts in total
TOPK = 2  # experts per token
MAX_TOKENS = 64  # most tokens one rank dispatches in one call; sizes the buffer
TOLERANCE = 2e-2  # relative; dispatch and combine carry BF16, rounded twice on the way


def init_distributed() -> torch.device:
    """Joins the job torchrun started: one GPU per rank over NCCL, else CPU ranks over gloo."""
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return torch.device("cpu")
    local_rank = dist.get_node_local_rank()  # LOCAL_RANK, set by torchrun
    if local_rank >= torch.cuda.device_count():
        raise SystemExit(
            f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
            "start at most one rank per GPU"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def main() -> int:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = EXPERTS_PER_RANK * world
    # Expert e lives on rank e // EXPERTS_PER_RANK: ElasticBuffer splits the expert ids into
    # equal contiguous blocks, one per rank.
    first_local = rank * EXPERTS_PER_RANK

    # The same seed on every rank gives every rank the same router and all expert weights; a
    # real model would create only its local experts. Float32 weights, BF16 activations.
    shared = torch.Generator().manual_seed(0)
    router = torch.randn(HIDDEN, num_experts, generator=shared)
    all_weights = torch.randn(num_experts, HIDDEN, HIDDEN, generator=shared) * HIDDEN**-0.5
    local_weights = all_weights[first_local : first_local + EXPERTS_PER_RANK].to(device)

    # This rank's tokens: different values, and even a different count, on every rank.
    mine = torch.Generator().manual_seed(1 + rank)
    num_tokens = MAX_TOKENS - rank % MAX_TOKENS
    x = torch.randn(num_tokens, HIDDEN, generator=mine).to(torch.bfloat16)

    # Top-k routing with weights that sum to 1 per token.
    probs = (x.float() @ router).softmax(dim=-1)
    topk_weights, topk_idx = probs.topk(TOPK, dim=-1)  # [T, k] float32, [T, k] int64
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)

    # One buffer per expert-parallel group, made once and reused by every layer and step.
    # Construction is collective: every rank must pass the same sizes.
    buffer = ElasticBuffer(
        dist.group.WORLD, num_max_tokens_per_rank=MAX_TOKENS, hidden=HIDDEN, num_topk=TOPK
    )

    # Dispatch: each token goes once to every rank that owns at least one of its k experts.
    #   recv_x             [M, H] bf16: the M tokens this rank received, grouped by source rank
    #   recv_topk_idx      [M, k] int64: the token's experts as local ids 0..EXPERTS_PER_RANK-1,
    #                      -1 in the slots of experts that live on other ranks
    #   recv_topk_weights  [M, k] float32: the router weights of those slots (0 where -1)
    #   handle             remembers where each row came from, for combine
    # On CPU the call completes before returning; the event (ignored here) is for overlap on GPU.
    recv_x, recv_topk_idx, recv_topk_weights, handle, _ = buffer.dispatch(
        x.to(device),
        topk_idx=topk_idx.to(device),
        topk_weights=topk_weights.to(device),
        num_experts=num_experts,
    )
    assert recv_topk_idx is not None and recv_topk_weights is not None  # None only if expanded

    # The experts: for local expert e, the rows that chose it, times its weight matrix, scaled
    # by the router weight. combine only sums, so the weighting happens here, on the expert side.
    expert_out = torch.zeros(recv_x.shape, dtype=torch.float32, device=device)
    for e in range(EXPERTS_PER_RANK):
        rows, slots = (recv_topk_idx == e).nonzero(as_tuple=True)
        y = recv_x[rows].float() @ local_weights[e]
        expert_out.index_add_(0, rows, y * recv_topk_weights[rows, slots, None])

    # Combine: every row goes back to the rank it came from, where the rows of one token (one per
    # rank that worked on it) are summed. combined_x is [T, H] bf16, in this rank's token order.
    combined_x, _, _ = buffer.combine(expert_out.to(torch.bfloat16), handle)

    # The same MoE output computed locally: sum over k of weight * (x @ W[expert]).
    direct = torch.zeros(num_tokens, HIDDEN)
    for j in range(TOPK):
        per_token_w = all_weights[topk_idx[:, j]]  # [T, H, H]: the j-th expert of each token
        direct += topk_weights[:, j, None] * torch.einsum("th,thd->td", x.float(), per_token_w)

    error = (combined_x.float().cpu() - direct).abs().max() / direct.abs().max()
    worst = error.to(device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the verdict is the same on every rank
    ok = float(worst) <= TOLERANCE
    if rank == 0:
        print(
            f"dispatch -> expert GEMM -> combine on {world} ranks ({device.type}, "
            f"{buffer.backend_name} backend, {num_experts} experts, top-{TOPK}): "
            f"max relative error {float(worst):.1e} against the local computation: "
            f"{'OK' if ok else 'MISMATCH'}",
            flush=True,
        )
    buffer.destroy()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
