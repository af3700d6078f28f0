"""Host side of device timeouts: turns a stuck spin wait into a ``JitTimeoutError``.

A :class:`DeviceWatchdog` owns one ``ep_jit::ErrorRecord`` in pinned host memory (readable even
after a kernel trapped and killed the context) and one abort word in device memory (kernels may
use a word of their own buffer instead: ``record_ptr`` with their own abort word). Kernels take
``watchdog.context()`` (an ``ep_jit::WaitContext`` by value) and call ``ep_jit::wait_ge`` /
``wait_until`` from ``<ep_jit/smxx_timeout.cuh>``; after the kernel (or when a sync raises),
``watchdog.check()`` raises a ``JitTimeoutError`` naming the stage and the peer::

    wd = DeviceWatchdog(stages=["notify", "recv"], rank=rank, timeout_s=30)
    kernel.launch(grid, block, ..., wd.context())
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:  # the kernel trapped
        wd.check(cause=exc)
        raise
    wd.check()
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ep_jit.errors import JitPeerAbortError, JitTimeoutError
from ep_jit.hostwait import wait_event
from ep_jit.streamops import write_value

__all__ = [
    "ABORT_BY_RANK",
    "ERROR_PEER_ABORT",
    "ERROR_TIMEOUT",
    "DeviceWatchdog",
    "ErrorRecord",
    "WaitContext",
    "signal_abort",
]

ERROR_TIMEOUT = 1
"""``ep_jit::kErrorTimeout``."""

ERROR_PEER_ABORT = 2
"""``ep_jit::kErrorPeerAbort``: a rank gave up on the op (the record's ``peer``)."""

ABORT_BY_RANK = 0x10000
"""``ep_jit::kAbortByRank``: an abort word holding ``ABORT_BY_RANK + r`` says rank ``r`` gave up."""

_RECORD_WORDS = 8  # 64 bytes as int64; field offsets mirror smxx_timeout.cuh


class ErrorRecord(NamedTuple):
    """The fields of ``ep_jit::ErrorRecord`` (:meth:`DeviceWatchdog.read_record`)."""

    code: int
    stage: int
    peer: int
    rank: int
    block: int
    thread: int
    observed: int
    expected: int


class WaitContext(ctypes.Structure):
    """``ep_jit::WaitContext`` (32 bytes), passed to kernels by value."""

    _fields_ = [
        ("record", ctypes.c_void_p),
        ("abort", ctypes.c_void_p),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


assert ctypes.sizeof(WaitContext) == 32  # internal invariant shared with the header


class DeviceWatchdog:
    """A failure record that kernels fill in when a wait times out.

    Args:
        stages: Names of the stage ids kernels pass to the waits (a list indexes from 0).
        rank: This process's rank, reported in the error.
        timeout_s: How long a wait may spin before it records a timeout; 0: forever.
        device: CUDA device of the abort word; default the current device.

    Raises:
        ValueError: ``timeout_s`` is negative.
    """

    def __init__(
        self,
        stages: Sequence[str] | Mapping[int, str] = (),
        *,
        rank: int = 0,
        timeout_s: float = 100.0,
        device: torch.device | int | str | None = None,
    ) -> None:
        """Allocates the record and the abort word (see the class docstring)."""
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self.stages: dict[int, str] = (
            dict(stages) if isinstance(stages, Mapping) else dict(enumerate(stages))
        )
        self.rank = rank
        self.timeout_s = timeout_s
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if device is None
            else (torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
        )
        # Pinned host memory is device-accessible at the same address under UVA.
        self._record = torch.zeros(
            _RECORD_WORDS, dtype=torch.int64, pin_memory=torch.cuda.is_available()
        )
        self._abort = torch.zeros(1, dtype=torch.int32, device=dev)

    @property
    def record_ptr(self) -> int:
        """Device-visible address of the ``ep_jit::ErrorRecord`` (pinned host memory)."""
        return int(self._record.data_ptr())

    @property
    def timeout_ns(self) -> int:
        """The timeout in nanoseconds, as kernels take it (0: wait forever)."""
        return int(self.timeout_s * 1e9)

    def context(self) -> WaitContext:
        """The ``ep_jit::WaitContext`` to pass to a kernel."""
        return WaitContext(
            record=self._record.data_ptr(),
            abort=self._abort.data_ptr(),
            timeout_ns=self.timeout_ns,
            rank=self.rank,
            reserved=0,
        )

    def read_record(self) -> ErrorRecord:
        """The record's fields as they are now (reads host memory; does not synchronise).

        ``code`` 0: nothing recorded. Kernels may record codes of their own (above
        ``ERROR_PEER_ABORT``), which their callers read here before :meth:`check`.
        """
        raw = bytes(ctypes.string_at(self._record.data_ptr(), 64))
        i32 = [int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, 24, 4)]
        i64 = [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in (24, 32)]
        return ErrorRecord(*i32, *i64)

    @property
    def failed(self) -> bool:
        """Whether a kernel recorded a failure (reads host memory; does not synchronise)."""
        return self.read_record().code != 0

    def check(self, cause: BaseException | None = None) -> None:
        """Raises if a failure was recorded. Call after synchronising with the kernel's stream.

        Args:
            cause: The exception that revealed the failure (e.g. a launch failure after a trap);
                chained as ``__cause__``.

        Raises:
            JitTimeoutError: A wait timed out; names the stage, the peer and the values.
            JitPeerAbortError: A kernel saw that a rank gave up on its op
                (:func:`signal_abort`); names that rank.
        """
        code, stage, peer, rank, block, thread, observed, expected = self.read_record()
        if code == 0:
            return
        if code == ERROR_PEER_ABORT:
            raise JitPeerAbortError(peer, rank) from cause
        name = self.stages.get(stage, f"stage {stage}")
        if code != ERROR_TIMEOUT:
            name = f"{name} (error code {code})"
        raise JitTimeoutError(name, peer, rank, observed, expected, block, thread) from cause

    def reset(self) -> None:
        """Clears the record and the abort word (the latter on the current stream, async)."""
        self._record.zero_()
        self._abort.zero_()


def signal_abort(
    abort_words: Sequence[int],
    rank: int,
    *,
    stream: torch.cuda.Stream | None = None,
    timeout_s: float | None = None,
) -> None:
    """Tells the kernels sharing each abort word that rank ``rank`` gave up on their op.

    Writes ``ABORT_BY_RANK + rank`` into every word of ``abort_words`` (device addresses of the
    32-bit abort words of ``ep_jit::WaitContext``, the peers' included, e.g. through peer-mapped
    memory) on ``stream``, after the work already queued there, and waits for the writes (a
    rank that raises right after must not leave before they land). Every wait of a kernel that
    shares one of those words then returns false, the first thread that sees it records
    ``ERROR_PEER_ABORT`` naming ``rank`` in its :class:`DeviceWatchdog` record, and
    :meth:`DeviceWatchdog.check` raises :class:`~ep_jit.JitPeerAbortError`. A word that
    already holds a failure keeps it. The words stay set until their hosts reset them.

    Args:
        abort_words: Device addresses of the abort words.
        rank: The rank giving up (``0 <= rank < 0xFFFF``).
        stream: Stream to order the writes on (default: the current stream).
        timeout_s: Limit of the wait for the writes; default ``EP_JIT_HOST_TIMEOUT_S``.

    Raises:
        ValueError: ``rank`` out of range.
        HostTimeoutError: The writes did not complete in time (earlier work on ``stream``
            never finished).
    """
    if not 0 <= rank < 0xFFFF:
        raise ValueError(f"rank must be in [0, 65535), got {rank}")
    s = torch.cuda.current_stream() if stream is None else stream
    for address in abort_words:
        write_value(address, ABORT_BY_RANK + rank, stream=s)
    done = torch.cuda.Event()
    done.record(s)
    wait_event(done, what=f"rank {rank}'s abort signal to its peers", timeout_s=timeout_s)
