"""Training an expert-parallel MoE layer: forward, loss, backward, optimizer step.

    torchrun --nproc-per-node 2 train_moe.py              # CPU (gloo) or 2 GPUs (NCCL)
    torchrun --nproc-per-node 4 train_moe.py --steps 60

Each rank owns ``num_experts / world_size`` experts (two-layer MLPs) and a replica of the router.
Tokens reach their experts' ranks through ``dispatch_fn`` and come back through ``combine_fn``,
the differentiable forms of ``ElasticBuffer.dispatch`` / ``combine``: their backward passes move
the gradients along the same routes in the opposite direction (the backward of dispatch is a
combine, the backward of combine a dispatch), so ``loss.backward()`` on every rank delivers each
expert's gradient to the rank that owns it. The layer learns to imitate a fixed random teacher
MoE of the same shape; rank 0 prints the loss every few steps.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

# Imported before the process group exists, on purpose: torch.distributed.nn, which creating an
# optimizer imports, binds the default group of the moment into its functions' default
# arguments when first imported. That reference would keep the group alive past
# destroy_process_group(), and a gloo group still alive while Python exits can abort it.
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn

from ep_elastic import ElasticBuffer, combine_fn, dispatch_fn


class MoELayer(nn.Module):
    """Top-k gated mixture of experts whose experts are spread over the ranks of ``buffer``.

    Args:
        buffer: The :class:`ElasticBuffer` of the expert-parallel group.
        hidden: Model width ``H`` (a multiple of 64).
        ffn: Expert MLP width.
        num_experts: ``E`` in total, a multiple of the group size; rank ``r`` owns experts
            ``r * E / R`` to ``(r + 1) * E / R - 1``.
        num_topk: Experts per token.
    """

    def __init__(
        self, buffer: ElasticBuffer, hidden: int, ffn: int, num_experts: int, num_topk: int
    ) -> None:
        super().__init__()
        self.buffer, self.num_experts, self.num_topk = buffer, num_experts, num_topk
        self.num_local = num_experts // buffer.num_ranks
        device = buffer.device
        # The router is replicated: every rank routes its own tokens with the same weights.
        self.gate = nn.Linear(hidden, num_experts, bias=False, device=device)
        # Only this rank's experts are stored here.
        self.w_in = nn.Parameter(torch.empty(self.num_local, hidden, ffn, device=device))
        self.w_out = nn.Parameter(torch.empty(self.num_local, ffn, hidden, device=device))
        nn.init.normal_(self.w_in, 0.0, hidden**-0.5)
        nn.init.normal_(self.w_out, 0.0, ffn**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` float32, this rank's tokens -> ``[T, H]`` float32."""
        probs = self.gate(x).softmax(dim=-1)
        weights, topk_idx = probs.topk(self.num_topk, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Tokens travel as BF16. recv_x [M, H] holds each token routed here once; recv_idx
        # [M, k] gives its local experts (-1: expert on another rank); recv_w [M, k] the router
        # weights, which carry gradients back to the router.
        recv_x, recv_idx, recv_w, handle = dispatch_fn(
            self.buffer, x.to(torch.bfloat16), topk_idx, weights, num_experts=self.num_experts
        )
        assert recv_idx is not None and recv_w is not None  # None only with do_expand=True
        tokens = recv_x.float()
        out = torch.zeros_like(tokens)
        for e in range(self.num_local):
            rows, slots = (recv_idx == e).nonzero(as_tuple=True)
            hidden = F.gelu(tokens[rows] @ self.w_in[e]) @ self.w_out[e]
            # combine sums without weighting: scale by the router weight on the expert side.
            out = out.index_add(0, rows, hidden * recv_w[rows, slots, None])
        combined, _ = combine_fn(self.buffer, out.to(torch.bfloat16), handle)
        return combined.float()


def train(
    group: dist.ProcessGroup,
    device: torch.device,
    steps: int = 30,
    hidden: int = 64,
    num_experts_per_rank: int = 4,
    verbose: bool = True,
) -> list[float]:
    """Trains a student layer to imitate a teacher; returns the loss of each step.

    Collective: every rank of ``group`` calls it with the same arguments. The loss of a step is
    the mean over ranks of each rank's mean squared error on its own tokens.
    """
    rank, world = group.rank(), group.size()
    num_experts = num_experts_per_rank * world
    buffer = ElasticBuffer(group, num_max_tokens_per_rank=64, hidden=hidden, num_topk=2)
    # The seed makes the routers equal on every rank; the experts are re-drawn per rank below.
    torch.manual_seed(1234)
    teacher = MoELayer(buffer, hidden, 2 * hidden, num_experts, 2)
    student = MoELayer(buffer, hidden, 2 * hidden, num_experts, 2)
    torch.manual_seed(1 + rank)
    with torch.no_grad():
        for layer in (teacher, student):
            layer.w_in.normal_(0.0, hidden**-0.5)
            layer.w_out.normal_(0.0, (2 * hidden) ** -0.5)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    data = torch.randn(64, hidden, device=device)  # this rank's tokens
    with torch.no_grad():
        target = teacher(data)

    losses = []
    for step in range(steps):
        loss = F.mse_loss(student(data), target)
        optimizer.zero_grad()
        # The job's loss is the mean over ranks, so each rank backpropagates its share. Expert
        # gradients arrive complete at their owner through the backward of combine and dispatch
        # (they include every rank's tokens); the replicated router's gradient is summed over
        # ranks, as data-parallel gradients are.
        (loss / world).backward()
        assert student.gate.weight.grad is not None
        dist.all_reduce(student.gate.weight.grad, group=group)
        optimizer.step()

        mean = loss.detach() / world
        dist.all_reduce(mean, group=group)
        losses.append(float(mean))
        if verbose and rank == 0 and (step % 5 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.5f}", flush=True)
    buffer.destroy()
    return losses


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = init_distributed()
    group = dist.group.WORLD
    assert group is not None
    losses = train(group, device, args.steps)
    if dist.get_rank() == 0:
        print(
            f"loss {losses[0]:.5f} -> {losses[-1]:.5f} over {args.steps} steps on "
            f"{dist.get_world_size()} ranks ({device.type})",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
