"""A 4-stage MLP trained with a 1F1B pipeline schedule; activations and gradients go through
PipeBuffer. After the last step every stage compares its loss and weights with a single-process
run of the same model and data, and exits non-zero on a mismatch.

    torchrun --nproc-per-node 4 examples/pipeline_1f1b.py --cpu            # CPU ranks, gloo
    torchrun --nproc-per-node 4 examples/pipeline_1f1b.py --backend torch  # any backend
    torchrun --nproc-per-node 4 examples/pipeline_1f1b.py                  # GPUs (ranks may share)

Stage ``s`` runs on rank ``s``. Each step splits a batch into micro-batches; stage ``s`` runs
``min(S - s - 1, M)`` forwards first, then alternates one forward and one backward, then drains
the remaining backwards (1F1B). Gradients accumulate over the micro-batches and SGD steps once.
"""

from __future__ import annotations

import argparse
import gc
import sys
import weakref

import torch
import torch.distributed as dist

# Before the process group exists: torch.distributed.nn's functions take ``group=group.WORLD``
# as a default argument, evaluated when the module is first imported. Imported after
# init_process_group (the first optimizer imports torch._dynamo, which imports it), those
# defaults keep the default group alive after destroy_process_group, and gloo then tears it down
# during interpreter shutdown, at a different moment on every rank. Imported here they hold None.
import torch.distributed.nn
from torch import nn

from ep_jit.knobs import torchrun_env
from pp_rdma import PipeBuffer

HIDDEN, MICRO, BATCH, LR = 64, 4, 8, 0.05


def make_stages(num: int) -> list[nn.Module]:
    """The same initial weights on every rank (seeded)."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(num)]


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(MICRO, BATCH, HIDDEN, generator=g)
    y = torch.randn(MICRO, BATCH, HIDDEN, generator=g)
    return x, y


def reference(num_stages: int, steps: int) -> tuple[list[nn.Module], list[float]]:
    """The whole model in one process: per-micro-batch forward/backward, one SGD step."""
    stages = make_stages(num_stages)
    params = [p for s in stages for p in s.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(steps):
        x, y = make_data(step)
        opt.zero_grad()
        total = 0.0
        for m in range(MICRO):
            h = x[m]
            for s in stages:
                h = s(h)
            loss = nn.functional.mse_loss(h, y[m]) / MICRO
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    return stages, losses


def train(
    rank: int, world: int, device: torch.device, backend: str, steps: int
) -> tuple[nn.Module, list[float]]:
    """Stage ``rank`` of the pipeline, trained for ``steps`` steps with 1F1B."""
    stage = make_stages(world)[rank].to(device)
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    buf = PipeBuffer(
        None, BATCH * HIDDEN * 4, num_max_inflight=MICRO, backend=backend, device=device
    )
    if device.type == "cuda":
        # Load every kernel before the first pending stream wait (CUDA loads modules lazily).
        warm = stage(torch.zeros(BATCH, HIDDEN, device=device, requires_grad=True))
        nn.functional.mse_loss(warm, torch.zeros_like(warm)).backward()
        stage.zero_grad()
    losses = []
    for step in range(steps):
        x, y = make_data(step)
        opt.zero_grad()
        micro = MicroBatches(stage, buf, rank, world, x.to(device), y.to(device))
        warmup = min(world - rank - 1, MICRO)
        fwd = bwd = 0
        for _ in range(warmup):
            micro.forward(fwd)
            fwd += 1
        while fwd < MICRO:
            micro.forward(fwd)
            fwd += 1
            micro.backward(bwd)
            bwd += 1
        while bwd < MICRO:
            micro.backward(bwd)
            bwd += 1
        buf.synchronize()
        opt.step()
        losses.append(float(micro.total))
    buf.destroy()
    return stage, losses


class MicroBatches:
    """One step's micro-batches on one stage: forward and backward of micro-batch ``m``."""

    def __init__(
        self,
        stage: nn.Module,
        buf: PipeBuffer,
        rank: int,
        world: int,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        self.stage, self.buf, self.rank, self.x, self.y = stage, buf, rank, x, y
        self.first, self.last = rank == 0, rank == world - 1
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.total = torch.zeros((), device=x.device)

    def forward(self, m: int) -> None:
        if self.first:
            h = self.x[m]
        else:
            h = torch.empty(BATCH, HIDDEN, device=self.x.device)
            self.buf.recv(h, self.rank - 1)  # activation from the previous stage
            h.requires_grad_(True)
        self.inputs[m] = h
        out = self.stage(h)
        if self.last:
            loss = nn.functional.mse_loss(out, self.y[m]) / MICRO
            self.total = self.total + loss.detach()
            self.outputs[m] = loss
        else:
            self.buf.send(out.detach().contiguous(), self.rank + 1)
            self.outputs[m] = out

    def backward(self, m: int) -> None:
        if self.last:
            self.outputs[m].backward()
        else:
            grad = torch.empty(BATCH, HIDDEN, device=self.x.device)
            self.buf.recv(grad, self.rank + 1)  # gradient from the next stage
            self.outputs[m].backward(grad)
        h = self.inputs.pop(m)
        if not self.first:
            assert h.grad is not None
            self.buf.send(h.grad.contiguous(), self.rank - 1)
        self.outputs.pop(m)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", help="auto, copy_engine, nixl or torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo) even with CUDA")
    args = parser.parse_args()
    env = torchrun_env()
    if env is None:
        parser.error("start it with torchrun (RANK, WORLD_SIZE, MASTER_ADDR are not set)")
    rank, world, local = env.rank, env.world_size, env.local_rank
    use_gpu = torch.cuda.is_available() and not args.cpu
    if use_gpu:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        shared = torch.cuda.device_count() < env.local_world_size  # ranks share GPUs: gloo
        dist.init_process_group("gloo" if shared else "cpu:gloo,cuda:nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        stage, losses = train(rank, world, device, args.backend, args.steps)
        ref_stages, ref_losses = reference(world, args.steps)
        ok = True
        for (name, p), q in zip(
            stage.named_parameters(), ref_stages[rank].parameters(), strict=True
        ):
            if not torch.allclose(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5):
                print(f"stage {rank}: {name} differs from the single-process run", file=sys.stderr)
                ok = False
        if rank == world - 1:
            if not torch.allclose(
                torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6
            ):
                print(f"losses {losses} differ from {ref_losses}", file=sys.stderr)
                ok = False
            print(f"losses per step: {[round(v, 6) for v in losses]}")
        flags: list[object] = [None] * world
        dist.all_gather_object(flags, ok)
        if rank == 0:
            print("pipeline_1f1b: OK" if all(flags) else "pipeline_1f1b: MISMATCH")
        # Leave together: no rank tears its connections down while another still uses them.
        dist.barrier()
        ok = all(flags)
    finally:
        world_group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
    # destroy_process_group frees the group (its threads and connections) only when nothing
    # else holds it; a group that outlives it is torn down at interpreter exit instead.
    gc.collect()
    if world_group() is not None:
        print(
            f"rank {rank}: the default process group is still referenced after "
            "destroy_process_group",
            file=sys.stderr,
        )
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
