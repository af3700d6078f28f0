"""PeerMemory (driver virtual memory shared by file descriptor), stream memory operations,
bounded host waits and the launcher's ranks-per-GPU mode.

GPU cases run 1, 2 and 4 ranks on ONE GPU (a gloo group; the ranks' contexts time-slice the GPU,
so cross-rank handoffs are slow but correct) and, where the machine has them, one GPU per rank.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ep_jit
from ep_jit import JitTimeoutError, PeerMemory, knobs
from ep_jit._dlpack import device_tensor
from ep_jit.testing import RankInfo, gpu_placements, peer_pattern, peer_write_spec, run_ranks

HOST_BYTES = 4 << 20
# (ranks, ranks per GPU): shared-GPU cases need one GPU, the others one GPU per rank.
PLACEMENTS = gpu_placements((1, 2, 4))
SHARED = gpu_placements((2, 4), dedicated=False)


def _setup(cache: str) -> None:
    knobs.jit.cache_dir = cache


def _traffic_worker(info: RankInfo, cache: str, n: int) -> None:
    """Kernel stores, copy engines and peer views reach every rank's GPU and host segments."""
    _setup(cache)
    world, rank, dev = info.world_size, info.rank, info.device
    region = world * n * 4
    mem = PeerMemory(info.group, 3 * region, host_bytes=HOST_BYTES, timeout_s=60)
    assert (mem.rank, mem.world_size) == (rank, world)
    assert mem.peer_ptrs[rank] == mem.local.data_ptr()
    assert mem.peer_ptrs_dev.tolist() == mem.peer_ptrs
    assert len(set(mem.peer_ptrs)) == world
    assert mem.host_bytes == HOST_BYTES and mem.host_local is not None
    assert int(mem.signal_local.abs().sum()) == 0
    mem.local.fill_(0xFF)  # poison before anyone writes
    mem.host_local.fill_(0xEE)
    mem.barrier()
    ep_jit.build(peer_write_spec(world)).launch(64, 256, mem.peer_ptrs_dev, 0, rank, n)
    for dst in range(world):
        src = peer_pattern(rank, dst, n, dev)
        mem.copy_to_peer(dst, region + rank * n * 4, src)
        mem.peer_tensor(dst, 2 * region + rank * n * 4, (n,), torch.int32).copy_(src)
        # Host segments: every rank writes its slice of every peer's host segment.
        mem.host_tensor(dst, rank * n * 4, (n,), torch.int32).copy_(src)
    mem.barrier()
    mem.synchronize("test traffic")
    for k, how in enumerate(("kernel", "copy engine", "peer view copy")):
        got = mem.tensor(k * region, (world, n), torch.int32)
        for s in range(world):
            assert torch.equal(got[s], peer_pattern(s, rank, n, dev)), f"{how}: {s} -> {rank}"
    # The host segments, read through each rank's window and through the contiguous window.
    for owner in range(world):
        mine = mem.host_tensor(owner, 0, (world, n), torch.int32)
        flat = device_tensor(mem.host_window_ptr + owner * mem.host_bytes, region, dev, mem)
        for s in range(world):
            want = peer_pattern(s, owner, n, dev)
            assert torch.equal(mine[s], want), f"host segment of {owner}, from {s}"
            assert torch.equal(flat.view(torch.int32).view(world, n)[s], want)
    # The memory-operation barrier orders copy-engine traffic without any kernel.
    peer = (rank + 1) % world
    mem.copy_to_peer(peer, 0, torch.full((8,), 1000 + rank, dtype=torch.int32, device=dev))
    mem.barrier_mem_ops()
    mem.synchronize("test memory-op barrier")
    assert mem.tensor(0, (8,), torch.int32).tolist() == [1000 + (rank - 1) % world] * 8
    mem.barrier()
    mem.destroy()
    mem.destroy()  # idempotent
    assert mem.destroyed
    with pytest.raises(RuntimeError, match="destroyed"):
        mem.barrier()


def _cycles_worker(info: RankInfo, cycles: int) -> None:
    """Create/destroy cycles leave device and host memory where they were."""

    def cycle() -> None:
        mem = PeerMemory(info.group, 4 << 20, host_bytes=2 << 20, timeout_s=60)
        peer = (info.rank + 1) % info.world_size
        mem.copy_to_peer(
            peer, 0, torch.full((4,), info.rank, dtype=torch.int32, device=info.device)
        )
        mem.barrier()
        mem.synchronize()
        assert mem.tensor(0, (4,), torch.int32).tolist() == [(info.rank - 1) % info.world_size] * 4
        mem.destroy()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(3):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    free0, rss0 = torch.cuda.mem_get_info()[0], rss()
    for _ in range(cycles):
        cycle()
    gc.collect()
    torch.cuda.synchronize()
    free1, rss1 = torch.cuda.mem_get_info()[0], rss()
    # Each cycle maps 4 MiB of GPU and 2 MiB of host memory per rank; a leak of 100 cycles would
    # show as hundreds of MiB. Allow one cycle's worth of slack per rank of the GPU.
    slack = (8 << 20) * info.ranks_per_gpu
    assert free1 >= free0 - slack, f"free GPU memory fell by {(free0 - free1) >> 20} MiB"
    assert rss1 - rss0 < (64 << 20), f"resident host memory grew {(rss1 - rss0) >> 20} MiB"


def _timeout_worker(info: RankInfo) -> None:
    """A rank that never arrives at a barrier makes the others raise; new buffers work after."""
    mem = PeerMemory(info.group, 1 << 20, timeout_s=2.0)
    if info.rank != 0:
        mem.barrier()
    # Rank 0 never arrives: every other rank's barrier waits for it, times out and says so.
    if info.rank != 0:
        with pytest.raises(JitTimeoutError, match="peer memory barrier") as err:
            mem.synchronize("barrier without rank 0")
        assert err.value.peer == 0 and err.value.rank == info.rank
    dist.barrier(group=info.group)
    mem.destroy()
    again = PeerMemory(info.group, 1 << 20, timeout_s=30)
    again.barrier()
    again.synchronize()
    again.destroy()


def _peer_abort_worker(info: RankInfo) -> None:
    """A rank that gives up on an op (``signal_abort``) stops its peers' waits at once: their
    kernel records it and ``DeviceWatchdog.check`` raises ``JitPeerAbortError`` naming it."""
    import time

    from ep_jit.kernels import barrier_spec, barrier_threads

    world, rank, last = info.world_size, info.rank, info.world_size - 1
    mem = PeerMemory(info.group, 1 << 20, timeout_s=60.0)
    kernel = ep_jit.build(barrier_spec(world))
    # Word 0 of every rank's segment is its abort word; words from 4096 on are a barrier of the
    # test's own that rank `last` never enters.
    mem.tensor(0, (2048,), torch.int32).zero_()
    mem.barrier()
    mem.synchronize()
    watchdog = ep_jit.DeviceWatchdog({7: "test:abandoned barrier"}, rank=rank, timeout_s=60.0)
    ctx = watchdog.context()
    ctx.abort = mem.peer_ptrs[rank]
    start = time.monotonic()
    if rank == last:
        ep_jit.signal_abort(mem.peer_ptrs, rank)
    else:
        kernel.launch(1, barrier_threads(world), mem.peer_ptrs_dev, 4096, rank, ctx, 7)
        torch.cuda.synchronize()
        with pytest.raises(ep_jit.JitPeerAbortError, match=f"rank {last} gave up") as err:
            watchdog.check()
        assert (err.value.peer, err.value.rank) == (last, rank)
    assert mem.tensor(0, (1,), torch.int32).item() == ep_jit.watchdog.ABORT_BY_RANK + last
    assert time.monotonic() - start < 20, "the abort did not stop the wait (60 s timeout)"
    dist.barrier(group=info.group)
    mem.destroy()


def _disagree_worker(info: RankInfo) -> None:
    """Sizes that differ across ranks fail on every rank; the group stays usable."""
    with pytest.raises(ValueError, match="nbytes differs across ranks"):
        PeerMemory(info.group, 4096 * (1 + info.rank))
    with pytest.raises(ValueError, match="host_bytes differs across ranks"):
        PeerMemory(info.group, 4096, host_bytes=(2 << 20) * (info.rank % 2))
    with pytest.raises(ValueError, match="nbytes must be a positive int"):
        PeerMemory(info.group, 0 if info.rank == 0 else 4096)
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(MemoryError, match=r"asked for \d+ bytes of GPU memory.* \d+ free"):
        PeerMemory(info.group, 2 * free)
    mem = PeerMemory(info.group, 4096)
    mem.barrier()
    mem.synchronize()
    mem.destroy()


def _path_worker(info: RankInfo) -> None:
    """peer_memory() picks the VMM path for shared GPUs and refuses torch's there."""
    with knobs.jit.scope():
        knobs.jit.peer_memory = "auto"
        mem = ep_jit.peer_memory(info.group, 4096)
        assert isinstance(mem, PeerMemory) == (info.ranks_per_gpu > 1 or "nccl" not in info.backend)
        mem.barrier()
        torch.cuda.synchronize()
        mem.destroy()
        if info.ranks_per_gpu > 1:
            # torch's symmetric memory cannot serve ranks sharing a GPU: asked for on one
            # rank only, every rank raises.
            knobs.jit.peer_memory = "torch" if info.rank == 1 else "auto"
            with pytest.raises(ValueError, match="cannot serve this group"):
                ep_jit.peer_memory(info.group, 4096)
        elif info.world_size > 1:
            # A knob set differently on one rank fails on every rank.
            knobs.jit.peer_memory = "vmm" if info.rank == 0 else "torch"
            with pytest.raises(ValueError, match="peer memory path differs across ranks"):
                ep_jit.peer_memory(info.group, 4096)
    topo = ep_jit.topology(info.group, info.device)
    assert topo.single_nvlink_domain
    assert topo.shares_gpu == (info.ranks_per_gpu > 1)
    assert len(topo.gpu_peers) == info.ranks_per_gpu


@pytest.mark.parametrize(("world_size", "per_gpu"), PLACEMENTS)
def test_peer_memory_traffic(world_size: int, per_gpu: int, jit_cache: Path) -> None:
    run_ranks(world_size, _traffic_worker, str(jit_cache), 20_011, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(("world_size", "per_gpu"), PLACEMENTS)
def test_peer_memory_cycles_do_not_leak(world_size: int, per_gpu: int, jit_cache: Path) -> None:
    run_ranks(world_size, _cycles_worker, 100, ranks_per_gpu=per_gpu, timeout_s=600)


@pytest.mark.parametrize(("world_size", "per_gpu"), SHARED)
def test_peer_memory_barrier_timeout(world_size: int, per_gpu: int, jit_cache: Path) -> None:
    run_ranks(world_size, _timeout_worker, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(("world_size", "per_gpu"), SHARED)
def test_signal_abort_stops_the_peers_waits(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _peer_abort_worker, ranks_per_gpu=per_gpu, timeout_s=120)


@pytest.mark.parametrize(("world_size", "per_gpu"), SHARED)
def test_peer_memory_fails_together(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _disagree_worker, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(("world_size", "per_gpu"), PLACEMENTS)
def test_peer_memory_path_choice(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _path_worker, ranks_per_gpu=per_gpu)


@pytest.mark.gpu
def test_stream_memory_operations_in_a_graph() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    words = torch.zeros(8, dtype=torch.int64, device=dev)
    base = words.data_ptr()
    out = torch.zeros(4, dtype=torch.int64, device=dev)
    src = torch.arange(4, dtype=torch.int64, device=dev)
    ep_jit.write_value(base, 7)
    ep_jit.write_value(base + 8, (1 << 40) + 3, width=64)
    ep_jit.wait_value(base, 7, cond="eq")
    ep_jit.wait_value(base + 8, 1 << 40, cond="geq", width=64)
    ep_jit.batch_mem_ops([ep_jit.MemOp.write(base + 16, 5), ep_jit.MemOp.wait(base + 16, 5)])
    ep_jit.wait_stream(what="stream ops", timeout_s=30)
    assert words[:3].tolist() == [7, (1 << 40) + 3, 5]
    # Captured: the copy waits for the flag the graph itself raises; replays repeat it.
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ep_jit.write_value(base + 24, 1)
        ep_jit.wait_value(base + 24, 1)
        out.add_(src)
    for _ in range(3):
        graph.replay()
    ep_jit.wait_stream(stream, what="graph replays", timeout_s=30)
    assert out.tolist() == [0, 3, 6, 9]


@pytest.mark.gpu
def test_wait_stream_times_out_on_a_stuck_stream() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        ep_jit.wait_value(flag.data_ptr(), 1)
    with pytest.raises(ep_jit.HostTimeoutError, match="the stuck stream"):
        ep_jit.wait_stream(stream, what="the stuck stream", timeout_s=0.5)
    flag.fill_(1)  # host write releases the wait
    ep_jit.wait_stream(stream, what="the released stream", timeout_s=30)


_LOAD_SCRIPT = """
import sys, torch, ep_jit
from ep_jit import knobs
knobs.jit.cache_dir = sys.argv[1]
flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
kernel = ep_jit.build(ep_jit.kernels.toy_axpy_spec(3))
# Everything this process will launch is loaded before any wait is enqueued: torch's own
# kernels by running them once, ours by Kernel.load().
x = torch.ones(256, device="cuda")
out = torch.zeros_like(x)
kernel.load()
torch.cuda.synchronize()
waiting = torch.cuda.Stream()
with torch.cuda.stream(waiting):
    ep_jit.wait_value(flag.data_ptr(), 1)
# A launch on another stream while the wait is pending.
kernel.launch(1, 256, out, x, x, 0, ep_jit.kernels.AxpyArgs(alpha=1.0, pad=0, n=256))
ep_jit.wait_stream(what="the launch beside the pending wait", timeout_s=60)
flag.fill_(1)
ep_jit.wait_stream(waiting, what="the released wait", timeout_s=60)
print(f"ok {float(out[0])}")
"""


@pytest.mark.gpu
def test_loaded_kernel_launches_beside_a_pending_stream_wait(jit_cache: Path) -> None:
    # Loading a module while a stream of the context holds a pending stream wait blocks until
    # the wait is released (measured on an H100: a first launch there hung with lazy loading,
    # even with cuFuncLoad). Kernels loaded before the wait launch normally beside it.
    env = dict(os.environ, CUDA_MODULE_LOADING="LAZY")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_SCRIPT), str(jit_cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok 4.0" in proc.stdout, proc.stdout


# ---- CPU ---------------------------------------------------------------------------------


def _cpu_reject_worker(info: RankInfo) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        PeerMemory(info.group, 4096, device="cpu")


def test_peer_memory_rejects_cpu_ranks_on_every_rank() -> None:
    run_ranks(2, _cpu_reject_worker, use_gpu=False, timeout_s=120)


def _topology_worker(info: RankInfo, per_node: int) -> None:
    topo = ep_jit.topology(info.group, torch.device("cpu"), ranks_per_node=per_node)
    assert topo.world_size == info.world_size and topo.rank == info.rank
    assert topo.gpu_of == (None,) * info.world_size
    assert topo.nvlink_domains == () and not topo.single_nvlink_domain
    assert topo.gpu_peers == () and not topo.shares_gpu
    if per_node:
        assert topo.num_nodes == info.world_size // per_node
        assert topo.local_ranks == tuple(
            range(info.rank // per_node * per_node, (info.rank // per_node + 1) * per_node)
        )
    else:
        assert topo.num_nodes == 1 and topo.local_ranks == tuple(range(info.world_size))
    with knobs.jit.scope():
        knobs.jit.ranks_per_node = 1
        assert ep_jit.topology(info.group, torch.device("cpu")).num_nodes == info.world_size


@pytest.mark.parametrize(("world_size", "per_node"), [(2, 0), (4, 2), (4, 0)])
def test_topology_on_gloo(world_size: int, per_node: int) -> None:
    run_ranks(world_size, _topology_worker, per_node, use_gpu=False, timeout_s=120)


def test_topology_rejects_negative_ranks_per_node() -> None:
    run_ranks(1, _negative_rpn_worker, use_gpu=False, timeout_s=60)


def _negative_rpn_worker(info: RankInfo) -> None:
    with pytest.raises(ValueError, match="ranks_per_node"):
        ep_jit.topology(info.group, torch.device("cpu"), ranks_per_node=-1)


def test_run_ranks_checks_ranks_per_gpu() -> None:
    with pytest.raises(ValueError, match="ranks_per_gpu must be a positive int"):
        run_ranks(2, _negative_rpn_worker, ranks_per_gpu=0)
    with pytest.raises(ValueError, match="needs use_gpu"):
        run_ranks(2, _negative_rpn_worker, ranks_per_gpu=2, use_gpu=False)


def test_mem_op_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="width"):
        ep_jit.MemOp.write(0, 1, width=16)
    with pytest.raises(ValueError, match="does not fit"):
        ep_jit.MemOp.write(0, 1 << 32)
    with pytest.raises(ValueError, match="cond"):
        ep_jit.MemOp.wait(0, 1, cond="gt")
    assert ep_jit.MemOp.wait(8, (1 << 40), width=64).width == 64
    with pytest.raises(ValueError, match="at least one"):
        ep_jit.batch_mem_ops([])
