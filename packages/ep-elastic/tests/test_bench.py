"""Tests of ``ep-bench`` (``ep_elastic.bench``): CPU smoke runs, option validation, helpers.

The smoke runs spawn gloo ranks on the CPU and take a few seconds each; the GPU test runs the same
quick sweep on every visible GPU.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ep_elastic import bench
from ep_elastic.bench_cases import (
    GROUP_LIMITED_NUM_GROUPS,
    GROUP_LIMITED_TOPK_GROUPS,
    make_routing,
    seeded_generator,
    tokens_in_rank,
)
from ep_elastic.bench_context import check_equal
from ep_elastic.bench_report import TABLE_WIDTH, build_document, format_table
from ep_elastic.bench_timing import (
    Progress,
    RankTiming,
    format_seconds,
    merge_repeats,
    speedup,
)

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")


def _run(tmp_path: Path, name: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"{name}.json"
    code = bench.main([*args, "--json", str(out)])
    return code, json.loads(out.read_text())


def _check_doc(doc: dict[str, Any], expected_cases: set[str], num_ranks: int) -> None:
    assert doc["status"] == "PASS"
    repeats, iters = doc["config"]["repeats"], doc["config"]["iters"]
    assert {c["case"] for c in doc["cases"]} == expected_cases
    meta = doc["meta"]
    assert meta["num_ranks"] == num_ranks
    assert meta["torch"] == torch.__version__
    for key in ("device", "date", "argv", "git_commit", "backend_name"):
        assert key in meta
    for c in doc["cases"]:
        assert c["status"] == "PASS", c["mismatches"]
        assert c["mismatches"] == []
        for timing in (c["latency_us"], c["baseline"]["latency_us"]):
            assert 0 < timing["p10"] <= timing["median"] <= timing["p90"]
            assert len(timing["per_rank_median"]) == num_ranks
            assert timing["repeats"] == repeats == len(timing["repeat_medians"])
            assert timing["samples"] == repeats * iters
            assert timing["median"] == statistics.median_low(timing["repeat_medians"])
        sp = c["speedup"]
        assert len(sp["per_repeat"]) == repeats
        assert sp["min"] <= sp["value"] <= sp["max"]
        assert sp["value"] == pytest.approx(
            c["baseline"]["latency_us"]["median"] / c["latency_us"]["median"]
        )
        assert c["rows"] > 0
        assert c["gbps"]["logical"] > 0
        assert c["gbps"]["deepep"] >= c["gbps"]["logical"]
        assert 0 <= c["bytes"]["remote"] <= c["bytes"]["logical"]
        if c["mode"] == "ht":
            assert c["baseline"]["status"] == "PASS", c["baseline"]["mismatches"]
            # The baseline moves exactly the rows of the buffer under test.
            assert c["baseline"]["bytes"] == c["bytes"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("bench")
    png = tmp / "quick.png"
    plot = ["--plot", str(png)] if HAS_MATPLOTLIB else []
    code, doc = _run(tmp, "quick", "--quick", "--device", "cpu", *plot)
    return code, doc, png


def test_quick_cpu_run(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    code, doc, _ = quick_run
    assert code == 0
    expected = {
        f"{case}/{op}"
        for case in ("ht/bf16/sms=0/t=128", "ll/bf16/t=1", "ll/bf16/t=32")
        for op in ("dispatch", "combine")
    }
    _check_doc(doc, expected, num_ranks=bench.CPU_RANKS)
    assert doc["config"]["dtypes"] == ["bf16"]
    assert doc["config"]["defaults"] == "quick"
    argv = doc["meta"]["argv"]
    assert argv[:4] == ["ep-bench", "--quick", "--device", "cpu"]
    assert "--json" in argv


@needs_matplotlib
def test_quick_cpu_plot(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    png = quick_run[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_cpu_table(quick_run: tuple[int, dict[str, Any], Path]) -> None:
    table = format_table(quick_run[1])
    assert "overall: PASS" in table
    assert table.count(" PASS ") >= 6
    assert "INCLUDING" in table  # the byte-counting rule is printed
    assert max(len(line) for line in table.splitlines()) <= TABLE_WIDTH
    header = table.splitlines()[2].split()
    # On CPU the reference backend runs no kernels: no SM, kernel or in-graph columns.
    for absent in ("sms", "kern_us", "kGB/s", "g8_us", "dpep"):
        assert absent not in header
    for present in ("med_us", "base_us", "speedup", "range"):
        assert present in header
    wide = format_table(quick_run[1], wide=True).splitlines()[2].split()
    for column in ("sms", "kern_us", "g8_us", "dpep", "rem_GB/s", "base_GB/s", "speedup"):
        assert column in wide


def test_fp8_group_limited_sweep_two_ranks(tmp_path: Path) -> None:
    code, doc = _run(
        tmp_path,
        "sweep",
        "--quick",
        "--device",
        "cpu",
        "--num-processes",
        "2",
        "--mode",
        "ht",
        "--dtype",
        "both",
        "--routing",
        "group-limited",
        "--num-sms",
        "0,8",
        "--iters",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "0",
    )
    assert code == 0
    expected = {
        f"ht/{dtype}/sms={sms}/t=128/{op}"
        for dtype in ("fp8", "bf16")
        for sms in (0, 8)
        for op in ("dispatch", "combine")
    }
    _check_doc(doc, expected, num_ranks=2)
    fp8 = next(c for c in doc["cases"] if c["dtype"] == "fp8" and c["op"] == "dispatch")
    bf16 = next(c for c in doc["cases"] if c["dtype"] == "bf16" and c["op"] == "dispatch")
    # FP8 rows: H bytes of data + 4 bytes of scale per 128 channels; BF16 rows: 2H.
    assert fp8["bytes"]["logical"] == pytest.approx(fp8["rows"] * (256 + 4 * 2))
    assert bf16["bytes"]["logical"] == pytest.approx(bf16["rows"] * 512)
    assert fp8["bytes"]["deepep"] - fp8["bytes"]["logical"] == pytest.approx(fp8["rows"] * 48)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-sms", "0,abc"], "--num-sms: 'abc' is not an integer"),
        (["--num-sms", "-4"], "--num-sms: -4 is below the minimum 0"),
        (["--num-sms", "8,8"], "repeats a value"),
        (["--hidden", "100"], "--hidden 100 is not a multiple of 64"),
        (["--hidden", "192", "--dtype", "fp8"], "FP8 needs a multiple of 128"),
        (["--num-experts", "30"], "not a multiple of the 4 ranks"),
        (["--ll-tokens", "0"], "--ll-tokens: 0 is below the minimum 1"),
        (["--routing", "group-limited", "--num-experts", "12"], "not a multiple of 8"),
        (["--num-topk", "40", "--num-experts", "32"], "exceeds --num-experts"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--backend", "nvlink"], "--backend nvlink needs GPUs"),
    ],
)
def test_bad_options(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--device", "cpu", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--device", "cpu", "--plot", "x.png"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "ep-bench: --plot needs matplotlib, which is not installed: "
        "python -m pip install matplotlib"
    ]


def test_ctrl_c_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_ranks", interrupted)
    assert bench.main(["--quick", "--device", "cpu"]) == bench.INTERRUPTED_STATUS
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["ep-bench: interrupted (Ctrl-C); every rank stopped"]


def test_cpu_defaults_and_note() -> None:
    parser = bench.build_parser()
    args = parser.parse_args(["--device", "cpu"])
    cfg = bench.resolve_config(parser, args)
    assert cfg.defaults == "cpu"
    assert (cfg.num_tokens, cfg.hidden, cfg.num_topk, cfg.num_experts) == (512, 2048, 8, 64)
    assert cfg.repeats >= 3
    note = bench.defaults_note(cfg, args.defaulted)
    assert note is not None and "CPU-sized defaults" in note and "--num-tokens 4096" in note
    shape = ["--num-tokens", "64", "--hidden", "128", "--num-topk", "2", "--num-experts", "8"]
    args = parser.parse_args(["--device", "cpu", *shape, "--ll-tokens", "4"])
    cfg = bench.resolve_config(parser, args)
    assert cfg.num_tokens == 64 and bench.defaults_note(cfg, args.defaulted) is None
    args = parser.parse_args(["--device", "cpu", "--quick"])
    assert bench.defaults_note(bench.resolve_config(parser, args), args.defaulted) is None


def _ht_case(
    tag: str, dtype: str, num_tokens: int, latency_us: float, counts: dict[str, float], **fields
) -> dict:
    """A high-throughput dispatch case of ep-bench's JSON, as ``run_ht_case`` writes it."""
    timing = {
        "median": latency_us,
        "p10": latency_us * 0.95,
        "p90": latency_us * 1.05,
        "per_rank_median": [latency_us],
        "samples": 1,
    }
    base_timing = {**timing, "median": latency_us * 1.5}
    case = {
        "case": f"ht/{dtype}/{tag}/t={num_tokens}/dispatch",
        "mode": "ht",
        "op": "dispatch",
        "dtype": dtype,
        "num_sms": 24,
        "num_sms_used": 24,
        "num_tokens": num_tokens,
        "graph": False,
        "status": "PASS",
        "mismatches": [],
        "latency_us": timing,
        "bytes": counts,
        "gbps": counts,
        "baseline": {
            "status": "PASS",
            "mismatches": [],
            "latency_us": base_timing,
            "gbps": counts,
        },
        "speedup": {"value": 1.5, "min": 1.25, "max": 1.75, "per_repeat": [1.25, 1.5, 1.75]},
    }
    case.update(fields)
    return case


def test_failures_are_reported() -> None:
    counts = {"logical": 1.0, "deepep": 1.0, "remote": 0.0}
    case = _ht_case(
        "sms=0",
        "bf16",
        1,
        2.0,
        counts,
        num_sms=0,
        status="FAIL",
        mismatches=["rank 1: dispatch recv_x"],
    )
    meta = {"device": "cpu", "num_ranks": 1, "backend_name": "torch", "torch": "x"}
    doc = build_document(meta, {}, [case], ["ep-bench"])
    assert doc["status"] == "FAIL"
    table = format_table(doc)
    assert "MISMATCH ht/bf16/sms=0/t=1/dispatch: rank 1: dispatch recv_x" in table
    assert "auto:24" not in table  # the reference backend's SM count means nothing
    assert "auto:24" in format_table(doc, wide=True)
    assert table.endswith("overall: FAIL")


def test_kernel_time_columns() -> None:
    counts = {"logical": 1e6, "deepep": 1.1e6, "remote": 7e5}
    case = _ht_case(
        "sms=24",
        "fp8",
        4096,
        200.0,
        counts,
        gbps={k: v / 200e-6 / 1e9 for k, v in counts.items()},
        kernel_us=125.0,
        kernel_gbps={k: v / 125e-6 / 1e9 for k, v in counts.items()},
    )
    meta = {"device": "cuda", "num_ranks": 4, "backend_name": "nvlink", "torch": "x"}
    doc = build_document(meta, {}, [case], ["ep-bench"])
    row = next(line for line in format_table(doc).splitlines() if line.startswith("ht   dispatch"))
    assert " 125.0 " in row  # kern_us; kGB/s is the first column left out at 100 characters
    table = format_table(doc, wide=True)
    row = next(line for line in table.splitlines() if line.startswith("ht   dispatch"))
    assert " 125.0 " in row and " 8.00 " in row  # kern_us, logical bytes / kern_us in GB/s
    case.update(kernel_us=None, kernel_gbps=None)
    table = format_table(build_document(meta, {}, [case], ["ep-bench"]))
    assert " 125.0 " not in table


def test_in_graph_column() -> None:
    from ep_elastic.bench_report import IN_GRAPH_CALLS

    counts = {"logical": 1e6, "deepep": 1.1e6, "remote": 7e5}
    case = _ht_case("ll", "fp8", 128, 27.2, counts, kernel_us=22.4, in_graph_us=21.3)
    case.update(mode="ll", graph=True, case="ll/fp8/t=128/dispatch")
    meta = {"device": "cuda", "num_ranks": 4, "backend_name": "nvlink", "torch": "x"}
    table = format_table(build_document(meta, {}, [case], ["ep-bench"]))
    header = table.splitlines()[1]
    row = next(line for line in table.splitlines() if line.startswith("ll   dispatch*"))
    col = header.split().index(f"g{IN_GRAPH_CALLS}_us")
    assert row.split()[col] == "21.3"
    assert f"one graph of {IN_GRAPH_CALLS} dispatches" in table
    case.update(in_graph_us=None)
    doc = build_document(meta, {}, [case], ["ep-bench"])
    assert f"g{IN_GRAPH_CALLS}_us" not in format_table(doc).splitlines()[1]  # nothing to show
    wide = format_table(doc, wide=True).splitlines()
    col = wide[1].split().index(f"g{IN_GRAPH_CALLS}_us")
    row = next(line for line in wide if line.startswith("ll   dispatch*"))
    assert row.split()[col] == "-"


def _gpu_sweep_doc() -> dict[str, Any]:
    """A GPU-like document: an SM sweep of both dtypes and low-latency cases in graphs."""
    cases = []
    for dtype in ("fp8", "bf16"):
        for sms in (0, 24, 48):
            for op in ("dispatch", "combine"):
                lat = (400.0 if dtype == "bf16" else 250.0) - 3 * sms
                counts = {"logical": 3e8, "deepep": 3.1e8, "remote": 2.2e8}
                case = _ht_case(
                    f"sms={sms}",
                    dtype,
                    4096,
                    lat,
                    counts,
                    op=op,
                    num_sms=sms,
                    num_sms_used=sms or 132,
                    gbps={k: v / lat / 1e3 for k, v in counts.items()},
                    kernel_us=lat * 0.8,
                    kernel_gbps={k: v / (lat * 0.8) / 1e3 for k, v in counts.items()},
                )
                case["case"] = f"ht/{dtype}/sms={sms}/t=4096/{op}"
                case["baseline"]["gbps"] = {k: v / lat / 1.5e3 for k, v in counts.items()}
                cases.append(case)
        for tokens in (1, 32, 128):
            for op in ("dispatch", "combine"):
                counts = {"logical": 1e5 * tokens, "deepep": 1.1e5 * tokens, "remote": 7e4}
                lat = 20.0 + tokens / 8
                case = _ht_case(
                    "ll",
                    dtype,
                    tokens,
                    lat,
                    counts,
                    gbps={k: v / lat / 1e3 for k, v in counts.items()},
                    op=op,
                    mode="ll",
                    graph=True,
                    num_sms=0,
                    num_sms_used=None,
                    kernel_us=15.0 + tokens / 8,
                    in_graph_us=14.0 + tokens / 8,
                    graph_note="CUDA graph replays timed",
                )
                case["case"] = f"ll/{dtype}/t={tokens}/{op}"
                case["baseline"]["status"] = "not checked (different layout)"
                cases.append(case)
    meta = {"device": "NVIDIA H200", "num_ranks": 4, "backend_name": "nvlink", "torch": "x"}
    config = {
        "hidden": 7168,
        "num_topk": 8,
        "num_experts": 256,
        "routing": "uniform",
        "iters": 20,
        "repeats": 5,
        "warmup": 5,
    }
    return build_document(meta, config, cases, ["ep-bench"])


def test_default_table_fits_and_wide_has_everything() -> None:
    doc = _gpu_sweep_doc()
    table = format_table(doc)
    assert max(len(line) for line in table.splitlines()) <= TABLE_WIDTH
    header = table.splitlines()[2].split()
    for column in ("sms", "med_us", "kern_us", "g8_us", "base_us", "speedup", "range"):
        assert column in header
    assert "dpep" not in header and "--wide" in table
    row = next(line for line in table.splitlines() if line.split()[:3] == ["ht", "dispatch", "fp8"])
    assert row.split()[header.index("sms")] == "auto:132"
    assert row.split()[header.index("range")] == "1.25-1.75"
    wide = format_table(doc, wide=True)
    wide_header = wide.splitlines()[2].split()
    for column in ("dpep", "kGB/s", "rem_MB", "rem_GB/s", "base_GB/s", "base_rem", "p10_us"):
        assert column in wide_header
    assert max(len(line) for line in wide.splitlines()) > TABLE_WIDTH


def test_table_of_a_document_without_repeats() -> None:
    """Documents written before the speedup record (one measurement) still print."""
    case = _ht_case("sms=0", "bf16", 128, 2.0, {"logical": 1.0, "deepep": 1.0, "remote": 0.0})
    del case["speedup"]
    meta = {"device": "cpu", "num_ranks": 4, "backend_name": "torch", "torch": "x"}
    table = format_table(build_document(meta, {}, [case], ["ep-bench"]))
    assert " 1.50x" in table and "range" not in table.splitlines()[1]


def _timing(median: float, ranks: tuple[float, ...] = (1.0,)) -> RankTiming:
    return RankTiming(median, median * 0.9, median * 1.2, ranks, 10)


def test_merge_repeats_and_speedup() -> None:
    ours = merge_repeats([_timing(m, (m, m - 1)) for m in (10.0, 30.0, 20.0, 12.0)])
    assert ours.median_us == 12.0  # the lower middle one: a measured value
    assert ours.merged.samples == 40
    assert ours.merged.p10_us <= ours.median_us <= ours.merged.p90_us
    assert ours.merged.per_rank_median_us == (16.0, 15.0)
    assert ours.to_json()["repeat_medians"] == [10.0, 30.0, 20.0, 12.0]
    base = merge_repeats([_timing(m) for m in (20.0, 33.0, 30.0, 18.0)])
    sp = speedup(ours, base)
    assert sp["per_repeat"] == pytest.approx([2.0, 1.1, 1.5, 1.5])
    assert sp["value"] == pytest.approx(20.0 / 12.0)
    assert sp["min"] <= sp["value"] <= sp["max"]
    with pytest.raises(ValueError, match="at least one"):
        merge_repeats([])


def test_progress_lines() -> None:
    lines: list[str] = []
    with Progress(lines.append, "timing", 40, first_after_s=0.05, every_s=0.05) as progress:
        for _ in range(10):
            progress.tick()
        deadline = 100
        while not lines and deadline:
            import time

            time.sleep(0.02)
            deadline -= 1
    assert lines and lines[0].startswith("      timing: 10/40 iterations, ")
    assert lines[0].endswith(" left")
    assert Progress(None, "t", 4).line(30.0) == "      t: 0/4 iterations, 30 s"
    p = Progress(None, "t", 4)
    p.done = 1
    assert p.line(65.0) == "      t: 1/4 iterations, 1 min 05 s, about 3 min 15 s left"
    quiet: list[str] = []
    with Progress(quiet.append, "t", 4, first_after_s=60.0):
        pass
    assert quiet == []
    assert format_seconds(7200) == "2 h 00 min"


@needs_matplotlib
def test_plot_of_sweeps(tmp_path: Path) -> None:
    from ep_elastic.bench_plot import _panels, write_plot

    doc = _gpu_sweep_doc()
    kinds = [kind for kind, _ in _panels(doc["cases"])]
    assert kinds == ["ht-sms:dispatch", "ht-sms:combine", "ll-tokens"]
    write_plot(doc, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    single = [c for c in doc["cases"] if c["num_sms"] == 24 or c["num_tokens"] == 32]
    kinds = [kind for kind, _ in _panels(single)]
    assert kinds == ["ht-bars", "ll-bars"]
    doc["cases"] = single
    doc["cases"][0]["status"] = "FAIL"
    write_plot(doc, str(tmp_path / "single.png"))
    assert (tmp_path / "single.png").stat().st_size > 0


def test_kernel_times_off_cuda() -> None:
    from ep_elastic.bench_timing import kernel_times

    calls: list[str] = []
    out = kernel_times(
        [("a", lambda: calls.append("a"))],
        {"a": ("ep_",)},
        iters=3,
        device=torch.device("cpu"),
        group=None,  # type: ignore[arg-type]  # not used off CUDA
    )
    assert out == {"a": None} and calls == []


def test_input_checks_off_while_timing() -> None:
    from ep_core import knobs as core_knobs
    from ep_elastic.bench_timing import input_checks_off

    with core_knobs.ep.scope():
        core_knobs.ep.check_inputs = True
        with input_checks_off():
            assert core_knobs.ep.check_inputs is False
        assert core_knobs.ep.check_inputs is True


def test_routing_kinds() -> None:
    device = torch.device("cpu")
    num_tokens, num_experts, k, num_ranks = 512, 64, 6, 4
    for kind in ("uniform", "skewed", "group-limited"):
        gen = seeded_generator(device, 1, 2, 3)
        idx, weights = make_routing(
            kind, num_tokens, num_experts, k, num_ranks=num_ranks, gen=gen, device=device
        )
        assert idx.shape == weights.shape == (num_tokens, k)
        assert idx.dtype == torch.int64 and weights.dtype == torch.float32
        assert int(idx.min()) >= 0 and int(idx.max()) < num_experts
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "experts of a token are distinct"
        if kind == "skewed":
            share = (idx == 0).any(dim=1).float().mean().item()
            assert share > 0.6
            per_rank = tokens_in_rank(idx, num_experts, num_ranks).sum(dim=0)
            assert int(per_rank.argmax()) == 0
        if kind == "group-limited":
            groups = idx // (num_experts // GROUP_LIMITED_NUM_GROUPS)
            per_token = torch.zeros(num_tokens, GROUP_LIMITED_NUM_GROUPS, dtype=torch.bool)
            per_token.scatter_(1, groups, True)
            assert int(per_token.sum(dim=1).max()) <= GROUP_LIMITED_TOPK_GROUPS
    again = make_routing(
        "uniform",
        8,
        num_experts,
        k,
        num_ranks=num_ranks,
        gen=seeded_generator(device, 1, 2, 3),
        device=device,
    )
    first = make_routing(
        "uniform",
        8,
        num_experts,
        k,
        num_ranks=num_ranks,
        gen=seeded_generator(device, 1, 2, 3),
        device=device,
    )
    assert torch.equal(again[0], first[0])


def test_check_equal() -> None:
    a = torch.randn(4, 128).to(torch.float8_e4m3fn)
    b = a.clone()
    assert check_equal(a, b)
    b.view(torch.uint8)[3, 0] ^= 1
    assert not check_equal(a, b)
    assert check_equal(a, b, rows=3)
    assert not check_equal(a, b[:2], rows=3)
    assert check_equal(None, None) and not check_equal(a, None)
    assert not check_equal(a.float(), a.to(torch.bfloat16))


@pytest.mark.gpu
def test_quick_gpu_run(tmp_path: Path) -> None:
    code, doc = _run(tmp_path, "gpu", "--quick", "--device", "cuda", "--dtype", "both")
    assert code == 0
    assert doc["meta"]["num_ranks"] == torch.cuda.device_count()
    assert doc["status"] == "PASS"
    assert all(c["latency_us"]["median"] > 0 for c in doc["cases"])
    if doc["meta"]["backend_name"] != "torch":
        assert all(c["graph"] for c in doc["cases"] if c["mode"] == "ll"), [
            c.get("graph_note") for c in doc["cases"]
        ]
