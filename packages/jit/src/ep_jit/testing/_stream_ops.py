"""Stream memory operations recorded instead of issued: CPU tests of copy-engine protocols."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ep_jit._cuda import driver
from ep_jit.streamops import MemOp, decode_mem_ops

__all__ = ["StreamOpRecorder", "record_stream_ops"]


def _entry(ops: list[MemOp], stream: Any) -> tuple[Any, ...]:
    return ("ops", ops, stream)


class StreamOpRecorder:
    """cuda-bindings' driver module, except that stream memory operations are recorded.

    ``cuStreamBatchMemOp``, ``cuStreamWriteValue32`` and ``cuStreamWriteValue64`` append
    ``entry(ops, stream)`` to ``calls`` (by default ``("ops", ops, stream)``), where ``ops`` are
    the :class:`~ep_jit.streamops.MemOp` the driver would have seen (values as of the call), and
    report success; every other attribute is the real driver's.

    Args:
        calls: The list the records go to (shared with other fakes of the test, e.g. copies).
        entry: Makes one record from the operations and the stream handed to the driver.
    """

    def __init__(
        self,
        calls: list[Any],
        entry: Callable[[list[MemOp], Any], Any] = _entry,
    ) -> None:
        """Records into ``calls``; see the class docstring."""
        self.calls = calls
        self.entry = entry

    def __getattr__(self, name: str) -> Any:
        return getattr(driver, name)

    def _ok(self, ops: list[MemOp], stream: Any) -> Any:
        self.calls.append(self.entry(ops, stream))
        return (driver.CUresult.CUDA_SUCCESS,)

    def cuStreamBatchMemOp(self, stream: Any, count: int, params: list[Any], flags: int) -> Any:
        """Records the batch (``flags`` must be 0 and ``count`` the parameters' length)."""
        assert flags == 0 and count == len(params), (flags, count, len(params))
        return self._ok(decode_mem_ops(params), stream)

    def cuStreamWriteValue32(self, stream: Any, address: int, value: int, flags: int) -> Any:
        """Records one 32-bit write."""
        return self._ok([MemOp.write(int(address), int(value), 32)], stream)

    def cuStreamWriteValue64(self, stream: Any, address: int, value: int, flags: int) -> Any:
        """Records one 64-bit write."""
        return self._ok([MemOp.write(int(address), int(value), 64)], stream)


def record_stream_ops(
    monkeypatch: Any,
    calls: list[Any],
    entry: Callable[[list[MemOp], Any], Any] = _entry,
) -> StreamOpRecorder:
    """Makes ``ep_jit.streamops`` record its driver calls into ``calls`` for the test's duration.

    Streams reach the recorder as the caller gave them (no conversion to a driver handle), so a
    test may pass any object as a stream and find it in the records.

    Args:
        monkeypatch: The test's ``pytest.MonkeyPatch``.
        calls: Where the records go.
        entry: As :class:`StreamOpRecorder`.

    Returns:
        The recorder installed.
    """
    from ep_jit import streamops

    recorder = StreamOpRecorder(calls, entry)
    monkeypatch.setattr(streamops, "driver", recorder)
    monkeypatch.setattr(streamops, "_stream", lambda stream: stream)
    return recorder
