"""Region planning and byte rows (CPU)."""

from __future__ import annotations

import pytest
import torch

from ep_jit.regions import RegionPlan, align_up, double_buffered
from ep_jit.rows import RowField, pack_rows, unpack_rows


def test_align_up() -> None:
    assert [align_up(v, 128) for v in (0, 1, 128, 129)] == [0, 128, 128, 256]
    with pytest.raises(ValueError, match="alignment"):
        align_up(5, 0)


def test_regions_are_aligned_and_disjoint() -> None:
    plan = RegionPlan(align=128)
    assert plan.add("a", 40) == 0
    assert plan.add("b", 0) == 128
    assert plan.add("c", 1000, align=1024) == 1024
    assert plan.size == 2024 and plan.padded(4096) == 4096
    assert plan.offsets == {"a": 0, "b": 128, "c": 1024}
    assert plan.sizes == {"a": 40, "b": 0, "c": 1000}
    with pytest.raises(ValueError, match="already planned"):
        plan.add("a", 8)
    with pytest.raises(ValueError, match="nbytes"):
        plan.add("d", -1)


def test_double_buffered_layout() -> None:
    d = double_buffered(3 << 20, 4096)
    assert d.region_bytes == 4 << 20
    assert d.starts == (4096, 4096 + (4 << 20))
    assert d.total == align_up(4096 + (8 << 20), 2 << 20)
    small = double_buffered(100, 64, region_align=128, total_align=256)
    assert (small.region_bytes, small.starts, small.total) == (128, (64, 192), 512)


def test_pack_and_unpack_rows_round_trip() -> None:
    data = torch.randn(5, 7).to(torch.bfloat16)
    ids = torch.arange(10, dtype=torch.int64).view(5, 2)
    weights = torch.rand(5, 3)
    rows = pack_rows([data, ids, weights])
    assert rows.dtype == torch.uint8 and rows.shape == (5, 7 * 2 + 2 * 8 + 3 * 4)
    fields = [
        RowField("data", torch.bfloat16, 7),
        RowField("ids", torch.int64, 2),
        RowField("weights", torch.float32, 3),
    ]
    out = unpack_rows(rows, fields)
    assert torch.equal(out["data"], data)
    assert torch.equal(out["ids"], ids)
    assert torch.equal(out["weights"], weights)
    with pytest.raises(RuntimeError, match="row layout mismatch"):
        unpack_rows(rows, fields[:2])
