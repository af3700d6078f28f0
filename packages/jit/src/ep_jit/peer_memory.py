"""Elastic peer memory: GPU and host segments of every rank of a node, mapped into every rank.

Built on the CUDA driver's virtual memory API (``cuMemCreate``, ``cuMemAddressReserve``,
``cuMemMap``, ``cuMemSetAccess``) and shared between processes by POSIX file descriptor, so it
needs nothing from torch's private symmetric memory and works where that refuses:

* several ranks on ONE GPU (a gloo group): debug multi-rank code on a single GPU;
* host segments: pinned host memory on the GPU's own NUMA node, reachable by every local rank's
  kernels and copy engines, for tables larger than GPU memory.

One reserved virtual range per rank holds, for every rank ``p`` of the group, a window
``[GPU segment | host segment]`` at ``base + p * window_bytes``, then the host segments of all
ranks back to back (``host_window_ptr + p * host_bytes``), so a kernel reaches any rank's shard
by offset. Offsets inside a segment are the same on every rank.

Layout of a GPU segment: ``[data: nbytes | signal: signal_bytes | barrier words]``, each part
256-byte aligned; the whole segment is 2 MiB aligned.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ep_jit import knobs
from ep_jit._cuda import check, current_stream_handle, driver, ensure_context
from ep_jit._dlpack import device_tensor
from ep_jit._fdshare import FdServer, fetch_fds, new_address
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.errors import HostTimeoutError
from ep_jit.hostwait import wait_stream
from ep_jit.topology import free_host_bytes, resolve_device
from ep_jit.watchdog import DeviceWatchdog

__all__ = ["PeerMemory", "PeerViews"]

_ALIGN = 256
_SEGMENT_ALIGN = 2 << 20
_BARRIER_BYTES = 8192  # R + 1 uint32 kernel-barrier words, then R uint32 stream-op words
_A = driver.CUdevice_attribute
_POSIX_FD = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _attr(attr: Any, dev: Any) -> int:
    return int(check("cuDeviceGetAttribute", driver.cuDeviceGetAttribute(attr, dev)))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class PeerViews:
    """Views and copies over a peer-mapped buffer; shared by every peer-memory class.

    Subclasses set ``nbytes``, ``world_size``, ``device``, ``local`` and ``peer_ptrs``, and
    implement ``_alive()``.
    """

    nbytes: int
    world_size: int
    device: torch.device
    local: torch.Tensor
    peer_ptrs: list[int]

    def _alive(self) -> Any:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def settle(self, timeout_s: float | None = None) -> None:
        """Every rank's queued GPU work on the buffer is done (collective; bounded host waits).

        Drains this device, passes a GPU barrier, drains again: afterwards no kernel of any rank
        still reads or writes the buffer (e.g. before the host rewrites control words).
        """
        from ep_jit.hostwait import wait_device

        wait_device(self.device, what="settling the peer buffer", timeout_s=timeout_s)
        self.barrier()
        wait_device(self.device, what="settling the peer buffer", timeout_s=timeout_s)

    def _check_range(
        self,
        offset: int,
        nbytes: int,
        itemsize: int,
        limit: int | None = None,
        what: str = "the buffer",
    ) -> None:
        limit = self.nbytes if limit is None else limit
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be >= 0 and a multiple of {itemsize}")
        if offset + nbytes > limit:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) exceed {what} ({limit})")

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer {peer} out of range [0, {self.world_size})")

    def tensor(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous view of the local data region at byte ``offset``.

        Raises:
            ValueError: Misaligned ``offset`` or a view past the end of the region.
        """
        self._alive()
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = _numel(shape)
        self._check_range(offset, numel * itemsize, itemsize)
        view: torch.Tensor = self.local[offset : offset + numel * itemsize].view(dtype)
        return view.view(tuple(shape))

    def copy_to_peer(self, peer: int, offset: int, src: torch.Tensor) -> None:
        """Copies ``src`` into ``peer``'s data region at byte ``offset`` with a copy engine.

        Asynchronous on the current stream (``cuMemcpyAsync``; no SM is used).

        Raises:
            ValueError: ``peer``/``offset`` out of range.
            TypeError: ``src`` is not a contiguous CUDA tensor.
        """
        self._alive()
        self._check_peer(peer)
        if src.device.type != "cuda" or not src.is_contiguous():
            raise TypeError("src must be a contiguous CUDA tensor")
        nbytes = src.numel() * src.element_size()
        self._check_range(offset, nbytes, 1)
        if nbytes == 0:
            return
        ensure_context(torch.cuda.current_device())
        check(
            "cuMemcpyAsync",
            driver.cuMemcpyAsync(
                self.peer_ptrs[peer] + offset,
                src.data_ptr(),
                nbytes,
                driver.CUstream(current_stream_handle()),
            ),
        )


class _Mapping:
    """The driver objects of one PeerMemory: handles, mappings and the reserved range."""

    def __init__(self) -> None:
        self.own: list[Any] = []  # handles this rank created (released on free)
        self.imported: list[Any] = []  # handles imported from peers
        self.mapped: list[tuple[int, int]] = []  # (address, size)
        self.reserved: tuple[int, int] | None = None
        self.fds: list[int] = []

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def free(self) -> None:
        """Unmaps, releases and frees everything, tolerating partial construction."""
        self.close_fds()
        for addr, size in reversed(self.mapped):
            driver.cuMemUnmap(addr, size)
        self.mapped = []
        for h in self.imported + self.own:
            driver.cuMemRelease(h)
        self.imported, self.own = [], []
        if self.reserved is not None:
            driver.cuMemAddressFree(*self.reserved)
            self.reserved = None


class PeerMemory(PeerViews):
    """GPU (and optionally host) memory on every rank of ``group``, mapped into every rank.

    Collective: every rank constructs it with the same sizes, in the same order relative to
    other buffers. The group may be gloo (ranks sharing a GPU) or NCCL; only its object
    collectives are used. Every rank must run on the same host. Returns after a GPU barrier, so
    the zeroed signal words are visible everywhere.

    Args:
        group: Process group (default: the world).
        nbytes: Bytes of the data region (``local``), > 0.
        device: CUDA device; default the current device.
        signal_bytes: Bytes of a zero-initialised region for flags and counters, a multiple of 4.
        host_bytes: Bytes of the host segment of each rank (0: none).
        timeout_s: Limit of every host wait and of the GPU barrier's spin waits; default
            ``EP_JIT_HOST_TIMEOUT_S``.

    Attributes:
        local: ``[nbytes]`` uint8 CUDA tensor, this rank's data region.
        signal_local: ``[signal_bytes]`` uint8 CUDA tensor, this rank's signal region.
        peer_ptrs / peer_ptrs_dev: Device address of every rank's data region (list; ``[R]``
            int64 CUDA tensor, the device-side table).
        signal_ptrs / signal_ptrs_dev: The same for the signal regions.
        signal_offset: Bytes from a data region's start to its signal region.
        host_local: ``[host_bytes]`` uint8 CUDA-device tensor over this rank's host segment
            (pinned host memory reached through the GPU's mapping), or ``None``.
        host_ptrs / host_ptrs_dev: Device addresses of every rank's host segment.
        host_window_ptr: Device address of rank 0's host segment in the contiguous window
            (rank ``p``'s is at ``host_window_ptr + p * host_bytes``).
        rank, world_size: This rank and the group size.

    Raises:
        ValueError: Bad sizes, or ranks that disagree (raised on every rank).
        MemoryError: Not enough GPU or host memory (names asked and free; on every rank).
        RuntimeError: The device lacks virtual memory management, POSIX handles, or host-NUMA
            allocations for a requested host segment; ranks on several hosts.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        nbytes: int,
        device: torch.device | int | str | None = None,
        *,
        signal_bytes: int = 4096,
        host_bytes: int = 0,
        timeout_s: float | None = None,
    ) -> None:
        """Allocates, exchanges handles, maps and barriers (collective; see the class doc)."""
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD  # type: ignore[assignment]
        self.timeout_s = float(knobs.jit.host_timeout_s if timeout_s is None else timeout_s)
        error: Exception | None = None
        try:
            dev = resolve_device(device, what="PeerMemory", cuda_only=True)
            if not isinstance(nbytes, int) or nbytes <= 0:
                raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
            if not isinstance(signal_bytes, int) or signal_bytes < 0 or signal_bytes % 4:
                raise ValueError(
                    f"signal_bytes must be a non-negative multiple of 4: {signal_bytes!r}"
                )
            if not isinstance(host_bytes, int) or host_bytes < 0:
                raise ValueError(f"host_bytes must be a non-negative int, got {host_bytes!r}")
        except (ValueError, TypeError) as exc:
            error, dev = exc, torch.device("cpu")
        sizes = {"nbytes": nbytes, "signal_bytes": signal_bytes, "host_bytes": host_bytes}
        configs = gather_checked(self.group, sizes, error, what="PeerMemory", device=dev)
        check_agreement(configs, "PeerMemory")
        self.device = dev
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.nbytes = nbytes
        self.signal_offset = _align(nbytes)
        self._barrier_offset = self.signal_offset + _align(max(signal_bytes, 4))
        self.gpu_bytes = _align(self._barrier_offset + _BARRIER_BYTES, _SEGMENT_ALIGN)
        self.host_bytes = _align(host_bytes, _SEGMENT_ALIGN) if host_bytes else 0
        self._map = _Mapping()
        self._barrier_epoch = 0
        self._barrier_kernel: Any = None
        self._destroyed = False
        try:
            self._build(signal_bytes)
        except BaseException:
            self._destroyed = True
            self._map.free()
            raise

    # ---- construction -----------------------------------------------------------------------
    def _prop(self, cu_dev: Any, host: bool) -> Any:
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.requestedHandleTypes = _POSIX_FD
        if host:
            prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
            prop.location.id = max(_attr(_A.CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, cu_dev), 0)
        else:
            prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            prop.location.id = int(self.device.index or 0)
        rdma = _A.CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED
        if not host and _attr(rdma, cu_dev):
            # A NIC backend registers GPU segments for RDMA (the driver rejects the flag for
            # host-NUMA allocations, which NICs reach as ordinary host memory).
            prop.allocFlags.gpuDirectRDMACapable = 1
        return prop

    def _create(self, cu_dev: Any, size: int, host: bool) -> Any:
        prop = self._prop(cu_dev, host)
        gran = int(
            check(
                "cuMemGetAllocationGranularity",
                driver.cuMemGetAllocationGranularity(
                    prop,
                    driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                ),
            )
        )
        if size % gran:
            raise RuntimeError(f"segment size {size} is not a multiple of the granularity {gran}")
        where = "host" if host else "GPU"
        free = free_host_bytes() if host else int(check("cuMemGetInfo", driver.cuMemGetInfo())[0])
        if size > free:
            raise MemoryError(
                f"PeerMemory asked for {size} bytes of {where} memory on {self.device}, {free} free"
            )
        err, handle = driver.cuMemCreate(size, prop, 0)
        if err == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise MemoryError(
                f"PeerMemory could not create {size} bytes of {where} memory on {self.device} "
                f"({free} reported free)"
            )
        check("cuMemCreate", (err,), f"{size} bytes of {where} memory")
        self._map.own.append(handle)
        fd = int(
            check(
                "cuMemExportToShareableHandle",
                driver.cuMemExportToShareableHandle(handle, _POSIX_FD, 0),
            )
        )
        self._map.fds.append(fd)
        return handle

    def _local_setup(self) -> dict[str, Any]:
        """Checks the device and creates this rank's segments; returns what peers need."""
        idx = int(self.device.index or 0)
        ensure_context(idx)
        cu_dev = check("cuDeviceGet", driver.cuDeviceGet(idx))
        if not _attr(_A.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, cu_dev):
            raise RuntimeError(f"{self.device} does not support virtual memory management")
        if not _attr(_A.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, cu_dev):
            raise RuntimeError(f"{self.device} cannot export memory as POSIX file descriptors")
        if self.host_bytes and not _attr(
            _A.CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, cu_dev
        ):
            raise RuntimeError(
                f"{self.device} does not support host-NUMA virtual memory allocations, so "
                f"PeerMemory cannot create host segments (host_bytes={self.host_bytes})"
            )
        self._create(cu_dev, self.gpu_bytes, host=False)
        if self.host_bytes:
            self._create(cu_dev, self.host_bytes, host=True)
        return {"host": socket.gethostname()}

    def _build(self, signal_bytes: int) -> None:
        world, rank = self.world_size, self.rank
        address = new_address(rank)
        server: FdServer | None = None
        error: Exception | None = None
        info: dict[str, Any] = {}
        try:
            info = self._local_setup()
            server = FdServer(address, self._map.fds, world - 1, self.timeout_s)
        except (RuntimeError, MemoryError, ValueError, OSError) as exc:
            error = exc
        info["address"] = address
        try:
            peers = gather_checked(self.group, info, error, what="PeerMemory", device=self.device)
            hosts = sorted({p["host"] for p in peers})
            if len(hosts) > 1:
                raise RuntimeError(
                    f"PeerMemory maps the ranks of one host; the group spans {hosts}"
                )
        except BaseException:
            if server is not None:
                server.close()
            raise
        assert server is not None
        server.start()
        per_rank = 2 if self.host_bytes else 1
        fds: list[list[int]] = []
        try:
            for p in range(world):
                if p == rank:
                    fds.append(list(self._map.fds))
                else:
                    got = fetch_fds(peers[p]["address"], rank, per_rank, self.timeout_s)
                    self._map.fds.extend(got)  # closed after import, also on failure
                    fds.append(got)
        finally:
            server.join()
        self._map_all(fds)
        self._map.close_fds()
        self._make_views(signal_bytes)

    def _map_all(self, fds: list[list[int]]) -> None:
        world, gpu, host = self.world_size, self.gpu_bytes, self.host_bytes
        window = gpu + host
        total = world * window + world * host
        base = int(
            check("cuMemAddressReserve", driver.cuMemAddressReserve(total, _SEGMENT_ALIGN, 0, 0))
        )
        self._map.reserved = (base, total)
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = int(self.device.index or 0)
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        for p in range(world):
            if p == self.rank:
                handles = list(self._map.own)
            else:
                handles = []
                for fd in fds[p]:
                    h = check(
                        "cuMemImportFromShareableHandle",
                        driver.cuMemImportFromShareableHandle(fd, _POSIX_FD),
                    )
                    self._map.imported.append(h)
                    handles.append(h)
            places = [(base + p * window, gpu, handles[0])]
            if host:
                places.append((base + p * window + gpu, host, handles[1]))
                places.append((base + world * window + p * host, host, handles[1]))
            for addr, size, h in places:
                check("cuMemMap", driver.cuMemMap(addr, size, 0, h, 0))
                self._map.mapped.append((addr, size))
                check("cuMemSetAccess", driver.cuMemSetAccess(addr, size, [access], 1))
        self._base, self._window = base, window

    def _make_views(self, signal_bytes: int) -> None:
        world, dev = self.world_size, self.device
        base, window = self._base, self._window
        self.peer_ptrs = [base + p * window for p in range(world)]
        self.signal_ptrs = [p + self.signal_offset for p in self.peer_ptrs]
        mine = self.peer_ptrs[self.rank]
        with torch.cuda.device(dev):
            segment = device_tensor(mine, self.gpu_bytes, dev, self)
            self.local = segment[: self.nbytes]
            self.signal_local = segment[self.signal_offset : self.signal_offset + signal_bytes]
            self.peer_ptrs_dev = torch.tensor(self.peer_ptrs, dtype=torch.int64, device=dev)
            self.signal_ptrs_dev = torch.tensor(self.signal_ptrs, dtype=torch.int64, device=dev)
            self.host_ptrs = [p + self.gpu_bytes for p in self.peer_ptrs] if self.host_bytes else []
            self.host_window_ptr = base + world * window if self.host_bytes else 0
            self.host_local = (
                device_tensor(self.host_ptrs[self.rank], self.host_bytes, dev, self)
                if self.host_bytes
                else None
            )
            self.host_ptrs_dev = torch.tensor(self.host_ptrs, dtype=torch.int64, device=dev)
            segment[self.signal_offset :].zero_()
            self._segment = segment
            self._watchdog = DeviceWatchdog(
                ["peer memory barrier"], rank=self.rank, timeout_s=self.timeout_s, device=dev
            )
            wait_stream(what="PeerMemory zeroing its signal words", timeout_s=self.timeout_s)
            self._object_barrier()
            self.barrier()
            self.synchronize("PeerMemory's first barrier")

    # ---- use ------------------------------------------------------------------------------
    def _alive(self) -> None:
        if getattr(self, "_destroyed", True):
            raise RuntimeError("PeerMemory was destroyed")

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` ran."""
        return getattr(self, "_destroyed", True)

    def peer_tensor(
        self, peer: int, offset: int, shape: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A view of ``peer``'s data region, mapped here; copies into it write the peer's memory.

        Raises:
            ValueError: ``peer`` out of range, misaligned ``offset`` or a view past the end.
        """
        self._alive()
        self._check_peer(peer)
        return self._mapped_view(
            self.peer_ptrs[peer], offset, shape, dtype, self.nbytes, "the buffer"
        )

    def host_tensor(
        self, peer: int, offset: int, shape: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A view of ``peer``'s host segment as a tensor on this rank's CUDA device.

        Raises:
            ValueError: No host segment, ``peer`` out of range, or a view past its end.
        """
        self._alive()
        self._check_peer(peer)
        if not self.host_bytes:
            raise ValueError("this PeerMemory has no host segment (host_bytes=0)")
        return self._mapped_view(
            self.host_ptrs[peer], offset, shape, dtype, self.host_bytes, "the host segment"
        )

    def _mapped_view(
        self,
        base: int,
        offset: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        limit: int,
        what: str,
    ) -> torch.Tensor:
        """A ``shape``/``dtype`` tensor at ``base + offset`` of a mapped segment of ``limit``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = _numel(shape) * itemsize
        self._check_range(offset, nbytes, itemsize, limit, what)
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        raw = device_tensor(base + offset, nbytes, self.device, self)
        return raw.view(dtype).view(tuple(shape))

    def barrier(self) -> None:
        """GPU barrier across the group, enqueued on the current stream (asynchronous).

        A one-block kernel (``<ep_jit/smxx_barrier.cuh>``) over private words of the GPU
        segments, its waits bounded by ``timeout_s``. A recorded timeout is raised by the next
        :meth:`barrier`, :meth:`check` or :meth:`synchronize`. Graph-capturable.

        Raises:
            JitTimeoutError: An earlier barrier timed out.
        """
        from ep_jit.kernels import barrier_spec, barrier_threads
        from ep_jit.launch import build

        self._alive()
        self._watchdog.check()
        if self._barrier_kernel is None:
            # Built and loaded once, at construction (its first barrier): never a first load
            # behind a pending stream wait (see docs/jit.md).
            self._barrier_kernel = build(barrier_spec(self.world_size))
        self._barrier_kernel.launch(
            1,
            barrier_threads(self.world_size),
            self.peer_ptrs_dev,
            self._barrier_offset,
            self.rank,
            self._watchdog.context(),
            0,
        )

    def barrier_mem_ops(self) -> None:
        """GPU barrier as stream memory operations only: no kernel (copy-engine protocols).

        Writes this barrier's number into every peer's word for this rank, then waits until
        every peer wrote it here. The number is counted on the host, so a captured graph of it
        cannot be replayed; the wait has no device timeout (bound the host with
        :meth:`synchronize`).
        """
        from ep_jit.streamops import MemOp, batch_mem_ops

        self._alive()
        self._barrier_epoch += 1
        words = self._barrier_offset + 4 * (self.world_size + 1)
        epoch = self._barrier_epoch & 0xFFFFFFFF
        ops = [
            MemOp.write(self.peer_ptrs[p] + words + 4 * self.rank, epoch)
            for p in range(self.world_size)
        ]
        mine = self.peer_ptrs[self.rank] + words
        ops += [MemOp.wait(mine + 4 * p, epoch) for p in range(self.world_size)]
        batch_mem_ops(ops)

    def check(self) -> None:
        """Raises the timeout a barrier recorded, if any (reads pinned memory; no sync)."""
        self._watchdog.check()

    def synchronize(self, what: str = "PeerMemory") -> None:
        """Waits for the current stream, then raises any timeout a barrier recorded.

        The host waits longer than the device's own limit (twice ``timeout_s``, at least 10 s
        more), so that a stuck peer is reported by the device record, naming the stage and the
        peer, rather than as a bare host timeout.

        Raises:
            JitTimeoutError: A barrier's wait timed out on the device.
            HostTimeoutError: The stream did not drain in time and no device record explains it.
        """
        try:
            wait_stream(what=what, timeout_s=self.timeout_s + max(self.timeout_s, 10.0))
        except HostTimeoutError as exc:
            self._watchdog.check(cause=exc)
            raise
        self._watchdog.check()

    def _object_barrier(self) -> None:
        gather_checked(self.group, {}, None, what="PeerMemory barrier", device=self.device)

    def destroy(self) -> None:
        """Collective and idempotent: waits for the current stream, meets every rank, frees.

        Every rank's work on the buffer must be done (the free is not stream-ordered): the
        current stream is drained with a deadline, then the ranks meet on the host before any
        rank unmaps. Views taken earlier must not be used afterwards.
        """
        if self.destroyed:
            return
        self._destroyed = True
        try:
            with torch.cuda.device(self.device):
                # A timeout a barrier recorded was reported already (or is moot now); only a
                # stream that does not drain stops the destruction.
                wait_stream(
                    what="PeerMemory.destroy draining the stream",
                    timeout_s=self.timeout_s + max(self.timeout_s, 10.0),
                )
                torch.cuda.synchronize(self.device)
            self._object_barrier()
        finally:
            empty = torch.empty(0, dtype=torch.uint8)
            self.local = self.signal_local = self._segment = empty
            self.host_local = None
            self.peer_ptrs, self.signal_ptrs, self.host_ptrs = [], [], []
            self._map.free()

    def __enter__(self) -> PeerMemory:
        """Returns the buffer; :meth:`destroy` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Destroys the buffer (collective)."""
        self.destroy()

    def __repr__(self) -> str:
        """Rank, sizes and device, or that it was destroyed."""
        if self.destroyed:
            return f"PeerMemory(rank {self.rank}/{self.world_size}, destroyed)"
        host = f" + {self.host_bytes} B host" if self.host_bytes else ""
        return (
            f"PeerMemory(rank {self.rank}/{self.world_size}, {self.nbytes} B{host} "
            f"on {self.device})"
        )
