from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import ep_jit
from ep_jit import knobs


@pytest.fixture
def jit_cache(tmp_path: Path) -> Iterator[Path]:
    """A fresh, empty kernel cache for one test; knobs and counters restored afterwards."""
    cache = tmp_path / "jit-cache"
    with knobs.jit.scope():
        knobs.jit.cache_dir = str(cache)
        for name in ("ptxas_check", "ptxas_verbose", "dump_ptx", "dump_sass", "debug", "arch"):
            setattr(knobs.jit, name, None)
        ep_jit.clear_memory_cache()
        ep_jit.reset_cache_stats()
        yield cache
    ep_jit.clear_memory_cache()


@pytest.fixture
def tmp_include_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A registered include root ``<tmp>/include/<name>/`` for test headers; yields (name, dir)."""
    name = f"ep_jit_test_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "include" / name
    folder.mkdir(parents=True)
    ep_jit.register_include_root(name, tmp_path / "include")
    try:
        yield name, folder
    finally:
        ep_jit.unregister_include_root(name)
