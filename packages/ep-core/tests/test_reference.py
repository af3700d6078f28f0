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
from ep_core.testing import Case, run_case, run_low_latency_case
from ep_jit.testing import run_ranks

HT_CASES = [
    Case("random-bf16", expert_alignment=1),
    Case("random-nosync-bias1", expert_alignment=16, do_cpu_sync=False, num_bias=1, seed=1),
    Case("skewed-fp8-bias2", routing="skewed", fp8="fp8", expert_alignment=128, num_bias=2, seed=2),
    Case(
        "group-limited-ue8m0-masked",
        routing="group-limited",
        fp8="ue8m0",
        masked_ratio=0.2,
        do_cpu_sync=False,
        seed=3,
    ),
    Case(
        "empty-rank-no-weights",
        masked_ratio=0.3,
        empty_rank=1,
        with_weights=False,
        expert_alignment=16,
        seed=4,
    ),
    Case("zero-tokens-nosync", num_tokens=(20, 0), do_cpu_sync=False, num_bias=2, seed=5),
    Case("zero-tokens-sync", num_tokens=(0, 7), expert_alignment=16, seed=6),
    Case("top1-full", num_tokens=(32,), num_experts=8, num_topk=1, hidden=256, seed=7),
    Case(
        "topk-over-local-fp8-nosync",
        num_experts=16,
        num_topk=8,
        fp8="fp8",
        expert_alignment=16,
        do_cpu_sync=False,
        num_bias=1,
        seed=8,
    ),
    Case("all-masked", masked_ratio=1.0, seed=9),
    Case("all-masked-nosync", masked_ratio=1.0, do_cpu_sync=False, expert_alignment=128, seed=10),
    Case("bf16-h64", hidden=64, routing="skewed", num_bias=1, seed=11),
]

LL_CASES = [
    (Case("ll-random", num_tokens=(13, 32), hidden=256, seed=20), True, False, False),
    (Case("ll-masked", masked_ratio=0.3, hidden=128, seed=21), True, True, False),
    (Case("ll-ue8m0", routing="skewed", hidden=640, seed=22), True, True, True),
    (
        Case("ll-bf16-empty", num_tokens=(5, 0), empty_rank=0, hidden=128, seed=23),
        False,
        False,
        False,
    ),
]


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
    for case in HT_CASES:
        run_case(backend, case, info.rank, info.world_size, info.device, reference=reference)
    for case, use_fp8, round_scale, use_ue8m0 in LL_CASES:
        run_low_latency_case(
            backend,
            case,
            info.rank,
            info.world_size,
            info.device,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
    backend.destroy()


@pytest.mark.parametrize("world_size", [2, 4])
def test_reference_matches_oracle(world_size: int) -> None:
    run_ranks(world_size, check_cases_worker, "torch", False, timeout_s=600, use_gpu=False)


@pytest.mark.gpu
@pytest.mark.multigpu(2)
def test_reference_matches_oracle_nccl() -> None:
    run_ranks(2, check_cases_worker, "torch", False, timeout_s=600, use_gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "world_size",
    [
        pytest.param(2, marks=pytest.mark.multigpu(2)),
        pytest.param(4, marks=pytest.mark.multigpu(4)),
    ],
)
def test_nvlink_matches_reference(world_size: int) -> None:
    run_ranks(world_size, check_cases_worker, "nvlink", True, timeout_s=600, use_gpu=True)
