"""Agreement checks across ranks (``ep_jit.agreement``), on CPU ranks over gloo."""

from __future__ import annotations

import re

import pytest
import torch.distributed as dist

from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.testing import RankInfo, run_ranks


def _worker(info: RankInfo) -> list[str]:
    seen = []
    # Equal configurations: every rank gets every payload, by rank.
    configs = gather_checked(info.group, {"n": 4, "rank": info.rank}, None, what="Thing")
    assert configs == [{"n": 4, "rank": r} for r in range(info.world_size)]
    check_agreement([{k: v for k, v in c.items() if k == "n"} for c in configs], "Thing")

    # Differing fields: every rank raises the same error, naming each field and every value.
    configs = gather_checked(
        info.group, {"n": 4 * (1 + info.rank), "mode": "a", "k": info.rank % 2}, None, what="Thing"
    )
    with pytest.raises(ValueError) as err:
        check_agreement(configs, "Thing")
    seen.append(str(err.value))

    # A local error: raised as it is on its rank, named with its type on the others.
    error = TypeError("bad dtype") if info.rank == 1 else None
    expected = (
        "bad dtype" if info.rank == 1 else "Thing cannot be built: rank 1: TypeError: bad dtype"
    )
    with pytest.raises(TypeError if info.rank == 1 else ValueError, match=re.escape(expected)):
        gather_checked(info.group, {"n": 4}, error, what="Thing")

    # The group still works afterwards.
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, info.rank, group=info.group)
    assert out == list(range(info.world_size))
    return seen


def test_agreement_fails_on_every_rank_together() -> None:
    results = run_ranks(3, _worker, timeout_s=120, use_gpu=False)
    messages = [r[0] for r in results]
    assert len(set(messages)) == 1, messages
    assert messages[0] == (
        "Thing configuration must agree on every rank: "
        "n differs across ranks (rank 0: 4, rank 1: 8, rank 2: 12); "
        "k differs across ranks (rank 0: 0, rank 1: 1, rank 2: 0)"
    )
