"""``torch.compile(fullgraph=True)`` of a model that calls ElasticBuffer, on gloo (and on a GPU).

Dispatch, combine and the low-latency pair are custom ops inside the compiled graph (no graph
break); the compiled forward and backward equal the eager ones bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ep_elastic import ElasticBuffer
from ep_elastic.autograd import combine_fn, dispatch_fn
from ep_jit.testing import gpu_placements, run_ranks

NMAX, HIDDEN, K = 8, 128, 2


def _compile_worker(info: Any, backend: str) -> None:
    torch.manual_seed(info.rank)
    torch._dynamo.reset()
    dev = info.device
    e = 2 * info.world_size
    buffer = ElasticBuffer(
        info.group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=K, backend=backend,
        device=dev,
    )  # fmt: skip
    expert = torch.nn.Linear(HIDDEN, HIDDEN, dtype=torch.bfloat16, device=dev)

    def moe(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        recv, _, _, handle = dispatch_fn(buffer, x, idx, num_experts=e, do_cpu_sync=False)
        out, _ = combine_fn(buffer, expert(recv), handle)
        return out

    def plain(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        recv, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_experts=e)
        again, _, _, _, _ = buffer.dispatch(x * 2, handle=handle)
        out, _, _ = buffer.combine(torch.relu(again) + recv, handle)
        return out

    def low_latency(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        recv, _, handle, _, hook = buffer.low_latency_dispatch(
            x, idx, NMAX, e, use_fp8=False, return_recv_hook=True
        )
        hook()
        out, _, _ = buffer.low_latency_combine(recv * 2, idx, w, handle)
        return out

    x = torch.randn(NMAX, HIDDEN, device=dev).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e)[:K] for _ in range(NMAX)]).to(dev)
    w = torch.rand(NMAX, K, device=dev)

    # Forward and backward of a training MoE step.
    x_eager = x.clone().requires_grad_()
    eager = moe(x_eager, idx)
    eager.float().square().sum().backward()
    assert x_eager.grad is not None and expert.weight.grad is not None
    grads = (x_eager.grad.clone(), expert.weight.grad.clone())
    expert.weight.grad = None
    x_comp = x.clone().requires_grad_()
    compiled = torch.compile(moe, fullgraph=True)(x_comp, idx)
    compiled.float().square().sum().backward()
    assert torch.equal(compiled, eager)
    assert x_comp.grad is not None and torch.equal(x_comp.grad, grads[0])
    assert torch.equal(expert.weight.grad, grads[1])

    # The methods themselves, a cached dispatch included, and the low-latency pair.
    with torch.no_grad():
        assert torch.equal(torch.compile(plain, fullgraph=True)(x, idx), plain(x, idx))
        got = torch.compile(low_latency, fullgraph=True)(x, idx, w)
        assert torch.equal(got, low_latency(x, idx, w))
    buffer.destroy()


def test_compile_fullgraph_gloo() -> None:
    run_ranks(2, _compile_worker, "torch", timeout_s=300, use_gpu=False)


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,), dedicated=False))
def test_compile_fullgraph_nvlink(world_size: int, per_gpu: int) -> None:
    run_ranks(
        world_size,
        _compile_worker,
        "nvlink",
        timeout_s=300,
        use_gpu=True,
        ranks_per_gpu=per_gpu,
    )
