"""The copy-engine backend on one GPU shared by 1, 2 and 4 ranks: random programs bit for bit
against the expected results and the reference backend, no kernel during an all-gather, and no
synchronising call or allocation on the all-gather path."""

from __future__ import annotations

import pytest
import torch

from cp_copyengine import CopyEngineBuffer, knobs, session_bytes_hint
from cp_copyengine.testing import expected, make_ops, random_program, same_bits
from ep_jit.testing import RankInfo, run_ranks

pytestmark = pytest.mark.gpu

SHAPES = [(0,), (1,), (3, 5), (17, 33), (64, 1024), (2, 3, 129), ()]
DTYPES = [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int32, torch.uint8]


def _program_worker(info: RankInfo, seed: int, num_ops: int, copy_mode: str) -> dict[str, object]:
    world = info.world_size
    ops = make_ops(seed, num_ops, SHAPES, DTYPES)
    budget = session_bytes_hint(world, [(64, 1024)] * 3, torch.float32)
    seen: dict[str, object] = {}
    per_backend = {}
    for backend in ("copyengine", "torch"):
        buf = CopyEngineBuffer(info.group, budget, num_max_ops_per_session=4, backend=backend)
        assert buf.backend == backend and buf.device.type == "cuda"
        if backend == "copyengine":
            if copy_mode == "loop":
                buf._backend.batched = False
            # Poison the whole area once, before any flag is awaited.
            buf._area.fill_(0xA5)
            torch.cuda.synchronize()
        try:
            per_backend[backend] = random_program(buf, ops, seed=seed)
            if backend == "copyengine":
                seen["copy_mode"] = buf._backend.last_copy_mode
        finally:
            buf.destroy()
    bad = []
    for op in ops:
        want = expected(op, seed, info.rank, world)
        for backend, results in per_backend.items():
            if not same_bits(results[op.index], want):
                bad.append(f"{backend} op {op}")
    assert not bad, f"rank {info.rank}: results differ: {bad[:5]}"
    seen["ops"] = len(ops)
    return seen


@pytest.mark.parametrize(
    ("world", "seed", "num_ops", "copy_mode"),
    [(1, 3, 24, "auto"), (2, 4, 40, "auto"), (2, 5, 24, "loop"), (4, 6, 32, "auto")],
)
def test_random_programs_bit_exact(world: int, seed: int, num_ops: int, copy_mode: str) -> None:
    results = run_ranks(
        world, _program_worker, seed, num_ops, copy_mode, ranks_per_gpu=world, timeout_s=180
    )
    assert [r["ops"] for r in results] == [num_ops] * world
    if copy_mode == "loop":
        assert {r["copy_mode"] for r in results} <= {"loop", "none"}


def _kernel_names(prof: torch.profiler.profile) -> tuple[list[str], list[str]]:
    """(kernels, copies and sets) among the profiled device activities."""
    kernels, copies = [], []
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        if name.startswith(("Memcpy", "Memset")) or "memcpy" in name.lower():
            copies.append(name)
        else:
            kernels.append(name)
    return kernels, copies


def _profile_worker(info: RankInfo) -> dict[str, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    world, rank, dev = info.world_size, info.rank, info.device
    buf = CopyEngineBuffer(info.group, 8 << 20, backend="copyengine")
    xs = [torch.full((256, 1024), float(rank + i), device=dev) for i in range(3)]
    rs_in = torch.ones(world * 64, 128, device=dev)
    torch.cuda.synchronize()
    out: dict[str, list[str]] = {}
    for mode in ("loop", "batch"):
        buf._backend.batched = None if mode == "batch" else False
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with buf.new_session():
                slot = buf.get_inplace_tensor((256, 1024), torch.float32)
                slot.copy_(xs[0].cpu())  # a host-to-device copy, no kernel
                gathered, handle = buf.all_gather([slot, xs[1], xs[2]])
                handle()
                torch.cuda.synchronize()
            torch.cuda.synchronize()
        assert isinstance(gathered, tuple)
        kernels, copies = _kernel_names(prof)
        out[f"{mode} kernels"], out[f"{mode} copies"] = kernels, copies
    with profile(activities=[ProfilerActivity.CUDA]) as prof, buf.new_session():
        reduced, handle = buf.reduce_scatter(rs_in)
        handle()
        torch.cuda.synchronize()
    assert isinstance(reduced, torch.Tensor)
    assert torch.equal(reduced.cpu(), torch.full((64, 128), float(world)))
    out["reduce kernels"], _ = _kernel_names(prof)
    buf.destroy()
    return out


def test_no_kernel_runs_during_an_all_gather() -> None:
    results = run_ranks(2, _profile_worker, ranks_per_gpu=2, timeout_s=120)
    for rank, r in enumerate(results):
        for mode in ("loop", "batch"):
            assert r[f"{mode} kernels"] == [], f"rank {rank} ({mode}): kernels ran: {r}"
        # The per-copy path shows its copies; the profiler sees kernels where there are some.
        assert r["loop copies"], f"rank {rank}: the profiler saw no copy at all: {r}"
        assert r["reduce kernels"], f"rank {rank}: the profiler saw no reduction kernel: {r}"


def _host_path_worker(info: RankInfo) -> dict[str, int]:
    world, rank, dev = info.world_size, info.rank, info.device
    buf = CopyEngineBuffer(info.group, 1 << 20, num_max_ops_per_session=8, backend="copyengine")
    x = torch.full((256,), float(rank), device=dev)
    y = torch.full((3, 5), rank + 0.5, device=dev, dtype=torch.bfloat16)
    want_x = torch.arange(world, dtype=torch.float32)[:, None].expand(world, 256)
    want_y = (torch.arange(world) + 0.5).to(torch.bfloat16)[:, None, None].expand(world, 3, 5)
    torch.cuda.synchronize()
    seen: dict[str, int] = {}
    for checks in (False, True, True):  # the second round with checks reuses views and events
        with knobs.cp.scope():
            knobs.cp.check_inputs = checks
            before = torch.cuda.memory_stats(dev).get("allocation.all.allocated", 0)
            # A call that synchronises with the device raises here (torch's sync debug mode).
            torch.cuda.set_sync_debug_mode("error")
            try:
                buf.create_session()
                slot = buf.get_inplace_tensor((256,), torch.float32)
                assert isinstance(slot, torch.Tensor)
                slot.copy_(x)
                out1, h1 = buf.all_gather(slot)
                outs, h2 = buf.all_gather([x, y])
                h1()
                h2()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            seen[f"allocations checks={checks}"] = (
                torch.cuda.memory_stats(dev).get("allocation.all.allocated", 0) - before
            )
            assert isinstance(out1, torch.Tensor) and isinstance(outs, tuple)
            assert torch.equal(out1.cpu(), want_x) and torch.equal(outs[0].cpu(), want_x)
            assert torch.equal(outs[1].cpu(), want_y)
            torch.cuda.set_sync_debug_mode("error")
            try:
                buf.destroy_session()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    buf.destroy()
    return seen


def test_all_gather_host_path_neither_syncs_nor_allocates() -> None:
    """Sessions of all-gathers (in place and not, checks off and on) make no synchronising CUDA
    call and no allocation of torch's caching allocator, and the data is right."""
    results = run_ranks(2, _host_path_worker, ranks_per_gpu=2, timeout_s=120)
    for rank, seen in enumerate(results):
        assert all(v == 0 for v in seen.values()), f"rank {rank}: {seen}"
