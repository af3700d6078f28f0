"""Load compiled cubins and launch them on the caller's current torch stream.

``build(spec)`` compiles (or finds in the cache) and returns a :class:`Kernel`; nothing touches the
GPU until the first :meth:`Kernel.launch`, which loads the cubin with ``cuLibraryLoadData`` into
torch's primary context. Launches go through ``cuLaunchKernelEx``: no synchronisation and no
allocation, so they can be captured in CUDA graphs (launch once before capturing so the load
happens outside the capture).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ep_jit import knobs
from ep_jit._cuda import check, current_stream_handle, driver, ensure_context
from ep_jit._log import verbose
from ep_jit.cache import CacheEntry, compile_spec
from ep_jit.spec import KernelSpec, param_names

__all__ = ["Dim3", "Kernel", "build"]

Dim3 = int | tuple[int] | tuple[int, int] | tuple[int, int, int]
"""A grid or block shape: ``x`` or ``(x,)``, ``(x, y)``, ``(x, y, z)``."""

_STATIC_SMEM_LIMIT = 48 * 1024
_SCALARS: dict[str, type[Any]] = {
    "bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "int8_t": ctypes.c_int8,
    "uint8_t": ctypes.c_uint8,
    "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16,
    "short": ctypes.c_int16,
    "int": ctypes.c_int32,
    "int32_t": ctypes.c_int32,
    "unsigned": ctypes.c_uint32,
    "unsigned int": ctypes.c_uint32,
    "uint32_t": ctypes.c_uint32,
    "long": ctypes.c_int64,
    "long long": ctypes.c_int64,
    "int64_t": ctypes.c_int64,
    "unsigned long long": ctypes.c_uint64,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "__grid_constant__", "struct"}


def _param_kind(decl: str, name: str) -> tuple[str, type[Any] | None]:
    """("ptr", None), ("scalar", ctype) or ("struct", None) for one C++ parameter."""
    ctype = decl[: decl.rstrip().rfind(name)].strip()
    if "*" in ctype or "&" in ctype:
        return "ptr", None
    words = [w for w in ctype.replace("std::", "").split() if w not in _QUALIFIERS]
    scalar = _SCALARS.get(" ".join(words))
    return ("scalar", scalar) if scalar is not None else ("struct", None)


def _int_range(ctype: type[Any]) -> tuple[int, int] | None:
    if ctype in (ctypes.c_float, ctypes.c_double, ctypes.c_bool, ctypes.c_char):
        return None
    bits = 8 * ctypes.sizeof(ctype)
    signed = ctype(-1).value < 0
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _marshal(
    spec: KernelSpec,
    args: Sequence[object],
    kinds: list[tuple[str, type[Any] | None]],
    names: list[str],
) -> tuple[Any, list[Any]]:
    if len(args) != len(kinds):
        raise TypeError(
            f"kernel {spec.name} takes {len(kinds)} arguments ({', '.join(names)}), got {len(args)}"
        )
    keep: list[Any] = []
    for value, (kind, ctype), name in zip(args, kinds, names, strict=True):
        if kind == "ptr":
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda":
                    raise TypeError(
                        f"argument {name} of {spec.name}: tensor on {value.device}, "
                        "expected a CUDA tensor"
                    )
                obj: Any = ctypes.c_void_p(value.data_ptr())
            elif value is None:
                obj = ctypes.c_void_p(0)
            elif isinstance(value, int) and not isinstance(value, bool):
                obj = ctypes.c_void_p(value)
            else:
                raise TypeError(
                    f"argument {name} of {spec.name} is a pointer: pass a tensor, "
                    f"an int address or None, not {type(value).__name__}"
                )
        elif kind == "scalar":
            assert ctype is not None
            if isinstance(value, ctype):
                obj = value
            elif isinstance(value, (int, float, bool)) and not isinstance(value, torch.Tensor):
                bounds = _int_range(ctype)
                if bounds is not None:
                    if not isinstance(value, int):
                        raise TypeError(
                            f"argument {name} of {spec.name} must be an int, got {value!r}"
                        )
                    if not bounds[0] <= value <= bounds[1]:
                        raise ValueError(
                            f"argument {name}={value} of {spec.name} does not fit "
                            f"in {ctype.__name__}"
                        )
                obj = ctype(value)
            else:
                raise TypeError(
                    f"argument {name} of {spec.name} must be a number, got {type(value).__name__}"
                )
        else:
            if not isinstance(value, (ctypes.Structure, ctypes.Union, ctypes.Array)):
                raise TypeError(
                    f"argument {name} of {spec.name} is passed by value: give a "
                    f"ctypes.Structure, got {type(value).__name__}"
                )
            obj = value
        keep.append(obj)
    array = (ctypes.c_void_p * max(1, len(keep)))(*[ctypes.addressof(o) for o in keep])
    keep.append(array)
    return array, keep


def _dim3(value: Dim3, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {value!r}")
    return (*dims, 1, 1)[:3]  # type: ignore[return-value]


class Kernel:
    """A compiled kernel; loads lazily and launches on a torch stream.

    Obtain with :func:`build`. Thread-safe; one instance serves every device of the process.
    """

    def __init__(self, entry: CacheEntry) -> None:
        """Wraps a cache entry; loads nothing yet."""
        self.entry = entry
        self.spec = entry.spec
        self._names = param_names(self.spec.params)
        self._kinds = [
            _param_kind(d, n) for d, n in zip(self.spec.params, self._names, strict=True)
        ]
        self._library: Any = None
        self._kernel: Any = None
        self._functions: dict[int, Any] = {}
        self._smem_set: dict[int, int] = {}
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        """Entry, arch and cache folder."""
        return f"Kernel({self.spec.entry}, sm_{self.entry.arch}, {self.entry.path})"

    def load(self) -> None:
        """Loads the cubin and the kernel's code into the current context (idempotent).

        The code is loaded eagerly (``cuFuncLoad``), whatever ``CUDA_MODULE_LOADING`` says: a
        lazy first load synchronises the context and would wait behind a pending stream wait
        (``ep_jit.wait_value``) forever. Call before CUDA graph capture to keep the load out.
        """
        with self._lock:
            if self._kernel is not None:
                self._function(torch.cuda.current_device(), 0)
                return
            ensure_context(torch.cuda.current_device())
            library = check(
                "cuLibraryLoadData",
                driver.cuLibraryLoadData(self.entry.read_cubin(), [], [], 0, [], [], 0),
            )
            self._kernel = check(
                "cuLibraryGetKernel", driver.cuLibraryGetKernel(library, self.spec.entry.encode())
            )
            self._library = library
            self._function(torch.cuda.current_device(), 0)

    def _config(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        smem: int,
        stream: int,
        cluster: tuple[int, int, int] | None,
        cooperative: bool,
    ) -> Any:  # a cuda-bindings CUlaunchConfig
        key = (grid, block, smem, stream, cluster, cooperative)
        cfg = self._configs.get(key)
        if cfg is not None:
            return cfg
        cfg = driver.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
        cfg.sharedMemBytes = smem
        cfg.hStream = driver.CUstream(stream)
        attrs = []
        if cluster is not None:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster
            attrs.append(attr)
        if cooperative:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            attrs.append(attr)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        if len(self._configs) > 256:
            self._configs.clear()
        self._configs[key] = cfg
        return cfg

    def _function(self, device: int, smem: int) -> Any:  # a CUfunction
        """The kernel's ``CUfunction`` in ``device``'s primary context, smem limit raised."""
        func = self._functions.get(device)
        if func is None:
            func = check("cuKernelGetFunction", driver.cuKernelGetFunction(self._kernel))
            check("cuFuncLoad", driver.cuFuncLoad(func), detail=self.spec.entry)
            self._functions[device] = func
        if smem > max(self._smem_set.get(device, 0), _STATIC_SMEM_LIMIT):
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(
                "cuFuncSetAttribute",
                driver.cuFuncSetAttribute(func, attr, smem),
                detail=f"kernel {self.spec.entry}, {smem} bytes of dynamic shared memory",
            )
            self._smem_set[device] = smem
        return func

    def launch(
        self,
        grid: Dim3,
        block: Dim3,
        *args: object,
        smem: int = 0,
        stream: torch.cuda.Stream | int | None = None,
        cluster: Dim3 | None = None,
        cooperative: bool = False,
    ) -> None:
        """Enqueues the kernel; asynchronous, on ``stream`` (default: the current torch stream).

        Args:
            grid: Blocks per grid.
            block: Threads per block.
            *args: One value per ``spec.params`` entry: a CUDA tensor (its ``data_ptr``), an int
                address or ``None`` for pointers; a Python number for scalars (range-checked);
                a ``ctypes.Structure`` for by-value structs.
            smem: Dynamic shared memory bytes (the limit is raised past 48 KiB as needed).
            stream: A ``torch.cuda.Stream`` or a raw ``cudaStream_t`` int.
            cluster: Thread-block cluster shape (SM 9.0+).
            cooperative: Launch cooperatively (grid-wide sync allowed; grid must fit on the GPU).

        Raises:
            TypeError: Wrong number or kind of arguments.
            ValueError: Bad launch shape, or a scalar out of its C type's range.
            JitLaunchError: A driver call failed; names the call and the ``CUresult``.
        """
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        threads = b[0] * b[1] * b[2]
        bound = self.spec.launch_bounds
        limit = bound if isinstance(bound, int) else (bound[0] if bound else 1024)
        if threads > limit:
            raise ValueError(f"block {b} has {threads} threads; {self.spec.name} allows {limit}")
        if smem < 0:
            raise ValueError(f"smem must be >= 0, got {smem}")
        clus = _dim3(cluster, "cluster") if cluster is not None else None
        array, keep = _marshal(self.spec, args, self._kinds, self._names)
        if self._kernel is None:
            self.load()
        device = torch.cuda.current_device()
        ensure_context(device)
        func = self._function(device, smem)
        if stream is None:
            handle = current_stream_handle()
        else:
            handle = stream.cuda_stream if isinstance(stream, torch.cuda.Stream) else int(stream)
        cfg = self._config(g, b, smem, handle, clus, cooperative)
        if knobs.jit.debug:
            verbose(
                "launch %s grid=%s block=%s smem=%d stream=%#x cluster=%s coop=%s",
                self.spec.entry,
                g,
                b,
                smem,
                handle,
                clus,
                cooperative,
            )
        check(
            "cuLaunchKernelEx",
            driver.cuLaunchKernelEx(cfg, func, ctypes.addressof(array), 0),
            detail=f"kernel {self.spec.entry}, grid {g}, block {b}, smem {smem}",
        )
        del keep


_kernels: dict[str, Kernel] = {}
_kernels_lock = threading.Lock()


def build(spec: KernelSpec, *, arch: str | None = None, compiler: str | None = None) -> Kernel:
    """Compiles ``spec`` (or finds it in the cache) and returns its :class:`Kernel`.

    Needs no GPU when ``arch`` or ``EP_JIT_ARCH`` is given. A second call with the same spec
    returns the same object without touching the disk.

    Raises:
        JitCompileError: See :func:`ep_jit.compile_spec`.
        ValueError: See :func:`ep_jit.compile_spec`.
    """
    entry = compile_spec(spec, arch=arch, compiler=compiler)
    with _kernels_lock:
        kernel = _kernels.get(entry.key)
        if kernel is None:
            kernel = _kernels[entry.key] = Kernel(entry)
        return kernel
