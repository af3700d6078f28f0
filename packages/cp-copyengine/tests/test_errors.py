"""Every bad input raises a clear error on every rank (2 gloo ranks), and the buffer still works."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cp_copyengine import CopyEngineBuffer, knobs
from ep_jit.errors import HostTimeoutError
from ep_jit.testing import RankInfo, run_ranks

from .test_buffer import _worker


def _raises(exc: type[Exception], pattern: str, fn: Callable[[], object]) -> str:
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    return message


def _errors_worker(info: RankInfo) -> None:
    rank, world, group = info.rank, info.world_size, info.group
    # Construction: a bad size on one rank fails on both; the other rank names the culprit.
    _raises(
        ValueError,
        "num_max_session_bytes must be >= 1" if rank == 1 else "rank 1: ValueError",
        lambda: CopyEngineBuffer(group, 0 if rank == 1 else 1024),
    )
    _raises(ValueError, "differs across ranks", lambda: CopyEngineBuffer(group, 1024 + rank))
    _raises(TypeError, "must be an int", lambda: CopyEngineBuffer(group, 1024.0))  # type: ignore[arg-type]
    _raises(ValueError, r"in \[1, 1024\]", lambda: CopyEngineBuffer(group, 1024, 0))
    _raises(ValueError, "backend must be one of", lambda: CopyEngineBuffer(group, 64, 2, "nccl"))
    # A bad EP_CP_BACKEND on one rank fails on both (it used to raise there alone).
    with knobs.cp.scope():
        if rank == 1:
            os.environ[knobs.CpKnobs.backend.name] = "bogus"
        _raises(
            ValueError,
            "EP_CP_BACKEND" if rank == 1 else "rank 1: ValueError",
            lambda: CopyEngineBuffer(group, 1024),
        )
    # A bad timeout on one rank fails on both (it used to raise on that rank alone, before the
    # ranks met, leaving the other waiting).
    _raises(
        TypeError if rank == 1 else ValueError,
        "timeout_s must be a number" if rank == 1 else "rank 1: TypeError",
        lambda: CopyEngineBuffer(group, 1024, timeout_s="soon" if rank == 1 else None),  # type: ignore[arg-type]
    )
    _raises(
        ValueError,
        "not every rank is on a CUDA device",
        lambda: CopyEngineBuffer(group, 1024, backend="copyengine"),
    )

    buf = CopyEngineBuffer(group, 4 * 64 * world + 32, num_max_ops_per_session=3)
    x = torch.arange(64, dtype=torch.float32)
    # Outside a session.
    _raises(RuntimeError, "needs an open session", lambda: buf.all_gather(x))
    _raises(RuntimeError, "needs an open session", lambda: buf.get_inplace_tensor((4,), x.dtype))
    _raises(RuntimeError, "needs an open session", buf.destroy_session)
    buf.create_session()
    _raises(RuntimeError, "still open", buf.create_session)

    # Non-contiguous on one rank only: both raise.
    bad = torch.arange(128, dtype=torch.float32).view(64, 2)[:, 0] if rank == 0 else x
    _raises(
        ValueError,
        "not contiguous" if rank == 0 else "rank 0: ValueError",
        lambda: buf.all_gather(bad),
    )
    # Wrong device (the meta device stands in for another device).
    wrong = torch.empty(64, device="meta") if rank == 1 else x
    _raises(ValueError, "is on meta" if rank == 1 else "rank 1", lambda: buf.all_gather(wrong))
    _raises(TypeError, "not a torch.Tensor", lambda: buf.all_gather([x, 3]))  # type: ignore[list-item]
    _raises(TypeError, "non-empty sequence", lambda: buf.all_gather([]))
    # Ranks whose shapes disagree.
    _raises(ValueError, "tensors differs across ranks", lambda: buf.all_gather(x[: 32 + rank]))
    _raises(
        ValueError,
        "differs across ranks",
        lambda: buf.all_gather(x.to(torch.int32 if rank else torch.float32)),
    )
    # Over budget: the numbers and the advice.
    big = torch.zeros(4 * 64 + 8)
    msg = _raises(ValueError, "destroy the session first", lambda: buf.all_gather(big))
    assert f"{(4 * 64 + 8) * 4 * world}" in msg and f"{4 * 64 * world + 32}" in msg
    _raises(
        ValueError,
        "destroy the session first",
        lambda: buf.get_inplace_tensor((4 * 64 + 8,), torch.float32),
    )

    # In-place tensor away from its slot.
    slot = buf.get_inplace_tensor((32,), torch.float32)
    assert isinstance(slot, torch.Tensor)
    shifted = buf.get_inplace_tensor([(8,), (32,)], torch.float32)[1]
    _raises(ValueError, "lies in the session area", lambda: buf.all_gather(shifted))
    # reduce_scatter specifics.
    _raises(ValueError, "multiple of the 2 ranks", lambda: buf.reduce_scatter(torch.zeros(3)))
    _raises(
        TypeError,
        "does not reduce",
        lambda: buf.reduce_scatter(torch.zeros(4, dtype=torch.float8_e4m3fn)),
    )
    _raises(
        TypeError,
        "needs a floating dtype",
        lambda: buf.reduce_scatter(torch.zeros(4, dtype=torch.int32), op="avg"),
    )
    _raises(ValueError, "op must be one of", lambda: buf.reduce_scatter(torch.zeros(4), op="max"))

    # After all those errors the ranks are still paired: a valid call works.
    slot.copy_(torch.full((32,), float(rank)))
    rounds = buf._checker.rounds
    out, handle = buf.all_gather(slot)
    handle()
    # A call that passes costs one fixed-size all-gather (a gloo group), no object exchange.
    assert not buf._checker.own_group and buf._checker.rounds == rounds + 1
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.arange(world, dtype=torch.float32)[:, None].expand(world, 32))
    # Too many calls in one session.
    buf.all_gather(torch.zeros(1))
    buf.all_gather(torch.zeros(1))
    _raises(ValueError, "num_max_ops_per_session=3", lambda: buf.all_gather(torch.zeros(1)))
    # A handle after its session ended.
    buf.destroy_session()
    _raises(RuntimeError, "has ended", handle)
    with buf.new_session():
        _raises(RuntimeError, "has ended", handle)
    # With input checks off, local errors stay local (and clear).
    with knobs.cp.scope():
        knobs.cp.check_inputs = False
        with buf.new_session():
            _raises(ValueError, "not contiguous", lambda: buf.all_gather(x.view(32, 2)[:, 0]))
            out, handle = buf.all_gather(x)
            handle()
            assert isinstance(out, torch.Tensor) and torch.equal(out[1 - rank], x)
    buf.destroy()
    _raises(RuntimeError, "destroyed", buf.create_session)


def _peer_never_joins(info: RankInfo) -> None:
    """Input checks off, rank 1 makes no call: rank 0's wait ends after timeout_s (the group is
    unusable afterwards, so this runs last)."""
    # Rank 1 stays connected until rank 0 has timed out (a file beside the launcher's pid; no
    # collective may follow the timeout).
    done = Path(tempfile.gettempdir()) / f"cp_copyengine_peer_never_joins_{os.getppid()}"
    if info.rank == 0:
        done.unlink(missing_ok=True)  # a stale one; rank 1 looks only after the collective below
    buf = CopyEngineBuffer(info.group, 1024, timeout_s=1.0)
    with knobs.cp.scope():
        knobs.cp.check_inputs = False
        buf.create_session()
        if info.rank == 0:
            start = time.monotonic()
            try:
                _raises(HostTimeoutError, "did not join", lambda: buf.all_gather(torch.zeros(4)))
            finally:
                done.touch()
            assert time.monotonic() - start < 20
        else:
            deadline = time.monotonic() + 60
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            done.unlink(missing_ok=True)


def _checks_without_gloo(info: RankInfo) -> None:
    """A group without gloo (NCCL only) gets its own gloo group for the checks: made by the
    group's ranks alone, agreeing and disagreeing like the group's own, freed by destroy()."""
    from cp_copyengine import _checks

    real = _checks.has_cpu_backend
    _checks.has_cpu_backend = lambda group: False  # stands in for an NCCL-only group
    try:
        checker = _checks.CallChecker(info.group, torch.device("cpu"), 30.0)
    finally:
        _checks.has_cpu_backend = real
    assert checker.own_group and checker.group is not info.group
    checker.check("all_gather", {"tensors": [(4,)]}, None)
    _raises(
        ValueError,
        r"tensors differs across ranks \(rank 0: \[\(4,\)\], rank 1: \[\(5,\)\]\)",
        lambda: checker.check("all_gather", {"tensors": [(4 + info.rank,)]}, None),
    )
    failing = ValueError("bad") if info.rank == 0 else None
    _raises(
        ValueError,
        "bad" if info.rank == 0 else "rank 0: ValueError: bad",
        lambda: checker.check("all_gather", {}, failing),
    )
    assert checker.rounds == 3
    checker.destroy()
    assert not checker.own_group


def _two_rank_worker(info: RankInfo) -> int:
    _errors_worker(info)
    _checks_without_gloo(info)
    # The API and random programs on 2 ranks, in the same launch (spawning dominates the time).
    ops = int(_worker(info, 1, 48)["ops"])  # type: ignore[call-overload]
    _peer_never_joins(info)
    return ops


def test_every_bad_input_raises_on_every_rank_then_api_and_programs_on_two_ranks() -> None:
    assert run_ranks(2, _two_rank_worker, timeout_s=120) == [48, 48]
