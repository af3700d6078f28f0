"""ep-core's backends in ep-jit's registry: the ``"auto"`` rule and its errors, on CPU."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import ep_jit
from ep_core.factory import PRIMITIVE, ep_backends, resolve_backend
from ep_jit.registry import registered_backends

GROUP: Any = object()  # is_single_nvlink_domain is replaced, so the group is never used


def test_provider_order() -> None:
    assert [s.name for s in ep_backends()] == ["nvlink", "torch"]
    assert all(s.primitive == PRIMITIVE == "ep" for s in ep_backends())
    names = [s.name for s in registered_backends("ep", [("ep_core", ep_backends)])]
    assert names[:1] == ["nvlink"] and "torch" in names


@pytest.mark.parametrize("single_domain", [True, False])
def test_auto(monkeypatch: pytest.MonkeyPatch, single_domain: bool) -> None:
    calls: list[object] = []

    def is_single(group: object) -> bool:
        calls.append(group)
        return single_domain

    monkeypatch.setattr(ep_jit, "is_single_nvlink_domain", is_single)
    assert resolve_backend("auto", GROUP, True) == ("nvlink" if single_domain else "torch")
    assert calls == [GROUP]
    assert resolve_backend("auto", GROUP, False) == "torch"
    assert resolve_backend("torch", GROUP, True) == "torch"
    assert calls == [GROUP]  # no CUDA, or "torch" named: no collective check
    if single_domain:
        assert resolve_backend("nvlink", GROUP, True) == "nvlink"
    else:
        with pytest.raises(ValueError, match="backend='nvlink' cannot be used: the ranks do not"):
            resolve_backend("nvlink", GROUP, True)


def test_pre_hopper_gpus_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(ep_jit, "is_single_nvlink_domain", lambda group: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_backend("auto", GROUP, True) == "torch"
    with pytest.raises(ValueError, match=r"compute capability 9.0 \(Hopper\) or newer.* 8.0"):
        resolve_backend("nvlink", GROUP, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert resolve_backend("auto", GROUP, True) == "nvlink"


def test_errors() -> None:
    with pytest.raises(ValueError, match="backend='nvlink' cannot be used: not every rank"):
        resolve_backend("nvlink", GROUP, False)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'nvlink', 'torch'"):
        resolve_backend("cuda", GROUP, False)


def test_nvlink_module_is_imported_only_when_needed() -> None:
    code = (
        "import sys\n"
        "from ep_core.factory import resolve_backend\n"
        "assert resolve_backend('auto', None, False) == 'torch'\n"
        "assert 'ep_core.nvlink' not in sys.modules\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
