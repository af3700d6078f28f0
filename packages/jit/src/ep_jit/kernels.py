"""Kernels ep-jit ships, and discovery of the kernels every package ships.

Packages declare a provider in their ``pyproject.toml``::

    [project.entry-points."ep_jit.kernels"]
    ep_core = "ep_core.kernels:shipped_kernels"

where ``shipped_kernels()`` registers the package's include root (idempotently) and returns
``KernelSpec`` instances with representative constants.
:func:`iter_shipped_kernels` collects them so one test can compile everything for ``sm_90a``.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, Sequence

from ep_jit.spec import KernelSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "AxpyArgs",
    "barrier_spec",
    "barrier_threads",
    "iter_shipped_kernels",
    "load_provider",
    "shipped_kernels",
    "toy_axpy_spec",
]

ENTRY_POINT_GROUP = "ep_jit.kernels"


class AxpyArgs(ctypes.Structure):
    """``ep_jit::toy::AxpyArgs``, passed by value to the toy kernel."""

    _fields_ = [("alpha", ctypes.c_float), ("pad", ctypes.c_int32), ("n", ctypes.c_int64)]


def toy_axpy_spec(scale: int = 2) -> KernelSpec:
    """``out = scale * alpha * x + y + offset`` over float32 (``ep_jit::toy::axpy``).

    Launch args: ``out, x, y`` (float32 CUDA tensors, ``[n]``), ``offset`` (int) and
    ``args`` (an ``AxpyArgs`` ctypes struct: ``alpha`` float, ``n`` int64).
    """
    return KernelSpec(
        name=f"ep_jit_toy_axpy_s{scale}",
        includes=["ep_jit/smxx_toy.cuh"],
        template="ep_jit::toy::axpy",
        params=[
            "float* out",
            "const float* x",
            "const float* y",
            "int offset",
            "ep_jit::toy::AxpyArgs args",
        ],
        constants={"kScale": scale},
        launch_bounds=256,
    )


def barrier_threads(num_ranks: int) -> int:
    """Threads per block of the barrier kernel for ``num_ranks`` ranks (whole warps)."""
    return 32 * ((num_ranks + 31) // 32)


def barrier_spec(num_ranks: int, trap: bool = False) -> KernelSpec:
    """The NVLink barrier of ``<ep_jit/smxx_barrier.cuh>`` for ``num_ranks`` ranks.

    Launch with grid 1 and block :func:`barrier_threads`; args: ``buffer_ptrs`` (int64 CUDA
    tensor ``[R]`` of peer base addresses), ``signal_offset`` (bytes from each base to its
    signal words; ``R + 1`` uint32 words are used), ``rank``, a ``WaitContext`` and a stage id.

    Raises:
        ValueError: ``num_ranks`` outside ``[1, 1024]``.
    """
    if not 1 <= num_ranks <= 1024:
        raise ValueError(f"num_ranks must be in [1, 1024], got {num_ranks}")
    return KernelSpec(
        name=f"ep_jit_barrier_r{num_ranks}{'_trap' if trap else ''}",
        includes=["ep_jit/smxx_barrier.cuh"],
        template="ep_jit::barrier_kernel",
        params=[
            "const uint64_t* buffer_ptrs",
            "int64_t signal_offset",
            "int rank",
            "ep_jit::WaitContext ctx",
            "int stage",
        ],
        constants={"kNumRanks": num_ranks, "kTrap": trap},
        launch_bounds=barrier_threads(num_ranks),
    )


def shipped_kernels() -> list[KernelSpec]:
    """ep-jit's own kernels with representative constants (its ``ep_jit.kernels`` provider)."""
    from ep_jit.testing._peer_pattern import peer_write_spec

    return [toy_axpy_spec(2), barrier_spec(2), barrier_spec(8, trap=True), peer_write_spec(4)]


def load_provider(target: str) -> Callable[[], Sequence[KernelSpec]]:
    """Imports ``"module:function"``.

    Raises:
        ValueError: ``target`` is not ``module:function``.
    """
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"kernel provider must read 'module:function', got {target!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"kernel provider {target!r} is not callable")
    return obj


def iter_shipped_kernels(
    providers: Sequence[tuple[str, str]] = (),
) -> Iterator[tuple[str, KernelSpec]]:
    """Yields ``(provider name, spec)`` for every kernel every installed package ships.

    Providers come from the ``ep_jit.kernels`` entry points of installed distributions, plus
    ``providers`` (``(name, "module:function")`` pairs, for source checkouts run from
    ``PYTHONPATH`` where entry points do not exist). ep-jit's own provider is always included.
    A name seen twice is used once.

    Raises:
        TypeError: A provider returned something other than ``KernelSpec`` instances.
    """
    seen: set[str] = set()
    found = [(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    found += list(providers)
    found.append(("ep_jit", "ep_jit.kernels:shipped_kernels"))
    for name, target in found:
        if name in seen:
            continue
        seen.add(name)
        for spec in load_provider(target)():
            if not isinstance(spec, KernelSpec):
                raise TypeError(f"kernel provider {name} returned {type(spec).__name__}")
            yield name, spec
