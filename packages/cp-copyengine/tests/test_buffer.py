"""CopyEngineBuffer on CPU ranks (gloo, the reference backend): the API, sessions, results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cp_copyengine import CopyEngineBuffer, knobs, session_bytes_hint
from cp_copyengine.testing import Op, expected, make_ops, op_input, random_program, same_bits
from ep_jit.testing import RankInfo, run_ranks


def _api_worker(info: RankInfo) -> dict[str, object]:
    world, rank = info.world_size, info.rank
    buf = CopyEngineBuffer(info.group, 1 << 16, num_max_ops_per_session=4)
    assert buf.backend == "torch" and buf.device == torch.device("cpu")
    seed = 11
    ag = Op(0, "all_gather", (3, 5), torch.bfloat16)
    ag2 = Op(1, "all_gather", (7,), torch.int32)
    ag3 = Op(2, "all_gather", (), torch.float32)
    rs = Op(3, "reduce_scatter", (2, 3), torch.bfloat16, "avg")
    rs2 = Op(4, "reduce_scatter", (4,), torch.int32, "sum")
    with buf.new_session() as b:
        assert b is buf and buf.in_session and buf.session_index == 1
        # In place: the view sits at this rank's piece of the next call.
        slot = buf.get_inplace_tensor(ag.shape, ag.dtype)
        assert isinstance(slot, torch.Tensor) and slot.shape == (3, 5)
        slot.copy_(op_input(ag, seed, rank, world))
        out, handle = buf.all_gather(slot)
        handle()
        assert isinstance(out, torch.Tensor) and out.shape == (world, 3, 5)
        assert same_bits(out, expected(ag, seed, rank, world))
        assert out[rank].data_ptr() == slot.data_ptr()
        # Batched, not in place, a zero-dim tensor among them.
        outs, h2 = buf.all_gather([op_input(o, seed, rank, world) for o in (ag2, ag3)])
        assert isinstance(outs, tuple) and len(outs) == 2
        h2()
        h2()  # may be called twice
        assert same_bits(outs[0], expected(ag2, seed, rank, world))
        assert same_bits(outs[1], expected(ag3, seed, rank, world))
        # Earlier outputs stay intact within the session.
        assert same_bits(out, expected(ag, seed, rank, world))
        red, h3 = buf.reduce_scatter([op_input(rs, seed, rank, world)], op="avg")  # a batch of one
        h3()
        assert isinstance(red, tuple) and same_bits(red[0], expected(rs, seed, rank, world))
        assert buf.session_calls == 3
    assert not buf.in_session
    with buf.new_session():
        assert buf.session_bytes_used == 0 and buf.session_calls == 0
        red2, h4 = buf.reduce_scatter(op_input(rs2, seed, rank, world))
        h4()
        assert isinstance(red2, torch.Tensor) and red2.shape == (4,)
        assert same_bits(red2, expected(rs2, seed, rank, world))
    with buf.new_session(enabled=False):
        assert not buf.in_session
    assert "torch" in repr(buf)
    buf.destroy()
    buf.destroy()  # idempotent
    assert buf.destroyed and "destroyed" in repr(buf)
    return {"red2": red2.tolist()}


def _readme_worker(info: RankInfo) -> None:
    """The README's example, run as written (its budget must cover every call of the session)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    world, rank = info.world_size, info.rank
    k = torch.full((3, 8), float(rank), dtype=torch.bfloat16)
    v = torch.full((3, 4), float(rank + 10), dtype=torch.bfloat16)
    g = torch.arange(world * 2 * 5, dtype=torch.float32).view(world * 2, 5) * (rank + 1)
    scope: dict[str, object] = {"group": info.group, "R": world, "k": k, "v": v, "g": g}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.equal(scope["k_all"][:, 0, 0].float(), torch.arange(world).float())  # type: ignore[index]
    grads = scope["grads"]
    mean = (world + 1) / 2 * g[rank * 2 : rank * 2 + 2] / (rank + 1)
    assert isinstance(grads, torch.Tensor) and torch.equal(grads, mean)


def _worker(info: RankInfo, seed: int, num_ops: int) -> dict[str, object]:
    _readme_worker(info)
    out = _api_worker(info)
    with knobs.cp.scope():
        # The cross-rank checks have their own test (test_errors.py); fewer collectives here.
        knobs.cp.check_inputs = False
        out["ops"] = _stress_worker(info, seed, num_ops)
    return out


# 2 ranks: test_errors.py runs the same worker in its launch (spawning dominates CPU tests).
@pytest.mark.parametrize(("world", "seed", "num_ops"), [(4, 2, 20)])
def test_api_and_random_programs_on_reference_backend(world: int, seed: int, num_ops: int) -> None:
    results = run_ranks(world, _worker, seed, num_ops, timeout_s=120)
    assert [r["ops"] for r in results] == [num_ops] * world
    # Reduced int32 sums: rank r holds rows r*4..r*4+3 of the sum over ranks.
    seed, rs2 = 11, Op(4, "reduce_scatter", (4,), torch.int32, "sum")
    full = sum(op_input(rs2, seed, p, world).to(torch.int64) for p in range(world))
    for r in range(world):
        assert results[r]["red2"] == full[r * 4 : (r + 1) * 4].tolist()


def _stress_worker(info: RankInfo, seed: int, num_ops: int) -> int:
    world = info.world_size
    shapes = [(0,), (1,), (3, 5), (8, 33), (2, 2, 7), ()]
    dtypes = [torch.bfloat16, torch.float32, torch.int32, torch.float8_e4m3fn, torch.uint8]
    ops = make_ops(seed, num_ops, shapes, dtypes)
    budget = session_bytes_hint(world, [(8, 33)] * 4, torch.float32)
    buf = CopyEngineBuffer(info.group, budget, num_max_ops_per_session=4)
    try:
        results = random_program(buf, ops, seed=seed)
    finally:
        buf.destroy()
    assert sorted(results) == [op.index for op in ops]
    for op in ops:
        want = expected(op, seed, info.rank, world)
        assert same_bits(results[op.index], want), f"op {op} differs on rank {info.rank}"
    return len(ops)
