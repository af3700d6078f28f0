from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ep_jit
from ep_jit import KernelSpec
from ep_jit.kernels import toy_axpy_spec

# A child process: optionally registers a test include root, waits for a start signal, builds
# one spec and prints its cache counters and entry key as JSON.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import ep_jit
    from ep_jit.kernels import toy_axpy_spec

    root, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
    if root:
        name = Path(root).name
        ep_jit.register_include_root(name, Path(root).parent)
        spec = ep_jit.KernelSpec(name="hdr", includes=[f"{name}/k.cuh"], template="k",
                                 params=["int* x"])
    else:
        spec = toy_axpy_spec(7)
    Path(ready).touch()
    while go and not os.path.exists(go):
        time.sleep(0.005)
    entry = ep_jit.compile_spec(spec, arch="90a")
    stats = ep_jit.cache_stats()
    print(json.dumps({"compiles": stats.compiles, "disk_hits": stats.disk_hits,
                      "key": entry.key, "pid": os.getpid()}))
    """
)


def _spawn(cache: Path, tmp: Path, tag: str, root: str = "", go: str = "") -> subprocess.Popen[str]:
    env = dict(os.environ, EP_JIT_CACHE_DIR=str(cache))
    env.pop("EP_JIT_PTXAS_CHECK", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, root, str(tmp / f"ready-{tag}"), go],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_second_process_loads_from_disk(jit_cache: Path, tmp_path: Path) -> None:
    first = _result(_spawn(jit_cache, tmp_path, "a"))
    second = _result(_spawn(jit_cache, tmp_path, "b"))
    assert (first["compiles"], first["disk_hits"]) == (1, 0)
    assert (second["compiles"], second["disk_hits"]) == (0, 1)
    assert first["key"] == second["key"]
    # This process finds the same entry on disk too.
    entry = ep_jit.compile_spec(toy_axpy_spec(7), arch="90a")
    assert entry.key == first["key"]
    assert ep_jit.cache_stats().disk_hits == 1
    assert ep_jit.cache_stats().compiles == 0


@pytest.mark.slow
def test_concurrent_processes_compile_once(jit_cache: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [_spawn(jit_cache, tmp_path, str(i), go=str(go)) for i in range(4)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline, "children did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    results = [_result(p) for p in procs]
    assert sum(r["compiles"] for r in results) == 1  # type: ignore[misc]
    assert sum(r["disk_hits"] for r in results) == 3  # type: ignore[misc]
    assert len({r["key"] for r in results}) == 1
    arch_dir = jit_cache / f"v{ep_jit.__version__}" / "sm_90a"
    entries = [e for e in arch_dir.glob("ep_jit_toy_axpy_s7-*") if e.suffix != ".lock"]
    assert len(entries) == 1
    assert (entries[0] / "kernel.cubin").is_file()
    assert not list((jit_cache / "tmp").iterdir())  # work folders cleaned up


def test_header_change_invalidates(
    jit_cache: Path, tmp_path: Path, tmp_include_root: tuple[str, Path]
) -> None:
    name, folder = tmp_include_root
    header = folder / "k.cuh"
    header.write_text("__device__ void k(int* x) { x[0] = 1; }\n")
    spec = KernelSpec(name="hdr", includes=[f"{name}/k.cuh"], template="k", params=["int* x"])
    first = ep_jit.compile_spec(spec, arch="90a")
    ep_jit.clear_memory_cache()
    assert ep_jit.compile_spec(spec, arch="90a").key == first.key  # unchanged: disk hit
    assert ep_jit.cache_stats().disk_hits == 1

    header.write_text("__device__ void k(int* x) { x[0] = 2; }\n")
    # Another process sees the edit at once.
    other = _result(_spawn(jit_cache, tmp_path, "c", root=str(folder)))
    assert other["compiles"] == 1
    assert other["key"] != first.key
    # This process sees it after dropping its in-memory cache, and reuses the other's cubin.
    ep_jit.clear_memory_cache()
    second = ep_jit.compile_spec(spec, arch="90a")
    assert second.key == other["key"]
    assert ep_jit.cache_stats().compiles == 1
    assert first.cubin_path.is_file()
    assert second.cubin_path.is_file()

    # A header that is not included but lives in a registered root also counts (hash all).
    (folder / "unrelated.cuh").write_text("// new file\n")
    ep_jit.clear_memory_cache()
    assert ep_jit.compile_spec(spec, arch="90a").key != second.key


def test_key_depends_on_flags_and_arch(jit_cache: Path) -> None:
    spec = toy_axpy_spec(2)
    base = ep_jit.compile_spec(spec, arch="90a")
    assert ep_jit.compile_spec(spec, arch="100a").key != base.key
    flagged = KernelSpec(
        name=spec.name,
        includes=spec.includes,
        template=spec.template,
        params=spec.params,
        constants=spec.constants,
        launch_bounds=spec.launch_bounds,
        extra_flags=["-DEXTRA=1"],
    )
    assert ep_jit.compile_spec(flagged, arch="90a").key != base.key
    assert ep_jit.compile_spec(spec, arch="90a", compiler="nvrtc") is base


@pytest.mark.parametrize("bad", ["sm_9", "x86"])
def test_bad_arch_is_rejected(jit_cache: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="architecture"):
        ep_jit.compile_spec(toy_axpy_spec(2), arch=bad)


def test_unrelated_root_does_not_change_keys(
    jit_cache: Path, tmp_include_root: tuple[str, Path]
) -> None:
    name, folder = tmp_include_root
    spec = toy_axpy_spec(2)
    ep_jit.unregister_include_root(name)
    before = ep_jit.compile_spec(spec, arch="90a").key
    (folder / "other.cuh").write_text("// another package's header\n")
    ep_jit.register_include_root(name, folder.parent)
    ep_jit.clear_memory_cache()
    assert ep_jit.compile_spec(spec, arch="90a").key == before
    # A root reached only through another root's header is part of the key.
    dep = f"{name}_dep"
    (folder.parent / dep).mkdir()
    (folder.parent / dep / "d.cuh").write_text("__device__ int d() { return 1; }\n")
    (folder / "uses.cuh").write_text(
        f"#include <{dep}/d.cuh>\n__device__ void u(int* x) {{ x[0] = d(); }}\n"
    )
    ep_jit.register_include_root(dep, folder.parent)
    try:
        user = KernelSpec(
            name="user", includes=[f"{name}/uses.cuh"], template="u", params=["int* x"]
        )
        assert set(ep_jit.toolchain.reachable_roots(user.includes)) == {"ep_jit", name, dep}
        first = ep_jit.compile_spec(user, arch="90a").key
        (folder.parent / dep / "d.cuh").write_text("__device__ int d() { return 2; }\n")
        ep_jit.clear_memory_cache()
        assert ep_jit.compile_spec(user, arch="90a").key != first
    finally:
        ep_jit.unregister_include_root(dep)
