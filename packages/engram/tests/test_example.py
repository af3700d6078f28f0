"""examples/engram_layer.py on 2 CPU ranks (gloo): the layer's output through the sharded table
equals, bit for bit, the same layer on a local copy of the whole table."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from ep_jit.testing import run_ranks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "engram_layer.py"


def _run_example(info: Any, argv: list[str]) -> dict[str, object]:
    spec = importlib.util.spec_from_file_location("engram_layer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result: dict[str, object] = module.run(module.parse(argv), info.group)
    return result


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_engram_layer_on_two_cpu_ranks(dtype: str) -> None:
    argv = ["--dtype", dtype, "--rows-per-head", "700", "--seq", "24"]
    results = run_ranks(2, _run_example, argv, use_gpu=False, timeout_s=120)
    for r in results:
        assert r["max_abs_diff"] == 0.0
        assert r["rows_per_token"] == 8 and r["backend"] == "reference"
