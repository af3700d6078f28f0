"""Symmetric (peer-mapped) GPU memory over ``torch.distributed._symmetric_memory``.

``SymmetricBuffer`` allocates it; ``is_single_nvlink_domain`` says whether a group can use it.

This is the only module of the project that touches torch's private symmetric-memory API; it
uses calls present in torch 2.11 through 2.13 (CUDA backend, no multicast). Every rank of a
group allocates the same number of bytes; each rank can then read and write every peer's
buffer through plain device pointers (``peer_ptrs``) over NVLink, or through copy engines.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ep_jit._cuda import check, current_stream_handle, driver, ensure_context
from ep_jit.agreement import check_agreement, gather_checked

__all__ = ["SymmetricBuffer", "is_single_nvlink_domain"]

_ALIGN = 256
_backend_lock = threading.Lock()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _symm() -> Any:  # torch's private module
    import torch.distributed._symmetric_memory as symm

    return symm


def _prepare_backend(
    symm: Any,  # torch's private module
    device: torch.device,
    group: dist.ProcessGroup,
) -> None:
    with _backend_lock:
        if hasattr(symm, "get_backend") and symm.get_backend(device) not in (None, "CUDA"):
            with contextlib.suppress(RuntimeError):  # another backend already allocated
                symm.set_backend("CUDA")
        enable = getattr(symm, "enable_symm_mem_for_group", None)
        # Older torch needs the group registered; newer torch deprecates the call.
        if enable is not None and not hasattr(enable, "__deprecated__"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(group.group_name)


class SymmetricBuffer:
    """``nbytes`` of device memory on every rank of ``group``, mapped into every peer.

    Collective: every rank of ``group`` must construct it with the same ``nbytes`` and
    ``signal_bytes``, in the same order relative to other buffers. Returns after a GPU barrier
    on the current stream, so the zeroed signal words are visible everywhere.

    Args:
        group: Process group (default: the world); one GPU per rank.
        nbytes: Bytes of the data region (``local``), > 0.
        device: CUDA device; default the current device.
        signal_bytes: Bytes of a separate, zero-initialised region for flags and counters
            (``signal_ptrs``), multiple of 4; ``0`` for none.

    Attributes:
        local: ``[nbytes]`` uint8 CUDA tensor, this rank's data region.
        signal_local: ``[signal_bytes]`` uint8 CUDA tensor, this rank's signal region.
        peer_ptrs: Device address of every rank's data region (``peer_ptrs[rank]`` is local).
        peer_ptrs_dev: ``[R]`` int64 CUDA tensor of ``peer_ptrs``.
        signal_ptrs: Device address of every rank's signal region.
        signal_ptrs_dev: ``[R]`` int64 CUDA tensor of ``signal_ptrs``.
        signal_offset: Bytes from a data region's start to its signal region.
        rank: This rank in ``group``.
        world_size: Ranks in ``group``.

    Raises:
        ValueError: Bad ``nbytes``/``signal_bytes``, ranks that ask for different sizes (raised
            on every rank), or ``device`` is not a CUDA device.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        nbytes: int,
        device: torch.device | int | str | None = None,
        *,
        signal_bytes: int = 4096,
    ) -> None:
        """Allocates, exchanges handles and barriers (collective; see the class docstring)."""
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if not isinstance(signal_bytes, int) or signal_bytes < 0 or signal_bytes % 4:
            raise ValueError(f"signal_bytes must be a non-negative multiple of 4: {signal_bytes!r}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"SymmetricBuffer needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD  # type: ignore[assignment]
        # Every rank must ask for the same sizes (a peer whose buffer is smaller would be
        # written past its end): one all-gather before anything is allocated.
        sizes = {"nbytes": nbytes, "signal_bytes": signal_bytes}
        check_agreement(
            gather_checked(self.group, sizes, None, what="SymmetricBuffer", device=device),
            "SymmetricBuffer",
        )
        self.device = device
        self.nbytes = nbytes
        self.signal_offset = _align(nbytes)
        total = self.signal_offset + _align(max(signal_bytes, 4))

        symm = _symm()
        _prepare_backend(symm, device, self.group)
        with torch.cuda.device(device):
            storage = symm._SymmetricMemory.empty_strided_p2p((total,), (1,), torch.uint8, device)
            handle = symm._SymmetricMemory.rendezvous(storage, self.group.group_name)
            base = [int(p) for p in handle.buffer_ptrs]
            if base[handle.rank] != storage.data_ptr():
                raise RuntimeError("symmetric memory handle does not start at the local tensor")
            self._storage: torch.Tensor | None = storage
            self._handle: Any = handle
            self.rank = int(handle.rank)
            self.world_size = int(handle.world_size)
            self.local = storage[:nbytes]
            self.signal_local = storage[self.signal_offset : self.signal_offset + signal_bytes]
            self.peer_ptrs = base
            self.signal_ptrs = [p + self.signal_offset for p in base]
            self.peer_ptrs_dev = torch.tensor(base, dtype=torch.int64, device=device)
            self.signal_ptrs_dev = torch.tensor(self.signal_ptrs, dtype=torch.int64, device=device)
            self.signal_local.zero_()
            handle.barrier(channel=0)

    def _alive(self) -> Any:  # torch's private handle
        if self._handle is None:
            raise RuntimeError("SymmetricBuffer was destroyed")
        return self._handle

    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` ran."""
        return self._handle is None

    def _check_range(self, offset: int, nbytes: int, itemsize: int) -> None:
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be >= 0 and a multiple of {itemsize}")
        if offset + nbytes > self.nbytes:
            raise ValueError(
                f"bytes [{offset}, {offset + nbytes}) exceed the buffer ({self.nbytes})"
            )

    def tensor(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous view of the local data region at byte ``offset``.

        Raises:
            ValueError: Misaligned ``offset`` or a view past the end of the region.
        """
        self._alive()
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= int(s)
        self._check_range(offset, numel * itemsize, itemsize)
        view: torch.Tensor = self.local[offset : offset + numel * itemsize].view(dtype)
        return view.view(tuple(shape))

    def peer_tensor(
        self, peer: int, offset: int, shape: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A view of ``peer``'s data region (device memory of another GPU, mapped here).

        Copies into it (``peer_tensor(...).copy_(src)``) write the peer's memory directly.

        Raises:
            ValueError: ``peer`` out of range, misaligned ``offset`` or a view past the end.
        """
        handle = self._alive()
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer {peer} out of range [0, {self.world_size})")
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= int(s)
        self._check_range(offset, numel * itemsize, itemsize)
        view: torch.Tensor = handle.get_buffer(peer, [numel], dtype, offset // itemsize)
        return view.view(tuple(shape))

    def copy_to_peer(self, peer: int, offset: int, src: torch.Tensor) -> None:
        """Copies ``src`` into ``peer``'s data region at byte ``offset`` with a copy engine.

        Asynchronous on the current stream (``cuMemcpyAsync``; no SM is used).

        Raises:
            ValueError: ``peer``/``offset`` out of range.
            TypeError: ``src`` is not a contiguous CUDA tensor.
        """
        self._alive()
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer {peer} out of range [0, {self.world_size})")
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

    def barrier(self, timeout_ms: int = 0) -> None:
        """GPU barrier across the group, enqueued on the current stream (asynchronous).

        Collective: every rank calls it, the same number of times. Uses torch's barrier over
        this buffer's own signal pad (not ``signal_local``).

        After it, every rank's writes issued on its stream before the barrier are visible to
        every rank's work issued after it. ``timeout_ms`` > 0 makes a stuck peer trap the kernel.
        """
        self._alive().barrier(channel=0, timeout_ms=timeout_ms)

    def destroy(self) -> None:
        """Releases this rank's references (idempotent). Not collective.

        Call after a barrier and a synchronisation of the streams that used the buffer (the free
        is not stream-ordered) so no kernel or peer still touches it; the memory returns to the
        allocator once no view of ``local``/``signal_local`` is alive.
        """
        if self._handle is None:
            return
        self._handle = None
        self._storage = None
        empty = torch.empty(0, dtype=torch.uint8)
        self.local = empty
        self.signal_local = empty
        self.peer_ptrs_dev = torch.empty(0, dtype=torch.int64)
        self.signal_ptrs_dev = torch.empty(0, dtype=torch.int64)
        self.peer_ptrs = []
        self.signal_ptrs = []

    def __enter__(self) -> SymmetricBuffer:
        """Returns the buffer; :meth:`destroy` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Destroys the buffer."""
        self.destroy()

    def __repr__(self) -> str:
        """Rank, size and device, or that it was destroyed."""
        state = "destroyed" if self.destroyed else f"{self.nbytes} B on {self.device}"
        return f"SymmetricBuffer(rank {self.rank}/{self.world_size}, {state})"


def _local_view() -> dict[str, object]:
    info: dict[str, object] = {"host": socket.gethostname(), "cuda": False}
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        info["cuda"] = True
        info["uuid"] = str(torch.cuda.get_device_properties(dev).uuid)
    return info


def _visible_uuids() -> dict[str, int]:
    return {
        str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())
    }


def is_single_nvlink_domain(group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` can load and store every other rank's GPU memory.

    True when all ranks run on one host, each on its own CUDA device, and CUDA reports peer
    access between every pair of those devices (NVLink or NVSwitch on the machines we target).
    False on CPU-only ranks (gloo). Collective: every rank must call it; all get the same answer.

    Args:
        group: Process group (default: the world).

    Returns:
        The same bool on every rank.
    """
    views: list[dict[str, object] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(views, _local_view(), group=group)
    ok = all(v is not None and v["cuda"] for v in views)
    ok = ok and len({v["host"] for v in views if v is not None}) == 1
    uuids = [str(v["uuid"]) for v in views if v is not None and v["cuda"]]
    ok = ok and len(set(uuids)) == len(uuids)
    if ok:
        # Peer access is queried from this process, so every peer device must be visible here.
        local = _visible_uuids()
        if all(u in local for u in uuids):
            idx = [local[u] for u in uuids]
            ok = all(torch.cuda.can_device_access_peer(a, b) for a in idx for b in idx if a != b)
        else:
            ok = False
    # Ranks may see different devices (CUDA_VISIBLE_DEVICES); agree on the strictest answer.
    votes: list[bool | None] = [None] * len(views)
    dist.all_gather_object(votes, ok, group=group)
    return all(bool(v) for v in votes)
