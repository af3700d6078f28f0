"""examples/ring_attention.py on 2 CPU ranks (gloo): its output matches single-process attention."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ring_attention.py"


def _example() -> ModuleType:
    name = "cp_copyengine_example_ring_attention"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_ring_attention_matches_single_process_attention() -> None:
    results = _example().main(["--ranks", "2", "--cpu", "--tokens", "32", "--layers", "2"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["backend"] == "torch" and r["error"] < 3e-2 for r in results)


def test_the_blockwise_merge_is_causal_attention() -> None:
    ex = _example()
    ws = ex.weights(1, 32, seed=3)
    x = ex.sequence(24, 32, seed=3)
    want = ex.reference(x, ws, heads=2)
    # Three chunks of 8 tokens, each attending to its own block and the ones before it.
    q, k, v = ((x @ ws[0][n]).view(24, 2, -1).transpose(0, 1) for n in ("wq", "wk", "wv"))
    outs = []
    for c in range(3):
        rows = slice(8 * c, 8 * c + 8)
        parts = [ex._partial(q[:, rows], k[:, rows], v[:, rows], causal=True)]
        for p in range(c):
            cols = slice(8 * p, 8 * p + 8)
            parts.append(ex._partial(q[:, rows], k[:, cols], v[:, cols], causal=False))
        outs.append(ex._merge(parts))
    o = torch.cat(outs, dim=1).transpose(0, 1).reshape(24, 32)
    got = x + o @ ws[0]["wo"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_ring_attention_on_two_ranks_sharing_a_gpu() -> None:
    results = _example().main(["--ranks", "2", "--ranks-per-gpu", "2", "--tokens", "128"])
    assert all(r["backend"] == "copyengine" and r["error"] < 3e-2 for r in results)
