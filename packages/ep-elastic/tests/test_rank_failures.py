"""A rank that never calls, on gloo: the other ranks raise within num_cpu_timeout_secs.

(A rank that rejects its own input takes part in the call and fails its peers at once: see
test_call_agreement.py.) A rank that stays alive but does not call at all leaves its peers
waiting in the reference backend's first exchange; they raise ``ep_jit.HostTimeoutError`` after
``num_cpu_timeout_secs`` instead of gloo's 30 minutes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ep_core.signature import HEADER_WORDS
from ep_elastic import ElasticBuffer
from ep_jit import HostTimeoutError
from ep_jit.testing import run_ranks

NMAX, HIDDEN, K, TIMEOUT_S = 8, 128, 2, 3.0


def _stray_rank_worker(info: Any) -> float:
    r = info.world_size
    num_experts = 2 * r
    buffer = ElasticBuffer(
        info.group,
        num_max_tokens_per_rank=NMAX,
        hidden=HIDDEN,
        num_topk=K,
        num_cpu_timeout_secs=TIMEOUT_S,
    )
    x = torch.randn(NMAX, HIDDEN).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts)[:K] for _ in range(NMAX)])
    start = time.monotonic()
    if info.rank == 0:
        # Alive but absent: the others must give up on their own. Then join the exchange they
        # left pending, so the group can be torn down.
        time.sleep(TIMEOUT_S + 2.0)
        pending = torch.zeros(r * HEADER_WORDS, dtype=torch.int64)
        dist.all_to_all_single(torch.empty_like(pending), pending, group=info.group)
        return 0.0
    with pytest.raises(HostTimeoutError, match="a peer did not join") as err:
        buffer.dispatch(x, topk_idx=idx, num_experts=num_experts)
    waited = time.monotonic() - start
    assert err.value.timeout_s == TIMEOUT_S
    return waited


@pytest.mark.parametrize("world_size", [2, 4])
def test_peers_of_an_absent_rank_raise_in_time(world_size: int) -> None:
    waited = run_ranks(world_size, _stray_rank_worker, timeout_s=120, use_gpu=False)
    for rank, seconds in enumerate(waited[1:], start=1):
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 10, f"rank {rank} raised after {seconds:.1f} s"
