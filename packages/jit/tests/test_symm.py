from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ep_jit
from ep_jit import DeviceWatchdog, JitTimeoutError, SymmetricBuffer, knobs
from ep_jit.kernels import barrier_spec, barrier_threads
from ep_jit.testing import RankInfo, peer_pattern, peer_write_spec, run_ranks

MULTI = [
    pytest.param(2, marks=[pytest.mark.gpu, pytest.mark.multigpu(2)]),
    pytest.param(4, marks=[pytest.mark.gpu, pytest.mark.multigpu(4)]),
]


def _setup(cache: str) -> None:
    knobs.jit.cache_dir = cache


def _peer_write_worker(info: RankInfo, cache: str, n: int) -> None:
    _setup(cache)
    world, rank, dev = info.world_size, info.rank, info.device
    region = world * n * 4
    buf = SymmetricBuffer(info.group, 3 * region)
    assert (buf.rank, buf.world_size) == (rank, world)
    assert buf.peer_ptrs[rank] == buf.local.data_ptr()
    assert buf.peer_ptrs_dev.tolist() == buf.peer_ptrs
    assert len(set(buf.peer_ptrs)) == world
    buf.local.fill_(0xFF)  # poison before anyone writes
    buf.barrier()
    # 1) SM stores through the peer table, 2) copy engine, 3) torch copy into a peer view.
    ep_jit.build(peer_write_spec(world)).launch(64, 256, buf.peer_ptrs_dev, 0, rank, n)
    for dst in range(world):
        src = peer_pattern(rank, dst, n, dev)
        buf.copy_to_peer(dst, region + rank * n * 4, src)
        buf.peer_tensor(dst, 2 * region + rank * n * 4, (n,), torch.int32).copy_(src)
    buf.barrier()
    torch.cuda.synchronize()
    for k, how in enumerate(("kernel", "copy engine", "peer view copy")):
        got = buf.tensor(k * region, (world, n), torch.int32)
        for src_rank in range(world):
            torch.testing.assert_close(
                got[src_rank],
                peer_pattern(src_rank, rank, n, dev),
                rtol=0,
                atol=0,
                msg=f"{how}: data from rank {src_rank} on rank {rank}",
            )
    buf.barrier()
    torch.cuda.synchronize()
    buf.destroy()
    buf.destroy()  # idempotent
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.barrier()


def _cycles_worker(info: RankInfo, cycles: int) -> None:
    def cycle() -> None:
        a = SymmetricBuffer(info.group, 8 << 20)
        b = SymmetricBuffer(info.group, 1 << 20, signal_bytes=0)
        assert a.peer_ptrs[info.rank] != b.peer_ptrs[info.rank]
        peer = (info.rank + 1) % info.world_size
        a.peer_tensor(peer, 0, (4,), torch.int32).fill_(info.rank)
        b.copy_to_peer(peer, 0, torch.full((4,), info.rank, dtype=torch.int32, device=info.device))
        a.barrier()
        b.barrier()
        torch.cuda.synchronize()
        left = (info.rank - 1) % info.world_size
        assert a.tensor(0, (4,), torch.int32).tolist() == [left] * 4
        assert b.tensor(0, (4,), torch.int32).tolist() == [left] * 4
        a.barrier()
        torch.cuda.synchronize()
        a.destroy()
        b.destroy()

    for _ in range(3):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    free0, allocated0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()
    for _ in range(cycles):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    free1, allocated1 = torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()
    # Device memory must not grow with the cycles (each cycle maps ~9 MiB per rank; a leak of
    # 100 cycles would show as ~900 MiB). torch's allocator may keep a few small blocks of its
    # own bookkeeping, so allow one cycle's worth of slack.
    assert free1 >= free0 - (16 << 20), f"free memory fell by {(free0 - free1) >> 20} MiB"
    assert allocated1 <= allocated0 + (1 << 20), f"allocated grew {allocated1 - allocated0} B"
    assert free0 - free1 < (32 << 20), f"device memory fell by {(free0 - free1) >> 20} MiB"


def _barrier_kernel_worker(info: RankInfo, cache: str) -> None:
    _setup(cache)
    world, rank = info.world_size, info.rank
    kernel = ep_jit.build(barrier_spec(world))
    threads = barrier_threads(world)
    buf = SymmetricBuffer(info.group, 4096)
    wd = DeviceWatchdog(["barrier"], rank=rank, timeout_s=20)

    def barrier() -> None:
        kernel.launch(1, threads, buf.peer_ptrs_dev, buf.signal_offset, rank, wd.context(), 0)

    for it in range(20):
        for dst in range(world):
            buf.peer_tensor(dst, rank * 4, (1,), torch.int32).fill_(it * 100 + rank)
        barrier()
        got = buf.tensor(0, (world,), torch.int32).clone()
        barrier()  # nobody overwrites before everyone has read
        torch.cuda.synchronize()
        assert got.tolist() == [it * 100 + s for s in range(world)], f"iteration {it}"
    wd.check()
    assert not wd.failed

    # Only rank 0 enters: it must time out, record the first missing peer and return.
    lonely = SymmetricBuffer(info.group, 4096)
    wd2 = DeviceWatchdog({7: "test:lonely_barrier"}, rank=rank, timeout_s=1.0)
    if rank == 0:
        kernel.launch(1, threads, lonely.peer_ptrs_dev, lonely.signal_offset, 0, wd2.context(), 7)
        torch.cuda.synchronize()
        assert wd2.failed
        with pytest.raises(
            JitTimeoutError, match="stage 'test:lonely_barrier' waiting for peer"
        ) as err:
            wd2.check()
        assert 1 <= err.value.peer < world
        assert (err.value.rank, err.value.observed, err.value.expected) == (0, 0, 1)
        assert err.value.block == 0
        wd2.reset()
        torch.cuda.synchronize()
        wd2.check()
    dist.barrier(group=info.group)
    torch.cuda.synchronize()
    lonely.destroy()
    buf.destroy()


def _sizes_worker(info: RankInfo) -> None:
    # Ranks asking for different sizes all fail (a smaller peer buffer would be written past its
    # end); the group is usable afterwards.
    with pytest.raises(ValueError, match="must agree on every rank"):
        SymmetricBuffer(info.group, 4096 * (1 + info.rank))
    differs = r"signal_bytes differs across ranks \(rank 0: 4, rank 1: 8"
    with pytest.raises(ValueError, match=differs):
        SymmetricBuffer(info.group, 4096, signal_bytes=4 + 4 * (info.rank % 2))
    buf = SymmetricBuffer(info.group, 4096)
    buf.barrier()
    torch.cuda.synchronize()
    buf.destroy()


def _domain_worker(info: RankInfo, expected: bool) -> None:
    assert ep_jit.is_single_nvlink_domain(info.group) is expected


def test_cpu_ranks_are_not_an_nvlink_domain() -> None:
    run_ranks(2, _domain_worker, False, timeout_s=120, use_gpu=False)


def test_symmetric_buffer_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="nbytes"):
        SymmetricBuffer(None, 0)
    with pytest.raises(ValueError, match="signal_bytes"):
        SymmetricBuffer(None, 16, signal_bytes=3)
    with pytest.raises(ValueError, match="CUDA device"):
        SymmetricBuffer(None, 16, device="cpu")


@pytest.mark.parametrize("world_size", MULTI)
def test_nvlink_domain_on_gpus(world_size: int) -> None:
    run_ranks(world_size, _domain_worker, True, timeout_s=180)


@pytest.mark.parametrize("world_size", MULTI)
def test_peer_writes_reach_every_rank(world_size: int, jit_cache: Path) -> None:
    run_ranks(world_size, _peer_write_worker, str(jit_cache), 100_003, timeout_s=300)


@pytest.mark.parametrize("world_size", MULTI)
def test_create_destroy_cycles_do_not_leak(world_size: int) -> None:
    run_ranks(world_size, _cycles_worker, 100, timeout_s=600)


@pytest.mark.parametrize("world_size", MULTI)
def test_barrier_kernel_and_timeout(world_size: int, jit_cache: Path) -> None:
    run_ranks(world_size, _barrier_kernel_worker, str(jit_cache), timeout_s=300)


@pytest.mark.parametrize("world_size", MULTI)
def test_symmetric_buffer_sizes_must_agree(world_size: int) -> None:
    run_ranks(world_size, _sizes_worker, timeout_s=180)
