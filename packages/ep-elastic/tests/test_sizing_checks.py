"""Honest sizing and the same capacity checks on every backend.

The size hint is what the NVLink backend allocates; an explicit ``num_bytes`` below it fails on
every rank naming both numbers; the low-latency limits of the NVLink kernels apply on CPU too.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from ep_core.nvlink.layout import NvlinkSizing, compute_layout
from ep_core.sizing import BUFFER_ALIGNMENT
from ep_elastic import ElasticBuffer
from ep_jit.testing import gpu_placements, run_ranks

NMAX, HIDDEN, K = 8, 256, 2


def test_hint_is_the_nvlink_layout() -> None:
    for r, nmax, hidden, k in ((2, 8, 256, 2), (4, 256, 2048, 8), (8, 4096, 7168, 0)):
        need = compute_layout(NvlinkSizing(r, nmax, hidden, k or 32))[1]
        hint = ElasticBuffer.get_buffer_size_hint(_FakeGroup(r), nmax, hidden, k)  # type: ignore[arg-type]
        assert hint % BUFFER_ALIGNMENT == 0
        assert need <= hint < need + BUFFER_ALIGNMENT, (r, nmax, hidden, k, need, hint)


class _FakeGroup:
    """``get_buffer_size_hint`` reads only the group's size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _sizing_worker(info: Any) -> None:
    group = info.group
    hint = ElasticBuffer.get_buffer_size_hint(group, 4096, 7168, 8)
    # Too small on every rank: both numbers named.
    pattern = re.escape(f"num_bytes {BUFFER_ALIGNMENT} is too small") + f".*need {hint} bytes"
    with pytest.raises(ValueError, match=pattern):
        ElasticBuffer(
            group, BUFFER_ALIGNMENT, num_max_tokens_per_rank=4096, hidden=7168, num_topk=8
        )
    # Too small on one rank only: every rank raises, the others name it.
    small = info.rank == info.world_size - 1
    with pytest.raises(ValueError, match="is too small" if small else "cannot be built"):
        ElasticBuffer(
            group, BUFFER_ALIGNMENT if small else hint,
            num_max_tokens_per_rank=4096, hidden=7168, num_topk=8,
        )  # fmt: skip
    exact = ElasticBuffer(group, hint, num_max_tokens_per_rank=4096, hidden=7168, num_topk=8)
    assert exact.num_bytes == hint
    exact.destroy()
    sized = ElasticBuffer(group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=K)
    assert sized.num_bytes == ElasticBuffer.get_buffer_size_hint(group, NMAX, HIDDEN, K)

    # Low-latency limits (the NVLink kernels'), here on the reference backend.
    e = 2 * info.world_size
    idx = torch.stack([torch.randperm(e)[:K] for _ in range(NMAX)])
    wide = torch.zeros(NMAX, 9216, dtype=torch.bfloat16)  # a valid high-throughput hidden
    with pytest.raises(ValueError, match="multiple of 64 up to 8192, got 9216"):
        sized.low_latency_dispatch(wide, idx, NMAX, e, use_fp8=False)
    x = torch.zeros(NMAX, HIDDEN, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"must be in \[1, 65535\], got 70000"):
        sized.low_latency_dispatch(x, idx, 70000, e, use_fp8=False)
    many = 512 * info.world_size
    with pytest.raises(ValueError, match="of shared memory per CTA"):
        sized.low_latency_dispatch(x, idx, 4096, many, use_fp8=False)
    # Over the limit on one rank: the others raise with it.
    last = info.rank == info.world_size - 1
    with pytest.raises(ValueError, match="up to 8192" if last else "rejected their input"):
        sized.low_latency_dispatch(wide if last else x, idx, NMAX, e, use_fp8=False)
    # Within the limits it runs.
    sized.low_latency_dispatch(x, idx, NMAX, e, use_fp8=False)
    sized.destroy()


@pytest.mark.parametrize("world_size", [2, 4])
def test_num_bytes_and_low_latency_limits(world_size: int) -> None:
    run_ranks(world_size, _sizing_worker, timeout_s=120, use_gpu=False)


def _nvlink_allocation_worker(info: Any) -> None:
    group, dev = info.group, info.device
    hint = ElasticBuffer.get_buffer_size_hint(group, NMAX, HIDDEN, K)
    buf = ElasticBuffer(
        group, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=K, backend="nvlink",
        device=dev,
    )  # fmt: skip
    assert buf.num_bytes == hint
    assert buf.backend.sym.nbytes == hint, (buf.backend.sym.nbytes, hint)  # type: ignore[attr-defined]
    buf.destroy()
    bigger = hint + BUFFER_ALIGNMENT
    buf = ElasticBuffer(
        group, bigger, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=K,
        backend="nvlink", device=dev,
    )  # fmt: skip
    assert buf.backend.sym.nbytes == bigger  # type: ignore[attr-defined]
    buf.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,), dedicated=False))
def test_nvlink_allocates_num_bytes(world_size: int, per_gpu: int) -> None:
    run_ranks(
        world_size,
        _nvlink_allocation_worker,
        timeout_s=300,
        use_gpu=True,
        ranks_per_gpu=per_gpu,
    )
