"""Random session programs and their expected results, for tests on every backend.

Every rank builds the tensor of op ``i`` from a seed (``rank_tensor``), so any rank can compute
what an all-gather or reduce-scatter must return without communicating. :func:`random_program`
runs DeepEP's AGRS stress pattern: create a session; all-gather (or reduce-scatter) groups of
ops, in place or not, batched or not; fetch random in-flight groups; destroy and create again.
Inputs reach the GPU by host-to-device copies, so the program launches no kernel of its own
beside a pending stream wait (only the reduce-scatter's reduction runs kernels).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cp_copyengine.buffer import CopyEngineBuffer, GatherHandle
from cp_copyengine.plan import align_up, nbytes_of
from cp_copyengine.reduction import reduce_shards

__all__ = ["Op", "expected", "make_ops", "random_program", "rank_tensor", "same_bits"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Op:
    """One op: an all-gather of ``shape``, or a reduce-scatter of ``[R*shape[0], *shape[1:]]``."""

    index: int
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    reduce_op: str = "sum"


def rank_tensor(seed: int, rank: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s deterministic CPU tensor for ``seed`` (the same on every process)."""
    gen = torch.Generator().manual_seed(seed * 1009 + rank * 7919 + 1)
    if dtype in FLOAT_DTYPES or dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    lo, hi = (0, 256) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, tuple(shape), generator=gen).to(dtype)


def op_input(op: Op, seed: int, rank: int, world: int) -> torch.Tensor:
    """The CPU input of ``op`` on ``rank``."""
    shape = op.shape if op.kind == "all_gather" else (world * op.shape[0], *op.shape[1:])
    return rank_tensor(seed + op.index, rank, shape, op.dtype)


def expected(op: Op, seed: int, rank: int, world: int) -> torch.Tensor:
    """What ``op`` returns on ``rank`` (CPU): ``[R, *shape]`` or the reduced ``shape`` shard."""
    inputs = [op_input(op, seed, p, world) for p in range(world)]
    if op.kind == "all_gather":
        return torch.stack(inputs)
    n = op.shape[0]
    return reduce_shards([x[rank * n : (rank + 1) * n] for x in inputs], op.reduce_op)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same shape, dtype and bytes (NaN-safe, fp8-safe)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a8 = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b8 = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a8, b8)


def make_ops(
    seed: int,
    num_ops: int,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[torch.dtype],
    reduce_fraction: float = 0.25,
) -> list[Op]:
    """``num_ops`` random ops (the same on every rank for the same arguments)."""
    rng = random.Random(seed)
    ops = []
    for i in range(num_ops):
        shape = tuple(rng.choice(list(shapes)))
        dtype = rng.choice(list(dtypes))
        reducible = dtype in FLOAT_DTYPES or dtype in (torch.int32, torch.int64)
        if reducible and len(shape) > 0 and rng.random() < reduce_fraction:
            red = "avg" if dtype in FLOAT_DTYPES and rng.random() < 0.5 else "sum"
            ops.append(Op(i, "reduce_scatter", shape, dtype, red))
        else:
            ops.append(Op(i, "all_gather", shape, dtype))
    return ops


def _region(op: Op, world: int) -> int:
    return align_up(world * nbytes_of(op.shape, op.dtype))


def random_program(
    buffer: CopyEngineBuffer,
    ops: Sequence[Op],
    *,
    seed: int,
    max_group: int = 4,
) -> dict[int, torch.Tensor]:
    """Runs ``ops`` through a random create / call / fetch / destroy program (collective).

    The decisions come from ``seed`` only, so every rank makes the same ones. Each all-gather
    group is in place with probability 0.5 and batched with probability 0.8 (else one call per
    tensor); a fetch calls a random in-flight group's handle and copies its outputs to the CPU.

    Returns:
        ``{op index: CPU result}`` for every op.
    """
    rng = random.Random(seed ^ 0x5EED)
    world = buffer.world_size
    todo = list(ops)
    inflight: list[tuple[GatherHandle, list[tuple[int, torch.Tensor]]]] = []
    results: dict[int, torch.Tensor] = {}

    def fetch(k: int) -> None:
        handle, outs = inflight.pop(k)
        handle()
        for i, out in outs:
            results[i] = out.cpu().clone()

    biggest = max((_region(op, world) for op in ops), default=0)
    if biggest > buffer.num_max_session_bytes:
        raise ValueError(f"an op needs {biggest} bytes, more than the buffer's session area")
    while todo or inflight or buffer.in_session:
        if not buffer.in_session:
            if not todo:
                break
            buffer.create_session()
            continue
        left_bytes = buffer.num_max_session_bytes - buffer.session_bytes_used
        left_calls = buffer.num_max_ops_per_session - buffer.session_calls
        group: list[Op] = []
        for op in todo[: rng.randint(1, max_group)]:
            key = (op.kind, op.dtype, op.reduce_op)
            if group and key != (group[0].kind, group[0].dtype, group[0].reduce_op):
                break
            if sum(_region(o, world) for o in [*group, op]) > left_bytes:
                break
            group.append(op)
        batched = rng.random() < 0.8
        can_call = bool(group) and (1 if batched else len(group)) <= left_calls
        choices = [("call", 0.55)] if can_call else []
        choices += [("fetch", 0.35)] if inflight else [("destroy", 0.1)]
        action = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        if action == "call":
            del todo[: len(group)]
            inflight.extend(_call(buffer, group, seed, rng, batched))
        elif action == "fetch":
            fetch(rng.randrange(len(inflight)))
        else:
            buffer.destroy_session()
    return results


def _call(
    buffer: CopyEngineBuffer,
    group: list[Op],
    seed: int,
    rng: random.Random,
    batched: bool,
) -> list[tuple[GatherHandle, list[tuple[int, torch.Tensor]]]]:
    world, rank, dev = buffer.world_size, buffer.rank, buffer.device
    inputs = [op_input(op, seed, rank, world) for op in group]
    if group[0].kind == "reduce_scatter":
        ts = [x.to(dev) for x in inputs]
        if batched:
            outs, h = buffer.reduce_scatter(ts, op=group[0].reduce_op)
            return [(h, list(zip([o.index for o in group], _as_tuple(outs), strict=True)))]
        done = []
        for op, t in zip(group, ts, strict=True):
            out, h = buffer.reduce_scatter(t, op=op.reduce_op)
            done.append((h, [(op.index, _as_tuple(out)[0])]))
        return done
    inplace = rng.random() < 0.5
    if batched:
        if inplace:
            views = buffer.get_inplace_tensor([op.shape for op in group], group[0].dtype)
            ts = list(_as_tuple(views))
            for v, x in zip(ts, inputs, strict=True):
                v.copy_(x)
        else:
            ts = [x.to(dev) for x in inputs]
        outs, h = buffer.all_gather(ts)
        return [(h, list(zip([o.index for o in group], _as_tuple(outs), strict=True)))]
    done = []
    for op, x in zip(group, inputs, strict=True):
        if inplace:
            t = _as_tuple(buffer.get_inplace_tensor(op.shape, op.dtype))[0]
            t.copy_(x)
        else:
            t = x.to(dev)
        out, h = buffer.all_gather(t)
        done.append((h, [(op.index, _as_tuple(out)[0])]))
    return done


def _as_tuple(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)
