"""``PipeBuffer``: point-to-point send/recv between any ranks of a group, for pipeline stages.

    buf = pp_rdma.PipeBuffer(group, num_max_tensor_bytes=64 << 20, num_max_inflight=4)
    buf.send(activations, dst=next_stage)  # enqueued on the current stream
    buf.recv(grad_out, src=next_stage)  # the stream waits for arrival
    buf.destroy()

Semantics (every backend): FIFO per directed pair; at most ``num_max_inflight`` unreceived sends
per pair, a further send waits (bounded by ``timeout_s``) and never overwrites; a send or recv
that cannot proceed raises :class:`~pp_rdma.errors.PipeError` naming the peer and the message's
sequence number. Only bytes travel: ``recv(out, src)`` takes dtype and shape from ``out`` and the
byte sizes must match (checked against a header each message carries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ep_jit.agreement import check_agreement, gather_checked
from ep_jit.topology import resolve_device, topology
from pp_rdma import knobs
from pp_rdma._base import PipeBackend, PipeConfig
from pp_rdma.errors import PipeError
from pp_rdma.factory import plan_routes, resolve_choices, usable_backends, used_kinds

__all__ = ["PipeBuffer"]


class PipeBuffer:
    """Send/recv of tensors between any two ranks of ``group``; no SM on the fast backends.

    Collective to build and to destroy: every rank of ``group`` calls both with the same
    arguments (checked: ranks that disagree all raise ``ValueError``).

    Args:
        group: The process group (default: the world). gloo on CPU ranks or ranks sharing a GPU,
            NCCL (or ``cpu:gloo,cuda:nccl``) on GPUs.
        num_max_tensor_bytes: Largest message in bytes (> 0). Landing slots of this size are
            reserved per peer and in-flight message.
        num_max_inflight: Unreceived sends allowed per directed pair (>= 1).
        backend: ``"auto"`` (default: ``EP_PP_BACKEND``), ``"copy_engine"``, ``"nixl"``,
            ``"torch"``, or ``{"local": ..., "remote": ...}`` to choose for peers on this node and
            on other nodes separately. ``"auto"`` takes the copy engine when every rank is on a
            GPU of one node (one NVLink domain or one shared GPU), else NIXL when installed, else
            ``torch``; across nodes NIXL when installed, else ``torch``.
        timeout_s: Limit in seconds of a send blocked on credits or a recv waiting for data
            (default ``EP_PP_TIMEOUT_S``).
        device: Where tensors live: a CUDA device (default: the current one when CUDA is
            available) or ``"cpu"``.

    Raises:
        ValueError: Bad sizes, an unknown or unusable backend, ranks that disagree.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_max_tensor_bytes: int,
        num_max_inflight: int = 4,
        backend: str | Mapping[str, str] | None = None,
        *,
        timeout_s: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Builds every backend the plan needs (collective; see the class doc)."""
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD  # type: ignore[assignment]
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        requested: str | dict[str, str] = "auto"
        limit = 0.0
        error: Exception | None = None
        dev = torch.device("cpu")
        try:
            # Everything that can fail on one rank only fails here, so all ranks raise together.
            if backend is None:
                requested = knobs.pp.backend
            elif isinstance(backend, str):
                requested = backend
            elif isinstance(backend, Mapping):
                requested = {str(k): v for k, v in backend.items()}
                if not all(isinstance(v, str) for v in requested.values()):
                    raise TypeError(f"backend mapping values must be str, got {backend!r}")
            else:
                raise TypeError(f"backend must be a str or a mapping, got {backend!r}")
            raw = knobs.pp.timeout_s if timeout_s is None else timeout_s
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise TypeError(f"timeout_s must be a number of seconds, got {timeout_s!r}")
            limit = float(raw)
            if not (math.isfinite(limit) and limit > 0):
                # An infinite limit would be a wait without a bound.
                raise ValueError(f"timeout_s must be finite and > 0, got {timeout_s!r}")
            dev = resolve_device(device, what="PipeBuffer")
            if isinstance(num_max_tensor_bytes, bool) or not isinstance(num_max_tensor_bytes, int):
                raise TypeError(
                    f"num_max_tensor_bytes must be an int, got {num_max_tensor_bytes!r}"
                )
            if num_max_tensor_bytes <= 0:
                raise ValueError(f"num_max_tensor_bytes must be > 0, got {num_max_tensor_bytes}")
            if isinstance(num_max_inflight, bool) or not isinstance(num_max_inflight, int):
                raise TypeError(f"num_max_inflight must be an int, got {num_max_inflight!r}")
            if num_max_inflight < 1:
                raise ValueError(f"num_max_inflight must be >= 1, got {num_max_inflight}")
            if self.world_size < 2:
                raise ValueError("PipeBuffer needs a group of at least 2 ranks")
        except (TypeError, ValueError) as exc:
            error = exc
        settings = {
            "num_max_tensor_bytes": num_max_tensor_bytes,
            "num_max_inflight": num_max_inflight,
            "backend": requested,
            "device_type": dev.type,
        }
        configs = gather_checked(self.group, settings, error, what="PipeBuffer")
        check_agreement(configs, "PipeBuffer")
        self.device = dev
        self.num_max_tensor_bytes = num_max_tensor_bytes
        self.num_max_inflight = num_max_inflight
        self.timeout_s = limit
        cuda = dev.type == "cuda"
        topo = topology(self.group, dev if cuda else None)
        specs, my_reasons = usable_backends(self.group, cuda)
        gathered = gather_checked(self.group, {"reasons": my_reasons}, None, what="PipeBuffer")
        reasons: dict[str, str] = {}
        for r, g in enumerate(gathered):
            for name, why in g["reasons"].items():
                reasons.setdefault(name, f"rank {r}: {why}")
        error = None
        routes: dict[int, str] = {}
        kinds: list[str] = []
        try:
            routes = plan_routes(requested, topo, list(specs), reasons)
            resolved = resolve_choices(requested, topo, list(specs), reasons)
            # Every rank builds every backend some pair uses, also one it uses for no peer
            # (a rank alone on its node): the constructors are collective.
            kinds = sorted(used_kinds(resolved, topo))
        except ValueError as exc:
            error = exc
        gather_checked(self.group, {}, error, what="PipeBuffer")
        self.routes = routes
        self._backends: dict[str, PipeBackend] = {}
        self._send_seq = [0] * self.world_size
        self._recv_seq = [0] * self.world_size
        self._failure: PipeError | None = None
        self._destroyed = False
        try:
            for name in kinds:
                peers = tuple(p for p, n in routes.items() if n == name)
                config = PipeConfig(
                    group=self.group,
                    rank=self.rank,
                    world_size=self.world_size,
                    peers=peers,
                    num_max_tensor_bytes=num_max_tensor_bytes,
                    num_max_inflight=num_max_inflight,
                    timeout_s=limit,
                    device=dev,
                )
                self._backends[name] = specs[name].build(config)
        except BaseException:
            for b in self._backends.values():
                b.destroy(collective=False)
            self._destroyed = True
            raise

    # ---- use ----------------------------------------------------------------------------------
    @property
    def destroyed(self) -> bool:
        """Whether :meth:`destroy` ran."""
        return self._destroyed

    def backend_of(self, peer: int) -> str:
        """The backend carrying traffic between this rank and ``peer``."""
        self._check_peer(peer, "peer")
        return self.routes[peer]

    def _check_peer(self, peer: int, what: str) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int):
            raise TypeError(f"{what} must be an int rank, got {peer!r}")
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"{what}={peer} must be another rank of the group, in [0, {self.world_size}) "
                f"and not this rank ({self.rank})"
            )

    def _check_tensor(self, t: torch.Tensor, what: str) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != self.device.type or (
            self.device.type == "cuda" and t.device.index != self.device.index
        ):
            raise ValueError(f"{what} is on {t.device}; this PipeBuffer works on {self.device}")
        if not t.is_contiguous():
            raise ValueError(
                f"{what} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
            )
        nbytes = t.numel() * t.element_size()
        if nbytes > self.num_max_tensor_bytes:
            raise ValueError(
                f"{what} has {nbytes} bytes, more than num_max_tensor_bytes="
                f"{self.num_max_tensor_bytes}"
            )
        return nbytes

    def _alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("PipeBuffer was destroyed")
        if self._failure is not None:
            raise RuntimeError(f"PipeBuffer failed earlier and cannot be used: {self._failure}")

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except PipeError as exc:
            self._failure = exc
            raise

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Sends the bytes of ``t`` to rank ``dst`` (FIFO per pair).

        Ordered on the current stream on GPU: the copy engine enqueues a credit wait, the copy and
        a signal, then returns; ``t`` may be reused once the stream has passed the send. NIXL and
        ``torch`` wait on the host for the stream first (host-driven transports). Blocks (bounded)
        while ``num_max_inflight`` sends to ``dst`` are unreceived (on the copy engine the
        stream waits instead, bounded at :meth:`synchronize`).

        Args:
            t: Contiguous tensor on this buffer's device, at most ``num_max_tensor_bytes``.
            dst: Receiving rank (group rank), not this rank.

        Raises:
            ValueError / TypeError: Bad ``t`` or ``dst``.
            PipeTimeoutError: No credit came from ``dst`` within ``timeout_s``.
            PipePeerError: The transport reports ``dst`` gone.
            PipeSizeMismatchError: ``dst`` reported that an earlier message had the wrong size.
        """
        self._alive()
        self._check_peer(dst, "dst")
        self._check_tensor(t, "t")
        self._send_seq[dst] += 1
        self._run(self._backends[self.routes[dst]].send, t, dst, self._send_seq[dst])

    def recv(self, out: torch.Tensor, src: int) -> None:
        """Receives the next message from rank ``src`` into ``out`` (its dtype and shape).

        Ordered on the current stream on GPU (the stream waits for arrival; the copy engine
        returns at once, NIXL and ``torch`` wait on the host, bounded).

        Args:
            out: Contiguous output on this buffer's device; ``out.nbytes`` must equal the sent
                tensor's byte size.
            src: Sending rank (group rank), not this rank.

        Raises:
            ValueError / TypeError: Bad ``out`` or ``src``.
            PipeSizeMismatchError: The message has another byte size (``out`` is untouched).
            PipeTimeoutError: Nothing arrived within ``timeout_s``.
            PipePeerError: The transport reports ``src`` gone.
        """
        self._alive()
        self._check_peer(src, "src")
        self._check_tensor(out, "out")
        self._recv_seq[src] += 1
        self._run(self._backends[self.routes[src]].recv, out, src, self._recv_seq[src])

    def synchronize(self) -> None:
        """Waits (bounded) until this rank's queued transfers are handed over; raises failures.

        On the copy engine this drains the current stream with a deadline and, when it does not
        drain, reads the signal words to name the peer and message that hold it up.

        Raises:
            PipeError: A transfer failed or did not progress within ``timeout_s``.
        """
        self._alive()
        for b in self._backends.values():
            self._run(b.synchronize)

    def destroy(self, *, collective: bool = True) -> None:
        """Idempotent; collective by default: drains, meets every rank, frees the landing slots.

        Every rank calls it, also after a failure (the meeting then tolerates a broken group:
        its error is swallowed and this rank frees what it can). After a peer died, pass
        ``collective=False``: this rank frees its resources without meeting the others (on the
        copy engine the peer-mapped memory then stays mapped until the process exits).

        Raises:
            PipeError: Draining found a failure on this rank (for example a size mismatch the
                receiver reported); the others are told at the meeting, and every rank frees
                its resources without a further collective.
            RuntimeError: Another rank's drain failed (this rank had not failed before).
        """
        if self._destroyed:
            return
        self._destroyed = True
        failed = self._failure is not None
        try:
            if collective:
                error: PipeError | None = None
                if not failed:
                    try:
                        for b in self._backends.values():
                            b.synchronize()
                    except PipeError as exc:
                        # Still meet the others (they are in the meeting below), and tell them.
                        error = self._failure = exc
                try:
                    gather_checked(self.group, {}, error, what="PipeBuffer.destroy")
                except Exception as exc:
                    collective = False
                    if error is not None:
                        raise error from None
                    if not failed:
                        raise RuntimeError(
                            f"PipeBuffer.destroy: another rank's transfers failed ({exc})"
                        ) from exc
        finally:
            for b in self._backends.values():
                b.destroy(collective)
            self._backends = {}
            self.group = None  # type: ignore[assignment]

    def __enter__(self) -> PipeBuffer:
        """Returns the buffer; :meth:`destroy` runs on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Destroys the buffer (collective unless it failed)."""
        self.destroy()

    def __repr__(self) -> str:
        """Rank, sizes and the backend of each peer."""
        state = "destroyed" if self._destroyed else f"routes={self.routes}"
        return (
            f"PipeBuffer(rank {self.rank}/{self.world_size}, {self.num_max_tensor_bytes} B x "
            f"{self.num_max_inflight} in flight, {state})"
        )
