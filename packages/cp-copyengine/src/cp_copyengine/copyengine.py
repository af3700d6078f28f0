"""The copy-engine backend: peer copies into every rank's session area, stream-memory-op flags.

The session area is the data region of an ep-jit :class:`~ep_jit.PeerMemory` (every rank's
GPU segment mapped into every rank; ranks may share one GPU). Its signal region holds, per rank,
``[num_max_ops_per_session][R]`` arrival words and ``[R]`` session-end words, all 32-bit and never
reset: each is written with the session's number, which only grows.

One call of session ``s``, slot ``k``, on rank ``r`` (everything on the communication stream):

1. first call of a session ``s > 1`` only: wait until every peer's session-end word here is at
   least ``s - 1``, i.e. every peer has finished reading its area in the previous session, so
   overwriting it is safe;
2. the copies: for every tensor and every rank ``p`` (starting at ``r``, so ranks spread over
   the peers), ``src -> area_p[offset + r * nbytes]`` (an all-gather sends its tensor, a
   reduce-scatter its shard ``p``); the self copy of an in-place tensor is skipped. One
   ``cuMemcpyBatchAsync`` (``ep_jit.memcpy``) where the driver has it: copy engines, no kernel;
3. one ``cuStreamBatchMemOp``: write ``s`` into arrival word ``[k][r]`` of every rank (after
   the copies: the write carries a memory barrier), then wait until arrival words ``[k][p]``
   here are at least ``s`` for every ``p``.

Ending session ``s`` writes ``s`` into session-end word ``[r]`` of every rank, after the
communication stream waited for the compute stream (which issued the reads of the outputs).
No kernel runs on this path; reduce-scatter's reduction runs afterwards as torch operations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_copyengine.plan import Transfer
from ep_jit import PeerMemory
from ep_jit.memcpy import memcpy_batch
from ep_jit.streamops import MemOp, batch_mem_ops

__all__ = ["CopyEngineBackend"]


class CopyEngineBackend:
    """Session data movement on the copy engines; see the module docstring.

    Collective to build (maps every rank's memory). The session area is
    :attr:`area` (``[session_bytes]`` uint8 on this rank's GPU).

    Args:
        group: The process group (all ranks on one host, one NVLink domain or one GPU).
        session_bytes: Bytes of the session area.
        max_ops: Arrival-flag slots per session.
        device: This rank's CUDA device.
        timeout_s: Limit of PeerMemory's host waits and barrier.
    """

    name = "copyengine"

    def __init__(
        self,
        group: dist.ProcessGroup,
        session_bytes: int,
        max_ops: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device
        self.max_ops = max_ops
        world = self.world_size
        signal_bytes = 4 * (max_ops * world + world)
        self.memory = PeerMemory(
            group, session_bytes, device, signal_bytes=signal_bytes, timeout_s=timeout_s
        )
        self.area = self.memory.local
        self._end_words = 4 * max_ops * world
        self.last_copy_mode = "none"
        self.batched: bool | None = None
        """``None``: one ``cuMemcpyBatchAsync`` where available; ``False``: a copy per call."""

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup,
        session_bytes: int,
        max_ops: int,
        device: torch.device,
        timeout_s: float,
    ) -> CopyEngineBackend:
        """The backend factory the registry calls."""
        return cls(group, session_bytes, max_ops, device, timeout_s)

    def _arrival(self, peer: int, slot: int, src: int) -> int:
        return self.memory.signal_ptrs[peer] + 4 * (slot * self.world_size + src)

    def _end(self, peer: int, src: int) -> int:
        return self.memory.signal_ptrs[peer] + self._end_words + 4 * src

    def transfer(self, t: Transfer) -> None:
        """Enqueues one call on the current stream (asynchronous)."""
        world, rank = self.world_size, self.rank
        ptrs = self.memory.peer_ptrs
        if t.slot == 0 and t.session > 1 and world > 1:
            prev = (t.session - 1) & 0xFFFFFFFF
            fence = [MemOp.wait(self._end(rank, p), prev) for p in range(world) if p != rank]
            batch_mem_ops(fence)
        copies: list[tuple[int, int, int]] = []
        for i in range(world):
            p = (rank + i) % world
            for item in t.items:
                if item.nbytes == 0 or (p == rank and item.inplace):
                    continue
                src = item.src.data_ptr()
                if t.kind == "reduce_scatter":
                    src += p * item.nbytes
                copies.append((ptrs[p] + item.offset + rank * item.nbytes, src, item.nbytes))
        self.last_copy_mode = memcpy_batch(copies, batched=self.batched)
        epoch = t.session & 0xFFFFFFFF
        ops = [MemOp.write(self._arrival(p, t.slot, rank), epoch) for p in range(world)]
        ops += [MemOp.wait(self._arrival(rank, t.slot, p), epoch) for p in range(world)]
        batch_mem_ops(ops)

    def end_session(self, session: int) -> None:
        """Tells every rank that this rank is done reading its area in ``session``."""
        epoch = session & 0xFFFFFFFF
        batch_mem_ops([MemOp.write(self._end(p, self.rank), epoch) for p in range(self.world_size)])

    def destroy(self) -> None:
        """Collective: drains the current stream, meets every rank, unmaps (PeerMemory.destroy)."""
        self.memory.destroy()
