"""EngramTable on CPU ranks (gloo, reference backend): bit for bit against all_gather +
index_select, and every documented error on every rank. One spawned job per world size."""

from __future__ import annotations

from typing import Any

import pytest

from ep_engram.testing import run_error_cases, run_standard_cases
from ep_jit.testing import run_ranks


def _standard(info: Any) -> dict[str, int]:
    return run_standard_cases(info.group, "host", "auto")


def _errors(info: Any) -> list[str]:
    return run_error_cases(info.group, "host", "reference")


@pytest.mark.parametrize("world_size", [2, 4])
def test_fetch_matches_all_gather_index_select(world_size: int) -> None:
    results = run_ranks(world_size, _standard, use_gpu=False, timeout_s=120)
    for done in results:
        # 11 fetches for BF16; 11 fetches x 2 scale formats x 2 layouts for FP8.
        assert done == {"torch.bfloat16": 11, "torch.float8_e4m3fn": 44}


def test_errors_fail_together() -> None:
    messages = run_ranks(2, _errors, use_gpu=False, timeout_s=120)
    assert len(messages[0]) == len(messages[1])
    assert any("bytes" in m and "host memory" in m for m in messages[0])
