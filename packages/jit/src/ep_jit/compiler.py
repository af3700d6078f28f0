"""NVRTC and nvcc behind one interface: a generated source in, a cubin (and its logs) out.

:func:`get_compiler` picks the backend from ``EP_JIT_COMPILER`` (NVRTC by default, as it needs no
toolkit install beyond the ``nvidia-cuda-nvrtc`` wheel and the CUDA headers). Both take the same
language flags: C++20, ``-default-device``/``--expt-relaxed-constexpr`` (constexpr host functions
usable on the device) and the registered include roots. Nothing here needs a GPU.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ep_jit import knobs, toolchain
from ep_jit._log import verbose
from ep_jit.errors import JitCompileError, JitPtxasCheckError

__all__ = [
    "CompileOutput",
    "Compiler",
    "FunctionUsage",
    "NvccCompiler",
    "NvrtcCompiler",
    "check_ptxas",
    "get_compiler",
    "parse_ptxas",
]

CXX_STANDARD = "c++20"

_FUNC_RE = re.compile(r"Function properties for (\S+)")
_USAGE_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_REGS_RE = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class CompileOutput:
    """What a compiler produced.

    Attributes:
        cubin: The ELF image for the requested SM architecture.
        ptx: The PTX text when requested (``EP_JIT_DUMP_PTX``), else ``None``.
        log: Compiler messages (warnings, ptxas ``-v`` report).
        command: The command line (nvcc) or the NVRTC options.
    """

    cubin: bytes
    ptx: str | None
    log: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class FunctionUsage:
    """One function's resource report from ``ptxas -v``."""

    name: str
    stack_frame: int
    spill_stores: int
    spill_loads: int
    registers: int | None

    @property
    def uses_local_memory(self) -> bool:
        """Whether the function has a stack frame or spills registers."""
        return self.stack_frame > 0 or self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(log: str) -> list[FunctionUsage]:
    """Extracts per-function stack/spill/register figures from a ``ptxas -v`` report."""
    usages: list[FunctionUsage] = []
    current: str | None = None
    pending: tuple[int, int, int] | None = None
    for line in log.splitlines():
        m = _FUNC_RE.search(line)
        if m:
            if current is not None and pending is not None:
                usages.append(FunctionUsage(current, *pending, None))
            current, pending = m.group(1).strip("'"), None
            continue
        m = _USAGE_RE.search(line)
        if m and current is not None:
            pending = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            continue
        m = _REGS_RE.search(line)
        if m and current is not None and pending is not None:
            usages.append(FunctionUsage(current, *pending, int(m.group(1))))
            current, pending = None, None
    if current is not None and pending is not None:
        usages.append(FunctionUsage(current, *pending, None))
    return usages


def check_ptxas(name: str, output: CompileOutput, source_path: str) -> None:
    """Raises when a compiled function uses local memory (``EP_JIT_PTXAS_CHECK``).

    Raises:
        JitPtxasCheckError: A function reports a stack frame or spills; names each offender.
        JitCompileError: The log has no ptxas report to check.
    """
    usages = parse_ptxas(output.log)
    if not usages:
        raise JitCompileError(
            name, output.command, output.log, source_path, "EP_JIT_PTXAS_CHECK found no report"
        )
    bad = [u for u in usages if u.uses_local_memory]
    if bad:
        detail = "; ".join(
            f"{u.name}: {u.stack_frame} B stack, {u.spill_stores} B spill stores, "
            f"{u.spill_loads} B spill loads"
            for u in bad
        )
        raise JitPtxasCheckError(
            name, output.command, output.log, source_path, f"local memory used ({detail})"
        )


def _want_ptxas_report() -> bool:
    return knobs.jit.ptxas_verbose or knobs.jit.ptxas_check or knobs.jit.debug


def _want_lineinfo() -> bool:
    return knobs.jit.with_lineinfo or knobs.jit.debug


class Compiler(ABC):
    """A way to turn a translation unit into a cubin."""

    name: str

    @abstractmethod
    def identity(self) -> str:
        """Compiler name and version; part of every cache key."""

    @abstractmethod
    def flags(self, arch: str, extra_flags: tuple[str, ...]) -> list[str]:
        """The full option list for ``arch`` (e.g. ``"90a"``), knobs applied."""

    @abstractmethod
    def compile(
        self, name: str, source: str, source_path: Path, flags: list[str], want_ptx: bool
    ) -> CompileOutput:
        """Compiles ``source`` (already written at ``source_path``).

        Raises:
            JitCompileError: The compiler reported an error.
        """

    def _include_flags(self, with_cuda: bool) -> list[str]:
        dirs = [str(p) for p in toolchain.include_roots().values()]
        if with_cuda:
            dirs += [str(p) for p in toolchain.cuda_include_dirs()]
        return [f"-I{d}" for d in dirs]


class NvrtcCompiler(Compiler):
    """NVRTC through ``cuda.bindings.nvrtc``; the CUDA headers come from ``cuda_include_dirs``."""

    name = "nvrtc"

    def identity(self) -> str:
        """``"nvrtc <major>.<minor>"``."""
        major, minor = toolchain.nvrtc_version()
        return f"nvrtc {major}.{minor}"

    def flags(self, arch: str, extra_flags: tuple[str, ...]) -> list[str]:
        """NVRTC options; ``-default-device`` stands in for ``--expt-relaxed-constexpr``."""
        flags = [f"--gpu-architecture=sm_{arch}", f"--std={CXX_STANDARD}", "-default-device"]
        flags += ["--diag-suppress=177,550"]  # unused variables in instantiated templates
        if _want_lineinfo():
            flags.append("--generate-line-info")
        if _want_ptxas_report():
            flags.append("--ptxas-options=-v")
        return flags + self._include_flags(with_cuda=True) + list(extra_flags)

    def compile(
        self, name: str, source: str, source_path: Path, flags: list[str], want_ptx: bool
    ) -> CompileOutput:
        """Compiles in-process with NVRTC (see :meth:`Compiler.compile`)."""
        from cuda.bindings import nvrtc

        ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
        if knobs.jit.print_compiler_command:
            verbose("nvrtc %s %s", source_path, " ".join(flags))
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), str(source_path).encode(), 0, [], [])
        if err != ok:
            raise JitCompileError(name, flags, f"nvrtcCreateProgram: {err}", str(source_path))
        try:
            opts = [f.encode() for f in flags]
            (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.rstrip(b"\0 ").decode(errors="replace")
            if result != ok:
                raise JitCompileError(name, flags, log or str(result), str(source_path))
            _, size = nvrtc.nvrtcGetCUBINSize(prog)
            cubin = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            if err != ok or size == 0:
                raise JitCompileError(
                    name, flags, log, str(source_path), f"no cubin produced ({err})"
                )
            ptx = None
            if want_ptx:
                _, size = nvrtc.nvrtcGetPTXSize(prog)
                pbuf = b" " * size
                nvrtc.nvrtcGetPTX(prog, pbuf)
                ptx = pbuf.rstrip(b"\0").decode(errors="replace")
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        return CompileOutput(cubin, ptx, log, tuple(flags))


class NvccCompiler(Compiler):
    """nvcc as a subprocess (``-cubin``); the binary comes from :func:`toolchain.nvcc_path`."""

    name = "nvcc"

    def __init__(self) -> None:
        """Locates nvcc; raises ``FileNotFoundError`` when it is not installed."""
        self.path = toolchain.nvcc_path() or "nvcc"

    def identity(self) -> str:
        """The path of nvcc and its ``release`` line."""
        return f"nvcc {self.path} {toolchain.nvcc_version(self.path)}"

    def flags(self, arch: str, extra_flags: tuple[str, ...]) -> list[str]:
        """Options for nvcc, which finds the CUDA headers itself."""
        flags = [
            f"--gpu-architecture=sm_{arch}",
            f"-std={CXX_STANDARD}",
            "-O3",
            "--expt-relaxed-constexpr",
            "--expt-extended-lambda",
            "--diag-suppress=177,550",
        ]
        if _want_lineinfo():
            flags.append("-lineinfo")
        if _want_ptxas_report():
            flags.append("--ptxas-options=-v")
        return flags + self._include_flags(with_cuda=False) + list(extra_flags)

    def _run(self, name: str, cmd: list[str], source_path: Path) -> str:
        if knobs.jit.print_compiler_command:
            verbose("%s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise JitCompileError(name, cmd, log, str(source_path), f"exit code {proc.returncode}")
        return log

    def compile(
        self, name: str, source: str, source_path: Path, flags: list[str], want_ptx: bool
    ) -> CompileOutput:
        """Runs ``nvcc -cubin`` (and ``-ptx`` when asked) in a subprocess."""
        with tempfile.TemporaryDirectory(prefix="ep_jit_nvcc_") as tmp:
            out = Path(tmp) / "kernel.cubin"
            cmd = [self.path, "-cubin", str(source_path), "-o", str(out), *flags]
            log = self._run(name, cmd, source_path)
            cubin = out.read_bytes()
            ptx = None
            if want_ptx:
                ptx_path = Path(tmp) / "kernel.ptx"
                no_v = [f for f in flags if f != "--ptxas-options=-v"]
                self._run(
                    name,
                    [self.path, "-ptx", str(source_path), "-o", str(ptx_path), *no_v],
                    source_path,
                )
                ptx = ptx_path.read_text()
        if not cubin:
            raise JitCompileError(name, cmd, log, str(source_path), "nvcc wrote an empty cubin")
        return CompileOutput(cubin, ptx, log, tuple(cmd))


def get_compiler(name: str | None = None) -> Compiler:
    """The compiler named ``name`` (``"nvrtc"`` or ``"nvcc"``), default ``EP_JIT_COMPILER``.

    Raises:
        ValueError: Unknown compiler name.
        FileNotFoundError: nvcc was requested but is not installed.
    """
    name = (name or knobs.jit.compiler).lower()
    if name == "nvrtc":
        return NvrtcCompiler()
    if name == "nvcc":
        return NvccCompiler()
    raise ValueError(f"unknown compiler {name!r}; expected 'nvrtc' or 'nvcc'")
