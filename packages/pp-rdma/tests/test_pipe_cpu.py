"""PipeBuffer on CPU ranks (gloo): the reference backend and NIXL, 2 and 4 ranks."""

from __future__ import annotations

import importlib.util

import pytest

from ep_jit.testing import RankFailedError, run_ranks

from . import _pp_workers as w

HAVE_NIXL = importlib.util.find_spec("nixl_cu13") is not None
BACKENDS = [
    "torch",
    pytest.param(
        "nixl", marks=pytest.mark.skipif(not HAVE_NIXL, reason="nixl_cu13 is not installed")
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [4])
def test_random_interleaving_is_bit_exact(backend: str, world: int) -> None:
    num_sends = 120
    results = run_ranks(
        world, w.stress_worker, backend, 11 + world, num_sends, 1 << 14, 2, 0.3, timeout_s=120
    )
    assert sum(r["ops"] for r in results) == 2 * num_sends
    for rank, r in enumerate(results):
        assert set(r["routes"]) == set(range(world)) - {rank}
        assert set(r["routes"].values()) == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_from_zero_to_max_and_backpressure(backend: str) -> None:
    results = run_ranks(2, w.sizes_and_backpressure_worker, backend, 1 << 16, 1.0, timeout_s=120)
    assert [r[0] for r in results] == [14, 14]
    # The send past the limit waited for rank 1 to start receiving (after ~1 s).
    assert results[0][1] > 0.7, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_failures_name_peer_and_sequence(backend: str) -> None:
    inflight, timeout_s = 2, 1.5
    seen = run_ranks(2, w.failure_worker, backend, inflight, timeout_s, timeout_s=120)
    assert seen[1]["mismatch"] == ("recv", 0, 1, 16, 8)
    if backend == "nixl":
        # The receiver tells the sender, whose destroy raises it (after meeting rank 1).
        assert seen[0]["sender_mismatch"] == ("send", 1, 1)
    else:
        assert seen[0]["sender_mismatch"] is None
    op, peer, seq, elapsed, text = seen[0]["send_timeout"]
    assert (op, peer, seq) == ("send", 1, inflight + 1)
    assert timeout_s <= elapsed < timeout_s + 5
    assert f"send #{inflight + 1} to rank 1" in text
    assert "failed earlier" in seen[0]["after_failure"]
    if backend == "nixl":
        assert seen[1]["received"] == list(range(1, inflight + 1))  # nothing overwritten
    op, peer, seq, elapsed, text = seen[1]["recv_timeout"]
    assert (op, peer, seq) == ("recv", 0, 1)
    assert timeout_s <= elapsed < timeout_s + 5
    assert "recv #1 from rank 0" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_peer_raises_within_timeout(backend: str) -> None:
    timeout_s = 2.0
    result = run_ranks(2, w.dead_peer_worker, backend, timeout_s, timeout_s=120)
    name, op, peer, seq, elapsed = result[0]
    assert (op, peer, seq) == ("recv", 1, 2), result[0]
    assert name in ("PipeTimeoutError", "PipePeerError")
    assert elapsed < timeout_s + 5


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl_cu13 is not installed")
def test_two_simulated_nodes_route_local_and_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EP_JIT_RANKS_PER_NODE", "2")
    backend = {"local": "torch", "remote": "nixl"}
    results = run_ranks(4, w.stress_worker, backend, 5, 100, 1 << 12, 2, 0.2, timeout_s=120)
    for rank, r in enumerate(results):
        for peer, name in r["routes"].items():
            assert name == ("torch" if peer // 2 == rank // 2 else "nixl"), (rank, r["routes"])


def test_bad_arguments_raise_on_every_rank() -> None:
    results = run_ranks(2, w.validation_worker, timeout_s=120)
    # Bad on one rank only: that rank raises TypeError, the other a ValueError naming it.
    for key, bad_rank in (("timeout_one_rank", 0), ("backend_type", 1)):
        assert results[bad_rank].pop(key) == "TypeError", key
        assert results[1 - bad_rank].pop(key) == "ValueError", key
    for r in results:
        assert r == {
            "max_bytes": "ValueError",
            "inflight": "ValueError",
            "disagree": "ValueError",
            "backend": "ValueError",
            "timeout_inf": "ValueError",
            "self": "ValueError",
            "big": "ValueError",
            "strided": "ValueError",
            "device": "ValueError",
        }


def test_a_failing_rank_is_reported() -> None:
    with pytest.raises(RankFailedError, match="PipeTimeoutError"):
        run_ranks(2, w.lonely_recv_worker, timeout_s=60)


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl_cu13 is not installed")
def test_a_rank_alone_on_its_node_joins_every_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nodes {0, 1} and {2}: rank 2 has no local peer but must still join the local backend's
    # collective setup (NIXL here), or the group's collectives fall out of step.
    monkeypatch.setenv("EP_JIT_RANKS_PER_NODE", "2")
    backend = {"local": "nixl", "remote": "torch"}
    results = run_ranks(3, w.stress_worker, backend, 9, 24, 1 << 10, 2, 0.05, timeout_s=90)
    assert results[2]["routes"] == {0: "torch", 1: "torch"}
    assert results[0]["routes"] == {1: "nixl", 2: "torch"}
