from __future__ import annotations

import pytest

from ep_jit.streamops import MemOp, MemOpBatch, decode_mem_ops


def test_mem_op_batch_keeps_set_values_in_the_driver_parameters() -> None:
    ops = [
        MemOp.wait(0x1000, 0, cond="eq", width=64),
        MemOp.write(0x2000, 1, width=64),
        MemOp.write(0x3000, 5),
    ]
    batch = MemOpBatch(ops)
    batch.set_value(0, (1 << 64) - 1)
    batch.set_value(2, 9)
    params = batch._params
    assert int(params[0].waitValue.value64) == (1 << 64) - 1  # type: ignore[attr-defined]
    assert int(params[0].waitValue.address) == 0x1000  # type: ignore[attr-defined]
    assert int(params[1].writeValue.value64) == 1  # type: ignore[attr-defined]
    assert int(params[2].writeValue.value) == 9  # type: ignore[attr-defined]
    assert int(params[2].writeValue.address) == 0x3000  # type: ignore[attr-defined]


def test_mem_op_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one operation"):
        MemOpBatch([])
    batch = MemOpBatch([MemOp.write(0x1000, 0)])
    with pytest.raises(ValueError, match="does not fit an unsigned 32-bit word"):
        batch.set_value(0, 1 << 32)
    with pytest.raises(IndexError):
        batch.set_value(1, 0)


def test_decode_mem_ops_reads_back_what_a_batch_holds() -> None:
    ops = [
        MemOp.wait(0x1000, 7, cond="eq", width=64),
        MemOp.write(0x2000, 1, width=64),
        MemOp.write(0x3000, 5),
        MemOp.wait(0x4000, 3, cond="and", flush=True),
        MemOp.wait(0x5000, 9),
    ]
    batch = MemOpBatch(ops)
    assert decode_mem_ops(batch._params) == ops
    batch.set_value(2, 11)
    assert decode_mem_ops(batch._params)[2] == MemOp.write(0x3000, 11)
