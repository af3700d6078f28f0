"""PipeBuffer on one GPU shared by 2 and 4 ranks: copy engine, NIXL and the reference.

Run with ``python -m pytest packages/pp-rdma/tests -m gpu -p no:xdist``.
"""

from __future__ import annotations

import importlib.util

import pytest

from ep_jit.testing import run_ranks

from . import _pp_workers as w

pytestmark = pytest.mark.gpu
HAVE_NIXL = importlib.util.find_spec("nixl_cu13") is not None
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="nixl_cu13 is not installed")


@pytest.mark.parametrize(
    "backend", ["copy_engine", "auto", "torch", pytest.param("nixl", marks=needs_nixl)]
)
@pytest.mark.parametrize("world", [2, 4])
def test_random_interleaving_is_bit_exact(backend: str, world: int) -> None:
    num_sends = 60 if world == 2 else 80
    results = run_ranks(
        world,
        w.stress_worker,
        backend,
        21 + world,
        num_sends,
        1 << 16,
        2,
        0.05,
        ranks_per_gpu=world,
        timeout_s=120,
    )
    assert sum(r["ops"] for r in results) == 2 * num_sends
    expect = "copy_engine" if backend == "auto" else backend
    for r in results:
        assert set(r["routes"].values()) == {expect}


@pytest.mark.parametrize("backend", ["copy_engine", pytest.param("nixl", marks=needs_nixl)])
def test_sizes_and_backpressure(backend: str) -> None:
    results = run_ranks(
        2, w.sizes_and_backpressure_worker, backend, 1 << 20, 1.0, ranks_per_gpu=2, timeout_s=120
    )
    assert [r[0] for r in results] == [14, 14]
    if backend == "nixl":  # host-driven: the send itself waits for the credit
        assert results[0][1] > 0.7, results


def test_graph_replay() -> None:
    checked = run_ranks(2, w.graph_replay_worker, 5, 1 << 16, ranks_per_gpu=2, timeout_s=120)
    assert checked[0] == 5


def test_no_kernel_runs_for_a_transfer() -> None:
    kernels = run_ranks(2, w.no_kernel_worker, 1 << 20, 4, ranks_per_gpu=2, timeout_s=120)
    assert kernels == [[], []], kernels


def test_copy_engine_timeout_names_peer_and_sequence() -> None:
    inflight, timeout_s = 2, 2.0
    results = run_ranks(
        2, w.copy_engine_timeout_worker, inflight, timeout_s, ranks_per_gpu=2, timeout_s=60
    )
    op, peer, seq, elapsed, text = results[0]
    assert (op, peer, seq) == ("send", 1, inflight + 1), text
    assert elapsed < timeout_s + 10
    assert results[1] == list(range(1, inflight + 2))


@needs_nixl
def test_nixl_failures_on_gpu() -> None:
    seen = run_ranks(2, w.failure_worker, "nixl", 2, 1.5, ranks_per_gpu=2, timeout_s=120)
    assert seen[1]["mismatch"] == ("recv", 0, 1, 16, 8)
    assert seen[0]["send_timeout"][:3] == ("send", 1, 3)
    assert seen[1]["recv_timeout"][:3] == ("recv", 0, 1)
