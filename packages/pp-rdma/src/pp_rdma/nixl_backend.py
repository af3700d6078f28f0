"""The NIXL backend: UCX one-sided WRITE + notification into per-pair landing slots.

Every rank registers with NIXL one landing region, ``world_size x num_max_inflight`` slots of
``num_max_tensor_bytes`` (slot ``(src, seq % inflight)`` receives ``src``'s messages), and one
staging slot it sends from. Agents' metadata travel over the process group's object collectives,
and every pair of peers is connected and greeted once at construction.

* ``send(t, dst)``: waits (bounded) for the credit of the slot, copies ``t`` into the staging slot
  (on GPU: on the current stream, then a bounded host wait on an event: NIXL is host-driven and
  knows nothing of CUDA streams), posts a WRITE into ``dst``'s slot with the notification
  ``D(seq, nbytes)`` and polls the transfer to completion. A zero-byte message is the
  notification alone.
* ``recv(out, src)``: polls notifications (bounded) until ``D(seq, ...)`` from ``src`` is there,
  checks the size, copies the slot into ``out`` (on GPU on the current stream, waited for with a
  bound) and returns the credit ``C(seq)`` to ``src`` as a notification. A size mismatch returns
  ``E(seq, sent, expected)`` instead, so both ends raise
  :class:`~pp_rdma.errors.PipeSizeMismatchError`.

Progress is host-driven: nothing moves unless some PipeBuffer call of this rank polls (every wait
does), unless NIXL's progress thread is on (``EP_PP_NIXL_PROGRESS_THREAD``; one busy core per
rank). Push only: when ranks share a GPU, UCX serves READ in software over TCP, so this backend
never reads remotely. On GPU, UCX's CUDA memory hooks need ``libcudart.so.13``, which the NIXL
wheel does not ship: it is loaded with ``RTLD_GLOBAL`` from the CUDA runtime of the environment
(torch's ``nvidia`` packages) before the first agent is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import socket
import struct
import sys
import uuid
from collections.abc import Callable
from typing import Any

import torch

from ep_jit.agreement import gather_checked
from ep_jit.errors import HostTimeoutError
from ep_jit.hostwait import wait_event, wait_until
from pp_rdma import knobs
from pp_rdma._base import PipeConfig, byte_view
from pp_rdma.errors import (
    PipeError,
    PipePeerError,
    PipeSizeMismatchError,
    PipeTimeoutError,
)

__all__ = ["NixlPipe", "load_nixl"]

_ALIGN = 256
_DATA, _CREDIT, _ERROR, _HELLO, _WARM = b"D", b"C", b"E", b"H", b"W"
_cudart_loaded = False


def _preload_cudart() -> None:
    """Loads ``libcudart.so.13`` with ``RTLD_GLOBAL`` (UCX's CUDA hooks need it; NIXL omits it)."""
    global _cudart_loaded
    if _cudart_loaded:
        return
    path = None
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        path = load_nvidia_dynamic_lib("cudart").abs_path
    except Exception:
        for root in sys.path:
            found = sorted(
                glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so.13*"), recursive=True)
            )
            if found:
                path = found[0]
                break
    if path is None:
        raise RuntimeError(
            "the NIXL backend on GPU needs libcudart.so.13 (UCX's CUDA hooks load it); none was "
            "found in the nvidia packages of this environment"
        )
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    _cudart_loaded = True


def load_nixl(device: torch.device) -> Any:
    """Imports ``nixl_cu13`` (after the CUDA runtime preload on GPU)."""
    if device.type == "cuda":
        _preload_cudart()
    import nixl_cu13

    return nixl_cu13


def _is_disconnect(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "DISCONNECT" in text.upper()


class NixlPipe:
    """Host-driven transport over NIXL (see the module doc)."""

    name = "nixl"

    def __init__(self, config: PipeConfig) -> None:
        """Collective over the whole group: registers, exchanges metadata, connects, greets."""
        self.config = cfg = config
        self._slot = max(_ALIGN, -(-cfg.num_max_tensor_bytes // _ALIGN) * _ALIGN)
        self._agent: Any = None
        self._regs: list[Any] = []
        self._names: dict[int, str] = {}
        self._rank_of: dict[str, int] = {}
        self._arrived: dict[int, dict[int, int]] = {p: {} for p in cfg.peers}
        self._credits: dict[int, int] = dict.fromkeys(cfg.peers, 0)
        self._hello: set[int] = set()
        self._warm: set[int] = set()
        self._errors: dict[int, PipeError] = {}
        hosts = gather_checked(
            cfg.group, {"host": socket.gethostname()}, None, what="PipeBuffer (nixl)"
        )
        mode = knobs.pp.nixl_err_mode
        if mode == "auto":
            # One host: shared-memory transports, writes one-sided (err-mode peer would route
            # RMA through active messages that need the target to poll).
            mode = "none" if len({h["host"] for h in hosts}) == 1 else "peer"
        self.err_mode = mode
        error: Exception | None = None
        info: dict[str, Any] = {}
        try:
            info = self._local_setup()
        except Exception as exc:
            error = exc
        try:
            everyone = gather_checked(cfg.group, info, error, what="PipeBuffer (nixl)")
            self._connect(everyone)
        except BaseException:
            self.destroy(collective=False)
            raise

    # ---- construction -------------------------------------------------------------------------
    def _local_setup(self) -> dict[str, Any]:
        cfg = self.config
        nixl = load_nixl(cfg.device)
        name = f"pp_rdma-{cfg.rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        conf = nixl.nixl_agent_config(enable_prog_thread=knobs.pp.nixl_progress_thread, backends=[])
        self._agent = agent = nixl.nixl_agent(name, conf)
        agent.create_backend("UCX", {"ucx_error_handling_mode": self.err_mode})
        self._mem = "VRAM" if cfg.device.type == "cuda" else "DRAM"
        self._dev_id = int(cfg.device.index or 0) if cfg.device.type == "cuda" else 0
        slots = cfg.world_size * cfg.num_max_inflight
        self._landing = torch.empty(slots * self._slot, dtype=torch.uint8, device=cfg.device)
        self._staging = torch.empty(self._slot, dtype=torch.uint8, device=cfg.device)
        self._regs = [agent.register_memory(self._landing), agent.register_memory(self._staging)]
        return {
            "name": name,
            "md": agent.get_agent_metadata(),
            "landing": self._landing.data_ptr(),
            "dev": self._dev_id,
        }

    def _connect(self, everyone: list[dict[str, Any]]) -> None:
        cfg = self.config
        self._remote = {p: (everyone[p]["landing"], everyone[p]["dev"]) for p in cfg.peers}
        for p in cfg.peers:
            self._agent.add_remote_agent(everyone[p]["md"])
            # Notifications are keyed by the agent's name as a str (add_remote_agent's return
            # value is bytes), so the names travel with the metadata.
            name = str(everyone[p]["name"])
            self._names[p] = name
            self._rank_of[name] = p
        for p in cfg.peers:
            self._agent.make_connection(self._names[p])
        for p in cfg.peers:
            self._agent.send_notif(self._names[p], _HELLO)

        def greeted() -> bool:
            self._progress()
            return self._hello >= set(cfg.peers)

        try:
            wait_until(greeted, "NIXL peers' greetings", cfg.timeout_s)
        except HostTimeoutError:
            missing = sorted(set(cfg.peers) - self._hello)
            raise PipeTimeoutError(
                "recv", missing[0], 0, f"ranks {missing} did not greet over NIXL", cfg.timeout_s
            ) from None
        # The first WRITE on a connection completes only while its target polls: make it now,
        # while every rank polls here, not in the first send (one byte into this rank's own
        # first slot at each peer, which no message occupies yet).
        warmed: set[int] = set()
        for p in cfg.peers:
            self._write(p, cfg.rank * cfg.num_max_inflight * self._slot, 1, _WARM, 0)

        def warm() -> bool:
            self._progress()
            warmed.update(self._warm)
            return warmed >= set(cfg.peers)

        try:
            wait_until(warm, "NIXL peers' first WRITEs", cfg.timeout_s)
        except HostTimeoutError:
            missing = sorted(set(cfg.peers) - warmed)
            raise PipeTimeoutError(
                "recv", missing[0], 0, f"ranks {missing} did not WRITE over NIXL", cfg.timeout_s
            ) from None
        # Everyone is wired before anyone sends.
        gather_checked(cfg.group, {}, None, what="PipeBuffer (nixl)")

    # ---- progress -----------------------------------------------------------------------------
    def _progress(self) -> None:
        """Moves every new notification into the per-peer tables."""
        for name, messages in self._agent.get_new_notifs().items():
            peer = self._rank_of.get(name)
            if peer is None:
                continue
            for m in messages:
                kind = m[:1]
                if kind == _DATA:
                    seq, nbytes = struct.unpack("<QQ", m[1:17])
                    self._arrived[peer][seq] = nbytes
                elif kind == _CREDIT:
                    (seq,) = struct.unpack("<Q", m[1:9])
                    self._credits[peer] = max(self._credits[peer], seq)
                elif kind == _ERROR:
                    seq, sent, expected = struct.unpack("<QQQ", m[1:25])
                    self._errors.setdefault(
                        peer, PipeSizeMismatchError("send", peer, seq, sent, expected)
                    )
                elif kind == _HELLO:
                    self._hello.add(peer)
                elif kind == _WARM:
                    self._warm.add(peer)

    def _raise_for(self, peer: int) -> None:
        if peer in self._errors:
            raise self._errors[peer]

    def _wait(self, cond: Callable[[], bool], op: str, peer: int, seq: int, detail: str) -> None:
        def ready() -> bool:
            self._progress()
            self._raise_for(peer)
            return cond()

        try:
            wait_until(ready, detail, self.config.timeout_s)
        except HostTimeoutError:
            # The passive side hears nothing of a dead peer; an active call to it does.
            try:
                self._agent.send_notif(self._names[peer], b"P")
            except Exception as exc:
                raise PipePeerError(op, peer, seq, f"NIXL reports the peer gone ({exc})") from exc
            raise PipeTimeoutError(op, peer, seq, detail, self.config.timeout_s) from None

    def _notify(self, op: str, peer: int, seq: int, message: bytes) -> None:
        try:
            self._agent.send_notif(self._names[peer], message)
        except Exception as exc:
            if _is_disconnect(exc):
                raise PipePeerError(op, peer, seq, f"NIXL reports the peer gone ({exc})") from exc
            raise

    def _stream_done(self, op: str, peer: int, seq: int) -> None:
        if self.config.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        try:
            wait_event(event, f"the CUDA stream before {op} #{seq}", self.config.timeout_s)
        except HostTimeoutError:
            raise PipeTimeoutError(
                op,
                peer,
                seq,
                "the current CUDA stream did not reach this call",
                self.config.timeout_s,
            ) from None

    # ---- protocol -----------------------------------------------------------------------------
    def send(self, t: torch.Tensor, dst: int, seq: int) -> None:
        """Credit wait, staging copy, WRITE + notification polled to completion (bounded)."""
        cfg = self.config
        need = seq - cfg.num_max_inflight
        self._wait(
            lambda: self._credits[dst] >= need,
            "send",
            dst,
            seq,
            f"{cfg.num_max_inflight} sends are in flight and rank {dst} has not received "
            f"send #{max(need, 1)} (it stopped receiving or died)",
        )
        nbytes = t.numel() * t.element_size()
        note = _DATA + struct.pack("<QQ", seq, nbytes)
        if nbytes == 0:
            self._notify("send", dst, seq, note)
            return
        self._staging[:nbytes].copy_(byte_view(t))
        self._stream_done("send", dst, seq)
        offset = (cfg.rank * cfg.num_max_inflight + (seq - 1) % cfg.num_max_inflight) * self._slot
        self._write(dst, offset, nbytes, note, seq)

    def _write(self, dst: int, offset: int, nbytes: int, note: bytes, seq: int) -> None:
        """WRITE ``staging[:nbytes]`` to ``dst``'s landing region at ``offset``, polled to DONE."""
        cfg = self.config
        base, dev = self._remote[dst]
        agent = self._agent
        try:
            local = agent.get_xfer_descs(
                [(self._staging.data_ptr(), nbytes, self._dev_id)], self._mem
            )
            remote = agent.get_xfer_descs([(base + offset, nbytes, dev)], self._mem)
            handle = agent.initialize_xfer("WRITE", local, remote, self._names[dst], note)
        except Exception as exc:
            if _is_disconnect(exc):
                raise PipePeerError(
                    "send", dst, seq, f"NIXL reports the peer gone ({exc})"
                ) from exc
            raise
        try:
            state: list[str] = [str(agent.transfer(handle))]

            def done() -> bool:
                self._progress()  # the target of a first transfer may need our polling too
                if state[0] == "PROC":
                    state[0] = str(agent.check_xfer_state(handle))
                if state[0] == "ERR":
                    raise PipePeerError("send", dst, seq, "the NIXL WRITE failed")
                return state[0] == "DONE"

            try:
                wait_until(done, f"NIXL WRITE #{seq}", cfg.timeout_s)
            except HostTimeoutError:
                raise PipeTimeoutError(
                    "send", dst, seq, "the NIXL WRITE did not complete", cfg.timeout_s
                ) from None
            except PipeError:
                raise
            except Exception as exc:
                raise PipePeerError("send", dst, seq, f"NIXL failed: {exc}") from exc
        finally:
            # A handle of a failed transfer may refuse; the failure is what matters.
            with contextlib.suppress(Exception):
                agent.release_xfer_handle(handle)

    def recv(self, out: torch.Tensor, src: int, seq: int) -> None:
        """Bounded poll for ``D(seq)``, size check, copy out of the slot, credit back."""
        cfg = self.config
        arrived = self._arrived[src]
        self._wait(
            lambda: seq in arrived, "recv", src, seq, f"no message #{seq} arrived from rank {src}"
        )
        nbytes = arrived.pop(seq)
        expected = out.numel() * out.element_size()
        if nbytes != expected:
            error = PipeSizeMismatchError("recv", src, seq, nbytes, expected)
            self._notify("recv", src, seq, _ERROR + struct.pack("<QQQ", seq, nbytes, expected))
            raise error
        if nbytes:
            offset = (src * cfg.num_max_inflight + (seq - 1) % cfg.num_max_inflight) * self._slot
            byte_view(out).copy_(self._landing[offset : offset + nbytes])
            # The slot is free for the sender only once the copy has read it.
            self._stream_done("recv", src, seq)
        self._notify("recv", src, seq, _CREDIT + struct.pack("<Q", seq))

    def synchronize(self) -> None:
        """Polls notifications once and raises a size mismatch a receiver reported."""
        if self._agent is None:
            return
        self._progress()
        for peer in sorted(self._errors):
            raise self._errors[peer]

    def destroy(self, collective: bool) -> None:
        """Forgets the peers, deregisters the slots and drops the agent."""
        agent, self._agent = self._agent, None
        if agent is None:
            return
        for name in self._names.values():
            with contextlib.suppress(Exception):  # a dead peer's entry
                agent.remove_remote_agent(name)
        for reg in self._regs:
            with contextlib.suppress(Exception):
                agent.deregister_memory(reg)
        self._regs = []
        self._names = {}
