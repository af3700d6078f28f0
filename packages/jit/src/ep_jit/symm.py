"""Symmetric (peer-mapped) GPU memory over ``torch.distributed._symmetric_memory``.

``SymmetricBuffer`` allocates it; ``is_single_nvlink_domain`` says whether a group can use it.

This is the only module of the project that touches torch's private symmetric-memory API; it
uses calls present in torch 2.11 through 2.13 (CUDA backend, no multicast). Every rank of a
group allocates the same number of bytes; each rank can then read and write every peer's
buffer through plain device pointers (``peer_ptrs``) over NVLink, or through copy engines.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ep_jit import knobs
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.peer_memory import PeerMemory, PeerViews, _numel
from ep_jit.topology import topology

__all__ = ["SymmetricBuffer", "is_single_nvlink_domain", "peer_memory"]

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


class SymmetricBuffer(PeerViews):
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

    def peer_tensor(
        self, peer: int, offset: int, shape: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A view of ``peer``'s data region (device memory of another GPU, mapped here).

        Copies into it (``peer_tensor(...).copy_(src)``) write the peer's memory directly.

        Raises:
            ValueError: ``peer`` out of range, misaligned ``offset`` or a view past the end.
        """
        handle = self._alive()
        self._check_peer(peer)
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = _numel(shape)
        self._check_range(offset, numel * itemsize, itemsize)
        view: torch.Tensor = handle.get_buffer(peer, [numel], dtype, offset // itemsize)
        return view.view(tuple(shape))

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


def is_single_nvlink_domain(group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank of ``group`` can load and store every other rank's GPU memory.

    True when all ranks run on one host on CUDA devices that are the same device or have peer
    access between every pair (NVLink or NVSwitch on the machines we target; several ranks on
    one GPU also qualify). False on CPU-only ranks. Collective (see :func:`ep_jit.topology`).

    Args:
        group: Process group (default: the world).

    Returns:
        The same bool on every rank.
    """
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    return topology(group, dev, ranks_per_node=0).single_nvlink_domain


def peer_memory(
    group: dist.ProcessGroup | None,
    nbytes: int,
    device: torch.device | int | str | None = None,
    *,
    signal_bytes: int = 4096,
    host_bytes: int = 0,
    timeout_s: float | None = None,
) -> SymmetricBuffer | PeerMemory:
    """Peer-mapped memory on the path this group should use; collective.

    ``EP_JIT_PEER_MEMORY`` picks: ``vmm`` (:class:`PeerMemory`), ``torch``
    (:class:`SymmetricBuffer`), or ``auto``: torch's symmetric memory where every rank has a GPU
    of its own and no host segment is asked for (the path verified across GPUs), else
    :class:`PeerMemory` (ranks sharing a GPU, gloo groups, host segments). The ranks agree on
    the choice first, so a knob set differently on one rank fails on every rank.

    Args: as :class:`PeerMemory` (``host_bytes`` and ``timeout_s`` need the vmm path).

    Raises:
        ValueError: Ranks chose different paths, or ``torch`` was forced where it cannot serve.
    """
    group = group if group is not None else dist.group.WORLD
    assert group is not None
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    topo = topology(group, dev, ranks_per_node=0)
    nccl = "nccl" in str(dist.get_backend(group)).lower()
    wanted = knobs.jit.peer_memory
    path, error = wanted, None
    if wanted == "auto":
        path = "torch" if nccl and not topo.shares_gpu and not host_bytes else "vmm"
    elif wanted == "torch" and (topo.shares_gpu or host_bytes or not nccl):
        error = ValueError(
            "EP_JIT_PEER_MEMORY=torch cannot serve this group: torch's symmetric memory needs an "
            "NCCL group with one GPU per rank and has no host segments"
        )
    choice = gather_checked(
        group, {"peer memory path": path}, error, what="peer memory", device=dev
    )
    check_agreement(choice, "peer memory")
    if path == "torch":
        return SymmetricBuffer(group, nbytes, device=dev, signal_bytes=signal_bytes)
    return PeerMemory(
        group, nbytes, dev, signal_bytes=signal_bytes, host_bytes=host_bytes, timeout_s=timeout_s
    )
