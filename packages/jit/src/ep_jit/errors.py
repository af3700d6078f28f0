"""Exceptions raised by ep-jit.

``JitError`` is the base. ``JitCompileError`` carries everything needed to reproduce a failed
compile; ``JitLaunchError`` names the driver error; ``JitTimeoutError`` turns a device-side
watchdog report (a peer that never signalled) into a Python exception; ``JitPeerAbortError`` is
the report of a rank that gave up on an op from its host (``ep_jit.signal_abort``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "HostTimeoutError",
    "JitCompileError",
    "JitError",
    "JitLaunchError",
    "JitPeerAbortError",
    "JitPtxasCheckError",
    "JitTimeoutError",
]


class JitError(RuntimeError):
    """Base class of every error raised by the JIT machinery."""


class JitCompileError(JitError):
    """A kernel failed to compile.

    Attributes:
        name: The kernel spec's name.
        command: The compiler command (nvcc) or NVRTC options, one string per argument.
        log: The full compiler log.
        source_path: Where the generated translation unit was written, for reproduction.
    """

    def __init__(
        self, name: str, command: Sequence[str], log: str, source_path: str, reason: str = ""
    ) -> None:
        """Builds the message from every field; ``reason`` replaces "compilation failed"."""
        self.name = name
        self.command = list(command)
        self.log = log
        self.source_path = source_path
        head = reason or "compilation failed"
        super().__init__(
            f"kernel {name!r}: {head}\n  source: {source_path}\n  command: {' '.join(command)}\n"
            f"--- compiler log ---\n{log.rstrip()}"
        )


class JitPtxasCheckError(JitCompileError):
    """``EP_JIT_PTXAS_CHECK`` found a function that uses local memory (stack frame or spills)."""


class JitLaunchError(JitError):
    """A CUDA driver call for loading or launching a kernel failed.

    Attributes:
        call: The driver function, e.g. ``"cuLaunchKernelEx"``.
        error_name: The ``CUresult`` name, e.g. ``"CUDA_ERROR_INVALID_VALUE"``.
    """

    def __init__(self, call: str, error_name: str, detail: str = "") -> None:
        """Names the call, the ``CUresult`` and optional context."""
        self.call = call
        self.error_name = error_name
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"{call} failed with {error_name}{suffix}")


class JitTimeoutError(JitError):
    """A device-side spin wait exceeded its timeout and recorded the failure.

    Attributes:
        stage: Name of the stage that waited (e.g. ``"dispatch:wait_recv_count"``).
        peer: The rank that did not arrive, or -1 when not peer-specific.
        rank: The rank whose kernel waited.
        observed: The last value read by the waiting thread.
        expected: The value it waited for.
        block: CUDA block index of the waiting thread.
        thread: Thread index within that block.
    """

    def __init__(
        self,
        stage: str,
        peer: int,
        rank: int,
        observed: int,
        expected: int,
        block: int,
        thread: int,
    ) -> None:
        """Stores the fields of the device record; see the class attributes."""
        self.stage = stage
        self.peer = peer
        self.rank = rank
        self.observed = observed
        self.expected = expected
        self.block = block
        self.thread = thread
        who = f"peer {peer}" if peer >= 0 else "no specific peer"
        super().__init__(
            f"GPU timeout on rank {rank} in stage {stage!r} waiting for {who}: "
            f"observed {observed}, expected {expected} (block {block}, thread {thread})"
        )


class JitPeerAbortError(JitError):
    """A rank gave up on a collective op from its host, and a kernel of this rank saw it.

    The rank wrote its abort value into the peers' abort words (``ep_jit.signal_abort``); every
    kernel sharing such a word unwinds and the first one records it. The op's results are not
    valid, and the abort word stays set until the host resets it.

    Attributes:
        peer: The rank that gave up.
        rank: The rank whose kernel saw it.
    """

    def __init__(self, peer: int, rank: int) -> None:
        """Stores the fields of the device record; see the class attributes."""
        self.peer = peer
        self.rank = rank
        super().__init__(
            f"rank {peer} gave up on a collective op (its kernels on rank {rank} stopped)"
        )


class HostTimeoutError(JitError, TimeoutError):
    """A host-side wait (a stream synchronisation, a handle exchange) passed its deadline.

    Attributes:
        what: What was waited for.
        timeout_s: The limit that passed.
    """

    def __init__(self, what: str, timeout_s: float) -> None:
        """Stores what was waited for and the limit."""
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"timed out after {timeout_s:g} s waiting for {what}")
