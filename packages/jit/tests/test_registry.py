"""The backend registry: discovery, priority order, the ``"auto"`` rule, errors, lazy import."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ep_jit import registry
from ep_jit.registry import BackendSpec, get_backend, registered_backends, select_backend

GROUP: Any = object()  # the checks below never touch the group
CALLS: list[str] = []


def _check(name: str, reason: str | None) -> Any:
    def unavailable(group: Any, all_cuda: bool) -> str | None:
        assert group is GROUP
        CALLS.append(name)
        return reason if reason is not None and not (all_cuda and name == "fast") else None

    return unavailable


def _build(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return args, kwargs


def fake_provider() -> list[BackendSpec]:
    """Primitive "fake": "fast" (only with all_cuda), "mid" (never), "ref" (always)."""
    return [
        BackendSpec("fake", "ref", 0, _build, description="reference"),
        BackendSpec("fake", "fast", 100, _build, _check("fast", "needs CUDA")),
        BackendSpec("fake", "mid", 50, _build, _check("mid", "never here")),
        BackendSpec("other", "ref", 0, _build),
    ]


def bad_provider() -> list[object]:
    return ["not a spec"]


PROVIDERS = [("fake", f"{__name__}:fake_provider")]


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    CALLS.clear()
    registry._logged_choices.clear()
    yield
    registry._logged_choices.clear()


def test_priority_order() -> None:
    specs = registered_backends("fake", PROVIDERS)
    assert [s.name for s in specs] == ["fast", "mid", "ref"]
    assert [s.name for s in registered_backends("other", PROVIDERS)] == ["ref"]
    # Ties are broken by name, so every rank evaluates the same order.
    tie = [("tie", lambda: [BackendSpec("t", "b", 1, _build), BackendSpec("t", "a", 1, _build)])]
    assert [s.name for s in registered_backends("t", tie)] == ["a", "b"]


def test_callable_provider_and_duplicate_provider_name() -> None:
    # A provider name seen twice is used once (an entry point plus the package's own fallback).
    specs = registered_backends("fake", [*PROVIDERS, ("fake", fake_provider), ("x", lambda: [])])
    assert len(specs) == 3


def test_auto_picks_highest_priority_that_can_serve(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ep_jit"):
        assert select_backend("fake", "auto", GROUP, True, PROVIDERS).name == "fast"
        # Every backend is checked, in order, even after one is found.
        assert CALLS == ["fast", "mid"]
        assert select_backend("fake", "auto", GROUP, False, PROVIDERS).name == "ref"
        assert CALLS == ["fast", "mid", "fast", "mid"]
        select_backend("fake", "auto", GROUP, False, PROVIDERS)
    messages = [r.getMessage() for r in caplog.records if "'auto' chose" in r.getMessage()]
    # Logged once per choice.
    assert messages == [
        "fake backend 'auto' chose 'fast'",
        "fake backend 'auto' chose 'ref' (passed over fast: needs CUDA; mid: never here)",
    ]


def test_auto_when_nothing_can_serve() -> None:
    providers = [("none", lambda: [BackendSpec("n", "a", 1, _build, lambda g, c: "no")])]
    with pytest.raises(ValueError, match=r"no n backend can serve this group \(a: no\)"):
        select_backend("n", "auto", GROUP, True, providers)


def test_explicit_names() -> None:
    assert select_backend("fake", "ref", GROUP, False, PROVIDERS).name == "ref"
    assert CALLS == []  # an explicit name checks only that backend
    assert select_backend("fake", "fast", GROUP, True, PROVIDERS).name == "fast"
    assert CALLS == ["fast"]
    with pytest.raises(ValueError, match="fake backend='fast' cannot be used: needs CUDA"):
        select_backend("fake", "fast", GROUP, False, PROVIDERS)
    with pytest.raises(ValueError, match="cannot be used: never here"):
        select_backend("fake", "mid", GROUP, True, PROVIDERS)


def test_unknown_names() -> None:
    msg = r"fake backend must be one of \('auto', 'fast', 'mid', 'ref'\), got 'cuda'"
    with pytest.raises(ValueError, match=msg):
        select_backend("fake", "cuda", GROUP, True, PROVIDERS)
    with pytest.raises(ValueError, match=msg):
        get_backend("fake", "cuda", PROVIDERS)
    assert CALLS == []
    with pytest.raises(ValueError, match="no backends are registered for primitive 'nope'"):
        select_backend("nope", "auto", GROUP, True, PROVIDERS)


def test_failing_check_becomes_a_reason() -> None:
    def boom(group: Any, all_cuda: bool) -> str | None:
        raise RuntimeError("lost")

    providers = [
        ("p", lambda: [BackendSpec("b", "x", 9, _build, boom), BackendSpec("b", "y", 0, _build)])
    ]
    assert select_backend("b", "auto", GROUP, True, providers).name == "y"
    with pytest.raises(ValueError, match=r"x' cannot be used: .*raised RuntimeError: lost"):
        select_backend("b", "x", GROUP, True, providers)


def test_lazy_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "ep_jit_test_lazy_backend"
    (tmp_path / f"{module}.py").write_text(
        "class Backend:\n"
        "    @classmethod\n"
        "    def from_config(cls, group, config):\n"
        "        return ('built', group, config)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    spec = BackendSpec("lazy", "k", 1, f"{module}:Backend.from_config")
    providers = [("lazy", lambda: [spec])]
    assert select_backend("lazy", "auto", GROUP, True, providers) is spec
    assert get_backend("lazy", "k", providers) is spec
    assert module not in sys.modules
    assert spec.build(GROUP, 3) == ("built", GROUP, 3)
    assert module in sys.modules
    missing = BackendSpec("lazy", "m", 1, "ep_jit_test_no_such_module:Backend")
    with pytest.raises(ValueError, match="lazy/m cannot be built: ep_jit_test_no_such_module"):
        missing.build()


def test_build_passes_arguments() -> None:
    spec = get_backend("fake", "ref", PROVIDERS)
    assert spec.build(1, 2, k=3) == ((1, 2), {"k": 3})


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = importlib.metadata.EntryPoint(
        name="fake", value=f"{__name__}:fake_provider", group=registry.ENTRY_POINT_GROUP
    )
    seen: list[str] = []

    def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
        seen.append(group)
        return [ep]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert [s.name for s in registered_backends("fake")] == ["fast", "mid", "ref"]
    assert seen == ["ep_jit.backends"]


def test_provider_and_spec_errors() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        registered_backends("fake", [("bad", "no_colon")])
    with pytest.raises(TypeError, match="returned str"):
        registered_backends("fake", [("bad", f"{__name__}:bad_provider")])
    with pytest.raises(ValueError, match="fake/ref is registered by both fake and again"):
        registered_backends("fake", [*PROVIDERS, ("again", fake_provider)])
    with pytest.raises(ValueError, match="'auto' is reserved"):
        BackendSpec("fake", "auto", 0, _build)
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        BackendSpec("fake", "", 0, _build)
    with pytest.raises(TypeError, match="priority must be an int"):
        BackendSpec("fake", "x", 1.5, _build)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module:attribute"):
        BackendSpec("fake", "x", 0, "nocolon")
    with pytest.raises(TypeError, match="factory must be"):
        BackendSpec("fake", "x", 0, 42)  # type: ignore[arg-type]


def test_peer_access_needs_cuda_on_every_rank() -> None:
    from ep_jit.registry import peer_access_unavailable

    # Without CUDA on every rank the answer needs no collective (and no group).
    assert peer_access_unavailable(None, False) == "not every rank is on a CUDA device"  # type: ignore[arg-type]


def test_a_broken_installed_provider_does_not_break_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    group = registry.ENTRY_POINT_GROUP
    broken = importlib.metadata.EntryPoint(name="broken", value="no_such_pkg.x:y", group=group)
    good = importlib.metadata.EntryPoint(
        name="fake", value=f"{__name__}:fake_provider", group=group
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken, good])
    with caplog.at_level(logging.WARNING, logger="ep_jit"):
        assert [s.name for s in registered_backends("fake")] == ["fast", "mid", "ref"]
    assert any("'broken'" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    # A package's own provider, passed explicitly, still raises its error.
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg"):
        registered_backends("fake", [("broken", "no_such_pkg.x:y")])
