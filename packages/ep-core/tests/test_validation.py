"""Every input check raises the right error type and names the bad value."""

from __future__ import annotations

import pytest
import torch

from ep_core import knobs
from ep_core.validation import (
    check_bias,
    check_combine_x,
    check_dispatch_x,
    check_expert_alignment,
    check_hidden,
    check_num_experts,
    check_topk_idx,
    check_topk_idx_values,
    check_topk_weights,
    should_check_values,
)

CPU = torch.device("cpu")


def _idx(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize(
    ("topk", "error", "match"),
    [
        (_idx([[0, 1], [2, 16]]), ValueError, r"topk_idx\[1, 1\] = 16 is outside \[-1, 16\)"),
        (_idx([[0, -2], [2, 3]]), ValueError, r"topk_idx\[0, 1\] = -2"),
        (_idx([[0, 1], [5, 5]]), ValueError, "row 1 selects expert 5 more than once"),
        (_idx([[0, 1], [2, 3]]).int(), TypeError, "torch.int64, got torch.int32"),
        (torch.zeros(2, 0, dtype=torch.int64), ValueError, "k = 0"),
        (torch.zeros(2, 33, dtype=torch.int64), ValueError, "k = 33"),
        (torch.zeros(3, 2, dtype=torch.int64), ValueError, "3 rows but x has 2 tokens"),
        (torch.zeros(2, 4, dtype=torch.int64)[:, ::2], ValueError, "contiguous"),
        (torch.zeros(2, dtype=torch.int64), ValueError, "2-D"),
        ([[0, 1]], TypeError, "torch.Tensor"),
    ],
)
def test_topk_idx_errors(topk: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_topk_idx(topk, num_tokens=2, num_experts=16, device=CPU)


def test_duplicated_minus_one_is_fine_and_knob_disables_value_checks() -> None:
    check_topk_idx(_idx([[-1, -1], [3, -1]]), num_tokens=2, num_experts=16, device=CPU)
    bad = _idx([[0, 99], [1, 1]])
    with knobs.ep.scope():
        knobs.ep.check_inputs = False
        assert not should_check_values(bad)
        check_topk_idx(bad, num_tokens=2, num_experts=16, device=CPU)
    assert should_check_values(bad)


def test_device_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match="is on cpu but the operation runs on meta"):
        check_topk_idx(_idx([[0, 1]]), num_tokens=1, num_experts=4, device=torch.device("meta"))


def test_weights_errors() -> None:
    topk = _idx([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match=r"torch\.float32, got torch\.bfloat16"):
        check_topk_weights(torch.zeros(2, 2, dtype=torch.bfloat16), topk)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        check_topk_weights(torch.zeros(2, 3), topk)


def test_dispatch_x_errors() -> None:
    bf16 = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="5 tokens, more than num_max_tokens_per_rank = 4"):
        check_dispatch_x(
            torch.zeros(5, 128, dtype=torch.bfloat16), None, num_max_tokens_per_rank=4, device=CPU
        )
    with pytest.raises(TypeError, match=r"torch\.bfloat16, got torch\.float32"):
        check_dispatch_x(bf16.float(), None, num_max_tokens_per_rank=4, device=CPU)
    with pytest.raises(ValueError, match="hidden size of x 96 is unsupported for BF16"):
        check_dispatch_x(
            torch.zeros(4, 96, dtype=torch.bfloat16), None, num_max_tokens_per_rank=4, device=CPU
        )
    fp8 = torch.zeros(4, 192, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="192 is unsupported for FP8"):
        check_dispatch_x(fp8, torch.zeros(4, 2), num_max_tokens_per_rank=4, device=CPU)
    fp8 = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"torch\.float8_e4m3fn, got torch\.bfloat16"):
        check_dispatch_x(
            torch.zeros(4, 256, dtype=torch.bfloat16),
            torch.zeros(4, 2),
            num_max_tokens_per_rank=4,
            device=CPU,
        )
    with pytest.raises(TypeError, match=r"torch\.float32 or torch\.int32, got torch\.float16"):
        check_dispatch_x(
            fp8, torch.zeros(4, 2, dtype=torch.float16), num_max_tokens_per_rank=4, device=CPU
        )
    with pytest.raises(ValueError, match=r"got \(4, 9\)"):
        check_dispatch_x(fp8, torch.zeros(4, 9), num_max_tokens_per_rank=4, device=CPU)
    with pytest.raises(ValueError, match=r"got \(3, 2\)"):
        check_dispatch_x(fp8, torch.zeros(3, 2), num_max_tokens_per_rank=4, device=CPU)
    # Scales may have any strides (e.g. column-major from a GEMM); they come back contiguous.
    _, scales = check_dispatch_x(fp8, torch.zeros(2, 4).t(), num_max_tokens_per_rank=4, device=CPU)
    assert scales is not None and scales.is_contiguous()


def test_hidden_limits() -> None:
    check_hidden(16384, fp8=False)
    for bad in (0, 16384 + 64, 32):
        with pytest.raises(ValueError, match=f"hidden {bad} is unsupported"):
            check_hidden(bad, fp8=False)


def test_scalar_config_errors() -> None:
    with pytest.raises(
        ValueError, match="num_experts 10 is not a multiple of the number of ranks 4"
    ):
        check_num_experts(10, 4)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        check_num_experts(None, 4)
    with pytest.raises(ValueError, match="expert_alignment must be >= 1, got 0"):
        check_expert_alignment(0)
    with pytest.raises(TypeError, match="expert_alignment must be an int, got bool"):
        check_expert_alignment(True)


def test_bias_and_combine_errors() -> None:
    good = torch.zeros(3, 64, dtype=torch.bfloat16)
    assert check_bias(None, num_tokens=3, hidden=64, device=CPU) == ()
    assert len(check_bias((good, good), num_tokens=3, hidden=64, device=CPU)) == 2
    with pytest.raises(ValueError, match="at most 2 tensors, got 3"):
        check_bias((good, good, good), num_tokens=3, hidden=64, device=CPU)
    with pytest.raises(ValueError, match=r"bias\[0\] must have shape \(3, 64\), got \(2, 64\)"):
        check_bias(good[:2], num_tokens=3, hidden=64, device=CPU)
    with pytest.raises(
        TypeError, match=r"bias\[1\] must have dtype torch.bfloat16, got torch.float32"
    ):
        check_bias((good, good.float()), num_tokens=3, hidden=64, device=CPU)
    with pytest.raises(ValueError, match="5 rows but the handle's dispatch produced 3"):
        check_combine_x(torch.zeros(5, 64, dtype=torch.bfloat16), num_rows=3, device=CPU)


@pytest.mark.parametrize(
    ("topk", "match"),
    [
        (_idx([[0, 1], [2, 16]]), r"topk_idx\[1, 1\] = 16 is outside \[-1, 16\)"),
        (_idx([[0, 1], [5, 5]]), "row 1 selects expert 5 more than once"),
    ],
)
def test_values_checked_apart_from_the_layout(topk: torch.Tensor, match: str) -> None:
    # values=False leaves the value checks to the caller (a backend checking on the device),
    # which names the entry through check_topk_idx_values with the same message.
    assert check_topk_idx(topk, num_tokens=2, num_experts=16, device=CPU, values=False) is topk
    with pytest.raises(ValueError, match=match):
        check_topk_idx_values(topk, 16)
    with pytest.raises(ValueError, match="k = 33"):  # layout checks still run
        check_topk_idx(
            torch.zeros(2, 33, dtype=torch.int64),
            num_tokens=2,
            num_experts=16,
            device=CPU,
            values=False,
        )
    check_topk_idx_values(_idx([[-1, -1], [15, 0]]), 16)
