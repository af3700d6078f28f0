"""Load compiled cubins and launch them on the caller's current torch stream.

``build(spec)`` compiles (or finds in the cache) and returns a :class:`Kernel`; nothing touches the
GPU until the first :meth:`Kernel.launch`, which loads the cubin with ``cuLibraryLoadData`` into
torch's primary context. Launches go through cuda-bindings' ``cuLaunchKernel`` or, for clusters and
cooperative grids, ``cuLaunchKernelEx``: no synchronisation and no allocation, so they can be
captured in CUDA graphs (the load happens at build time or before, outside any capture).
:meth:`Kernel.bind` fixes a launch's arguments for repeated launches at the lowest host cost.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ep_jit import knobs
from ep_jit._cuda import (
    check,
    cu_stream,
    current_device,
    current_stream_handle,
    driver,
    ensure_context,
)
from ep_jit._launch_args import _Packer, _Storage
from ep_jit._log import verbose
from ep_jit.cache import CacheEntry, compile_spec
from ep_jit.spec import KernelSpec

__all__ = ["BoundLaunch", "Dim3", "Kernel", "build"]

Dim3 = int | tuple[int] | tuple[int, int] | tuple[int, int, int]
"""A grid or block shape: ``x`` or ``(x,)``, ``(x, y)``, ``(x, y, z)``."""

_STATIC_SMEM_LIMIT = 48 * 1024
_SUCCESS = driver.CUresult.CUDA_SUCCESS


def _stream_handle(stream: torch.cuda.Stream | int | None, device: int) -> int:
    """The raw handle of a launch's ``stream`` argument (default: torch's current stream)."""
    if stream is None:
        return current_stream_handle(device)
    return stream.cuda_stream if isinstance(stream, torch.cuda.Stream) else int(stream)


def _as_tuple(value: Any) -> Dim3:
    return value if isinstance(value, int) else tuple(value)


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
        self._library: Any = None
        self._kernel: Any = None
        self._functions: dict[int, Any] = {}
        self._smem_set: dict[int, int] = {}
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._shapes: dict[tuple[Any, ...], Any] = {}
        self._packer = _Packer(self.spec)
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
        if isinstance(grid, list) or isinstance(block, list) or isinstance(cluster, list):
            # Lists are accepted like tuples but cannot key the shape cache.
            grid, block = _as_tuple(grid), _as_tuple(block)
            cluster = None if cluster is None else _as_tuple(cluster)
        shape_key = (grid, block, smem, cluster)
        shape = self._shapes.get(shape_key)
        if shape is None:
            shape = self._shapes[shape_key] = self._check_shape(grid, block, smem, cluster)
        g, b, clus = shape
        params = self._packer.pack(args)
        if self._kernel is None:
            self.load()
        device = current_device()
        ensure_context(device)
        func = self._functions.get(device)
        if func is None or smem > _STATIC_SMEM_LIMIT:
            func = self._function(device, smem)
        handle = _stream_handle(stream, device)
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
        if clus is None and not cooperative:
            result = driver.cuLaunchKernel(
                func, g[0], g[1], g[2], b[0], b[1], b[2], smem, cu_stream(handle), params, 0
            )
            call = "cuLaunchKernel"
        else:
            cfg = self._config(g, b, smem, handle, clus, cooperative)
            result = driver.cuLaunchKernelEx(cfg, func, params, 0)
            call = "cuLaunchKernelEx"
        if result[0] != _SUCCESS:
            check(
                call, result, detail=f"kernel {self.spec.entry}, grid {g}, block {b}, smem {smem}"
            )

    def bind(
        self,
        grid: Dim3,
        block: Dim3,
        *args: object,
        smem: int = 0,
        cluster: Dim3 | None = None,
        cooperative: bool = False,
    ) -> BoundLaunch:
        """Fixes a launch's shape and arguments; calling the result enqueues it again.

        The arguments are checked and packed once, here; each call of the returned
        :class:`BoundLaunch` only looks up the stream and calls the driver, for repeated launches
        whose pointers and scalars do not change (polling, barriers, persistent buffers). Tensors
        passed here are kept alive by the bound launch. A by-value struct (``ctypes.Structure``)
        is passed by its address: fields changed between calls are what the next call passes,
        so a kernel taking one struct can be bound once and fed new pointers per call. The
        current device is the one it launches on.

        Args:
            grid, block, args, smem, cluster, cooperative: As :meth:`launch`.

        Raises:
            TypeError, ValueError: As :meth:`launch`.
        """
        if isinstance(grid, list) or isinstance(block, list) or isinstance(cluster, list):
            grid, block = _as_tuple(grid), _as_tuple(block)
            cluster = None if cluster is None else _as_tuple(cluster)
        g, b, clus = self._check_shape(grid, block, smem, cluster)
        storage = _Storage(self._packer.kinds)
        params = self._packer.pack(args, storage)
        if self._kernel is None:
            self.load()
        device = current_device()
        ensure_context(device)
        func = self._function(device, smem)
        return BoundLaunch(
            self, func, device, g, b, smem, params, (storage, args), clus, bool(cooperative)
        )

    def _check_shape(
        self, grid: Dim3, block: Dim3, smem: int, cluster: Dim3 | None
    ) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int] | None]:
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        threads = b[0] * b[1] * b[2]
        bound = self.spec.launch_bounds
        limit = bound if isinstance(bound, int) else (bound[0] if bound else 1024)
        if threads > limit:
            raise ValueError(f"block {b} has {threads} threads; {self.spec.name} allows {limit}")
        if smem < 0:
            raise ValueError(f"smem must be >= 0, got {smem}")
        clus = _dim3(cluster, "cluster") if cluster is not None else None
        if len(self._shapes) > 256:
            self._shapes.clear()
        return g, b, clus


class BoundLaunch:
    """A kernel launch with fixed shape and arguments (see :meth:`Kernel.bind`)."""

    def __init__(
        self,
        kernel: Kernel,
        func: Any,
        device: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        smem: int,
        params: int,
        keepalive: object,
        cluster: tuple[int, int, int] | None = None,
        cooperative: bool = False,
    ) -> None:
        self.kernel = kernel
        self.device = device
        self.grid = grid
        self.block = block
        self.smem = smem
        self.cluster = cluster
        self.cooperative = cooperative
        self._func = func
        self._params = params
        self._keepalive = keepalive
        # Launches with attributes go through cuLaunchKernelEx: its config per stream handle.
        self._extended = cluster is not None or cooperative
        self._configs: dict[int, Any] = {}

    def __call__(self, stream: torch.cuda.Stream | int | None = None) -> None:
        """Enqueues the launch on ``stream`` (default: the current torch stream); asynchronous.

        Raises:
            JitLaunchError: The driver refused the launch.
        """
        device = self.device
        ensure_context(device)
        handle = _stream_handle(stream, device)
        g, b = self.grid, self.block
        if self._extended:
            cfg = self._configs.get(handle)
            if cfg is None:
                if len(self._configs) > 64:
                    self._configs.clear()
                cfg = self._configs[handle] = self.kernel._config(
                    g, b, self.smem, handle, self.cluster, self.cooperative
                )
            result = driver.cuLaunchKernelEx(cfg, self._func, self._params, 0)
            call = "cuLaunchKernelEx"
        else:
            result = driver.cuLaunchKernel(
                self._func, g[0], g[1], g[2], b[0], b[1], b[2], self.smem,
                cu_stream(handle), self._params, 0,
            )  # fmt: skip
            call = "cuLaunchKernel"
        if result[0] != _SUCCESS:
            detail = f"kernel {self.kernel.spec.entry}, grid {g}, block {b}, smem {self.smem}"
            check(call, result, detail=detail)

    def __repr__(self) -> str:
        """Kernel, shape and device."""
        extra = f", cluster={self.cluster}" if self.cluster is not None else ""
        extra += ", cooperative" if self.cooperative else ""
        return (
            f"BoundLaunch({self.kernel.spec.entry}, grid={self.grid}, block={self.block}, "
            f"smem={self.smem}, device={self.device}{extra})"
        )


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
