"""What every backend of :class:`~pp_rdma.PipeBuffer` receives and implements.

A backend serves some peers of this rank (``config.peers``); :class:`~pp_rdma.PipeBuffer` counts
the sequence numbers of every directed pair and passes them in, so all backends share one
numbering (from 1) and one error vocabulary (:mod:`pp_rdma.errors`). Constructors and
``destroy`` are collective over the whole group, also on ranks that use the backend for no peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

__all__ = ["PipeBackend", "PipeConfig", "byte_view"]


@dataclass(frozen=True)
class PipeConfig:
    """The settings a backend is built with (the same on every rank but ``rank``/``peers``).

    Attributes:
        group: The process group of the buffer.
        rank: This rank in ``group``.
        world_size: Ranks in ``group``.
        peers: The ranks this backend carries traffic to and from, for this rank.
        num_max_tensor_bytes: Largest message in bytes.
        num_max_inflight: Unreceived sends allowed per directed pair.
        timeout_s: Limit of every wait (a send blocked on credits, a recv waiting for data).
        device: This rank's device (``cpu`` or a CUDA device).
    """

    group: dist.ProcessGroup
    rank: int
    world_size: int
    peers: tuple[int, ...]
    num_max_tensor_bytes: int
    num_max_inflight: int
    timeout_s: float
    device: torch.device


class PipeBackend(Protocol):
    """One transport of :class:`~pp_rdma.PipeBuffer`."""

    name: str

    def send(self, t: torch.Tensor, dst: int, seq: int) -> None:
        """Sends contiguous ``t`` as message ``seq`` of the pair (this rank -> ``dst``)."""

    def recv(self, out: torch.Tensor, src: int, seq: int) -> None:
        """Receives message ``seq`` of the pair (``src`` -> this rank) into contiguous ``out``."""

    def synchronize(self) -> None:
        """Bounded wait until this rank's queued transfers are handed over; raises failures."""

    def destroy(self, collective: bool) -> None:
        """Frees everything; meets the other ranks first when ``collective``."""


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) as a flat ``uint8`` tensor sharing its storage."""
    return t.reshape(-1).view(torch.uint8)
