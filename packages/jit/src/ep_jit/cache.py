"""The kernel cache: in-process dict, then disk, then compile under a file lock.

Layout under ``EP_JIT_CACHE_DIR``::

    v<ep_jit version>/sm_<arch>/<name>-<key[:32]>/   kernel.cu kernel.cubin kernel.log meta.json
                                                     [kernel.ptx] [kernel.sass]
    v<ep_jit version>/sm_<arch>/<name>-<key[:32]>.lock
    tmp/<name>-<pid>-<uuid>/                         work folder; kept when a compile fails

``key`` is a sha256 over the generated source, a digest of every header under every include
root the source can reach (its ``#include <root/...>`` lines, followed through the headers of
those roots, plus ep-jit's own), the compiler identity and version, the flags, the arch and the
ep-jit version.
Files are written into the work folder and ``os.replace``-d into the entry, ``kernel.cubin``
last, so a reader that sees the cubin sees a complete entry. N processes that miss together
serialise on the lock; the first compiles, the others find the entry when they get the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import filelock

from ep_jit import knobs, toolchain
from ep_jit._log import verbose
from ep_jit._version import __version__
from ep_jit.compiler import CompileOutput, Compiler, check_ptxas, get_compiler
from ep_jit.errors import JitCompileError, JitError
from ep_jit.spec import KernelSpec

__all__ = [
    "CacheEntry",
    "CacheStats",
    "cache_stats",
    "clear_memory_cache",
    "compile_spec",
    "reset_cache_stats",
]

_LOCK_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class CacheEntry:
    """A compiled kernel on disk.

    Attributes:
        spec: What was compiled.
        arch: Target architecture, e.g. ``"90a"``.
        key: The full sha256 cache key (hex).
        path: The entry folder.
        compiler: Identity of the compiler that built it.
    """

    spec: KernelSpec
    arch: str
    key: str
    path: Path
    compiler: str

    @property
    def cubin_path(self) -> Path:
        """``kernel.cubin`` inside the entry."""
        return self.path / "kernel.cubin"

    @property
    def source_path(self) -> Path:
        """``kernel.cu`` (the generated source) inside the entry."""
        return self.path / "kernel.cu"

    def read_cubin(self) -> bytes:
        """The cubin bytes."""
        return self.cubin_path.read_bytes()


@dataclass(frozen=True)
class CacheStats:
    """Counters of this process since start or :func:`reset_cache_stats`."""

    memory_hits: int
    disk_hits: int
    compiles: int


_memory: dict[tuple[object, ...], CacheEntry] = {}
_digests: dict[tuple[object, ...], str] = {}
_counts = {"memory_hits": 0, "disk_hits": 0, "compiles": 0}
_mutex = threading.RLock()


def cache_stats() -> CacheStats:
    """How often this process hit memory, hit disk and compiled."""
    with _mutex:
        return CacheStats(**_counts)


def reset_cache_stats() -> None:
    """Zeroes the counters of :func:`cache_stats`."""
    with _mutex:
        for k in _counts:
            _counts[k] = 0


def clear_memory_cache() -> None:
    """Forgets in-process entries and header digests (next lookups re-hash headers, go to disk).

    Call after editing a header in a running process; other processes see the edit anyway.
    """
    with _mutex:
        _memory.clear()
        _digests.clear()


def _headers_digest(spec: KernelSpec) -> str:
    roots = toolchain.include_roots()
    memo = (spec.includes, tuple(sorted((name, str(path)) for name, path in roots.items())))
    with _mutex:
        digest = _digests.get(memo)
    if digest is None:
        digest = toolchain.headers_digest(toolchain.reachable_roots(spec.includes, roots))
        with _mutex:
            _digests[memo] = digest
    return digest


def _key(
    spec: KernelSpec, source: str, arch: str, identity: str, flags: list[str], check: bool
) -> str:
    h = hashlib.sha256()
    # Include paths differ between checkouts; the header digest stands in for them.
    portable = [f for f in flags if not f.startswith("-I")]
    for part in (
        __version__,
        identity,
        arch,
        " ".join(portable),
        f"check={check}",
        _headers_digest(spec),
        source,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _cache_root() -> Path:
    return Path(knobs.jit.cache_dir).expanduser()


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _dump_sass(cubin: Path) -> str | None:
    # The cuobjdump of nvcc's toolkit first, so that both come from one CUDA release.
    nvcc = toolchain.nvcc_path(required=False)
    beside = Path(nvcc).resolve().parent / "cuobjdump" if nvcc else None
    if beside is not None and os.access(beside, os.X_OK):
        tool: str | None = str(beside)
    else:
        tool = toolchain.cuda_tool_path("cuobjdump")
    if tool is None:
        verbose("EP_JIT_DUMP_SASS: cuobjdump not found; no SASS written for %s", cubin)
        return None
    proc = subprocess.run(
        [tool, "--dump-sass", str(cubin)], capture_output=True, text=True, check=False
    )
    return proc.stdout if proc.returncode == 0 else f"cuobjdump failed:\n{proc.stderr}"


def _build(
    spec: KernelSpec,
    arch: str,
    compiler: Compiler,
    flags: list[str],
    key: str,
    entry: Path,
    source: str,
) -> None:
    tmp_root = _cache_root() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = tmp_root / f"{spec.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    src = _write(work, "kernel.cu", source)
    want_ptx = knobs.jit.dump_ptx
    t0 = time.perf_counter()
    try:
        out: CompileOutput = compiler.compile(spec.name, source, src, flags, want_ptx)
    except JitCompileError as exc:
        _write(work, "kernel.log", exc.log)
        raise
    elapsed = time.perf_counter() - t0
    _write(work, "kernel.log", out.log)
    if knobs.jit.ptxas_verbose or knobs.jit.debug:
        verbose("ptxas report for %s:\n%s", spec.name, out.log)
    if knobs.jit.ptxas_check:
        check_ptxas(spec.name, out, str(src))
    meta = {
        "name": spec.name,
        "entry": spec.entry,
        "arch": arch,
        "key": key,
        "compiler": compiler.identity(),
        "flags": flags,
        "ep_jit": __version__,
        "compile_seconds": round(elapsed, 3),
        "pid": os.getpid(),
    }
    _write(work, "meta.json", json.dumps(meta, indent=1))
    if out.ptx is not None:
        _write(work, "kernel.ptx", out.ptx)
    cubin = _write(work, "kernel.cubin.tmp", out.cubin)
    if knobs.jit.dump_sass:
        sass = _dump_sass(cubin)
        if sass is not None:
            _write(work, "kernel.sass", sass)
    entry.mkdir(parents=True, exist_ok=True)
    for f in sorted(work.iterdir()):
        if f.name != "kernel.cubin.tmp":
            os.replace(f, entry / f.name)
    os.replace(cubin, entry / "kernel.cubin")  # last: its presence marks a complete entry
    shutil.rmtree(work, ignore_errors=True)
    with _mutex:
        _counts["compiles"] += 1
    if knobs.jit.debug:
        verbose("compiled %s for sm_%s in %.2f s -> %s", spec.name, arch, elapsed, entry)


def compile_spec(
    spec: KernelSpec, *, arch: str | None = None, compiler: str | None = None
) -> CacheEntry:
    """Returns the cached cubin for ``spec``, compiling it at most once across processes.

    Needs no GPU when ``arch`` or ``EP_JIT_ARCH`` is given. Thread- and process-safe.

    Args:
        spec: The kernel to build.
        arch: Target, e.g. ``"90a"``; default ``EP_JIT_ARCH`` or the current device.
        compiler: ``"nvrtc"`` or ``"nvcc"``; default ``EP_JIT_COMPILER``.

    Raises:
        JitCompileError: The compiler failed; the error carries the log and the source path.
        JitPtxasCheckError: ``EP_JIT_PTXAS_CHECK`` is set and a function uses local memory.
        JitError: The cache lock could not be taken within 30 minutes.
        ValueError: Bad ``arch``/``compiler``, or no GPU to infer the arch from.
    """
    target = toolchain.resolve_arch(arch)
    comp = get_compiler(compiler)
    flags = comp.flags(target, spec.extra_flags)
    check = knobs.jit.ptxas_check
    identity = comp.identity()
    memo_key = (spec, target, identity, tuple(flags), check)
    with _mutex:
        hit = _memory.get(memo_key)
        if hit is not None:
            _counts["memory_hits"] += 1
            return hit
    source = spec.render()
    key = _key(spec, source, target, identity, flags, check)
    arch_dir = _cache_root() / f"v{__version__}" / f"sm_{target}"
    entry_dir = arch_dir / f"{spec.name}-{key[:32]}"
    result = CacheEntry(spec, target, key, entry_dir, identity)
    if knobs.jit.debug:
        verbose("kernel %s (sm_%s, key %s):\n%s", spec.name, target, key[:16], source)
    if result.cubin_path.is_file():
        counter = "disk_hits"
    else:
        arch_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(entry_dir) + ".lock", timeout=_LOCK_TIMEOUT_S)
        try:
            with lock:
                if result.cubin_path.is_file():  # another process built it while we waited
                    counter = "disk_hits"
                else:
                    _build(spec, target, comp, flags, key, entry_dir, source)
                    counter = ""
        except filelock.Timeout as exc:
            raise JitError(f"timed out waiting for cache lock {lock.lock_file}") from exc
    with _mutex:
        if counter:
            _counts[counter] += 1
        _memory[memo_key] = result
    return result
