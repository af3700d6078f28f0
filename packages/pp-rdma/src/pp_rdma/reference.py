"""The reference backend: ``torch.distributed`` isend/irecv (gloo on CPU, NCCL on GPUs).

Every message is a 16-byte header ``int64[2] = (seq, nbytes)`` followed by the payload (none for
zero bytes), both on the same pair in order, so a receiver checks the sequence number and the
size before it touches ``out``. A size mismatch still drains the payload (into a scratch tensor),
so the pair stays aligned, then raises :class:`~pp_rdma.errors.PipeSizeMismatchError` on the
receiver; the sender cannot learn of it here (it has no channel back that keeps NCCL's
per-pair ordering).

Credits: a send is unreceived while its isend has not completed. On gloo an isend completes only
once the receiver posted the matching irecv, so "at most ``num_max_inflight`` unreceived sends"
is exact; NCCL completes small sends once they sit in its buffers, so there the limit counts
sends NCCL has not yet finished. Waits are bounded by the buffer's timeout: on gloo with
``work.wait(timeout)`` (gloo marks point-to-point work complete only inside ``wait``; a wait
that times out closes gloo's connection to that peer, so the pair cannot be used afterwards),
on NCCL by polling ``is_completed()``. On a gloo group whose ranks use CUDA tensors (ranks
sharing a GPU), payloads are staged through host memory, since gloo's send/recv take CPU
tensors.
"""

from __future__ import annotations

import contextlib
import datetime
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from ep_jit.errors import HostTimeoutError
from ep_jit.hostwait import wait_until
from pp_rdma._base import PipeConfig, byte_view
from pp_rdma.errors import PipePeerError, PipeSizeMismatchError, PipeTimeoutError

__all__ = ["TorchPipe"]

_TAG = 0x5050  # one tag for headers and payloads: gloo matches per tag in post order


class TorchPipe:
    """Reference transport over ``torch.distributed`` point-to-point calls (see the module doc)."""

    name = "torch"

    def __init__(self, config: PipeConfig) -> None:
        """Local only; no collective is needed (the process group is already connected)."""
        self.config = config
        backend = dist.get_backend(config.group)
        self._staged = config.device.type == "cuda" and "nccl" not in str(backend)
        self._wire = torch.device("cpu") if self._staged else config.device
        self._gloo = "nccl" not in str(backend)
        # Per destination: (seq, works, tensors kept alive until the works complete).
        self._pending: dict[int, deque[tuple[int, list[Any], list[torch.Tensor]]]] = {
            p: deque() for p in config.peers
        }

    # ---- helpers ------------------------------------------------------------------------------
    def _wait(self, work: Any, op: str, peer: int, seq: int, detail: str) -> None:
        if self._gloo:
            limit = datetime.timedelta(seconds=self.config.timeout_s)
            try:
                work.wait(limit)
            except RuntimeError as exc:
                if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                    raise PipeTimeoutError(op, peer, seq, detail, self.config.timeout_s) from exc
                raise PipePeerError(op, peer, seq, f"the transport failed: {exc}") from exc
            return

        def done() -> bool:
            try:
                return bool(work.is_completed())
            except RuntimeError as exc:
                raise PipePeerError(op, peer, seq, f"the transport failed: {exc}") from exc

        try:
            wait_until(done, detail, self.config.timeout_s)
        except HostTimeoutError:
            raise PipeTimeoutError(op, peer, seq, detail, self.config.timeout_s) from None
        try:
            work.wait()
        except RuntimeError as exc:
            raise PipePeerError(op, peer, seq, f"the transport failed: {exc}") from exc

    def _post(self, fn: Any, t: torch.Tensor, op: str, peer: int, seq: int) -> Any:
        """``dist.isend``/``dist.irecv``; a connection the peer closed raises at posting."""
        try:
            if fn is dist.isend:
                return dist.isend(t, group=self.config.group, group_dst=peer, tag=_TAG)
            return dist.irecv(t, group=self.config.group, group_src=peer, tag=_TAG)
        except RuntimeError as exc:
            raise PipePeerError(op, peer, seq, f"the transport failed: {exc}") from exc

    def _reap(self, dst: int) -> None:
        if self._gloo:
            return  # gloo completes point-to-point work only inside wait()
        queue = self._pending[dst]
        while queue and all(w.is_completed() for w in queue[0][1]):
            for w in queue.popleft()[1]:
                w.wait()

    # ---- protocol -----------------------------------------------------------------------------
    def send(self, t: torch.Tensor, dst: int, seq: int) -> None:
        """Posts header and payload; first waits (bounded) while ``dst`` holds too many sends."""
        cfg = self.config
        self._reap(dst)
        queue = self._pending[dst]
        if len(queue) >= cfg.num_max_inflight:
            old_seq, works, _ = queue[0]
            detail = (
                f"{cfg.num_max_inflight} sends are in flight and rank {dst} has not received "
                f"send #{old_seq} (it stopped receiving or died)"
            )
            for w in works:
                self._wait(w, "send", dst, seq, detail)
            queue.popleft()
            self._reap(dst)
        nbytes = t.numel() * t.element_size()
        header = torch.tensor([seq, nbytes], dtype=torch.int64, device=self._wire)
        tensors = [header]
        works = [self._post(dist.isend, header, "send", dst, seq)]
        if nbytes:
            payload = byte_view(t)
            if self._staged:
                payload = payload.to("cpu")
            tensors.append(payload)
            works.append(self._post(dist.isend, payload, "send", dst, seq))
        queue.append((seq, works, tensors))

    def recv(self, out: torch.Tensor, src: int, seq: int) -> None:
        """Waits (bounded) for the header, checks it, then receives the payload into ``out``."""
        header = torch.empty(2, dtype=torch.int64, device=self._wire)
        work = self._post(dist.irecv, header, "recv", src, seq)
        self._wait(work, "recv", src, seq, f"no message #{seq} arrived from rank {src}")
        got_seq, nbytes = (int(v) for v in header.tolist())
        if got_seq != seq:
            raise PipePeerError(
                "recv", src, seq, f"the pair is out of step: message #{got_seq} arrived"
            )
        expected = out.numel() * out.element_size()
        target = byte_view(out) if nbytes == expected else None
        if nbytes:
            landing = torch.empty(nbytes, dtype=torch.uint8, device=self._wire)
            if target is not None and not self._staged:
                landing = target
            work = self._post(dist.irecv, landing, "recv", src, seq)
            self._wait(work, "recv", src, seq, f"the payload of message #{seq} did not arrive")
            if target is not None and landing is not target:
                target.copy_(landing)
        if target is None:
            raise PipeSizeMismatchError("recv", src, seq, nbytes, expected)

    def synchronize(self) -> None:
        """Reaps completed sends; nothing waits for the receivers here."""
        for dst in self._pending:
            self._reap(dst)

    def destroy(self, collective: bool) -> None:
        """Completes and drops the send handles.

        After the ranks met (``collective``) every peer has received what was sent, so waiting
        on the handles ends at once; it lets gloo finish with their tensors before they are
        freed, instead of leaving that to its worker threads at interpreter exit. After a failure
        the handles are dropped without waiting.
        """
        pending, self._pending = self._pending, {p: deque() for p in self._pending}
        if not collective:
            return
        limit = datetime.timedelta(seconds=self.config.timeout_s)
        for queue in pending.values():
            for _, works, _ in queue:
                for w in works:
                    with contextlib.suppress(RuntimeError):
                        if self._gloo:
                            w.wait(limit)
                        else:
                            w.wait()
