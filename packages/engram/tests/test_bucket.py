"""The grouping of ids by table page (ep_engram.bucket) on the CPU: the shift choice, the
pure-torch reference grouping and the checker the GPU tests use, argument errors, the knob and
the kernels' compile for sm_90a."""

from __future__ import annotations

import pytest
import torch

from ep_engram.bucket import (
    BUCKET_BYTES,
    MAX_BUCKETS,
    BucketGrouper,
    bucket_shift,
    bucket_spec,
    buckets_of,
    group_reference,
    grouping_error,
    num_buckets,
    shipped_bucket_kernels,
)
from ep_engram.kernels import shipped_kernels


@pytest.mark.parametrize(
    ("row_bytes", "shift"), [(16, 17), (256, 13), (400, 12), (2048, 10), (7168, 8), (4 << 20, 0)]
)
def test_shift_gives_buckets_of_at_most_2_mib(row_bytes: int, shift: int) -> None:
    assert bucket_shift(row_bytes, 1000) == shift
    if row_bytes <= BUCKET_BYTES:
        # The largest power of two of rows that fits 2 MiB.
        assert (row_bytes << shift) <= BUCKET_BYTES < (row_bytes << (shift + 1))


@pytest.mark.parametrize("row_bytes", [16, 256, 2048, 7168])
@pytest.mark.parametrize("table_gib", [1, 64, 190, 1 << 14])
def test_large_tables_get_larger_buckets_never_too_many(row_bytes: int, table_gib: int) -> None:
    num_rows = (table_gib << 30) // row_bytes
    shift = bucket_shift(row_bytes, num_rows)
    assert num_buckets(num_rows, shift) <= MAX_BUCKETS
    # No smaller shift would do.
    if shift > bucket_shift(row_bytes, 1):
        assert num_buckets(num_rows, shift - 1) > MAX_BUCKETS
    assert buckets_of(torch.tensor([num_rows - 1]), num_rows, shift).item() == (
        num_buckets(num_rows, shift) - 2
    )


def test_one_bucket_of_rows_and_the_last_for_bad_ids() -> None:
    assert num_buckets(1, bucket_shift(256, 1)) == 2
    ids = torch.tensor([-1, 0, 8191, 8192, 20000, 20001, -7, 1 << 40])
    assert buckets_of(ids, 20001, 13).tolist() == [3, 0, 0, 1, 2, 3, 3, 3]


def test_shift_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="row_bytes"):
        bucket_shift(0, 10)
    with pytest.raises(ValueError, match="num_rows"):
        bucket_shift(256, 0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_reference_grouping_is_a_valid_grouping(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    num_rows, shift = 3000, 7  # 24 buckets of rows
    ids = torch.randint(-1, num_rows, (n,), generator=gen).to(dtype)
    if n > 4:
        ids[1] = num_rows  # bad ids keep their values
        ids[3] = -5
        ids[4] = ids[0]  # a duplicate
    grouped, order = group_reference(ids, num_rows, shift)
    assert grouping_error(ids, grouped, order, num_rows, shift) is None
    assert grouped.dtype == dtype and order.dtype == torch.int64
    assert sorted(grouped.tolist()) == sorted(ids.tolist())
    # Stable: inside a bucket the original order is kept; -1 and bad ids come last.
    b = buckets_of(grouped, num_rows, shift)
    assert bool(((b[1:] > b[:-1]) | (order[1:] > order[:-1])).all())
    if n > 4:
        assert grouped[-1].item() in (-1, -5, num_rows)


def test_checker_finds_every_kind_of_mistake() -> None:
    num_rows, shift = 1000, 4
    ids = torch.tensor([900, 5, -1, 17, 5, 1000, 333], dtype=torch.int64)
    grouped, order = group_reference(ids, num_rows, shift)
    assert grouping_error(ids, grouped, order, num_rows, shift) is None
    swapped = grouped.clone()
    swapped[[0, -1]] = swapped[[-1, 0]]
    other = order.clone()
    other[[0, -1]] = other[[-1, 0]]
    assert "decrease" in str(grouping_error(ids, swapped, other, num_rows, shift))
    assert "ids[order" in str(grouping_error(ids, swapped, order, num_rows, shift))
    twice = order.clone()
    twice[1] = twice[0]
    assert "permutation" in str(grouping_error(ids, grouped, twice, num_rows, shift))
    outside = order.clone()
    outside[2] = 7
    assert "outside" in str(grouping_error(ids, grouped, outside, num_rows, shift))
    assert "dtypes" in str(grouping_error(ids, grouped.int(), order, num_rows, shift))
    assert "positions" in str(grouping_error(ids, grouped[:-1], order[:-1], num_rows, shift))
    # Within one bucket any order is fine, as long as order maps back.
    same = torch.tensor([5, 3, 5], dtype=torch.int64)
    g = torch.tensor([5, 5, 3], dtype=torch.int64)
    assert grouping_error(same, g, torch.tensor([1, 0, 2]), num_rows, shift) is not None
    assert grouping_error(same, g, torch.tensor([0, 2, 1]), num_rows, shift) is None
    assert grouping_error(same, g, torch.tensor([2, 0, 1]), num_rows, shift) is None


def test_grouper_rejects_bad_ids() -> None:
    grouper = BucketGrouper(torch.device("cpu"))
    with pytest.raises(TypeError, match="int32 or int64"):
        grouper.group(torch.zeros(4, dtype=torch.int16), 100, 3, 2)
    with pytest.raises(TypeError, match="CUDA"):
        grouper.group(torch.zeros(4, dtype=torch.int64), 100, 3, 2)
    with pytest.raises(TypeError, match="1-D"):
        grouper.group(torch.zeros((2, 2), dtype=torch.int64), 100, 3, 2)


def test_specs_and_shipped_kernels() -> None:
    with pytest.raises(ValueError, match="step"):
        bucket_spec("scan", index64=True)
    spec = bucket_spec("scatter", index64=True)
    assert f"{MAX_BUCKETS}" in spec.render() and "long long" in spec.render()
    names = {s.name for s in shipped_kernels()}
    assert {s.name for s in shipped_bucket_kernels()} <= names
