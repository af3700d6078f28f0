"""examples/engram_layer.py on 2 CPU ranks (gloo): the layer's output through the sharded table
equals, bit for bit, the same layer on a local copy of the whole table."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ep_jit.testing import run_ranks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "engram_layer.py"


def _run_example(info: Any, argvs: list[list[str]]) -> list[dict[str, object]]:
    spec = importlib.util.spec_from_file_location("engram_layer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.run(module.parse(argv), info.group) for argv in argvs]


def test_engram_layer_on_two_cpu_ranks() -> None:
    argvs = [["--dtype", d, "--rows-per-head", "700", "--seq", "24"] for d in ("bf16", "fp8")]
    results = run_ranks(2, _run_example, argvs, use_gpu=False, timeout_s=120)
    for per_rank in results:
        assert len(per_rank) == 2
        for r in per_rank:
            assert r["max_abs_diff"] == 0.0
            assert r["rows_per_token"] == 8 and r["backend"] == "reference"
