"""Decoding with the low-latency dispatch/combine pair captured in a CUDA graph.

    torchrun --nproc-per-node 2 decode_cuda_graph.py     # one GPU per rank
    torchrun --nproc-per-node 8 decode_cuda_graph.py

In decoding every rank holds a fixed batch of sequences and produces one token per sequence per
step, so the MoE layer sees the same shapes at every step, and the per-step cost is mostly launch
overhead. Capturing the layer once in a CUDA graph and replaying it removes that overhead. The
normal ``dispatch`` cannot be captured: it returns exactly as many rows as arrived, a size only
the host can learn by synchronizing. ``low_latency_dispatch`` instead writes into a fixed layout,
``[experts on this rank, world size * BATCH, H]``, with a device-side count of valid rows per
expert; ``low_latency_combine`` reads that layout back and applies the router weights. Neither
reads anything on the host while a graph is being captured.

The script captures router + dispatch + expert GEMM + combine once, replays the graph for
``STEPS`` decode steps (each step's output feeds the next step's input, as in a model), checks
one replay against the same step run eagerly, and prints the time per step of both ways.

Without CUDA there are no CUDA graphs: the script says so and exits 0. ``ElasticBuffer`` picks
its NVLink kernels when all GPUs are Hopper GPUs in one NVLink domain; elsewhere it falls back
to its reference backend, which synchronizes with the host and so cannot be captured: the script
then runs the loop eagerly and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ep_elastic import ElasticBuffer

BATCH = 16  # sequences per rank = tokens per rank per step (Nmax of the low-latency layout)
HIDDEN = 1024  # H: a multiple of 64 for BF16 (128 for FP8)
EXPERTS_PER_RANK = 4
TOPK = 2
STEPS = 32
TOLERANCE = 1e-2  # relative; graph and eager run the same kernels on the same inputs


def init_distributed() -> torch.device:
    """Joins the job torchrun started: one GPU per rank over NCCL."""
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
    if not torch.cuda.is_available():
        if dist.get_node_local_rank(fallback_rank=0) == 0:
            print(
                "decode_cuda_graph.py needs CUDA, one GPU per rank (CUDA graphs do not exist "
                "on CPU); nothing to do",
                flush=True,
            )
        return 0
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = EXPERTS_PER_RANK * world

    # The router is the same on every rank; each rank creates only its own experts' weights,
    # stacked for one batched GEMM: [EXPERTS_PER_RANK, H, H] bf16.
    router = torch.randn(HIDDEN, num_experts, generator=torch.Generator().manual_seed(0))
    router = router.to(device)
    first_local = rank * EXPERTS_PER_RANK
    expert_weights = torch.stack(
        [
            torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(1 + e))
            * HIDDEN**-0.5
            for e in range(first_local, first_local + EXPERTS_PER_RANK)
        ]
    ).to(device, torch.bfloat16)

    # low_latency_mode with its limits builds the low-latency buffer and loads its kernels here,
    # at construction, so even the first low-latency call could be captured in a graph.
    buffer = ElasticBuffer(
        dist.group.WORLD,
        num_max_tokens_per_rank=BATCH,
        hidden=HIDDEN,
        num_topk=TOPK,
        low_latency_mode=True,
        num_max_dispatch_tokens_per_rank=BATCH,
        num_experts=num_experts,
    )

    # A graph replays fixed addresses: every step writes its tokens into this one tensor.
    first_tokens = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    first_tokens = first_tokens.to(device, torch.bfloat16)
    x = first_tokens.clone()

    def moe_layer() -> torch.Tensor:
        """The MoE layer on ``x [BATCH, H]`` bf16 -> ``[BATCH, H]`` bf16.

        Eager calls check the expert ids on the host (a sync; ``EP_CHECK_INPUTS=0`` skips it);
        under capture that check is skipped and nothing waits for the host.
        """
        probs = (x.float() @ router).softmax(dim=-1)
        weights, topk_idx = probs.topk(TOPK, dim=-1)  # [BATCH, k] float32, int64
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # recv_x [EXPERTS_PER_RANK, world * BATCH, H] bf16: local expert e's tokens in rows
        # 0..recv_count[e]-1 (ordered by source rank, then token); the other rows are
        # unspecified. use_fp8=True would send e4m3 data plus scales, for an FP8 GEMM.
        recv_x, _recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, BATCH, num_experts, use_fp8=False
        )
        # One GEMM over every slot keeps the shapes static; combine reads only the valid rows,
        # so what the unused rows compute does not matter.
        y = torch.bmm(recv_x, expert_weights)
        # Weighted sum over each token's k experts, back on the token's rank: [BATCH, H] bf16.
        out, _, _ = buffer.low_latency_combine(y, topk_idx, weights, handle)
        return out

    def next_tokens(out: torch.Tensor) -> torch.Tensor:
        """A stand-in for the rest of the model: residual connection and RMSNorm."""
        return F.rms_norm(x.float() + out.float(), (HIDDEN,)).to(torch.bfloat16)

    def decode(step: Callable[[], torch.Tensor], steps: int) -> float:
        """Runs ``steps`` decode steps from ``first_tokens``; returns microseconds per step."""
        x.copy_(first_tokens)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            x.copy_(next_tokens(step()))
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / steps

    # Warm-up, eagerly, so that the eager timing below does not include first-call costs (torch's
    # own kernels load lazily). Nothing may compile or synchronize inside a capture.
    moe_layer()
    torch.cuda.synchronize()
    eager_us = decode(moe_layer, STEPS)

    # The reference backend ("torch") synchronizes with the host: it cannot be captured.
    if buffer.backend_name == "torch":
        if rank == 0:
            print(
                f"ElasticBuffer runs its reference backend here (the NVLink kernels need Hopper "
                f"GPUs in one NVLink domain), which cannot be captured in a CUDA graph; "
                f"decoded {STEPS} steps eagerly on {world} GPUs: {eager_us:.0f} us/step",
                flush=True,
            )
        buffer.destroy()
        dist.destroy_process_group()
        return 0

    # Capture once. thread_local: NCCL's watchdog thread may query events meanwhile. graph_out
    # is the graph's output tensor, rewritten by every replay.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        graph_out = moe_layer()

    def replay() -> torch.Tensor:
        graph.replay()
        return graph_out

    graph_us = decode(replay, STEPS)

    # Proof that each replay reads the current x: one more step both ways on the same tokens.
    from_graph = replay().clone()
    eager = moe_layer()
    error = (from_graph.float() - eager.float()).abs().max() / eager.float().abs().max()
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    ok = float(error) <= TOLERANCE
    if rank == 0:
        print(
            f"decode on {world} GPUs ({buffer.backend_name} backend, {BATCH} tokens/rank, "
            f"{num_experts} experts, top-{TOPK}): CUDA graph {graph_us:.0f} us/step, eager "
            f"{eager_us:.0f} us/step; graph replay vs eager step: max relative difference "
            f"{float(error):.1e}: {'OK' if ok else 'MISMATCH'}",
            flush=True,
        )
    buffer.destroy()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
