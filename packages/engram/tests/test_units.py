"""Single-process pieces: scale layouts, knobs, the backend registry and the kernel's compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ep_engram
from ep_engram import knobs
from ep_engram.bucket import shipped_bucket_kernels
from ep_engram.factory import PRIMITIVE, PROVIDERS
from ep_engram.kernels import (
    VARIANTS,
    auto_variant,
    bulk_shape,
    gather_spec,
    ring_shape,
    shipped_kernels,
    smem_of,
    threads_of,
)
from ep_engram.layout import empty_sf, num_sf_packs, sf_col_stride
from ep_jit.registry import registered_backends


def test_num_sf_packs() -> None:
    assert num_sf_packs(7168, torch.float32) == 56
    assert num_sf_packs(7168, torch.int32) == 14
    assert num_sf_packs(400, torch.float32) == 4
    assert num_sf_packs(400, torch.int32) == 1
    assert ep_engram.num_sf_packs(128, torch.int32) == 1


@pytest.mark.parametrize("t", [1, 3, 4, 9])
def test_col_major_scales_have_deepeps_strides(t: int) -> None:
    sf = empty_sf(t, 6, torch.float32, torch.device("cpu"), col_major=True)
    assert sf.shape == (t, 6) and sf.stride() == (1, sf_col_stride(t))
    assert sf_col_stride(t) % 4 == 0 and sf_col_stride(t) >= t
    row = empty_sf(t, 6, torch.int32, torch.device("cpu"), col_major=False)
    assert row.stride() == (6, 1)
    assert empty_sf(0, 6, torch.float32, torch.device("cpu"), col_major=True).numel() == 0


def test_knobs_are_declared_once_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert knobs.engram.num_ctas == 8
    # (knob, variable, default, another valid choice, an invalid one)
    for name, env, default, valid, invalid in (
        ("kernel", "EP_ENGRAM_KERNEL", "auto", "warp", "tma"),
        ("sort", "EP_ENGRAM_SORT", "bucket", "torch", "radix"),
    ):
        assert getattr(knobs.engram, name) == default
        monkeypatch.setenv(env, valid)
        assert getattr(knobs.engram, name) == valid
        monkeypatch.setenv(env, invalid)
        with pytest.raises(ValueError, match=env):
            getattr(knobs.engram, name)


def test_backends_are_registered() -> None:
    names = [s.name for s in registered_backends(PRIMITIVE, PROVIDERS)]
    assert names == ["intranode", "reference"]


def test_gather_spec_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        gather_spec(index64=True, row_bytes=24, num_sf_packs=0, sf_col_major=False)
    with pytest.raises(ValueError, match="variant"):
        gather_spec(
            index64=True,
            row_bytes=32,
            num_sf_packs=0,
            sf_col_major=False,
            variant="tma",
        )
    with pytest.raises(ValueError, match="too large"):
        gather_spec(
            index64=True, row_bytes=64 << 10, num_sf_packs=0, sf_col_major=False, variant="bulk"
        )
    with pytest.raises(ValueError, match="unroll"):
        gather_spec(index64=True, row_bytes=32, num_sf_packs=0, sf_col_major=False, unroll=0)


def test_gather_kernels_compile_for_sm90a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ep_jit

    monkeypatch.setenv("EP_JIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EP_JIT_PTXAS_CHECK", "1")  # no spills, no local memory
    # One of every variant (256-byte rows, int32 ids); ep-jit's test of shipped kernels compiles
    # the rest (7168-byte rows with column-major scales, 16 loads per thread).
    chosen = [s for s in shipped_kernels() if "_i32_r256_" in s.name]
    assert len(chosen) == len(VARIANTS)
    # And the id grouping of tile_sorted.
    for spec in [*chosen, *shipped_bucket_kernels()]:
        try:
            entry = ep_jit.compile_spec(spec, arch="90a")
        except ep_jit.JitCompileError as exc:
            if "NVRTC" in str(exc) and "not found" in str(exc):
                pytest.skip(f"no CUDA compiler here: {exc}")
            raise
        assert spec.entry.encode() in entry.read_cubin()


def test_cpu_ranks_cannot_use_gpu_placement_or_intranode() -> None:
    from ep_engram.factory import intranode_unavailable_reason

    assert "CUDA" in str(intranode_unavailable_reason(None, False))  # type: ignore[arg-type]


def test_auto_picks_the_measured_fastest_variant() -> None:
    assert auto_variant("gpu", 2048) == auto_variant("host", 7168) == "ring"
    assert auto_variant("gpu", 1024) == "ring"
    assert auto_variant("gpu", 16384) == auto_variant("host", 65536) == "warp"  # beyond the ring
    assert auto_variant("gpu", 256) == auto_variant("gpu", 1023) == "wide"
    assert auto_variant("host", 256) == "tile_sorted"
    assert all(auto_variant(p, r) in VARIANTS for p in ("gpu", "host") for r in (16, 4096))


def test_variants_are_the_knob_choices() -> None:
    assert ("auto", *VARIANTS) == knobs.KERNEL_CHOICES
    for variant in VARIANTS:
        spec = gather_spec(
            index64=False, row_bytes=256, num_sf_packs=0, sf_col_major=False, variant=variant
        )
        assert spec.launch_bounds == (threads_of(variant), 1)
        assert spec.name.startswith(f"ep_engram_gather_{variant}")


@pytest.mark.parametrize("row_bytes", [16, 256, 400, 2048, 7168, 8192])
@pytest.mark.parametrize("bulk_store", [False, True])
def test_ring_shape_fills_shared_memory_with_enough_slots(row_bytes: int, bulk_store: bool) -> None:
    rows, slots, smem = ring_shape(row_bytes, bulk_store)
    assert 1 <= rows <= 32 and (3 if bulk_store else 2) <= slots <= 16
    assert smem == 8 * slots * rows * row_bytes <= 192 << 10
    variant = "ring_bulk" if bulk_store else "ring"
    assert smem_of(variant, row_bytes) == smem
    # No smaller ring than what the budget allows: one more slot of these rows would not fit.
    assert slots == 16 or 8 * (slots + 1) * rows * row_bytes > 192 << 10


def test_ring_rejects_rows_too_large_and_tile_threads() -> None:
    with pytest.raises(ValueError, match="too large for the ring_bulk"):
        ring_shape(9000, True)
    with pytest.raises(ValueError, match="too large for the ring gather"):
        ring_shape(13000, False)
    assert threads_of("tile", 8) == 1024 and threads_of("tile", 9) == 512
    assert smem_of("tile", 256) == 0 and smem_of("bulk", 256) == bulk_shape(256)[2]


def test_goal_report_names_the_fewest_ctas_meeting_each_goal() -> None:
    from ep_engram.bench import GOALS, goal_report, kernel_name, variant_runs

    def res(where: str, rb: int, kind: str, ctas: int | None, gbps: float) -> dict[str, object]:
        return {"placement": where, "row_bytes": rb, "kind": kind, "ctas": ctas, "gb_per_s": gbps}

    results = [
        res("host", 256, "index_select", None, 90.0),  # all SMs: never counts
        res("host", 256, "kernel-ring", 16, 45.0),  # too many SMs
        res("host", 256, "kernel-ring", 8, 41.0),
        res("host", 256, "kernel-ring", 4, 40.5),
        res("host", 256, "probe-seg-sorted-ring", 4, 80.0),  # probes do not count
        res("host", 2048, "kernel-bulk", 4, 47.9),
        res("gpu", 7168, "kernel-tile8", 8, 650.0),
        res("gpu", 2048, "kernel-tile_sorted8", 4, 700.0),
    ]
    lines = goal_report(results)
    assert len(lines) == len(GOALS)
    assert "MET by kernel-ring (256 B, 4 CTAs: 40.5 GB/s)" in lines[0] and "probe" not in lines[0]
    assert lines[1].endswith("not met")
    assert "MET by kernel-tile8 (7168 B, 8 CTAs" in lines[2]
    assert "kernel-tile_sorted8 (2048 B, 4 CTAs + sort: 700.0 GB/s)" in lines[2]
    assert variant_runs(["ilp", "ring", "tile"], [4, 8]) == [
        ("ilp", 4), ("ilp", 8), ("ring", 1), ("tile", 4), ("tile", 8)
    ]  # fmt: skip
    assert kernel_name("tile", 8) == "kernel-tile8"
    assert kernel_name("ring_bulk", 1) == "kernel-ring_bulk"


def test_probe_id_patterns() -> None:
    from ep_engram._probe import SMALL_FOOTPRINT_BYTES, id_patterns

    pats = id_patterns(5000, 1 << 22, 256, seed=1)
    assert set(pats) == {"random", "sorted", "small", "sequential"}
    assert torch.equal(pats["sequential"], torch.arange(5000))
    assert all(p.numel() == 5000 and p.dtype == torch.int64 for p in pats.values())
    assert torch.equal(pats["sorted"], pats["random"].sort().values)
    assert int(pats["small"].max()) < SMALL_FOOTPRINT_BYTES // 256
    assert int(pats["random"].max()) >= SMALL_FOOTPRINT_BYTES // 256  # spread over the table


@pytest.mark.parametrize("placement", ["host", "gpu"])
def test_probe_runs_every_pattern_memory_and_variant(
    monkeypatch: pytest.MonkeyPatch, placement: str
) -> None:
    # The probe's bookkeeping on the CPU, with the kernel replaced by index_select; a GPU table
    # has no pinned copy to compare with.
    import argparse
    import types

    from ep_engram import _probe

    entries, row = 1 << 16, 256
    stored = torch.randint(0, 256, (entries, row), dtype=torch.uint8)
    launches: list[tuple[str, int, int]] = []

    def fake_launcher(variant: str, unroll: int, *_: int) -> object:
        def launch(
            ctas: int, ids: torch.Tensor, out: torch.Tensor, err: object, bases: object
        ) -> None:
            launches.append((variant, unroll, ctas))
            torch.index_select(stored, 0, ids, out=out)

        return launch

    monkeypatch.setattr(_probe, "_launcher", fake_launcher)
    monkeypatch.setattr(_probe, "_pinned_copy", lambda rows: rows.clone())
    monkeypatch.setattr(_probe, "_device_pointer", lambda host: 0)
    backend = types.SimpleNamespace(
        rows_base=torch.zeros(1, dtype=torch.int64),
        rows_view=lambda peer: stored,
        cfg=types.SimpleNamespace(placement=placement),
    )
    table = types.SimpleNamespace(
        device=torch.device("cpu"), num_entries_per_rank=entries, hidden=row // 2, _backend=backend
    )
    args = argparse.Namespace(
        variants=["ilp", "ring"], probe_unrolls=[4, 8], probe_ctas=[2, 8], tokens=64, k=8, iters=1,
        warmup=0,
    )  # fmt: skip
    kinds: list[tuple[str, int | None]] = []
    _probe.probe_table(
        table, stored, args, "head", {}, lambda h, b, kind, c, s: kinds.append((kind, c))
    )
    memories = 2 if placement == "host" else 1
    assert ("probe-index_select-sequential", None) in kinds
    assert (("probe-pin-small-ilp4", 8) in kinds) == (placement == "host")
    assert ("probe-seg-sorted-ring", 2) in kinds
    # patterns x (index_select + (ilp4, ilp8, ring) x memories x ctas)
    assert len(kinds) == 4 * (1 + 3 * memories * 2)
    assert ("probe-seg-random-ilp8", 8) in kinds and ("ilp", 8, 2) in launches
