"""Single-process pieces: scale layouts, knobs, the backend registry and the kernel's compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ep_engram
from ep_engram import knobs
from ep_engram.factory import PRIMITIVE, PROVIDERS
from ep_engram.kernels import gather_spec, shipped_kernels
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
    assert knobs.engram.kernel == "ilp"
    monkeypatch.setenv("EP_ENGRAM_KERNEL", "warp")
    assert knobs.engram.kernel == "warp"
    monkeypatch.setenv("EP_ENGRAM_KERNEL", "tma")
    with pytest.raises(ValueError, match="EP_ENGRAM_KERNEL"):
        _ = knobs.engram.kernel


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
    for spec in shipped_kernels()[:2]:
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
