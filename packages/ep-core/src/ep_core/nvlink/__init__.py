"""The NVLink backend: dispatch/combine kernels over peer-mapped memory of one NVLink domain.

``backend`` holds :class:`NvlinkBackend`; ``ht`` the high-throughput kernels' specs and launchers,
``ll`` the low-latency engine, ``layout`` the buffer layout. Launchers take a small context
(:class:`~ep_core.nvlink.ht.HtContext`), never the backend. Importing this package compiles
nothing and initialises no CUDA.
"""

from __future__ import annotations

from typing import Any

from ep_core.nvlink import ht, ll
from ep_core.nvlink.backend import NvlinkBackend

__all__ = ["NvlinkBackend", "shipped_kernels"]


def shipped_kernels() -> list[Any]:
    """Every kernel ep-core ships, with representative constants (the ``ep_jit.kernels`` entry
    point; compile-only checks). Registers the include root first."""
    return [*ht.shipped_kernels(), *ll.shipped_kernels()]
