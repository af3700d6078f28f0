"""``CopyEngineBuffer``: sessions of all-gathers and reduce-scatters into a preallocated area.

A session hands out regions of the buffer's session area in call order. Every call
(``all_gather`` or ``reduce_scatter``) takes one region per tensor and returns at once with a
handle; calling the handle makes the current stream wait for the data. An all-gather's outputs
are views of the session area, valid until the session ends; ending a session lets the next
one reuse the whole area::

    buf = CopyEngineBuffer(group, num_max_session_bytes=256 << 20)
    with buf.new_session():
        k_slot = buf.get_inplace_tensor(k.shape, k.dtype)  # produce K in place
        k_slot.copy_(k)
        (k_all, v_all), handle = buf.all_gather([k_slot, v])
        ...  # overlap: compute that does not need k_all / v_all
        handle()
        use(k_all, v_all)  # [R, *shape] each
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cp_copyengine import knobs
from cp_copyengine._checks import CallChecker
from cp_copyengine._session_area import SessionAreaMixin
from cp_copyengine.factory import resolve_backend
from cp_copyengine.handle import GatherHandle
from cp_copyengine.plan import Item, Transfer
from cp_copyengine.reduction import warm_up
from ep_jit import knobs as jit_knobs
from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.hostwait import timeout_seconds, wait_stream
from ep_jit.streams import get_comm_stream
from ep_jit.topology import resolve_device

__all__ = ["MAX_OPS_PER_SESSION", "CopyEngineBuffer", "GatherHandle"]

MAX_OPS_PER_SESSION = 1024
"""Upper limit of ``num_max_ops_per_session``."""


class CopyEngineBuffer(SessionAreaMixin):
    """All-gather and reduce-scatter in sessions, on the copy engines or the reference.

    Collective to build: every rank of ``group`` constructs it with the same arguments.

    Args:
        group: The process group (default: the world). The copy-engine backend needs every
            rank on one host, on GPUs of one NVLink domain or on one shared GPU.
        num_max_session_bytes: Bytes of the session area: the sum, over a session's calls and
            tensors, of ``align(R * nbytes, 32)`` (see :func:`cp_copyengine.session_bytes_hint`).
        num_max_ops_per_session: Calls per session (``all_gather``/``reduce_scatter``, a batched
            call counts once), 1..1024.
        backend: ``"auto"`` (``EP_CP_BACKEND``, by default the copy engines where they can
            serve, else the reference), ``"copyengine"`` or ``"torch"``.
        device: The rank's device; default the current CUDA device, or CPU without CUDA.
        timeout_s: Limit of host waits in seconds; default ``EP_JIT_HOST_TIMEOUT_S``; ``<= 0``:
            none.

    Attributes:
        backend: The backend's name (``"copyengine"`` or ``"torch"``), the same on every rank.
        rank, world_size: This rank and ``R``.
        device: Where inputs and outputs live.

    Raises:
        ValueError/TypeError: Bad arguments, or ranks that disagree (on every rank).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_max_session_bytes: int,
        num_max_ops_per_session: int = 32,
        backend: str = "auto",
        *,
        device: torch.device | str | int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Checks the arguments on every rank, picks the backend and builds it (collective)."""
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD  # type: ignore[assignment]
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.timeout_s = float(jit_knobs.jit.host_timeout_s)
        self._destroyed = True
        error: Exception | None = None
        dev = torch.device("cpu")
        requested = backend
        try:
            if timeout_s is not None:
                self.timeout_s = timeout_seconds(timeout_s)
            dev = resolve_device(device, what="CopyEngineBuffer")
            _check_int("num_max_session_bytes", num_max_session_bytes, 1, None)
            _check_int("num_max_ops_per_session", num_max_ops_per_session, 1, MAX_OPS_PER_SESSION)
            if backend not in knobs.BACKEND_CHOICES:
                raise ValueError(f"backend must be one of {knobs.BACKEND_CHOICES}, got {backend!r}")
            # EP_CP_BACKEND is checked here too, so a bad value on one rank fails on every rank.
            requested = knobs.cp.backend if backend == "auto" else backend
        except (ValueError, TypeError) as exc:
            error = exc
        config = {
            "num_max_session_bytes": num_max_session_bytes,
            "num_max_ops_per_session": num_max_ops_per_session,
            "backend": requested,
        }
        gathered = gather_checked(
            self.group,
            {**config, "cuda": dev.type == "cuda"},
            error,
            what="CopyEngineBuffer",
            device=dev,
        )
        check_agreement([{k: g[k] for k in config} for g in gathered], "CopyEngineBuffer")
        all_cuda = all(g["cuda"] for g in gathered)
        spec = resolve_backend(str(requested), self.group, all_cuda)
        chosen = gather_checked(
            self.group, {"backend": spec.name}, None, what="CopyEngineBuffer", device=dev
        )
        check_agreement(chosen, "CopyEngineBuffer backend choice")
        self.device = dev
        self.num_max_session_bytes = int(num_max_session_bytes)
        self.num_max_ops_per_session = int(num_max_ops_per_session)
        if dev.type == "cuda":
            # Load every kernel this package launches before any stream waits on a flag (see
            # docs: a first kernel load behind a pending stream wait blocks the process).
            with torch.cuda.device(dev):
                warm_up(dev)
                with torch.cuda.stream(get_comm_stream(dev)):
                    warm_up(dev)
                torch.cuda.synchronize(dev)
        self._backend: Any = spec.build(
            self.group,
            self.num_max_session_bytes,
            self.num_max_ops_per_session,
            dev,
            self.timeout_s,
        )
        self.backend: str = spec.name
        self._area: torch.Tensor = self._backend.area
        self._area_ptr = self._area.data_ptr()
        self._area_end = self._area_ptr + self._area.numel()
        self._views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
        self._checker = CallChecker(self.group, dev, self.timeout_s)
        self._stream_context = bool(getattr(self._backend, "needs_stream_context", True))
        if dev.type == "cuda":
            # Made once: a call records a reused fork event and its slot's completion event
            # (a handle of an ended session never waits, so slot events can be re-recorded).
            self._comm: torch.cuda.Stream | None = get_comm_stream(dev)
            self._fork: torch.cuda.Event | None = torch.cuda.Event()
            self._done = [torch.cuda.Event() for _ in range(self.num_max_ops_per_session)]
        else:
            self._comm, self._fork, self._done = None, None, []
        self._session = 0
        self._in_session = False
        self._offset = 0
        self._slot = 0
        self._destroyed = False

    # ---- state ------------------------------------------------------------------------------
    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` ran."""
        return self._destroyed

    @property
    def in_session(self) -> bool:
        """Whether a session is open."""
        return self._in_session

    @property
    def session_index(self) -> int:
        """Number of sessions created so far (the open or last session's number)."""
        return self._session

    @property
    def session_bytes_used(self) -> int:
        """Bytes of the session area taken by the open session's calls."""
        return self._offset

    @property
    def session_calls(self) -> int:
        """Calls (``all_gather``/``reduce_scatter``) made in the open session."""
        return self._slot

    # ---- sessions ---------------------------------------------------------------------------
    def create_session(self) -> None:
        """Opens a session: its calls take regions of the session area from the start.

        Local (no communication). Every rank opens and ends its sessions in the same order. On
        CUDA the current stream waits for the communication stream, so in-place writes of the
        new session come after the last session's data landed.

        Raises:
            RuntimeError: A session is already open, or the buffer was destroyed.
        """
        self._alive()
        if self._in_session:
            raise RuntimeError(
                f"session {self._session} is still open: destroy_session() before creating one"
            )
        self._session += 1
        self._in_session = True
        self._offset = 0
        self._slot = 0
        if self._comm is not None and self._fork is not None:
            self._fork.record(self._comm)
            torch.cuda.current_stream(self.device).wait_event(self._fork)

    def destroy_session(self) -> None:
        """Ends the open session: its outputs and handles become invalid.

        Work already enqueued on the current stream (reads of the outputs) is ordered before
        peers may overwrite this rank's area in the next session; asynchronous on CUDA.

        Raises:
            RuntimeError: No session is open, or the buffer was destroyed.
        """
        self._require_session("destroy_session()")
        self._in_session = False
        comm, fork = self._comm, self._fork
        if comm is None or fork is None:
            self._backend.end_session(self._session)
            return
        fork.record(torch.cuda.current_stream(self.device))
        comm.wait_event(fork)
        if self._stream_context:
            with torch.cuda.device(self.device), torch.cuda.stream(comm):
                self._backend.end_session(self._session)
        else:
            self._backend.end_session(self._session, stream=comm)

    @contextlib.contextmanager
    def new_session(self, enabled: bool = True) -> Iterator[CopyEngineBuffer]:
        """``with buffer.new_session():`` creates a session and destroys it on exit.

        Args:
            enabled: ``False`` makes it a no-op (for code that sometimes runs outside one).
        """
        if not enabled:
            yield self
            return
        self.create_session()
        try:
            yield self
        finally:
            if self._in_session and not self._destroyed:
                self.destroy_session()

    # ---- calls ------------------------------------------------------------------------------
    def all_gather(
        self, tensors: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], GatherHandle]:
        """Gathers every rank's tensor(s) into ``[R, *shape]`` views of the session area.

        Asynchronous on CUDA: the copies run on the communication stream (copy engines on the
        copy-engine backend) after the current stream's earlier work; call the handle before
        reading the outputs. Several calls may be in flight in one session. Collective.

        Args:
            tensors: One contiguous tensor on :attr:`device`, or a sequence of them (one call:
                one arrival flag for all). A tensor from :meth:`get_inplace_tensor` must sit at
                its piece (same order as asked for); its self copy is skipped.

        Returns:
            ``(gathered, handle)``: ``gathered`` is ``[R, *shape]`` (rank ``p``'s tensor at
            ``[p]``), or a tuple of them for a sequence; valid until the session ends.

        Raises:
            RuntimeError: No open session.
            TypeError/ValueError: A non-tensor, a non-contiguous tensor, one on the wrong
                device, an in-place tensor away from its piece, a session over its budget, or
                ranks that disagree on shapes/dtypes (on every rank, with input checks on).
        """
        single = isinstance(tensors, torch.Tensor)
        ts = [tensors] if single else tensors
        error: Exception | None = None
        items: list[Item] = []
        try:
            self._require_session("all_gather()")
            items = self._plan("all_gather", ts)
        except (ValueError, TypeError, RuntimeError) as exc:
            error = exc
        self._agree("all_gather", ts, error)
        transfer = Transfer("all_gather", self._session, self._slot, tuple(items))
        event = self._launch(transfer, [])
        world = self.world_size
        outs = tuple(
            self._view(it.offset, world * it.nbytes, it.src.dtype, (world, *it.src.shape))
            for it in items
        )
        return (outs[0] if single else outs), GatherHandle(self, self._session, event)

    def reduce_scatter(
        self, tensors: torch.Tensor | Sequence[torch.Tensor], op: str = "sum"
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], GatherHandle]:
        """Sums (or averages) ``[R*n, ...]`` tensors over ranks; rank ``r`` gets shard ``r``.

        Rank ``r`` copies its shard ``p`` into rank ``p``'s session area (copy engines on the
        copy-engine backend); then each rank reduces the ``R`` shards it received, in rank
        order, in float32 (float64 for float64, int64 for integers) and casts back: one
        reduction per tensor, as torch operations on the communication stream (this part uses
        SMs). Asynchronous on CUDA; call the handle before reading the result. Collective.

        Args:
            tensors: One contiguous tensor on :attr:`device` whose first dimension is a multiple
                of ``R``, or a sequence of them.
            op: ``"sum"`` or ``"avg"`` (multiplies the sum by ``1/R``).

        Returns:
            ``(out, handle)``: ``out`` is a new ``[n, ...]`` tensor of the input's dtype (or a
            tuple of them), valid beyond the session; on CUDA call the handle before the
            session ends (after that the handle raises and nothing orders the current stream
            after the reduction).

        Raises:
            RuntimeError: No open session.
            TypeError/ValueError: As :meth:`all_gather`, plus a first dimension that is not a
                multiple of ``R``, an unsupported dtype (fp8, bool) or ``op``.
        """
        single = isinstance(tensors, torch.Tensor)
        ts = [tensors] if single else tensors
        error: Exception | None = None
        items: list[Item] = []
        try:
            self._require_session("reduce_scatter()")
            items = self._plan("reduce_scatter", ts, op)
        except (ValueError, TypeError, RuntimeError) as exc:
            error = exc
        self._agree("reduce_scatter", ts, error, op)
        transfer = Transfer("reduce_scatter", self._session, self._slot, tuple(items))
        outs: list[torch.Tensor] = []
        event = self._launch(transfer, outs, op)
        return (outs[0] if single else tuple(outs)), GatherHandle(self, self._session, event)

    def destroy(self) -> None:
        """Ends an open session, drains the communication stream (bounded), frees (collective).

        Idempotent. Outputs of all-gathers must not be used afterwards.

        Raises:
            HostTimeoutError: The communication stream did not drain within ``timeout_s``
                (a peer never sent its data).
        """
        if self._destroyed:
            return
        if self._in_session:
            self.destroy_session()
        self._destroyed = True
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                wait_stream(
                    get_comm_stream(self.device),
                    what="CopyEngineBuffer.destroy draining the communication stream",
                    timeout_s=self.timeout_s,
                )
        self._backend.destroy()
        self._checker.destroy()
        self._area = torch.empty(0, dtype=torch.uint8)
        self._views.clear()

    def __repr__(self) -> str:
        """Backend, rank, sizes, or that it was destroyed."""
        state = "destroyed" if self._destroyed else f"{self.num_max_session_bytes} B session area"
        return (
            f"CopyEngineBuffer({self.backend}, rank {self.rank}/{self.world_size}, {state}, "
            f"device {self.device})"
        )


def _check_int(name: str, value: object, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
