"""The reference backend against the independent oracle, on 2 and 4 ranks.

Each world size is one spawned job that runs every case (spawning is the expensive part). The
same worker runs on GPUs (NCCL) for the reference, and for the NVLink backend compared bit for
bit with the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ep_core import BackendConfig, TorchBackend, create_backend, get_buffer_size_hint
from ep_core.testing import HT_CASES, run_standard_cases
from ep_jit.testing import gpu_placements, run_ranks


def _backend(name: str, info: Any) -> Any:
    if name == "torch":
        return TorchBackend(info.group, info.rank, info.world_size)
    nmax = max(c.num_max_tokens_per_rank for c in HT_CASES)
    config = BackendConfig(
        rank=info.rank,
        num_ranks=info.world_size,
        device=info.device,
        num_bytes=get_buffer_size_hint(info.world_size, nmax, 1024, 0, False),
        num_max_tokens_per_rank=nmax,
        hidden=1024,
        num_topk=0,
        use_fp8_dispatch=False,
        num_cpu_timeout_secs=100,
        num_gpu_timeout_secs=100,
    )
    return create_backend(name, info.group, config)


def check_cases_worker(info: Any, backend_name: str, compare_with_torch: bool) -> None:
    """Runs every HT and LL case through ``backend_name`` (and the reference when asked)."""
    torch.manual_seed(0)
    backend = _backend(backend_name, info)
    reference = _backend("torch", info) if compare_with_torch else None
    run_standard_cases(backend, info.rank, info.world_size, info.device, reference=reference)
    backend.destroy()


@pytest.mark.parametrize("world_size", [2, 4])
def test_reference_matches_oracle(world_size: int) -> None:
    run_ranks(world_size, check_cases_worker, "torch", False, timeout_s=600, use_gpu=False)


@pytest.mark.gpu
@pytest.mark.multigpu(2)
def test_reference_matches_oracle_nccl() -> None:
    run_ranks(2, check_cases_worker, "torch", False, timeout_s=600, use_gpu=True)


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2, 4)))
def test_nvlink_matches_reference(world_size: int, per_gpu: int) -> None:
    run_ranks(
        world_size,
        check_cases_worker,
        "nvlink",
        True,
        timeout_s=900,
        use_gpu=True,
        ranks_per_gpu=per_gpu,
    )
