"""The session area of :class:`~cp_copyengine.CopyEngineBuffer`: regions, checks and launches.

``SessionAreaMixin`` holds what the buffer's calls share: the open-session guards, the in-place
views of :meth:`~cp_copyengine.CopyEngineBuffer.get_inplace_tensor`, the planning of a call's
regions against the session budget, the cross-rank agreement on a call, and its launch (with the
reduce-scatter's reduction) on the communication stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from cp_copyengine import knobs
from cp_copyengine._checks import CallChecker
from cp_copyengine.plan import Item, Transfer, align_up, check_shape, nbytes_of
from cp_copyengine.reduction import check_reduce, reduce_shards

__all__ = ["SessionAreaMixin"]

_MAX_VIEWS = 4096
"""Views of the area kept for reuse, at most (the cache starts over beyond)."""


def _is_shape(obj: object) -> bool:
    """Whether ``obj`` is one shape (ints) rather than a sequence of shapes."""
    if isinstance(obj, torch.Size):
        return True
    if not isinstance(obj, Sequence) or isinstance(obj, str):
        return False
    return len(obj) == 0 or all(isinstance(d, int) and not isinstance(d, bool) for d in obj)


class SessionAreaMixin:
    """Session-area internals of ``CopyEngineBuffer``; the host class sets the attributes below."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device
    num_max_session_bytes: int
    num_max_ops_per_session: int
    _backend: Any
    _area: torch.Tensor
    _area_ptr: int
    _area_end: int
    _views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor]
    _checker: CallChecker
    _stream_context: bool
    _comm: torch.cuda.Stream | None
    _fork: torch.cuda.Event | None
    _done: list[torch.cuda.Event]
    _session: int
    _in_session: bool
    _offset: int
    _slot: int
    _destroyed: bool

    def _alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this CopyEngineBuffer was destroyed")

    def _require_session(self, what: str) -> None:
        self._alive()
        if not self._in_session:
            raise RuntimeError(
                f"{what} needs an open session: use 'with buffer.new_session():' or "
                "create_session() first"
            )

    def get_inplace_tensor(
        self, shapes: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Views of this rank's pieces in the next all-gather's outputs, for producing in place.

        Pass the returned tensors, in the same order, as the next :meth:`all_gather` call; their
        self copy is then skipped. Does not take the regions (the all-gather does). Local.

        Args:
            shapes: One shape, or a sequence of shapes (one view each).
            dtype: The dtype of every view.

        Returns:
            One ``shape``/``dtype`` tensor on :attr:`device`, or a tuple of them.

        Raises:
            RuntimeError: No open session.
            TypeError/ValueError: Bad shapes or dtype; the views would exceed the session area.
        """
        self._require_session("get_inplace_tensor()")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        single = _is_shape(shapes)
        if not single and (not isinstance(shapes, Sequence) or isinstance(shapes, str)):
            raise TypeError(f"shapes must be a shape or a sequence of shapes, got {shapes!r}")
        shape_list = [check_shape(shapes)] if single else [check_shape(s) for s in shapes]
        views = []
        offset = self._offset
        for shape in shape_list:
            nbytes = nbytes_of(shape, dtype)
            need = align_up(self.world_size * nbytes)
            self._check_budget(offset + need - self._offset, "get_inplace_tensor()")
            views.append(self._view(offset + self.rank * nbytes, nbytes, dtype, shape))
            offset += need
        return views[0] if single else tuple(views)

    # ---- internals --------------------------------------------------------------------------
    def _view(
        self, start: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """A ``shape``/``dtype`` view of the area at byte ``start``, made once per place.

        Sessions of one program ask for the same places again, so the views are kept (bounded)
        instead of slicing and viewing the area in every call.
        """
        key = (start, dtype, shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._area[start : start + nbytes].view(dtype).view(shape)
            self._views[key] = view
        return view

    def _check_budget(self, need: int, what: str) -> None:
        left = self.num_max_session_bytes - self._offset
        if need > left:
            raise ValueError(
                f"{what} needs {need} bytes of the session area but only {left} of "
                f"num_max_session_bytes={self.num_max_session_bytes} are left ({self._offset} "
                f"taken by {self._slot} earlier calls of session {self._session}): destroy the "
                "session first, or build the buffer with a larger num_max_session_bytes"
            )

    def _plan(self, kind: str, ts: object, op: str = "sum") -> list[Item]:
        if not isinstance(ts, Sequence) or isinstance(ts, str) or len(ts) == 0:
            raise TypeError(f"{kind}() takes a tensor or a non-empty sequence of tensors")
        if self._slot >= self.num_max_ops_per_session:
            raise ValueError(
                f"{kind}() would be call {self._slot + 1} of session {self._session}, but "
                f"num_max_ops_per_session={self.num_max_ops_per_session}: destroy the session "
                "first, or build the buffer with a larger num_max_ops_per_session"
            )
        world = self.world_size
        items = []
        offset = self._offset
        for i, t in enumerate(ts):
            name = f"tensor {i}" if len(ts) > 1 else "the tensor"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{kind}(): {name} is a {type(t).__name__}, not a torch.Tensor")
            if t.device != self.device:
                raise ValueError(
                    f"{kind}(): {name} is on {t.device}, but this buffer's device is {self.device}"
                )
            if not t.is_contiguous():
                raise ValueError(
                    f"{kind}(): {name} (shape {tuple(t.shape)}, stride {t.stride()}) is not "
                    "contiguous; pass t.contiguous()"
                )
            nbytes = t.numel() * t.element_size()
            if kind == "reduce_scatter":
                check_reduce(t.dtype, op)
                if t.dim() == 0 or t.shape[0] % world:
                    raise ValueError(
                        f"reduce_scatter(): {name} has shape {tuple(t.shape)}; its first "
                        f"dimension must be a multiple of the {world} ranks"
                    )
                nbytes //= world
            inplace = False
            ptr = t.data_ptr()
            if kind == "all_gather" and nbytes and self._area_ptr <= ptr < self._area_end:
                want = offset + self.rank * nbytes
                if ptr - self._area_ptr != want:
                    raise ValueError(
                        f"all_gather(): {name} lies in the session area at byte "
                        f"{ptr - self._area_ptr}, but its piece of this call is at byte {want}: "
                        "pass get_inplace_tensor()'s views in the order they were asked for, "
                        "with no other call in between"
                    )
                inplace = True
            region = align_up(world * nbytes)
            self._check_budget(offset + region - self._offset, f"{kind}()")
            items.append(Item(t, offset, nbytes, inplace))
            offset += region
        return items

    def _agree(self, kind: str, ts: object, error: Exception | None, op: str = "") -> None:
        """Raises on every rank when any rank failed or the ranks' calls differ (input checks
        on); else raises only the local error."""
        if not knobs.cp.check_inputs:
            if error is not None:
                raise error
            return
        seq = [ts] if isinstance(ts, torch.Tensor) else ts
        sig: list[object] = []
        if isinstance(seq, Sequence) and not isinstance(seq, str):
            sig = [
                (tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else type(t).__name__
                for t in seq
            ]
        payload = {"call": kind, "op": op, "tensors": sig, "session": self._session}
        payload["call_in_session"] = self._slot
        self._checker.check(kind, payload, error)

    def _launch(self, transfer: Transfer, outs: list[torch.Tensor], op: str = "sum") -> Any:
        """Runs ``transfer`` (and the reduction) on the comm stream; returns its event.

        On CUDA the host work is: one event record and stream wait (the comm stream after the
        current stream), the backend's driver calls, and one event record; the copy-engine
        backend takes the stream as an argument, so only a reduction switches torch's stream.
        """
        for it in transfer.items:
            self._offset = max(self._offset, it.offset + align_up(self.world_size * it.nbytes))
        self._slot += 1
        comm, fork = self._comm, self._fork
        if comm is None or fork is None:
            self._backend.transfer(transfer)
            outs.extend(self._reduce(transfer, op))
            return None
        compute = torch.cuda.current_stream(self.device)
        fork.record(compute)
        comm.wait_event(fork)
        done = self._done[transfer.slot]
        if not self._stream_context and transfer.kind == "all_gather":
            self._backend.transfer(transfer, stream=comm)
            done.record(comm)
        elif not self._stream_context and torch.cuda.current_device() == comm.device_index:
            # The reduction's torch operations go on the comm stream (set_stream also makes
            # its device current, hence only when it is already).
            self._backend.transfer(transfer, stream=comm)
            torch.cuda.set_stream(comm)
            try:
                outs.extend(self._reduce(transfer, op))
            finally:
                torch.cuda.set_stream(compute)
            done.record(comm)
        else:
            with torch.cuda.device(self.device), torch.cuda.stream(comm):
                self._backend.transfer(transfer)
                outs.extend(self._reduce(transfer, op))
                done.record(comm)
        for it in transfer.items:
            if not it.inplace:  # in-place inputs are the area itself, not the allocator's
                it.src.record_stream(comm)
        for o in outs:
            o.record_stream(compute)
        return done

    def _reduce(self, transfer: Transfer, op: str) -> list[torch.Tensor]:
        if transfer.kind != "reduce_scatter":
            return []
        outs = []
        world = self.world_size
        for it in transfer.items:
            shard_shape = (it.src.shape[0] // world, *it.src.shape[1:])
            region = self._area[it.offset : it.offset + world * it.nbytes].view(it.src.dtype)
            shards = list(region.view(world, *shard_shape).unbind(0))
            outs.append(reduce_shards(shards, op))
        return outs
