"""A small expert-parallel MoE layer trained for a few steps on CPU ranks (gloo).

    python examples/moe_layer.py                 # 2 ranks, 40 steps
    python examples/moe_layer.py --world-size 4 --steps 60

Each rank owns ``num_experts / world_size`` experts (two-layer MLPs) and a replica of the gate.
Tokens go to their experts' ranks with a differentiable dispatch, come back with a
differentiable combine, and the layer learns to imitate a fixed random teacher MoE. Expert
weights are trained only by the rank owning them (gradients arrive through combine/dispatch);
the replicated gate's gradients are averaged across ranks. Rank 0 prints the loss.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ep_elastic import ElasticBuffer, combine_fn, dispatch_fn
from ep_jit.testing import run_ranks


class MoELayer(nn.Module):
    """Top-k gated mixture of experts whose experts are spread over the ranks of ``buffer``.

    Args:
        buffer: The :class:`ElasticBuffer` of the expert-parallel group.
        hidden: Model width ``H``.
        ffn: Expert MLP width.
        num_experts: ``E`` in total (a multiple of the group size).
        num_topk: Experts per token.
    """

    def __init__(
        self, buffer: ElasticBuffer, hidden: int, ffn: int, num_experts: int, num_topk: int
    ) -> None:
        super().__init__()
        self.buffer, self.num_experts, self.num_topk = buffer, num_experts, num_topk
        self.num_local = num_experts // buffer.num_ranks
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(self.num_local, hidden, ffn) * hidden**-0.5)
        self.w_out = nn.Parameter(torch.randn(self.num_local, ffn, hidden) * ffn**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` float32 on this rank -> ``[T, H]`` float32."""
        probs = self.gate(x).softmax(dim=-1)
        weights, topk_idx = probs.topk(self.num_topk, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        recv_x, recv_idx, recv_w, handle = dispatch_fn(
            self.buffer, x.to(torch.bfloat16), topk_idx, weights, num_experts=self.num_experts
        )
        assert recv_idx is not None and recv_w is not None
        tokens = recv_x.float()
        out = torch.zeros_like(tokens)
        for e in range(self.num_local):
            rows, lanes = (recv_idx == e).nonzero(as_tuple=True)
            hidden = F.gelu(tokens[rows] @ self.w_in[e]) @ self.w_out[e]
            out = out.index_add(0, rows, hidden * recv_w[rows, lanes, None])
        combined, _ = combine_fn(self.buffer, out.to(torch.bfloat16), handle)
        return combined.float()


def train(
    info: Any, steps: int = 40, hidden: int = 64, num_experts: int = 8, verbose: bool = True
) -> list[float]:
    """Trains the layer on this rank's tokens; returns the losses (averaged over ranks)."""
    torch.manual_seed(1234)  # identical teacher and initial gate on every rank
    buffer = ElasticBuffer(info.group, num_max_tokens_per_rank=64, hidden=hidden, num_topk=2)
    teacher = MoELayer(buffer, hidden, 2 * hidden, num_experts, 2)
    student = MoELayer(buffer, hidden, 2 * hidden, num_experts, 2)
    # Experts differ per rank; the gate must not.
    torch.manual_seed(info.rank + 1)
    with torch.no_grad():
        for layer in (teacher, student):
            layer.w_in.normal_(0.0, hidden**-0.5)
            layer.w_out.normal_(0.0, (2 * hidden) ** -0.5)
    optim = torch.optim.Adam(student.parameters(), lr=3e-3)
    data = torch.randn(64, hidden)
    with torch.no_grad():
        target = teacher(data)
    losses = []
    for step in range(steps):
        loss = F.mse_loss(student(data), target)
        optim.zero_grad()
        loss.backward()
        assert student.gate.weight.grad is not None
        dist.all_reduce(student.gate.weight.grad, group=info.group)
        student.gate.weight.grad /= info.world_size
        optim.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=info.group)
        losses.append(float(mean) / info.world_size)
        if verbose and info.rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.5f}", flush=True)
    buffer.destroy()
    return losses


def _worker(info: Any, steps: int) -> None:
    losses = train(info, steps)
    if info.rank == 0:
        print(
            f"loss {losses[0]:.5f} -> {losses[-1]:.5f} "
            f"over {steps} steps on {info.world_size} ranks"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    run_ranks(args.world_size, _worker, args.steps, use_gpu=False)


if __name__ == "__main__":
    main()
