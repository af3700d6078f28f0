"""CUDA toolkit discovery: explicit knobs first, then cuda.pathfinder, then ep-jit's fallbacks."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ep_jit import toolchain


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No CUDA_HOME/CUDA_PATH/EP_JIT_NVCC_COMPILER; the header cache cleared before and after."""
    for var in ("CUDA_HOME", "CUDA_PATH", "EP_JIT_NVCC_COMPILER"):
        monkeypatch.delenv(var, raising=False)
    toolchain.cuda_include_dirs.cache_clear()
    yield monkeypatch
    toolchain.cuda_include_dirs.cache_clear()


def _fake_toolkit(root: Path, *, cccl: bool = True, tools: tuple[str, ...] = ("nvcc",)) -> Path:
    include = root / "include"
    include.mkdir(parents=True)
    for header in ("cuda_bf16.h", "cuda_fp8.h", "cuda_runtime.h"):
        (include / header).write_text("#pragma once\n")
    if cccl:
        (include / "cccl" / "cuda" / "std").mkdir(parents=True)
    (root / "bin").mkdir()
    for tool in tools:
        exe = root / "bin" / tool
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return root


def _fake_pathfinder(headers: dict[str, Path], tools: dict[str, Path]) -> SimpleNamespace:
    return SimpleNamespace(
        SUPPORTED_HEADERS_CTK={"cudart": "cuda_runtime.h", "cccl": "cuda/std/version"},
        SUPPORTED_BINARY_UTILITIES=("nvcc", "cuobjdump"),
        find_nvidia_header_directory=lambda name: str(headers[name]) if name in headers else None,
        find_nvidia_binary_utility=lambda name: str(tools[name]) if name in tools else None,
    )


def test_cuda_home_wins_over_pathfinder(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    home = _fake_toolkit(tmp_path / "home")
    other = _fake_toolkit(tmp_path / "other")
    fake = _fake_pathfinder({"cudart": other / "include"}, {"nvcc": other / "bin" / "nvcc"})
    clean_env.setattr(toolchain, "_pathfinder", lambda: fake)
    clean_env.setenv("CUDA_HOME", str(home))
    assert toolchain.cuda_include_dirs() == (home / "include", home / "include" / "cccl")
    assert toolchain.nvcc_path() == str((home / "bin" / "nvcc").resolve())


def test_cuda_path_is_an_override_too(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    home = _fake_toolkit(tmp_path / "home", cccl=False)
    clean_env.setattr(toolchain, "_pathfinder", lambda: _fake_pathfinder({}, {}))
    clean_env.setenv("CUDA_PATH", str(home))
    assert toolchain.cuda_include_dirs() == (home / "include",)
    assert toolchain.nvcc_path() == str((home / "bin" / "nvcc").resolve())


def test_nvcc_knob_wins(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    home = _fake_toolkit(tmp_path / "home")
    mine = _fake_toolkit(tmp_path / "mine")
    clean_env.setenv("CUDA_HOME", str(home))
    clean_env.setenv("EP_JIT_NVCC_COMPILER", str(mine / "bin" / "nvcc"))
    assert toolchain.nvcc_path() == str(mine / "bin" / "nvcc")
    clean_env.setenv("EP_JIT_NVCC_COMPILER", str(tmp_path / "missing-nvcc"))
    with pytest.raises(FileNotFoundError, match="EP_JIT_NVCC_COMPILER"):
        toolchain.nvcc_path(required=False)


def test_found_through_pathfinder(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    kit = _fake_toolkit(tmp_path / "wheel", tools=("nvcc", "cuobjdump"))
    fake = _fake_pathfinder(
        {"cudart": kit / "include"},
        {"nvcc": kit / "bin" / "nvcc", "cuobjdump": kit / "bin" / "cuobjdump"},
    )
    clean_env.setattr(toolchain, "_pathfinder", lambda: fake)
    assert toolchain.cuda_include_dirs() == (kit / "include", kit / "include" / "cccl")
    assert toolchain.nvcc_path() == str(kit / "bin" / "nvcc")
    assert toolchain.cuda_tool_path("cuobjdump") == str(kit / "bin" / "cuobjdump")


def test_cccl_apart_through_pathfinder(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    kit = _fake_toolkit(tmp_path / "runtime", cccl=False)
    cccl = tmp_path / "cccl" / "include"
    (cccl / "cuda" / "std").mkdir(parents=True)
    fake = _fake_pathfinder({"cudart": kit / "include", "cccl": cccl}, {})
    clean_env.setattr(toolchain, "_pathfinder", lambda: fake)
    assert toolchain.cuda_include_dirs() == (kit / "include", cccl)


def test_headers_without_fp8_are_skipped(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    old = tmp_path / "old" / "include"
    old.mkdir(parents=True)
    (old / "cuda_runtime.h").write_text("")
    kit = _fake_toolkit(tmp_path / "kit")
    clean_env.setattr(toolchain, "_pathfinder", lambda: _fake_pathfinder({"cudart": old}, {}))
    clean_env.setenv("EP_JIT_NVCC_COMPILER", str(kit / "bin" / "nvcc"))
    assert toolchain.cuda_include_dirs()[0] == kit / "include"


@pytest.mark.parametrize("module", [None, SimpleNamespace()], ids=["absent", "too-old"])
def test_without_pathfinder_falls_back(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, module: Any
) -> None:
    kit = _fake_toolkit(tmp_path / "kit")
    clean_env.setattr(toolchain, "_pathfinder", lambda: module)
    clean_env.setenv("EP_JIT_NVCC_COMPILER", str(kit / "bin" / "nvcc"))
    assert toolchain.cuda_include_dirs() == (kit / "include", kit / "include" / "cccl")
    clean_env.delenv("EP_JIT_NVCC_COMPILER")
    clean_env.setenv("PATH", str(kit / "bin"))
    assert toolchain.cuda_tool_path("nvcc") == str((kit / "bin" / "nvcc").resolve())


def test_real_pathfinder_headers(clean_env: pytest.MonkeyPatch) -> None:
    pathfinder = pytest.importorskip("cuda.pathfinder")
    found = pathfinder.find_nvidia_header_directory("cudart")
    if not found or not (Path(found) / "cuda_fp8.h").is_file():
        pytest.skip("cuda.pathfinder finds no CUDA runtime headers here")
    assert toolchain.cuda_include_dirs()[0] == Path(found)
