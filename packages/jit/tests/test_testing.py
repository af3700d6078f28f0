from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ep_jit.testing import BenchStats, RankFailedError, RankInfo, bench, run_ranks


def _all_reduce_worker(info: RankInfo, n: int) -> dict[str, float]:
    assert info.world_size == dist.get_world_size()
    assert info.rank == dist.get_rank()
    assert info.device == torch.device("cpu")
    assert info.local_world_size == info.world_size
    assert info.node_rank == 0
    x = torch.arange(n, dtype=torch.float64) * (info.rank + 1)
    dist.all_reduce(x, group=info.group)
    scale = info.world_size * (info.world_size + 1) / 2
    torch.testing.assert_close(x, torch.arange(n, dtype=torch.float64) * scale, rtol=0, atol=0)
    return {"rank": info.rank, "sum": float(x.sum())}


def _failing_worker(info: RankInfo) -> None:
    if info.rank == 1:
        raise ValueError(f"boom from rank {info.rank}")
    dist.barrier()


def _hanging_worker(info: RankInfo) -> None:
    if info.rank == 0:
        time.sleep(600)


def _exiting_worker(info: RankInfo) -> None:
    if info.rank == 0:
        os._exit(3)
    time.sleep(600)


def _skipping_worker(info: RankInfo) -> None:
    pytest.skip("skipped inside a rank")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce(world_size: int) -> None:
    results = run_ranks(world_size, _all_reduce_worker, 1000, timeout_s=120)
    total = sum(range(1000)) * world_size * (world_size + 1) / 2
    assert results == [{"rank": r, "sum": total} for r in range(world_size)]


def test_failure_is_reraised_with_traceback() -> None:
    with pytest.raises(RankFailedError, match="boom from rank 1") as err:
        run_ranks(2, _failing_worker, timeout_s=120)
    assert err.value.rank == 1
    assert err.value.exc_type == "builtins.ValueError"
    assert "_failing_worker" in err.value.traceback_text
    assert isinstance(err.value.original, ValueError)


@pytest.mark.slow
def test_hang_times_out_naming_ranks() -> None:
    t0 = time.monotonic()
    # The limit leaves rank 1 time to start and finish on a loaded 2-core machine (spawning and
    # importing torch took over 20 s there).
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2") as caught:
        run_ranks(2, _hanging_worker, timeout_s=40)
    assert time.monotonic() - t0 < 90
    # The stuck rank's Python stack comes with the error: where it hangs, not only who.
    text = str(caught.value)
    assert "--- Python stacks of rank 0 ---" in text, text
    assert "in _hanging_worker" in text, text


def test_dead_rank_is_reported() -> None:
    with pytest.raises(RankFailedError, match="exited with code 3"):
        run_ranks(2, _exiting_worker, timeout_s=60)


def test_skip_inside_rank_skips() -> None:
    with pytest.raises(pytest.skip.Exception):
        run_ranks(1, _skipping_worker, timeout_s=60)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(0, _all_reduce_worker)
    with pytest.raises(TypeError, match="top-level"):
        run_ranks(1, lambda info: None)


def test_bench_cpu() -> None:
    calls = []
    stats = bench(lambda: calls.append(1), warmup=2, iters=7, device="cpu")
    assert isinstance(stats, BenchStats)
    assert len(calls) == 9
    assert len(stats.samples) == 7
    assert stats.min <= stats.p10 <= stats.median <= stats.p90 <= max(stats.samples)
    assert "us" in str(stats)
    with pytest.raises(ValueError, match="iters"):
        bench(lambda: None, iters=0, device="cpu")


@pytest.mark.gpu
def test_bench_cuda() -> None:
    x = torch.randn(1 << 20, device="cuda")
    stats = bench(lambda: x.mul_(1.0), warmup=2, iters=10)
    assert stats.device == "cuda"
    assert len(stats.samples) == 10
    assert all(s > 0 for s in stats.samples)


def _nccl_worker(info: RankInfo) -> None:
    assert info.device == torch.device("cuda", info.rank)
    assert torch.cuda.current_device() == info.rank
    x = torch.full((1024,), float(info.rank + 1), device=info.device)
    dist.all_reduce(x)
    assert x.eq(info.world_size * (info.world_size + 1) / 2).all().item()
    y = torch.ones(3)  # CPU tensors go through gloo
    dist.all_reduce(y)
    assert y.tolist() == [float(info.world_size)] * 3


@pytest.mark.gpu
@pytest.mark.multigpu(2)
def test_nccl_ranks() -> None:
    run_ranks(2, _nccl_worker, timeout_s=180)


WORKER_SOURCE = """
import torch.distributed as dist

def worker(info, path):
    with open(f"{path}.{info.rank}", "w") as f:
        f.write(f"{info.rank}/{dist.get_world_size()}")
"""


def test_worker_from_module_outside_sys_path(tmp_path: Path) -> None:
    # What pytest's importlib mode does: a module imported from a file under a name that
    # sys.path cannot resolve. The children must load it from its file.
    import importlib.util
    import sys

    source = tmp_path / "hidden_workers.py"
    source.write_text(WORKER_SOURCE)
    name = "not_importable.hidden_workers"
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        run_ranks(2, module.worker, str(tmp_path / "out"), timeout_s=120)
    finally:
        del sys.modules[name]
    assert (tmp_path / "out.0").read_text() == "0/2"
    assert (tmp_path / "out.1").read_text() == "1/2"


TORCHRUN_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from ep_jit.testing import run_from_env

def worker(info, out):
    assert info.world_size == 4 and info.local_world_size == 2 and info.num_nodes == 2
    assert info.node_rank == info.rank // 2 and info.local_rank == info.rank % 2
    x = torch.tensor([float(info.rank)])
    dist.all_reduce(x, group=info.group)
    with open(f"{out}.{info.rank}", "w") as f:
        f.write(f"{info.node_rank}:{info.local_rank}:{x.item():g}")
    return info.rank

if __name__ == "__main__":
    assert run_from_env(worker, sys.argv[1]) in range(4)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_run_from_env_under_torchrun_two_simulated_nodes(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "two_nodes.py"
    script.write_text(TORCHRUN_SCRIPT)
    port = _free_port()
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(script),
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log
    got = sorted((tmp_path / f"out.{r}").read_text() for r in range(4))
    assert got == ["0:0:6", "0:1:6", "1:0:6", "1:1:6"]


def test_a_rank_that_cannot_join_restarts_the_job_once(caplog: pytest.LogCaptureFixture) -> None:
    # An unknown backend fails every rank inside init_process_group, before the worker runs:
    # the job is started a second time, then the failure is raised with the rank's traceback.
    with (
        caplog.at_level(logging.WARNING, logger="ep_jit.testing"),
        pytest.raises(RankFailedError, match="no_such_backend"),
    ):
        run_ranks(2, _all_reduce_worker, 1, backend="no_such_backend", timeout_s=60)
    restarts = [r for r in caplog.records if "starting the job again" in r.getMessage()]
    assert len(restarts) == 1


def test_stream_ops_are_recorded_not_issued(monkeypatch: pytest.MonkeyPatch) -> None:
    # What ep_jit.streamops would hand the driver, read back as MemOps, with the caller's
    # stream object passed through; no GPU needed.
    from ep_jit import streamops
    from ep_jit.streamops import MemOp
    from ep_jit.testing import record_stream_ops

    calls: list[object] = []
    record_stream_ops(monkeypatch, calls)
    stream = object()
    streamops.write_value(0x1000, 7, width=32, stream=stream)  # type: ignore[arg-type]
    streamops.write_value(0x2000, 1 << 40, width=64, stream=stream)  # type: ignore[arg-type]
    ops = [MemOp.write(0x3000, 5, 64), MemOp.wait(0x4000, 9, cond="eq", width=64)]
    streamops.batch_mem_ops(ops, stream=stream)  # type: ignore[arg-type]
    assert calls == [
        ("ops", [MemOp.write(0x1000, 7, 32)], stream),
        ("ops", [MemOp.write(0x2000, 1 << 40, 64)], stream),
        ("ops", ops, stream),
    ]
