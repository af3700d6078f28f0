"""Root conftest: the one place that turns hardware markers into skips.

* ``@pytest.mark.gpu``: skipped when no CUDA device is visible.
* ``@pytest.mark.multigpu(n)``: skipped when fewer than ``n`` CUDA devices are visible.
* ``@pytest.mark.sm(major)``: skipped unless device 0 has that compute-capability major.

Packages' own ``tests/conftest.py`` files hold fixtures only. torch is imported lazily and only
when a collected test carries one of these markers, so CPU-only runs never touch CUDA here.
"""

from __future__ import annotations

import functools

import pytest

_HARDWARE_MARKERS = ("gpu", "multigpu", "sm")


@functools.cache
def _cuda() -> tuple[int, int | None]:
    """Number of visible CUDA devices and the compute-capability major of device 0."""
    try:
        import torch
    except ImportError:
        return 0, None
    if not torch.cuda.is_available():
        return 0, None
    count = torch.cuda.device_count()
    major = torch.cuda.get_device_capability(0)[0] if count else None
    return count, major


def _marker_arg(marker: pytest.Mark, item: pytest.Item) -> int:
    if len(marker.args) != 1 or not isinstance(marker.args[0], int):
        raise pytest.UsageError(f"{item.nodeid}: @{marker.name} takes one int, got {marker.args}")
    return marker.args[0]


def _skip_reason(item: pytest.Item) -> str | None:
    markers = {m.name: m for m in item.iter_markers() if m.name in _HARDWARE_MARKERS}
    if not markers:
        return None
    count, major = _cuda()
    if count == 0:
        return "needs a CUDA device"
    if "multigpu" in markers:
        need = _marker_arg(markers["multigpu"], item)
        if count < need:
            return f"needs {need} CUDA devices, {count} visible"
    if "sm" in markers:
        need = _marker_arg(markers["sm"], item)
        if major != need:
            return f"needs compute capability {need}.x, device 0 is {major}.x"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = _skip_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
