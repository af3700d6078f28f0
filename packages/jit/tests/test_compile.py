from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ep_jit
from ep_jit import JitCompileError, JitPtxasCheckError, KernelSpec, knobs, toolchain
from ep_jit.kernels import toy_axpy_spec

COMPILERS = [
    "nvrtc",
    pytest.param(
        "nvcc",
        marks=pytest.mark.skipif(
            toolchain.nvcc_path(required=False) is None, reason="nvcc not installed"
        ),
    ),
]

SPILL_HEADER = """
#pragma once
namespace t {
template <int N>
__device__ void spill(float* out, const int* idx) {
  float a[N];
  for (int i = 0; i < N; ++i) a[i] = out[i] * 2.0f + i;
  a[idx[N + threadIdx.x] % N] += 1.0f;  // a dynamically indexed store forces local memory
  out[threadIdx.x] = a[idx[threadIdx.x] % N];
}
template <int N>
__device__ void clean(float* out, const int* idx) {
  out[threadIdx.x] = out[idx[threadIdx.x] % N] * 2.0f;
}
}  // namespace t
"""

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    256 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""


def _spill_spec(name: str, root: str, template: str) -> KernelSpec:
    return KernelSpec(
        name=name,
        includes=[f"{root}/spill.cuh"],
        template=f"t::{template}",
        params=["float* out", "const int* idx"],
        constants={"N": 128},
    )


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_toy_for_sm90a(jit_cache: Path, compiler: str) -> None:
    spec = toy_axpy_spec(3)
    entry = ep_jit.compile_spec(spec, arch="sm_90a", compiler=compiler)
    cubin = entry.read_cubin()
    assert cubin[:4] == b"\x7fELF"
    assert spec.entry.encode() in cubin
    assert entry.arch == "90a"
    assert entry.path.is_relative_to(jit_cache)
    assert entry.source_path.read_text() == spec.render()
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["compiler"].startswith(compiler)
    assert "--gpu-architecture=sm_90a" in meta["flags"]
    assert ep_jit.cache_stats().compiles == 1
    # Second call: the in-process cache answers.
    assert ep_jit.compile_spec(spec, arch="90a", compiler=compiler) is entry
    assert ep_jit.cache_stats().memory_hits == 1


def test_build_without_gpu_returns_unloaded_kernel(jit_cache: Path) -> None:
    knobs.jit.arch = "90a"
    kernel = ep_jit.build(toy_axpy_spec(2))
    assert kernel.entry.arch == "90a"
    assert ep_jit.build(toy_axpy_spec(2)) is kernel
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_error_carries_log_and_source(
    jit_cache: Path, tmp_include_root: tuple[str, Path], compiler: str
) -> None:
    name, folder = tmp_include_root
    (folder / "broken.cuh").write_text("template <int N> __device__ void f(int* x) { x[0] = ; }\n")
    spec = KernelSpec(
        name="broken",
        includes=[f"{name}/broken.cuh"],
        template="f",
        params=["int* x"],
        constants={"N": 1},
    )
    with pytest.raises(JitCompileError) as err:
        ep_jit.compile_spec(spec, arch="90a", compiler=compiler)
    exc = err.value
    assert "error" in exc.log
    assert "broken.cuh" in exc.log
    assert any("sm_90a" in part for part in exc.command)
    assert Path(exc.source_path).read_text() == spec.render()
    assert Path(exc.source_path).is_relative_to(jit_cache / "tmp")
    assert exc.source_path in str(exc)
    assert ep_jit.cache_stats().compiles == 0
    with pytest.raises(JitCompileError):  # failures are not cached
        ep_jit.compile_spec(spec, arch="90a", compiler=compiler)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_ptxas_check_catches_local_memory(
    jit_cache: Path, tmp_include_root: tuple[str, Path], compiler: str
) -> None:
    name, folder = tmp_include_root
    (folder / "spill.cuh").write_text(SPILL_HEADER)
    spill = _spill_spec("spill", name, "spill")
    ep_jit.compile_spec(spill, arch="90a", compiler=compiler)  # fine without the check
    knobs.jit.ptxas_check = True
    with pytest.raises(JitPtxasCheckError, match=r"spill: \d+ B stack") as err:
        ep_jit.compile_spec(spill, arch="90a", compiler=compiler)
    assert "stack frame" in err.value.log
    ep_jit.compile_spec(_spill_spec("clean", name, "clean"), arch="90a", compiler=compiler)


def test_dump_ptx_writes_next_to_cubin(jit_cache: Path) -> None:
    knobs.jit.dump_ptx = True
    entry = ep_jit.compile_spec(toy_axpy_spec(5), arch="90a")
    ptx = (entry.path / "kernel.ptx").read_text()
    assert ".entry ep_jit_toy_axpy_s5" in ptx


@pytest.mark.skipif(
    toolchain.cuda_tool_path("cuobjdump") is None,
    reason="cuobjdump not installed",
)
def test_dump_sass(jit_cache: Path) -> None:
    knobs.jit.dump_sass = True
    entry = ep_jit.compile_spec(toy_axpy_spec(6), arch="90a")
    assert "ep_jit_toy_axpy_s6" in (entry.path / "kernel.sass").read_text()


def test_parse_ptxas() -> None:
    usages = {u.name: u for u in ep_jit.parse_ptxas(PTXAS_LOG)}
    assert set(usages) == {"k1", "helper", "k2"}
    assert (usages["k1"].stack_frame, usages["k1"].spill_stores, usages["k1"].spill_loads) == (
        256,
        8,
        4,
    )
    assert usages["k1"].registers == 32
    assert usages["k1"].uses_local_memory
    assert not usages["k2"].uses_local_memory
    assert usages["k2"].registers == 8


def test_arch_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw in ("90a", "sm_90a", "sm90a", "9.0a", "SM_90A"):
        assert toolchain.normalize_arch(raw) == "90a"
    assert toolchain.normalize_arch("sm_100f") == "100f"
    with pytest.raises(ValueError, match="not a CUDA architecture"):
        toolchain.normalize_arch("hopper")
    monkeypatch.setenv("EP_JIT_ARCH", "sm_100a")
    assert ep_jit.resolve_arch() == "100a"
    assert ep_jit.resolve_arch("90a") == "90a"
    monkeypatch.delenv("EP_JIT_ARCH")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="EP_JIT_ARCH"):
            ep_jit.resolve_arch()


def test_include_root_registration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no folder"):
        ep_jit.register_include_root("nothere", tmp_path)
    (tmp_path / "a" / "pkg_x").mkdir(parents=True)
    (tmp_path / "b" / "pkg_x").mkdir(parents=True)
    ep_jit.register_include_root("pkg_x", tmp_path / "a")
    try:
        ep_jit.register_include_root("pkg_x", tmp_path / "a")  # same path: fine
        with pytest.raises(ValueError, match="already registered"):
            ep_jit.register_include_root("pkg_x", tmp_path / "b")
        ep_jit.register_include_root("pkg_x", tmp_path / "b", replace=True)
        assert ep_jit.include_roots()["pkg_x"] == (tmp_path / "b").resolve()
    finally:
        ep_jit.unregister_include_root("pkg_x")
    assert "pkg_x" not in ep_jit.include_roots()
    with pytest.raises(ValueError, match="cannot unregister"):
        ep_jit.unregister_include_root("ep_jit")


def test_cuda_headers_found() -> None:
    dirs = toolchain.cuda_include_dirs()
    assert dirs, "NVRTC needs the CUDA headers (cuda_bf16.h, cuda/std/...)"
    assert (dirs[0] / "cuda_fp8.h").is_file()


HELPERS_HEADER = """
#pragma once
#include <ep_jit/smxx_ptx.cuh>
#include <ep_jit/smxx_timeout.cuh>
namespace t {
template <bool kTrap>
__device__ void helpers(uint32_t* flags, uint64_t* wide, ep_jit::WaitContext ctx) {
  ep_jit::st_release_sys(flags + 1, ep_jit::ld_acquire_sys(flags) + 1u);
  ep_jit::st_release_sys(wide, ep_jit::ld_acquire_sys(wide) + ep_jit::globaltimer_ns());
  ep_jit::red_add_release_sys(flags + 2, 1u);
  ep_jit::fence_acq_rel_sys();
  const uint32_t old = ep_jit::atom_add_acq_rel_sys(flags + 3, 1u);
  if (!ep_jit::wait_ge<kTrap>(flags + 4, old, ctx, 1, 0)) return;
  ep_jit::wait_until<kTrap>([&] { return ep_jit::ld_acquire_gpu(flags + 5) != 0u; }, ctx, 2, 1);
  if (ep_jit::aborted(ctx)) ep_jit::st_relaxed_sys(flags + 6, 1u);
}
}  // namespace t
"""


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("trap", [False, True])
def test_device_helpers_compile(
    jit_cache: Path, tmp_include_root: tuple[str, Path], compiler: str, trap: bool
) -> None:
    name, folder = tmp_include_root
    (folder / "helpers.cuh").write_text(HELPERS_HEADER)
    spec = KernelSpec(
        name="helpers",
        includes=[f"{name}/helpers.cuh"],
        template="t::helpers",
        params=["uint32_t* flags", "uint64_t* wide", "ep_jit::WaitContext ctx"],
        constants={"kTrap": trap},
    )
    knobs.jit.ptxas_check = True  # the helpers must not need local memory
    assert b"helpers" in ep_jit.compile_spec(spec, arch="90a", compiler=compiler).read_cubin()
