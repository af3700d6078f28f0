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
