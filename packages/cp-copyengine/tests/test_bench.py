"""python -m cp_copyengine.bench on CPU ranks: the smoke test of the whole benchmark path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cp_copyengine.bench import main, parse_args


def test_bench_runs_on_cpu_ranks_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--cpu", "--ranks", "2", "--iters", "1", "--warmup", "0", "--max-mib", "0.004"]
    result = main([*argv, "--quiet", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["world_size"] == 2 and written["backend"] == "torch"
    assert len(written["rows"]) == 4  # one size x (in place, batched)
    assert all(r["gbps"] > 0 and r["us_per_all_gather"] > 0 for r in written["rows"])
    assert [r["size_bytes"] for r in written["baseline"]] == [4096]
    host = written["host_cost_us"]
    assert host["calls_per_session"] >= 2  # a steady state to measure
    for checks in ("checks_off", "checks_on"):
        for what in ("all_gather_first", "all_gather_steady", "handle", "session"):
            assert host[f"{what}_{checks}"] > 0, (what, checks, host)
    assert result["rows"] == written["rows"]


def test_bench_rejects_bad_sizes() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--min-mib", "4", "--max-mib", "1"])
    args = parse_args(["--cpu"])
    assert args.min_mib < args.max_mib < 1
