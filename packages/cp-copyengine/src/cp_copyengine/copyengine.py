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
3. one ``cuStreamBatchMemOp``: write ``s`` into arrival word ``[k][r]`` of every peer (after
   the copies: the write carries a memory barrier), then wait until arrival words ``[k][p]``
   here are at least ``s`` for every peer ``p``. A rank's own words are neither written nor
   awaited: its own copies are ordered by its stream.

Ending session ``s`` writes ``s`` into session-end word ``[r]`` of every peer, after the
communication stream waited for the compute stream (which issued the reads of the outputs).
No kernel runs on this path; reduce-scatter's reduction runs afterwards as torch operations.

Every address is computed once, at construction, and so are the driver parameters of every
flag operation: one prepared :class:`ep_jit.MemOpBatch` for the fence, one per slot for the
arrival flags and one for the session end. A call builds only its copy list, sets the session's
number into its batches (the only thing that changes) and issues two or three driver calls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_copyengine.plan import Transfer
from ep_jit import PeerMemory
from ep_jit.memcpy import memcpy_batch
from ep_jit.streamops import MemOp, MemOpBatch

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
    needs_stream_context = False
    """Calls and session ends take their stream as an argument (driver calls only)."""

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
        self._build_tables()

    def _build_tables(self) -> None:
        """The addresses every call uses, computed once (peers in the order ``r+1, r+2, ...``)."""
        world, rank = self.world_size, self.rank
        self._peers = [(rank + i) % world for i in range(1, world)]
        self._order = [rank, *self._peers]
        self._fence_addrs = [self._end(rank, p) for p in self._peers]
        self._end_addrs = [self._end(p, rank) for p in self._peers]
        self._peer_bases = [self.memory.peer_ptrs[p] for p in self._order]
        # Arrival word [k][src] of a rank sits at its signal region + 4 * (k * R + src).
        self._arrive_out = [self._arrival(p, 0, rank) for p in self._peers]
        self._arrive_in = [self._arrival(rank, 0, p) for p in self._peers]
        # The flag operations, prepared once (building the driver's parameters costs far more
        # host time than setting a value); a call only sets the session's number. One rank
        # alone has no peer, so no flag at all.
        self._fence: MemOpBatch | None = None
        self._session_end: MemOpBatch | None = None
        self._arrivals: list[MemOpBatch] = []
        if self._peers:
            self._fence = MemOpBatch([MemOp.wait(a, 0) for a in self._fence_addrs])
            self._session_end = MemOpBatch([MemOp.write(a, 0) for a in self._end_addrs])
            self._arrivals = [MemOpBatch(self._arrival_ops(k)) for k in range(self.max_ops)]

    def _arrival_ops(self, slot: int) -> list[MemOp]:
        """Write into arrival word ``[slot][r]`` of every peer, then wait for theirs (the
        values, the session's number, are set per call)."""
        step = 4 * slot * self.world_size
        ops = [MemOp.write(a + step, 0) for a in self._arrive_out]
        ops += [MemOp.wait(a + step, 0) for a in self._arrive_in]
        return ops

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

    @staticmethod
    def _enqueue(batch: MemOpBatch, epoch: int, stream: torch.cuda.Stream | None) -> None:
        """Enqueues ``batch`` with every operation's value set to ``epoch`` (a 32-bit word)."""
        for i in range(len(batch.ops)):
            batch.set_value(i, epoch)
        batch.enqueue(stream)

    def transfer(self, t: Transfer, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueues one call on ``stream`` (default: the current stream; asynchronous)."""
        rank = self.rank
        if t.slot == 0 and t.session > 1 and self._fence is not None:
            self._enqueue(self._fence, (t.session - 1) & 0xFFFFFFFF, stream)
        scatter = t.kind == "reduce_scatter"
        pieces = [
            (it.offset + rank * it.nbytes, it.src.data_ptr(), it.nbytes, it.inplace)
            for it in t.items
            if it.nbytes
        ]
        copies: list[tuple[int, int, int]] = []
        for p, base in zip(self._order, self._peer_bases, strict=True):
            for offset, src, n, inplace in pieces:
                if p == rank and inplace:
                    continue
                copies.append((base + offset, src + p * n if scatter else src, n))
        self.last_copy_mode = memcpy_batch(copies, stream=stream, batched=self.batched)
        if self._arrivals:
            self._enqueue(self._arrivals[t.slot], t.session & 0xFFFFFFFF, stream)

    def end_session(self, session: int, stream: torch.cuda.Stream | None = None) -> None:
        """Tells every peer that this rank is done reading its area in ``session``."""
        if self._session_end is not None:
            self._enqueue(self._session_end, session & 0xFFFFFFFF, stream)

    def destroy(self) -> None:
        """Collective: drains the current stream, meets every rank, unmaps (PeerMemory.destroy)."""
        self.memory.destroy()
