"""Stream memory operations: write a value, wait for a value, from the host, with no kernel.

The copy-engine protocols (pipeline send/recv, all-gather on the copy engines) move data with
``cuMemcpyAsync`` and signal with these: a write lands after the stream's earlier work, a wait
holds the stream's later work until a 32- or 64-bit word in (peer-mapped) memory satisfies a
condition. All are stream-ordered, asynchronous, and can be captured in a CUDA graph::

    ep_jit.write_value(flag_on_peer, epoch)  # after the copy before it
    ep_jit.wait_value(my_flag, epoch, cond="geq")  # later work waits for the peer
    ep_jit.batch_mem_ops([MemOp.write(a, 1), MemOp.wait(b, 1)])
    batch = MemOpBatch([MemOp.write(a, 0), MemOp.wait(b, 0)])  # built once, then per call:
    batch.set_value(0, epoch)
    batch.set_value(1, epoch)
    batch.enqueue()

A stream wait has no timeout of its own: a peer that never writes leaves the stream waiting.
Bound the host side with :func:`ep_jit.wait_stream`, and see ``docs/jit.md`` for the hazard of
CUDA's lazy module loading behind a pending wait (ep-jit loads its kernels eagerly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ep_jit._cuda import check, cu_stream, driver, stream_handle

__all__ = ["MemOp", "MemOpBatch", "batch_mem_ops", "decode_mem_ops", "wait_value", "write_value"]

_WAIT_FLAGS = {
    "geq": driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ,
    "eq": driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ,
    "and": driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_AND,
    "nor": driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_NOR,
}
_FLUSH = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_FLUSH)
_OP = driver.CUstreamBatchMemOpType


def _check_width(width: int, value: int) -> None:
    if width not in (32, 64):
        raise ValueError(f"width must be 32 or 64, got {width}")
    if not 0 <= value < (1 << width):
        raise ValueError(f"value {value} does not fit an unsigned {width}-bit word")


def _stream(stream: torch.cuda.Stream | None) -> object:
    return cu_stream(stream_handle(stream))


def _wait_flags(cond: str, flush: bool) -> int:
    if cond not in _WAIT_FLAGS:
        raise ValueError(f"cond must be one of {sorted(_WAIT_FLAGS)}, got {cond!r}")
    return int(_WAIT_FLAGS[cond]) | (_FLUSH if flush else 0)


@dataclass(frozen=True)
class MemOp:
    """One operation of :func:`batch_mem_ops`; build with :meth:`write` or :meth:`wait`."""

    kind: str
    address: int
    value: int
    width: int = 32
    cond: str = "geq"
    flush: bool = False

    @classmethod
    def write(cls, address: int, value: int, width: int = 32) -> MemOp:
        """Write ``value`` to the word at ``address`` once earlier work is done."""
        _check_width(width, value)
        return cls("write", address, value, width)

    @classmethod
    def wait(
        cls, address: int, value: int, cond: str = "geq", width: int = 32, flush: bool = False
    ) -> MemOp:
        """Hold later work until the word at ``address`` satisfies ``cond`` against ``value``."""
        _check_width(width, value)
        _wait_flags(cond, flush)
        return cls("wait", address, value, width, cond, flush)


def write_value(
    address: int, value: int, *, width: int = 32, stream: torch.cuda.Stream | None = None
) -> None:
    """Enqueues a write of ``value`` to the 32/64-bit word at device address ``address``.

    The write becomes visible after all earlier work of the stream (a memory barrier is part of
    the operation). Asynchronous; capturable.

    Raises:
        ValueError: ``width`` not 32/64, or ``value`` does not fit.
    """
    _check_width(width, value)
    fn = driver.cuStreamWriteValue32 if width == 32 else driver.cuStreamWriteValue64
    flags = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
    check(f"cuStreamWriteValue{width}", fn(_stream(stream), address, value, flags))


def wait_value(
    address: int,
    value: int,
    *,
    cond: str = "geq",
    width: int = 32,
    flush: bool = False,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Enqueues a wait: later work of the stream starts once the word satisfies ``cond``.

    ``cond``: ``geq`` (unsigned ``word >= value``, wrap-aware in the driver for 32 bits), ``eq``,
    ``and`` (``word & value != 0``) or ``nor``. ``flush`` makes earlier remote writes visible
    first. Asynchronous; capturable; no timeout (see the module docstring).

    Raises:
        ValueError: Unknown ``cond``, ``width`` not 32/64, or ``value`` does not fit.
    """
    _check_width(width, value)
    fn = driver.cuStreamWaitValue32 if width == 32 else driver.cuStreamWaitValue64
    check(
        f"cuStreamWaitValue{width}", fn(_stream(stream), address, value, _wait_flags(cond, flush))
    )


class MemOpBatch:
    """A list of :class:`MemOp` prepared once for ``cuStreamBatchMemOp``, values changeable.

    A protocol that enqueues the same operations on the same words call after call (only the
    values change: epochs, sizes) builds one batch and then only sets values and enqueues: the
    driver's parameter structs are built here, once, which costs far more host time than
    setting a value.
    """

    def __init__(self, ops: Sequence[MemOp]) -> None:
        """Builds the driver parameters of ``ops``.

        Raises:
            ValueError: An empty list.
        """
        if not ops:
            raise ValueError("a MemOpBatch needs at least one operation")
        self.ops = list(ops)
        self._targets: list[object] = []
        self._params: list[object] = []
        for op in self.ops:
            p = driver.CUstreamBatchMemOpParams()
            if op.kind == "write":
                p.operation = (
                    _OP.CU_STREAM_MEM_OP_WRITE_VALUE_32
                    if op.width == 32
                    else _OP.CU_STREAM_MEM_OP_WRITE_VALUE_64
                )
                target = p.writeValue
                target.flags = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
            else:
                p.operation = (
                    _OP.CU_STREAM_MEM_OP_WAIT_VALUE_32
                    if op.width == 32
                    else _OP.CU_STREAM_MEM_OP_WAIT_VALUE_64
                )
                target = p.waitValue
                target.flags = _wait_flags(op.cond, op.flush)
            target.operation = p.operation
            target.address = op.address
            self._params.append(p)
            self._targets.append(target)
            self._store(len(self._params) - 1, op.value)

    def _store(self, i: int, value: int) -> None:
        if self.ops[i].width == 32:
            self._targets[i].value = value  # type: ignore[attr-defined]
        else:
            self._targets[i].value64 = value  # type: ignore[attr-defined]

    def set_value(self, i: int, value: int) -> None:
        """Sets the value of operation ``i`` for the next :meth:`enqueue`.

        Raises:
            ValueError: ``value`` does not fit the operation's width.
        """
        _check_width(self.ops[i].width, value)
        self._store(i, value)

    def enqueue(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueues the operations, in order, as one ``cuStreamBatchMemOp`` (one driver call)."""
        check(
            "cuStreamBatchMemOp",
            driver.cuStreamBatchMemOp(_stream(stream), len(self._params), self._params, 0),
        )


_WRITE_WIDTHS = {
    int(_OP.CU_STREAM_MEM_OP_WRITE_VALUE_32): 32,
    int(_OP.CU_STREAM_MEM_OP_WRITE_VALUE_64): 64,
}
_WAIT_WIDTHS = {
    int(_OP.CU_STREAM_MEM_OP_WAIT_VALUE_32): 32,
    int(_OP.CU_STREAM_MEM_OP_WAIT_VALUE_64): 64,
}
_CONDS = {int(flag): name for name, flag in _WAIT_FLAGS.items()}


def decode_mem_ops(params: Sequence[Any]) -> list[MemOp]:
    """The operations that ``cuStreamBatchMemOp`` parameters describe, with their values now.

    The inverse of :class:`MemOpBatch`'s parameters: tests of copy-engine protocols record the
    driver calls instead of issuing them and read back what the driver would have seen.

    Raises:
        ValueError: A parameter that is not a 32/64-bit write or wait.
    """
    ops = []
    for p in params:
        kind = int(p.operation)
        if kind in _WRITE_WIDTHS:
            width, target, cond, flush = _WRITE_WIDTHS[kind], p.writeValue, "geq", False
        elif kind in _WAIT_WIDTHS:
            width, target = _WAIT_WIDTHS[kind], p.waitValue
            flags = int(target.flags)
            flush = bool(flags & _FLUSH)
            cond = _CONDS[flags & ~_FLUSH]
        else:
            raise ValueError(f"not a write or wait operation: {p.operation}")
        value = int(target.value) if width == 32 else int(target.value64)
        op_kind = "write" if kind in _WRITE_WIDTHS else "wait"
        ops.append(MemOp(op_kind, int(target.address), value, width, cond, flush))
    return ops


def batch_mem_ops(ops: Sequence[MemOp], *, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueues ``ops`` in order as one ``cuStreamBatchMemOp`` (one driver call).

    Builds the driver's parameters each call; a protocol that repeats the same operations with
    new values keeps a :class:`MemOpBatch` instead.

    Raises:
        ValueError: An empty list.
    """
    if not ops:
        raise ValueError("batch_mem_ops needs at least one operation")
    MemOpBatch(ops).enqueue(stream)
