"""pytest parameters that place a multi-rank GPU test on one shared GPU or on a GPU per rank."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["gpu_placements"]


def gpu_placements(
    world_sizes: Iterable[int], *, shared: bool = True, dedicated: bool = True
) -> list[Any]:
    """``pytest.param(world_size, ranks_per_gpu)`` for each size, ready for ``parametrize``.

    Use with ``run_ranks(world_size, worker, ranks_per_gpu=ranks_per_gpu)``:

    * shared (id ``"<n>ranks-1gpu"``, marked ``gpu``): every rank on ``cuda:0``, a gloo group;
      runs on any one-GPU machine (correctness, not speed);
    * dedicated (id ``"<n>ranks-<n>gpus"``, marked ``gpu`` and ``multigpu(n)``): a GPU per rank.

    A world size of 1 gives one ``"1rank"`` parameter.
    """
    import pytest

    params = []
    for n in world_sizes:
        if n == 1:
            params.append(pytest.param(1, 1, marks=pytest.mark.gpu, id="1rank"))
            continue
        if shared:
            params.append(pytest.param(n, n, marks=pytest.mark.gpu, id=f"{n}ranks-1gpu"))
        if dedicated:
            marks = [pytest.mark.gpu, pytest.mark.multigpu(n)]
            params.append(pytest.param(n, 1, marks=marks, id=f"{n}ranks-{n}gpus"))
    return params
