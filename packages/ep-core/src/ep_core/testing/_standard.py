"""The standard EP scenarios every backend must pass, shared by the test suites and the
multi-node check (``tools/multinode_check.py``), so both run the same cases."""

from __future__ import annotations

import torch

from ep_core.backend import EPBackend
from ep_core.testing._checks import run_case, run_low_latency_case
from ep_core.testing._inputs import Case

__all__ = ["HT_CASES", "LL_CASES", "run_standard_cases"]

HT_CASES: list[Case] = [
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
"""High-throughput scenarios: routings, dtypes and scale formats, alignments, CPU sync or not,
biases, ``-1`` slots, a rank that receives nothing, zero tokens."""

LL_CASES: list[tuple[Case, bool, bool, bool]] = [
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
"""Low-latency scenarios as ``(case, use_fp8, round_scale, use_ue8m0)``."""


def run_standard_cases(
    backend: EPBackend,
    rank: int,
    num_ranks: int,
    device: torch.device,
    *,
    reference: EPBackend | None = None,
) -> int:
    """Runs every :data:`HT_CASES` and :data:`LL_CASES` scenario through ``backend``.

    Collective: every rank of the backend's group calls it. Each scenario is compared bit for bit
    with the oracle (and with ``reference`` when given); a mismatch raises ``AssertionError``.

    Returns:
        The number of scenarios run.
    """
    for case in HT_CASES:
        run_case(backend, case, rank, num_ranks, device, reference=reference)
    for case, use_fp8, round_scale, use_ue8m0 in LL_CASES:
        run_low_latency_case(
            backend,
            case,
            rank,
            num_ranks,
            device,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
    return len(HT_CASES) + len(LL_CASES)
