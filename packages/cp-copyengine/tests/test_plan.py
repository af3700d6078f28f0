"""Session sizing, the shared reduction, the backend registry entries and the knobs (no ranks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cp_copyengine
from cp_copyengine import knobs, session_bytes_hint
from cp_copyengine._checks import call_digest
from cp_copyengine.factory import cp_backends
from cp_copyengine.plan import align_up, check_shape, nbytes_of
from cp_copyengine.reduction import accumulate_dtype, check_reduce, reduce_shards
from ep_jit.registry import registered_backends


def test_session_bytes_hint_aligns_every_gathered_tensor() -> None:
    assert align_up(0) == 0 and align_up(1) == 32 and align_up(64) == 64
    # 3 ranks x 5 bf16 = 30 bytes -> 32; 3 x 4 x 4 = 48 -> 64
    assert session_bytes_hint(3, [(5,), (2, 2)], [torch.bfloat16, torch.float32]) == 32 + 64
    assert session_bytes_hint(2, [(32, 64, 2048)] * 4, torch.bfloat16) == 4 * 2 * (8 << 20)
    assert nbytes_of((), torch.float64) == 8
    with pytest.raises(ValueError, match="num_ranks"):
        session_bytes_hint(0, [(1,)], torch.float32)
    with pytest.raises(ValueError, match="2 shapes but 1 dtypes"):
        session_bytes_hint(2, [(1,), (2,)], [torch.float32])
    with pytest.raises(ValueError, match="negative"):
        check_shape((2, -1))
    with pytest.raises(TypeError, match="sequence of ints"):
        check_shape((2, 1.5))


def test_reduction_is_rank_ordered_float32_and_cast_back() -> None:
    # bf16 values whose sum depends on the order and width of the accumulation.
    a = torch.tensor([256.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    c = torch.tensor([1.0, -256.0], dtype=torch.bfloat16)
    out = reduce_shards([a, b, c], "sum")
    assert out.dtype == torch.bfloat16
    # float32: 256 + 1 + 1 = 258 (bf16 pairwise would round 257 back to 256 first).
    assert out.tolist() == [258.0, 1.0]
    avg = reduce_shards([a, b], "avg")
    assert avg.tolist() == [128.0, 128.0]
    ints = reduce_shards([torch.tensor([2**30], dtype=torch.int32)] * 2, "sum")
    assert ints.dtype == torch.int32
    assert accumulate_dtype(torch.float16) == torch.float32
    assert accumulate_dtype(torch.int8) == torch.int64
    for dtype, op, exc in [
        (torch.float8_e4m3fn, "sum", TypeError),
        (torch.bool, "sum", TypeError),
        (torch.int32, "avg", TypeError),
        (torch.float32, "prod", ValueError),
    ]:
        with pytest.raises(exc):
            check_reduce(dtype, op)


def test_backends_are_registered_for_primitive_cp() -> None:
    names = [s.name for s in cp_backends()]
    assert names == ["copyengine", "torch"]
    listed = [s.name for s in registered_backends("cp")]
    assert listed[:2] == ["copyengine", "torch"]
    spec = cp_backends()[0]
    assert spec.unavailable is not None
    assert spec.unavailable(None, False) == "not every rank is on a CUDA device"  # type: ignore[arg-type]


def test_knobs_and_public_names() -> None:
    with knobs.cp.scope():
        assert knobs.cp.check_inputs is True and knobs.cp.backend == "auto"
        knobs.cp.backend = "torch"
        assert knobs.cp.backend == "torch"
    assert set(cp_copyengine.__all__) >= {"CopyEngineBuffer", "GatherHandle", "session_bytes_hint"}


def test_call_digest_is_the_same_in_every_process() -> None:
    """The agreement compares digests across processes: never Python's salted hash()."""
    code = (
        "from cp_copyengine._checks import call_digest;"
        "print(call_digest({'call': 'all_gather', 'tensors': [((3, 5), 'torch.bfloat16')]}))"
    )
    # Another process with another string-hash salt than this one computes the same digest.
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    payload = {"call": "all_gather", "tensors": [((3, 5), "torch.bfloat16")]}
    assert int(run.stdout) == call_digest(payload)
    assert call_digest({**payload, "tensors": [((3, 6), "torch.bfloat16")]}) != call_digest(payload)
    assert call_digest(dict(reversed(payload.items()))) == call_digest(payload)
