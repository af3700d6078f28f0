"""Routing layout and the row helpers against per-token loops."""

from __future__ import annotations

import pytest
import torch

from ep_core.layout import (
    align_up,
    align_up_tensor,
    gather_rows,
    get_dispatch_layout,
    invert_positions,
    worst_case_num_expanded_tokens,
)
from ep_core.testing import make_routing, seeded


@pytest.mark.parametrize(
    ("routing", "num_tokens", "num_ranks", "masked"),
    [
        ("random", 37, 4, 0.0),
        ("skewed", 50, 2, 0.3),
        ("group-limited", 9, 8, 0.1),
        ("random", 0, 4, 0.0),
    ],
)
def test_layout_matches_loop(routing: str, num_tokens: int, num_ranks: int, masked: float) -> None:
    num_experts, k = 32, 6
    topk = make_routing(
        routing, num_tokens, num_experts, k, num_ranks, seeded(1), masked_ratio=masked
    )
    layout = get_dispatch_layout(topk, num_experts, num_ranks)
    per_rank = num_experts // num_ranks
    in_rank = [[False] * num_ranks for _ in range(num_tokens)]
    per_expert = [0] * num_experts
    for t, row in enumerate(topk.tolist()):
        for e in row:
            if e >= 0:
                in_rank[t][e // per_rank] = True
                per_expert[e] += 1
    assert layout.is_token_in_rank.tolist() == in_rank
    assert layout.num_tokens_per_expert.tolist() == per_expert
    assert layout.num_tokens_per_rank.tolist() == [
        sum(r[d] for r in in_rank) for d in range(num_ranks)
    ]
    assert layout.num_tokens_per_rank.dtype == torch.int32
    assert layout.send_row.dtype == torch.int32
    for d in range(num_ranks):
        seen = 0
        for t in range(num_tokens):
            assert layout.send_row[t, d].item() == (seen if in_rank[t][d] else -1)
            seen += in_rank[t][d]


def test_gather_rows_and_invert_positions() -> None:
    src = torch.arange(12).view(4, 3)
    got = gather_rows(src, torch.tensor([2, -1, 0]))
    assert got.tolist() == [[6, 7, 8], [0, 0, 0], [0, 1, 2]]
    assert gather_rows(torch.zeros(0, 3), torch.tensor([-1, -1])).shape == (2, 3)
    inv = invert_positions(torch.tensor([3, -1, 0, 5]), 6)
    assert inv.tolist() == [2, -1, -1, 0, -1, 3]


def test_alignment_helpers() -> None:
    assert [align_up(v, 16) for v in (0, 1, 16, 17)] == [0, 16, 16, 32]
    assert align_up_tensor(torch.tensor([0, 1, 127, 128, 129]), 128).tolist() == [
        0,
        128,
        128,
        128,
        256,
    ]
    # 2 ranks x 8 tokens, k=6 but only 4 local experts, alignment 16.
    assert worst_case_num_expanded_tokens(2, 8, 6, 4, 16) == align_up(2 * 8 * 4 + 15 * 4, 16)
