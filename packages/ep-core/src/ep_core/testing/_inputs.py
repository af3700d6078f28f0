"""Seeded routing and token generators for tests and examples.

Every rank can rebuild any rank's inputs from ``(seed, rank)``, which is how the oracle sees the
whole job without trusting the collectives under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_core.fp8 import per_token_cast_to_fp8

__all__ = ["ROUTINGS", "Case", "RankInputs", "make_inputs", "make_routing", "seeded"]

ROUTINGS = ("random", "skewed", "group-limited")
"""Routing kinds :func:`make_routing` knows."""


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of small non-negative ints."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (2**62)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Case:
    """One dispatch/combine scenario; every rank builds the same ``Case``.

    Attributes:
        name: Shown in failures.
        num_tokens: Tokens per rank, indexed by rank (cycled when shorter than the world).
        hidden: ``H``.
        num_experts: ``E``.
        num_topk: ``k``.
        num_max_tokens_per_rank: ``Nmax``.
        routing: One of :data:`ROUTINGS`.
        masked_ratio: Share of top-k slots set to ``-1``.
        empty_rank: A rank none of whose experts is ever selected (``-1``: none).
        fp8: ``"bf16"``, ``"fp8"`` (float32 scales) or ``"ue8m0"`` (int32 packs).
        with_weights: Pass ``topk_weights``.
        expert_alignment: ``A``.
        do_cpu_sync: Fresh dispatches synchronise with the host.
        num_bias: Bias tensors given to combine (0, 1 or 2).
        seed: Base seed.
    """

    name: str
    num_tokens: tuple[int, ...] = (24,)
    hidden: int = 128
    num_experts: int = 16
    num_topk: int = 4
    num_max_tokens_per_rank: int = 32
    routing: str = "random"
    masked_ratio: float = 0.0
    empty_rank: int = -1
    fp8: str = "bf16"
    with_weights: bool = True
    expert_alignment: int = 1
    do_cpu_sync: bool = True
    num_bias: int = 0
    seed: int = 0

    def tokens_of(self, rank: int) -> int:
        """Tokens on ``rank``."""
        return self.num_tokens[rank % len(self.num_tokens)]


@dataclass
class RankInputs:
    """Dispatch inputs of one rank (CPU tensors).

    Attributes:
        x: ``[T, H]`` bf16 (the source of the FP8 cast too).
        data: ``[T, H]`` what is dispatched: ``x`` or its e4m3 cast.
        scales: ``[T, P]`` float32/int32 for FP8, else ``None``.
        topk_idx: ``[T, k]`` int64.
        topk_weights: ``[T, k]`` float32 or ``None``.
    """

    x: torch.Tensor
    data: torch.Tensor
    scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor | None


def make_routing(
    routing: str,
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    num_ranks: int,
    generator: torch.Generator,
    *,
    masked_ratio: float = 0.0,
    empty_rank: int = -1,
) -> torch.Tensor:
    """Top-k expert ids ``[T, k]`` int64 (distinct per row, ``-1`` for masked slots).

    ``random``: uniform scores. ``skewed``: three quarters of the tokens pick expert 0 (a hot
    expert on rank 0). ``group-limited``: experts form ``R`` groups (one per rank); a token picks
    its experts inside its best ``max(1, R // 2)`` groups only.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if routing == "skewed":
        hot = torch.rand(num_tokens, generator=generator) < 0.75
        scores[:, 0] += hot.float() * 2.0
    if empty_rank >= 0:
        per_rank = num_experts // num_ranks
        scores[:, empty_rank * per_rank : (empty_rank + 1) * per_rank] = -1.0
    if routing == "group-limited":
        groups = scores.view(num_tokens, num_ranks, num_experts // num_ranks)
        keep = max(1, num_ranks // 2)
        best = groups.amax(dim=2).topk(keep, dim=1).indices
        allowed = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
        allowed.scatter_(1, best, True)
        scores = torch.where(allowed[:, :, None], groups, -2.0).view(num_tokens, num_experts)
    topk = scores.topk(num_topk, dim=1).indices
    # Slots whose score is a sentinel would select forbidden experts: mask them.
    picked = scores.gather(1, topk)
    topk = torch.where(picked < -0.5, -1, topk)
    if masked_ratio > 0:
        mask = torch.rand(num_tokens, num_topk, generator=generator) < masked_ratio
        topk = torch.where(mask, -1, topk)
    return topk.to(torch.int64)


def make_inputs(case: Case, rank: int, num_ranks: int, salt: int = 0) -> RankInputs:
    """Builds ``rank``'s inputs for ``case``, deterministic in ``case.seed``, ``rank``, ``salt``."""
    gen = seeded(case.seed, rank, salt, 1)
    num_tokens = case.tokens_of(rank)
    topk_idx = make_routing(
        case.routing,
        num_tokens,
        case.num_experts,
        case.num_topk,
        num_ranks,
        gen,
        masked_ratio=case.masked_ratio,
        empty_rank=case.empty_rank,
    )
    x = (torch.randn(num_tokens, case.hidden, generator=gen) * 2.0).to(torch.bfloat16)
    weights = None
    if case.with_weights:
        weights = torch.rand(num_tokens, case.num_topk, generator=gen)
        weights = torch.where(topk_idx >= 0, weights, 0.0)
    data, scales = x, None
    if case.fp8 != "bf16":
        ue8m0 = case.fp8 == "ue8m0"
        data, scales = per_token_cast_to_fp8(x, round_scale=ue8m0, use_ue8m0=ue8m0)
    return RankInputs(x=x, data=data, scales=scales, topk_idx=topk_idx, topk_weights=weights)
