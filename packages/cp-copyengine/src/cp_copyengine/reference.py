"""The reference backend: the same sessions over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

It keeps the session area as an ordinary tensor and fills it with ``dist.all_gather`` (an
all-gather's pieces) and ``dist.all_to_all_single`` (a reduce-scatter's shards), moving raw
bytes, so every dtype travels unchanged. Its results define what the copy-engine backend must
produce, bit for bit. On a CUDA device with a group that has no NCCL (ranks sharing one GPU over
gloo), the bytes are staged through host memory. Where the collectives block the host (CPU
tensors over gloo) they are ep-jit's bounded all-to-alls: a peer that never joins a call raises
:class:`~ep_jit.errors.HostTimeoutError` after ``timeout_s`` instead of gloo's own limit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_copyengine.plan import Transfer
from ep_jit.rows import all_to_all_uneven, collective_timeout

__all__ = ["TorchBackend"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a 1-D uint8 view."""
    return t.reshape(-1).view(torch.uint8)


class TorchBackend:
    """Session data movement over ``torch.distributed``; see the module docstring.

    Args:
        group: The process group.
        session_bytes: Bytes of the session area.
        max_ops: Calls per session (unused here: no flags).
        device: Where the session area lives.
        timeout_s: Limit of the host wait of each collective that blocks the host (CPU tensors
            over gloo); ``<= 0``: gloo's own limit. NCCL collectives are stream-ordered.
    """

    name = "torch"
    needs_stream_context = True
    """Runs torch operations, so the caller makes the communication stream current."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        session_bytes: int,
        max_ops: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.area = torch.empty(session_bytes, dtype=torch.uint8, device=device)
        backend = str(dist.get_backend(group)).lower()
        self._stage = device.type == "cuda" and "nccl" not in backend
        self._host = device.type == "cpu" or self._stage
        self.timeout_s = timeout_s

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup,
        session_bytes: int,
        max_ops: int,
        device: torch.device,
        timeout_s: float,
    ) -> TorchBackend:
        """The backend factory the registry calls."""
        return cls(group, session_bytes, max_ops, device, timeout_s)

    def transfer(self, t: Transfer) -> None:
        """Runs one call (blocking on CPU; on the current stream on CUDA)."""
        world = self.world_size
        for item in t.items:
            if item.nbytes == 0:
                continue
            region = self.area[item.offset : item.offset + world * item.nbytes]
            src = _bytes(item.src)
            if t.kind == "all_gather" and item.inplace:
                src = src.clone()  # an input that aliases its own output piece
            if self._stage:
                out = torch.empty(region.numel(), dtype=torch.uint8)
                self._move(t.kind, out, src.cpu(), item.nbytes)
                region.copy_(out)
            else:
                self._move(t.kind, region, src, item.nbytes)

    def _move(self, kind: str, out: torch.Tensor, src: torch.Tensor, nbytes: int) -> None:
        world = self.world_size
        if self._host:
            # One bounded all-to-all: an all-gather sends its bytes to every rank, a
            # reduce-scatter its shard p to rank p; the pieces arrive in rank order.
            if kind == "all_gather":
                send = src.view(1, nbytes).expand(world, nbytes)
            else:
                send = src.view(world, nbytes)
            with collective_timeout(self.timeout_s):
                got = all_to_all_uneven(send, [1] * world, [1] * world, self.group)
            out.view(world, nbytes).copy_(got)
            return
        if kind == "all_gather":
            dist.all_gather(list(out.view(self.world_size, nbytes).unbind(0)), src, self.group)
        else:
            dist.all_to_all_single(out, src, group=self.group)

    def end_session(self, session: int) -> None:
        """Nothing to fence: the collectives completed in order."""

    def destroy(self) -> None:
        """Drops the session area."""
        self.area = torch.empty(0, dtype=torch.uint8, device=self.device)
