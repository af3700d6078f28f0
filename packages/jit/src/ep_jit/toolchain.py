"""Toolchain discovery: include roots, CUDA headers, nvcc, NVRTC and the target architecture.

Packages register the folder that holds their device headers::

    ep_jit.register_include_root("ep_core", Path(__file__).parent / "include")

after which generated sources may ``#include <ep_core/name.cuh>``. ep-jit's own root (with
``<ep_jit/ptx.cuh>`` and friends) is always registered. Nothing here touches a GPU except
:func:`resolve_arch` when neither an explicit arch nor ``EP_JIT_ARCH`` is given.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

from ep_jit import knobs

__all__ = [
    "HEADER_SUFFIXES",
    "cuda_include_dirs",
    "cuda_tool_path",
    "headers_digest",
    "include_roots",
    "normalize_arch",
    "nvcc_path",
    "nvcc_version",
    "nvrtc_version",
    "reachable_roots",
    "register_include_root",
    "resolve_arch",
    "unregister_include_root",
]

HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".inl", ".cu")
"""Files of an include root that take part in the cache key."""

_OWN_ROOT = Path(__file__).resolve().parent / "include"
_roots: dict[str, Path] = {"ep_jit": _OWN_ROOT}
_lock = threading.Lock()
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"]([A-Za-z_][A-Za-z0-9_]*)/', re.MULTILINE)
_ARCH_RE = re.compile(r"^(?:sm_?|compute_)?(\d)\.?(\d{1,2})([af]?)$")


def register_include_root(
    name: str, path: str | os.PathLike[str], *, replace: bool = False
) -> None:
    """Adds ``path`` to the include path of every kernel compiled from now on.

    Args:
        name: The package's header folder; ``path/name`` must exist so that sources can write
            ``#include <name/header.cuh>``.
        path: The include root (the folder containing ``name/``).
        replace: Allow re-registering ``name`` with a different path.

    Raises:
        ValueError: ``path/name`` is not a directory, or ``name`` is registered elsewhere.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"include root name must be an identifier, got {name!r}")
    root = Path(path).resolve()
    if not (root / name).is_dir():
        raise ValueError(f"include root {root} has no folder {name!r} (expected {root / name})")
    with _lock:
        previous = _roots.get(name)
        if previous is not None and previous != root and not replace:
            raise ValueError(
                f"include root {name!r} is already registered at {previous}, not {root}"
            )
        _roots[name] = root


def unregister_include_root(name: str) -> None:
    """Removes a registered include root (ep-jit's own root cannot be removed).

    Raises:
        ValueError: ``name`` is ``"ep_jit"`` or not registered.
    """
    with _lock:
        if name == "ep_jit" or name not in _roots:
            raise ValueError(f"cannot unregister include root {name!r}")
        del _roots[name]


def include_roots() -> dict[str, Path]:
    """The registered include roots, ``{name: root}``, ep-jit's first."""
    with _lock:
        return dict(_roots)


def _root_headers(name: str, root: Path) -> list[Path]:
    folder = root / name
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in HEADER_SUFFIXES)


def reachable_roots(
    includes: Sequence[str], roots: dict[str, Path] | None = None
) -> dict[str, Path]:
    """The registered roots a source with these ``#include <...>`` lines can reach.

    Starts from the roots named by ``includes`` (plus ep-jit's own) and adds every root that a
    header of an already reached root includes with ``#include <name/...>``. Roots no kernel
    reaches stay out of its cache key, so registering a package does not invalidate the cubins
    of the others.
    """
    roots = include_roots() if roots is None else roots
    reached = {"ep_jit"} | {inc.split("/", 1)[0] for inc in includes}
    todo = sorted(n for n in reached if n in roots)
    while todo:
        name = todo.pop()
        for header in _root_headers(name, roots[name]):
            for dep in _INCLUDE_RE.findall(header.read_text(errors="replace")):
                if dep in roots and dep not in reached:
                    reached.add(dep)
                    todo.append(dep)
    return {n: roots[n] for n in sorted(reached) if n in roots}


def headers_digest(roots: dict[str, Path] | None = None) -> str:
    """sha256 over the relative path and bytes of every header under the registered roots.

    Only the ``roots[name]/name`` folder of each root is hashed (what ``<name/...>`` can reach),
    files sorted by path, so the digest is stable across machines and checkouts.
    """
    roots = include_roots() if roots is None else roots
    h = hashlib.sha256()
    for name in sorted(roots):
        folder = roots[name] / name
        for f in _root_headers(name, roots[name]):
            h.update(f"{name}/{f.relative_to(folder).as_posix()}\0".encode())
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _has_cuda_headers(include: Path) -> bool:
    return (include / "cuda_bf16.h").is_file() and (include / "cuda_fp8.h").is_file()


def _pathfinder() -> ModuleType | None:
    """``cuda.pathfinder`` (NVIDIA's locator of CUDA components), or ``None`` when absent."""
    try:
        return importlib.import_module("cuda.pathfinder")
    except ImportError:
        return None


def _pathfinder_function(name: str) -> Callable[[str], str | None] | None:
    # Older cuda-pathfinder releases lack some functions; ep-jit's own search stands in then.
    function = getattr(_pathfinder(), name, None)
    return function if callable(function) else None


def _pathfinder_supports(table: str, name: str) -> bool:
    return name in getattr(_pathfinder(), table, ())


def _pathfinder_header_dir(libname: str) -> Path | None:
    """The header folder cuda.pathfinder finds for a CUDA library (wheels, conda, toolkit)."""
    find = _pathfinder_function("find_nvidia_header_directory")
    if find is None or not _pathfinder_supports("SUPPORTED_HEADERS_CTK", libname):
        return None
    found = find(libname)
    return Path(found) if found else None


def _legacy_wheel_include_dirs() -> list[Path]:
    # Only used without cuda.pathfinder. CUDA 13 wheels unpack into nvidia/cu13/include, CUDA 12
    # wheels into nvidia/<lib>/include.
    try:
        nvidia = importlib.import_module("nvidia")  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found: list[Path] = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13/include", "cu12/include", "cuda_runtime/include"):
            found.append(Path(base) / sub)
    return found


def _include_candidates() -> Iterator[Path]:
    # Lazy: nvcc is only looked for when the earlier candidates miss.
    for root in knobs.cuda_home_candidates():
        yield Path(root) / "include"
    has_pathfinder = _pathfinder_function("find_nvidia_header_directory") is not None
    if has_pathfinder:
        found = _pathfinder_header_dir("cudart")
        if found is not None:
            yield found
    nvcc = nvcc_path(required=False)
    if nvcc is not None:
        yield Path(nvcc).resolve().parent.parent / "include"
    if not has_pathfinder:
        yield from _legacy_wheel_include_dirs()
        yield Path("/usr/local/cuda/include")


def _with_cccl(include: Path) -> tuple[Path, ...]:
    # CUDA 13 moved libcu++ (<cuda/std/...>) into include/cccl; wheels may ship it apart.
    if (include / "cuda" / "std").is_dir():
        return (include,)
    if (include / "cccl").is_dir():
        return (include, include / "cccl")
    cccl = _pathfinder_header_dir("cccl")
    return (include, cccl) if cccl is not None and cccl != include else (include,)


@functools.cache
def cuda_include_dirs() -> tuple[Path, ...]:
    """The CUDA toolkit include folders NVRTC needs (``cuda_bf16.h``, ``cuda/atomic``, ...).

    Searched in order: ``CUDA_HOME``/``CUDA_PATH`` (explicit overrides), then
    ``cuda.pathfinder.find_nvidia_header_directory("cudart")`` (nvidia-* wheels, conda,
    ``/usr/local/cuda*``, ...), then the toolkit of :func:`nvcc_path`. Returns the first folder
    with ``cuda_bf16.h`` and ``cuda_fp8.h`` plus the folder of libcu++ when it lives apart
    (``cccl/`` since CUDA 13). Empty when nothing is found; NVRTC then sees only its built-in
    headers. The result is cached for the process.
    """
    for include in _include_candidates():
        if _has_cuda_headers(include):
            return _with_cccl(include)
    return ()


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def cuda_tool_path(name: str) -> str | None:
    """Path of a CUDA toolkit program such as ``nvcc`` or ``cuobjdump``, or ``None``.

    Searched in order: ``CUDA_HOME/bin``, ``CUDA_PATH/bin``, then
    ``cuda.pathfinder.find_nvidia_binary_utility`` (nvidia-* wheels, conda, the toolkit of the
    loadable ``libcudart``), then ``PATH`` and ``/usr/local/cuda/bin``. Symlinks are resolved.
    """
    for root in knobs.cuda_home_candidates():
        candidate = Path(root) / "bin" / name
        if _executable(candidate):
            return str(candidate.resolve())
    find = _pathfinder_function("find_nvidia_binary_utility")
    if find is not None and _pathfinder_supports("SUPPORTED_BINARY_UTILITIES", name):
        found = find(name)
        if found:
            return str(found)
    for fallback in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if fallback and _executable(Path(fallback)):
            return str(Path(fallback).resolve())
    return None


def nvcc_path(*, required: bool = True) -> str | None:
    """Path of nvcc: ``EP_JIT_NVCC_COMPILER`` when set, else ``cuda_tool_path("nvcc")``.

    That is ``CUDA_HOME/bin``, ``CUDA_PATH/bin``, cuda.pathfinder, ``PATH``, then
    ``/usr/local/cuda/bin``.

    Raises:
        FileNotFoundError: ``EP_JIT_NVCC_COMPILER`` is not executable, or ``required`` and no
            nvcc exists.
    """
    explicit = knobs.jit.nvcc_compiler
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"EP_JIT_NVCC_COMPILER={explicit!r} is not executable")
        return explicit
    found = cuda_tool_path("nvcc")
    if found is None and required:
        raise FileNotFoundError("nvcc not found: set EP_JIT_NVCC_COMPILER or CUDA_HOME")
    return found


@functools.cache
def nvcc_version(nvcc: str) -> str:
    """The ``release X.Y, VX.Y.Z`` line of ``nvcc --version`` (part of the cache key)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "release" in line:
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library cuda-bindings loads.

    Recent cuda-bindings load it with ``cuda.pathfinder.load_nvidia_dynamic_lib("nvrtc")``: a
    copy already loaded, the nvidia-cuda-nvrtc wheel, conda, the system loader, then
    ``CUDA_PATH``/``CUDA_HOME``.

    Raises:
        RuntimeError: NVRTC cannot be loaded.
    """
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


def normalize_arch(arch: str) -> str:
    """Turns ``"sm_90a"``, ``"sm90a"``, ``"9.0a"`` or ``"90a"`` into ``"90a"``.

    Raises:
        ValueError: ``arch`` is not a CUDA SM architecture.
    """
    m = _ARCH_RE.match(arch.strip().lower())
    if m is None:
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected e.g. '90a' or 'sm_100a')")
    return f"{m.group(1)}{m.group(2)}{m.group(3)}"


def resolve_arch(arch: str | None = None) -> str:
    """The architecture to compile for, e.g. ``"90a"``.

    Order: ``arch``, ``EP_JIT_ARCH``, then the current CUDA device, using the arch-specific
    ``a`` variant from SM 9.0 on (wgmma, setmaxnreg and TMA multicast need it).

    Raises:
        ValueError: ``arch`` is malformed, or no arch is given and no GPU is visible.
    """
    if arch is None:
        arch = knobs.jit.arch
    if arch:
        return normalize_arch(arch)
    import torch

    if not torch.cuda.is_available():
        raise ValueError("no CUDA device: pass arch= or set EP_JIT_ARCH (e.g. 90a) to compile")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}{'a' if major >= 9 else ''}"
