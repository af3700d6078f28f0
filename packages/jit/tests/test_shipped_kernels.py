"""Compiles every kernel every package ships, for sm_90a (no GPU needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import ep_jit
from ep_jit.kernels import ENTRY_POINT_GROUP, iter_shipped_kernels

REPO = Path(__file__).resolve().parents[3]


def _checkout_providers() -> list[tuple[str, str]]:
    """Providers that sibling packages of this checkout declare in their pyproject.toml.

    Covers source checkouts run from PYTHONPATH, where no entry points exist. Only providers
    whose package is importable count: the tests never reach into packages/*/src themselves.
    """
    if sys.version_info < (3, 11):
        return []
    import tomllib

    providers = []
    for pyproject in sorted(REPO.glob("packages/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        table = data.get("project", {}).get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
        for name, target in sorted(table.items()):
            if importlib.util.find_spec(target.split(":")[0].split(".")[0]) is not None:
                providers.append((name, target))
    return providers


def test_every_shipped_kernel_compiles_for_sm90a(jit_cache: Path) -> None:
    specs = list(iter_shipped_kernels(_checkout_providers()))
    assert any(name == "ep_jit" for name, _ in specs)
    failures = []
    for provider, spec in specs:
        try:
            entry = ep_jit.compile_spec(spec, arch="90a")
        except ep_jit.JitCompileError as exc:
            failures.append(f"{provider}:{spec.name}\n{exc}")
            continue
        assert spec.entry.encode() in entry.read_cubin(), f"{provider}:{spec.name}"
    assert not failures, "\n\n".join(failures)


def bad_provider() -> list[object]:
    return ["not a spec"]


def test_provider_errors() -> None:
    with pytest.raises(ValueError, match="module:function"):
        list(iter_shipped_kernels([("bad", "no_colon")]))
    with pytest.raises(TypeError, match="returned str"):
        list(iter_shipped_kernels([("bad", f"{__name__}:bad_provider")]))
