"""Buffer size hint and analytical SM count."""

from __future__ import annotations

import itertools

from ep_core.sizing import (
    BUFFER_ALIGNMENT,
    combine_slot_bytes,
    dispatch_slot_bytes,
    expected_topk,
    get_buffer_size_hint,
    get_theoretical_num_sms,
)


def test_buffer_size_aligned_sufficient_monotone() -> None:
    base = {"num_ranks": 4, "num_max_tokens_per_rank": 256, "hidden": 2048, "num_topk": 8}
    for fp8 in (False, True):
        size = get_buffer_size_hint(**base, use_fp8_dispatch=fp8)
        assert size % BUFFER_ALIGNMENT == 0
        slots = 4 * 256
        assert size >= slots * dispatch_slot_bytes(2048, 8, fp8)
        assert size >= slots * combine_slot_bytes(2048, 8)
        assert size >= slots * 2048 * 2  # a bf16 row per slot at least
        # A BF16 dispatch (backward of combine) fits even an FP8-sized buffer.
        assert size >= slots * dispatch_slot_bytes(2048, 8, False)
        for key, bigger in (("num_ranks", 8), ("num_max_tokens_per_rank", 4096), ("hidden", 7168)):
            assert get_buffer_size_hint(**{**base, key: bigger}, use_fp8_dispatch=fp8) >= size
    # num_topk=0 sizes for 32, the largest k.
    assert get_buffer_size_hint(4, 256, 2048, 0) == get_buffer_size_hint(4, 256, 2048, 32)
    assert get_buffer_size_hint(4, 256, 2048, 32) >= get_buffer_size_hint(4, 256, 2048, 8)


def test_expected_topk() -> None:
    assert expected_topk(1, 256, 8) == 1.0
    assert abs(expected_topk(8, 256, 1) - 1.0) < 1e-12
    # Sampling without replacement reaches slightly more groups than 8 * (1 - (7/8)^8) = 5.25.
    assert 5.25 < expected_topk(8, 256, 8) < 5.4


def test_theoretical_num_sms_properties() -> None:
    for ranks, experts, k, device in itertools.product(
        (2, 4, 8), (64, 256), (1, 8), (24, 132, 133)
    ):
        n = get_theoretical_num_sms(ranks, experts, k, device)
        assert n % 2 == 0 and 4 <= n <= device
    assert get_theoretical_num_sms(1, 8, 2, 132) == 132
    assert get_theoretical_num_sms(1, 8, 2, 133) == 132
    assert get_theoretical_num_sms(8, 256, 8, 132, prefer_overlap_with_compute=False) >= 64
    # More NVLink bandwidth needs more SMs.
    slow = get_theoretical_num_sms(8, 256, 8, 132, nvlink_gbs=100.0)
    fast = get_theoretical_num_sms(8, 256, 8, 132, nvlink_gbs=800.0)
    assert slow < fast
