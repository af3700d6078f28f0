"""The intranode backend on one GPU (1, 2 and 4 ranks sharing it), host and GPU placement: the
same cases as the CPU tests, bit for bit against all_gather + index_select; the errors; every
kernel variant (small fetches on 2 ranks; long fetches that wrap every pipeline many times,
with zero rows and bad ids, at several row sizes); and a table of several GiB in host memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ep_engram import EngramTable, knobs
from ep_engram.kernels import VARIANTS
from ep_engram.testing import run_error_cases, run_standard_cases
from ep_jit.testing import run_ranks

pytestmark = pytest.mark.gpu

PLACEMENTS = ["host", "gpu"]


def _standard(info: Any, placement: str, backend: str) -> dict[str, int]:
    return run_standard_cases(info.group, placement, backend)


def _errors(info: Any, placement: str) -> list[str]:
    return run_error_cases(info.group, placement, "intranode")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_intranode_matches_all_gather(world_size: int, placement: str) -> None:
    results = run_ranks(
        world_size, _standard, placement, "intranode", ranks_per_gpu=world_size, timeout_s=120
    )
    for done in results:
        assert done == {"torch.bfloat16": 11, "torch.float8_e4m3fn": 44}


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_variants(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    # Every variant with an unusual unroll and CTA count, on 2 ranks.
    monkeypatch.setenv(knobs.EngramKnobs.kernel.name, variant)
    monkeypatch.setenv(knobs.EngramKnobs.unroll.name, "3")
    monkeypatch.setenv(knobs.EngramKnobs.num_ctas.name, "3")
    results = run_ranks(2, _standard, "host", "intranode", ranks_per_gpu=2, timeout_s=120)
    assert results[0]["torch.float8_e4m3fn"] == 44


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_intranode_errors(placement: str) -> None:
    messages = run_ranks(2, _errors, placement, ranks_per_gpu=2, timeout_s=120)
    assert any("out of range" in m for m in messages[0])
    where = "host memory" if placement == "host" else "GPU memory"
    assert any(where in m and "bytes" in m for m in messages[0])


def test_reference_backend_on_gpu_ranks() -> None:
    # Ranks sharing a GPU (gloo): the reference backend moves bytes on the CPU, results on GPU.
    results = run_ranks(2, _standard, "gpu", "reference", ranks_per_gpu=2, timeout_s=120)
    assert results[1]["torch.bfloat16"] == 11


def _big_host_table(info: Any, gib: float) -> int:
    hidden = 1024  # 2 KiB rows of BF16
    row = hidden * 2
    entries = int(gib * (1 << 30)) // row
    dev = info.device
    table = EngramTable(info.group, entries, hidden, torch.bfloat16, "host", "intranode")
    storage = torch.empty((entries, row), dtype=torch.uint8, device=dev)
    step = 1 << 18
    cols = torch.arange(row, device=dev, dtype=torch.int32)
    for start in range(0, entries, step):
        r = torch.arange(start, min(start + step, entries), device=dev, dtype=torch.int32)
        storage[start : start + step] = (
            (r[:, None] * 131 + cols[None, :] * 7 + (r[:, None] >> 9)) & 255
        ).to(torch.uint8)
    table.write(storage.view(torch.bfloat16))
    gen = torch.Generator(device=dev).manual_seed(3)
    idx = torch.randint(-1, entries, (4096, 24), device=dev, generator=gen)
    idx[0, :] = torch.arange(entries - 24, entries, device=dev)  # the last rows: offsets > 4 GiB
    data, sf = table.fetch(idx, num_ctas=16)()
    assert sf is None
    padded = torch.cat([storage, torch.zeros((1, row), dtype=torch.uint8, device=dev)])
    want = padded.index_select(0, torch.where(idx < 0, entries, idx).view(-1)).view(4096, -1)
    assert torch.equal(data.view(torch.uint8), want)
    table.destroy()
    return entries


def test_table_of_several_gib_in_host_memory() -> None:
    (entries,) = run_ranks(1, _big_host_table, 5.0, timeout_s=120)
    assert entries * 2048 > (4 << 30)


def _long_fetches(info: Any, placement: str) -> int:
    # 48,000 rows per fetch: every CTA's tiles / every warp's ring of slots wraps many times;
    # ids of both ranks' rows, -1 and, in a second fetch, bad ids.
    dev = info.device
    rank, world = info.rank, info.world_size
    checked = 0
    for hidden in (128, 200, 1024, 3584):  # rows of 256, 400, 2048 and 7168 bytes
        row, entries = hidden * 2, 1501
        gen = torch.Generator(device=dev).manual_seed(hidden)  # the same table on every rank
        rows = torch.randint(
            0, 256, (world * entries, row), dtype=torch.uint8, device=dev, generator=gen
        )
        padded = torch.cat([rows, torch.zeros((1, row), dtype=torch.uint8, device=dev)])
        table = EngramTable(info.group, entries, hidden, torch.bfloat16, placement, "intranode")
        table.write(rows[rank * entries : (rank + 1) * entries].view(torch.bfloat16))
        n = world * entries
        idx = torch.randint(-1, n, (2000, 24), device=dev, generator=gen)
        idx[5, :] = -1
        idx[7, :] = n - 1
        idx[9, :] = rank  # duplicates
        want = padded.index_select(0, torch.where(idx < 0, n, idx).view(-1))
        bad = idx.clone()
        bad[1999, 23] = n  # past the end
        bad[1500, 7] = -2  # the first bad position is the one reported
        for variant in VARIANTS:
            knobs.engram.kernel = variant
            knobs.engram.unroll = 5
            for ctas in (3, 16):
                out = torch.full((2000, 24 * row), 0xA5, dtype=torch.uint8, device=dev)
                data, _ = table.fetch(idx, out=out.view(torch.bfloat16), num_ctas=ctas)()
                where = f"{variant} {placement} {row} B ctas={ctas} rank {rank}"
                assert torch.equal(data.view(torch.uint8).view(want.shape), want), where
                checked += 1
            with pytest.raises(ValueError, match=r"indices\[1500, 7\] = -2 is out of range"):
                table.fetch(bad, num_ctas=5)()
        table.destroy()
    return checked


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_variant_on_long_fetches(placement: str) -> None:
    results = run_ranks(2, _long_fetches, placement, ranks_per_gpu=2, timeout_s=180)
    assert results == [4 * len(VARIANTS) * 2] * 2


def _grouping_kernel(info: Any) -> int:
    # The two grouping kernels against the definition (ep_engram.bucket.grouping_error), on
    # poisoned scratch: int32/int64 ids, -1, bad ids, hot rows, from 0 ids to more ids than
    # 8 CTAs of 1024 threads take in one step, up to MAX_BUCKETS buckets.
    from ep_engram.bucket import MAX_BUCKETS, BucketGrouper, bucket_shift, grouping_error

    dev = info.device
    gen = torch.Generator(device=dev).manual_seed(5)
    grouper = BucketGrouper(dev)
    tables = [
        (4 << 20, bucket_shift(256, 4 << 20)),  # 1 GiB of 256 B rows: 513 buckets
        (3002, bucket_shift(256, 3002)),  # every valid id in bucket 0
        ((MAX_BUCKETS - 1) << 3, 3),  # the most buckets there may be
    ]
    checked = 0
    for num_rows, shift in tables:
        for dtype in (torch.int32, torch.int64):
            for n in (0, 1, 31, 33, 1025, 98304, 200003):
                ids = torch.randint(-1, num_rows, (n,), device=dev, generator=gen).to(dtype)
                if n > 1000:
                    ids[:300] = 7  # a hot row
                    ids[500:800] = -1
                    ids[900] = num_rows  # bad ids keep their values
                    ids[901] = -2
                    ids[902] = torch.iinfo(dtype).max
                for ctas in (1, 3, 8, 16):
                    grouped, order = grouper.group(ids, num_rows, shift, ctas)
                    grouped.fill_(-3)
                    order.fill_(-3)
                    grouped, order = grouper.group(ids, num_rows, shift, ctas)
                    problem = grouping_error(ids, grouped, order, num_rows, shift)
                    assert problem is None, f"{num_rows} rows {dtype} n={n} ctas={ctas}: {problem}"
                    checked += 1
    return checked


def test_grouping_kernels_give_a_grouping() -> None:
    (checked,) = run_ranks(1, _grouping_kernel, timeout_s=180)
    assert checked == 3 * 2 * 7 * 4


def _grouping_in_a_graph(info: Any) -> bool:
    from ep_engram.bucket import BucketGrouper, bucket_shift, grouping_error

    dev = info.device
    num_rows = 1 << 20
    shift = bucket_shift(256, num_rows)
    grouper = BucketGrouper(dev)
    ids = torch.randint(-1, num_rows, (50000,), device=dev)
    grouper.group(ids, num_rows, shift, 4)  # loads the kernels, sizes the scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped, order = grouper.group(ids, num_rows, shift, 4)
    ids.copy_(torch.randint(-1, num_rows, (50000,), device=dev))
    grouped.fill_(-3)
    graph.replay()
    torch.cuda.synchronize()
    problem = grouping_error(ids, grouped, order, num_rows, shift)
    assert problem is None, problem
    return True


def test_grouping_is_graph_capturable() -> None:
    assert run_ranks(1, _grouping_in_a_graph, timeout_s=120) == [True]


def _tile_sorted_cases(info: Any, sort: str) -> int:
    # tile_sorted over grouped ids, bit for bit against index_select: int32/int64 ids, -1, hot
    # and duplicate rows, T=0, bad ids reported at their first position; a table of several
    # buckets per rank (10 MB of 256 B rows each).
    knobs.engram.kernel = "tile_sorted"
    knobs.engram.sort = sort
    dev = info.device
    rank, world = info.rank, info.world_size
    hidden, row, entries = 128, 256, 40000
    gen = torch.Generator(device=dev).manual_seed(11)  # the same table on every rank
    shape = (world * entries, row)
    rows = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev, generator=gen)
    padded = torch.cat([rows, torch.zeros((1, row), dtype=torch.uint8, device=dev)])
    table = EngramTable(info.group, entries, hidden, torch.bfloat16, "host", "intranode")
    table.write(rows[rank * entries : (rank + 1) * entries].view(torch.bfloat16))
    n = world * entries
    checked = 0
    for dtype in (torch.int32, torch.int64):
        for t, k in ((0, 24), (1, 1), (37, 5), (4096, 24)):
            idx = torch.randint(-1, n, (t, k), device=dev, generator=gen).to(dtype)
            if t > 3:
                idx[1, :] = -1
                idx[2, :] = n - 1  # a hot row
                idx[3, :] = rank  # duplicates
            want = padded.index_select(0, torch.where(idx < 0, n, idx).view(-1).long())
            for ctas in (1, 3, 8):
                out = torch.full((t, k * row), 0xA5, dtype=torch.uint8, device=dev)
                data, _ = table.fetch(idx, out=out.view(torch.bfloat16), num_ctas=ctas)()
                where = f"{sort} {dtype} T={t} K={k} ctas={ctas} rank {rank}"
                assert torch.equal(data.view(torch.uint8).reshape(-1, row), want), where
                checked += 1
            if t > 3:
                bad = idx.clone()
                bad[t - 1, k - 1] = n
                bad[2, 3] = -2  # the first bad position is the one reported
                with pytest.raises(ValueError, match=r"indices\[2, 3\] = -2 is out of range"):
                    table.fetch(bad, num_ctas=5)()
    table.destroy()
    return checked


@pytest.mark.parametrize("sort", ["bucket", "torch"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_tile_sorted_matches_index_select(world_size: int, sort: str) -> None:
    results = run_ranks(
        world_size, _tile_sorted_cases, sort, ranks_per_gpu=world_size, timeout_s=120
    )
    assert results == [2 * 4 * 3] * world_size


def _pending_hooks(info: Any) -> int:
    # More fetches pending than the table keeps error words for: each hook still reports its
    # own bad id, in any calling order; hooks dropped uncalled give their words back.
    dev = info.device
    entries, hidden = 1000, 128
    gen = torch.Generator(device=dev).manual_seed(2)
    rows = torch.randint(0, 256, (entries, 256), dtype=torch.uint8, device=dev, generator=gen)
    table = EngramTable(info.group, entries, hidden, torch.bfloat16, "host", "intranode")
    table.write(rows.view(torch.bfloat16))
    words = table._backend.error_words
    slots = len(words.events)
    hooks = []
    for j in range(slots + 4):
        idx = torch.randint(0, entries, (20, 8), device=dev, generator=gen)
        idx[j % 20, j % 8] = entries + j
        hooks.append((j, table.fetch(idx, num_ctas=2)))
    assert sum(h is not None for h in words.holders) == slots
    for j, hook in reversed(hooks):
        match = rf"indices\[{j % 20}, {j % 8}\] = {entries + j} is out of range"
        with pytest.raises(ValueError, match=match):
            hook()
    assert all(h is None for h in words.holders)
    good = torch.randint(-1, entries, (20, 8), device=dev, generator=gen)
    dropped = [table.fetch(good, num_ctas=2) for _ in range(slots)]
    del dropped
    torch.cuda.synchronize()
    last = table.fetch(good, num_ctas=2)
    assert sum(h is not None and h() is not None for h in words.holders) == 1
    padded = torch.cat([rows, torch.zeros((1, 256), dtype=torch.uint8, device=dev)])
    want = padded.index_select(0, torch.where(good < 0, entries, good).view(-1))
    data, _ = last()
    assert torch.equal(data.view(torch.uint8).reshape(-1, 256), want)
    table.destroy()
    return slots


def test_pending_hooks_keep_their_own_error_words() -> None:
    (slots,) = run_ranks(1, _pending_hooks, timeout_s=120)
    assert slots >= 2
