"""The copy-engine backend: peer-mapped landing slots, stream memory operations, no kernel.

One :class:`ep_jit.PeerMemory` per buffer maps every rank's landing slots into every rank. Rank
``r``'s data region holds ``world_size x num_max_inflight`` slots (slot ``(src, k)`` takes
``src``'s messages ``k, k + inflight, ...``); its signal region holds two 64-bit words per pair
and slot:

* ``full[src][k]`` (written by ``src``): 0 while empty, ``nbytes + 1`` once a message landed;
* ``used[dst][k]`` (written by ``dst``): 1 while this rank's message waits in ``dst``'s slot.

``send(t, dst)``, all on the current stream: wait ``used[dst][k] == 0`` (the credit), set it to
1, copy ``t`` into ``dst``'s slot with a copy engine, write ``full = nbytes + 1`` into ``dst``'s
word. ``recv(out, src)``: wait ``full[src][k] == out.nbytes + 1``, reset it, copy the slot into
``out``, write ``used = 0`` into ``src``'s word. Each wait with the write after it is one
``cuStreamBatchMemOp``, the last signal a ``cuStreamWriteValue64``, the copies ``cuMemcpyAsync``:
no SM is used and everything can be captured in a CUDA graph. The words of a pair and slot never
move, so the two-operation batches are prepared once per ``(peer, slot)`` (an
:class:`ep_jit.MemOpBatch`, built on the first call that uses it); a call only sets the size it
waits for. The flags return to their initial state after each message, so a
captured schedule replays correctly when both ends replay matching schedules (the slot of each
captured call is fixed at capture). A size mismatch never delivers bytes: the receiver's stream
keeps waiting, and :meth:`synchronize` reads the words and raises
:class:`~pp_rdma.errors.PipeSizeMismatchError`.

A stream wait has no timeout. The host bounds it: each eager call records an event, and when
more than ``2 x num_max_inflight`` calls are pending the host waits (bounded) for the oldest;
:meth:`synchronize` and ``destroy`` wait for the stream with the buffer's timeout. When a wait
passes its deadline, the signal words are read on a side stream and the error names the peer,
the sequence number and what is missing (no data, no credit, another size).

No kernel runs here, but the caller's kernels may: CUDA loads a kernel's module lazily, and a
first load behind a pending stream wait synchronises the context, so run every kernel of the
program once before the first ``recv`` (or set ``CUDA_MODULE_LOADING=EAGER``).
"""

from __future__ import annotations

from collections import deque

import torch

from ep_jit.errors import HostTimeoutError
from ep_jit.hostwait import wait_event
from ep_jit.memcpy import memcpy_batch
from ep_jit.peer_memory import PeerMemory
from ep_jit.streamops import MemOp, MemOpBatch, write_value
from pp_rdma._base import PipeConfig
from pp_rdma.errors import PipeError, PipeSizeMismatchError, PipeTimeoutError

__all__ = ["CopyEnginePipe"]

_ALIGN = 256


class CopyEnginePipe:
    """Copy-engine transport over peer-mapped memory (see the module doc)."""

    name = "copy_engine"

    def __init__(self, config: PipeConfig) -> None:
        """Collective: builds the PeerMemory (every rank of one host, CUDA)."""
        self.config = cfg = config
        self._slot = max(_ALIGN, -(-cfg.num_max_tensor_bytes // _ALIGN) * _ALIGN)
        slots = cfg.world_size * cfg.num_max_inflight
        self._mem = PeerMemory(
            cfg.group,
            slots * self._slot,
            cfg.device,
            signal_bytes=2 * 8 * slots,
            timeout_s=cfg.timeout_s,
        )
        self._words = 8 * slots  # offset of the used words in the signal region
        # (event, op, peer, seq, slot, nbytes) of eager calls not yet known to be done.
        self._pending: deque[tuple[torch.cuda.Event, str, int, int, int, int]] = deque()
        # What a diagnosis needs, made now: allocating pinned memory later, while this rank's
        # stream waits in vain, could itself wait for the device and hang the diagnosis.
        self._side = torch.cuda.Stream(cfg.device)
        self._words_host = torch.empty(2 * slots, dtype=torch.int64, pin_memory=True)
        # Prepared flag operations per (peer, slot), index peer * num_max_inflight + k, built on
        # first use (host memory only: nothing here waits for or allocates on the device).
        self._send_ops: list[MemOpBatch | None] = [None] * slots
        self._recv_ops: list[MemOpBatch | None] = [None] * slots

    # ---- addresses ----------------------------------------------------------------------------
    def _k(self, seq: int) -> int:
        return (seq - 1) % self.config.num_max_inflight

    def _data_off(self, src: int, k: int) -> int:
        return (src * self.config.num_max_inflight + k) * self._slot

    def _full(self, owner: int, src: int, k: int) -> int:
        return self._mem.signal_ptrs[owner] + 8 * (src * self.config.num_max_inflight + k)

    def _used(self, owner: int, dst: int, k: int) -> int:
        return (
            self._mem.signal_ptrs[owner]
            + self._words
            + 8 * (dst * self.config.num_max_inflight + k)
        )

    # ---- protocol -----------------------------------------------------------------------------
    def send(self, t: torch.Tensor, dst: int, seq: int) -> None:
        """Enqueues credit wait, claim, copy into ``dst``'s slot and the data signal."""
        me, k = self.config.rank, self._k(seq)
        nbytes = t.numel() * t.element_size()
        i = dst * self.config.num_max_inflight + k
        claim = self._send_ops[i]
        if claim is None:  # wait for the credit, take it: fixed values
            used = self._used(me, dst, k)
            claim = self._send_ops[i] = MemOpBatch(
                [MemOp.wait(used, 0, cond="eq", width=64), MemOp.write(used, 1, width=64)]
            )
        claim.enqueue()
        if nbytes:
            target = self._mem.peer_ptrs[dst] + self._data_off(me, k)
            memcpy_batch([(target, t.data_ptr(), nbytes)])
        write_value(self._full(dst, me, k), nbytes + 1, width=64)
        self._track("send", dst, seq, k, nbytes)

    def recv(self, out: torch.Tensor, src: int, seq: int) -> None:
        """Enqueues the data wait (size included), reset, copy out and the credit."""
        me, k = self.config.rank, self._k(seq)
        nbytes = out.numel() * out.element_size()
        i = src * self.config.num_max_inflight + k
        take = self._recv_ops[i]
        if take is None:  # wait for the data signal of this size, then reset it
            full = self._full(me, src, k)
            take = self._recv_ops[i] = MemOpBatch(
                [MemOp.wait(full, 0, cond="eq", width=64), MemOp.write(full, 0, width=64)]
            )
        # Under graph capture the driver copies the parameters into the captured node, so a
        # later call that sets another size here leaves a captured recv's awaited size as it was.
        take.set_value(0, nbytes + 1)
        take.enqueue()
        if nbytes:
            memcpy_batch(
                [(out.data_ptr(), self._mem.peer_ptrs[me] + self._data_off(src, k), nbytes)]
            )
        write_value(self._used(src, me, k), 0, width=64)
        self._track("recv", src, seq, k, nbytes)

    # ---- host-side bounds ---------------------------------------------------------------------
    def _track(self, op: str, peer: int, seq: int, k: int, nbytes: int) -> None:
        if torch.cuda.is_current_stream_capturing():
            return  # replays are bounded by the caller's synchronisation
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, op, peer, seq, k, nbytes))
        while self._pending and self._pending[0][0].query():
            self._pending.popleft()
        if len(self._pending) > 2 * self.config.num_max_inflight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        event, op, peer, seq = self._pending[0][:4]
        try:
            wait_event(event, f"{op} #{seq} (rank {peer})", self.config.timeout_s)
        except HostTimeoutError:
            raise self._diagnose() from None
        self._pending.popleft()

    def _read_words(self) -> list[int]:
        """This rank's signal words and the peers' words about this rank, read on a side stream.

        Returns the local region as a list (``full`` words, then ``used`` words).
        """
        words = self._mem.signal_local[: 2 * self._words].view(torch.int64)
        host = self._words_host
        with torch.cuda.stream(self._side):
            host.copy_(words, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        wait_event(done, "reading the pipe's signal words", 10.0)
        return [int(v) for v in host.tolist()]

    def _diagnose(self) -> PipeError:
        """The first stuck call of this rank, explained from the signal words."""
        cfg = self.config
        inflight = cfg.num_max_inflight
        try:
            words = self._read_words()
        except Exception:  # the explanation is a courtesy; the timeout is the news
            words = []
        while self._pending and self._pending[0][0].query():
            self._pending.popleft()
        if not self._pending:
            return PipeTimeoutError("recv", -1, 0, "the CUDA stream did not drain", cfg.timeout_s)
        _, op, peer, seq, k, nbytes = self._pending[0]
        if op == "recv":
            value = words[peer * inflight + k] if words else -1
            if value > 0 and value != nbytes + 1:
                return PipeSizeMismatchError("recv", peer, seq, value - 1, nbytes)
            detail = f"no data arrived from rank {peer} (slot {k}, signal word {value})"
        else:
            value = words[cfg.world_size * inflight + peer * inflight + k] if words else -1
            detail = (
                f"{inflight} sends are in flight and rank {peer} has not received send "
                f"#{max(seq - inflight, 1)} (slot {k} still full, credit word {value}): it "
                "stopped receiving, died, or receives into a tensor of another size"
            )
        return PipeTimeoutError(op, peer, seq, detail, cfg.timeout_s)

    def synchronize(self) -> None:
        """Waits (bounded) for the current stream; names the stuck call when it does not drain."""
        event = torch.cuda.Event()
        event.record()
        try:
            wait_event(event, "the pipe's queued transfers", self.config.timeout_s)
        except HostTimeoutError:
            raise self._diagnose() from None
        self._pending.clear()

    def destroy(self, collective: bool) -> None:
        """Collective: frees the peer memory (after a peer failure the mapping is left)."""
        self._pending.clear()
        if collective:
            self._mem.destroy()
