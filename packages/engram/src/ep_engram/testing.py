"""Checks shared by the CPU tests, the GPU tests and the benchmark's correctness pass.

Every rank builds its shard from a seed (random bytes, so FP8 NaN patterns and BF16 oddities are
covered), the whole table is all-gathered, and every fetch is compared bit for bit with
``index_select`` on it (id ``-1``: a zero row and zero scale bytes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_engram import knobs
from ep_engram.layout import num_sf_packs
from ep_engram.table import EngramTable

__all__ = [
    "IndexCase",
    "all_gather_bytes",
    "check_fetch",
    "expected_rows",
    "index_cases",
    "make_scales",
    "make_shard",
    "run_error_cases",
    "run_standard_cases",
]


def make_shard(
    rank: int, entries: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """Rank ``rank``'s ``[E, hidden]`` rows: random bytes (CPU)."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (entries, hidden * itemsize), generator=gen, dtype=torch.uint8)
    return raw.view(dtype)


def make_scales(
    rank: int, entries: int, hidden: int, sf_dtype: torch.dtype, seed: int = 0
) -> torch.Tensor:
    """Rank ``rank``'s ``[E, P]`` scales (float32 values, or random packed UE8M0 bytes)."""
    gen = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
    p = num_sf_packs(hidden, sf_dtype)
    if sf_dtype == torch.float32:
        return torch.rand((entries, p), generator=gen) + 0.5
    return torch.randint(0, 256, (entries, p * 4), generator=gen, dtype=torch.uint8).view(
        torch.int32
    )


def all_gather_bytes(
    t: torch.Tensor, group: dist.ProcessGroup, device: torch.device
) -> torch.Tensor:
    """The rows of every rank, concatenated, as ``[R*rows, bytes]`` uint8 (via ``all_gather``)."""
    gloo = str(dist.get_backend(group)) == "gloo"
    where = torch.device("cpu") if gloo else device
    local = t.contiguous().view(torch.uint8).to(where)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts).cpu()


def expected_rows(glob: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``index_select`` of ``glob`` ``[N, B]`` by ``indices`` ``[T, K]``; ``-1`` -> zero bytes.

    Returns ``[T, K*B]`` uint8 on the CPU.
    """
    padded = torch.cat([glob, torch.zeros((1, glob.shape[1]), dtype=glob.dtype)])
    flat = indices.reshape(-1).cpu().long()
    flat = torch.where(flat < 0, glob.shape[0], flat)
    t, k = indices.shape
    return padded.index_select(0, flat).view(t, k * glob.shape[1])


@dataclass(frozen=True)
class IndexCase:
    """One fetch: ``indices`` ``[T, K]`` and what to check with it."""

    name: str
    indices: torch.Tensor
    use_out: bool = False


def index_cases(rank: int, world: int, entries: int, seed: int = 0) -> Iterator[IndexCase]:
    """The standard fetches (the same calls on every rank; the ids differ by rank)."""
    n = world * entries
    gen = torch.Generator().manual_seed(seed * 7919 + rank)

    def rand(t: int, k: int, low: int = 0) -> torch.Tensor:
        return torch.randint(low, n, (t, k), generator=gen)

    mixed = rand(7, 5)
    mixed[mixed % 3 == 0] = -1
    yield IndexCase("random with -1", mixed)
    yield IndexCase("random int32", rand(11, 3).int())
    dup = torch.full((4, 32), (rank * 31 + 5) % n)
    dup[:, ::2] = n - 1
    yield IndexCase("duplicates, K=32", dup)
    hot = torch.tensor([0, n // 2, n - 1])[torch.randint(0, 3, (64, 8), generator=gen)]
    yield IndexCase("hot rows", hot.int())
    yield IndexCase("T=0", torch.empty((0, 4), dtype=torch.int64))
    yield IndexCase("T=0 int32", torch.empty((0, 32), dtype=torch.int32))
    yield IndexCase("K=32 random", rand(9, 32), use_out=True)
    yield IndexCase("K=1", rand(5, 1).int(), use_out=True)
    yield IndexCase("all -1", torch.full((3, 6), -1))
    # Every id owned by rank 0: the other ranks serve nothing.
    yield IndexCase("one owner", torch.randint(0, entries, (6, 4), generator=gen), use_out=True)
    yield IndexCase("T=1", rand(1, 7, low=-1))


def check_fetch(
    table: EngramTable,
    case: IndexCase,
    glob_rows: torch.Tensor,
    glob_sf: torch.Tensor | None,
    col_major: bool,
) -> None:
    """Fetches ``case`` (optionally into a poisoned ``out=``) and compares bit for bit.

    Raises:
        AssertionError: A byte differs, or a shape/stride/dtype is not as documented.
    """
    idx = case.indices.to(table.device)
    t, k = idx.shape
    out = None
    if case.use_out:
        out = torch.full((t, k * table.hidden * table.dtype.itemsize), 0xA5, dtype=torch.uint8)
        out = out.to(table.device).view(table.dtype)
    if case.use_out:  # the layout by name, as ep-elastic's ElasticBuffer passes it
        layout = "col_major_tma" if col_major else "row_major"
        data, sf = table.fetch(idx, out=out, sf_layout=layout)()
    else:
        data, sf = table.fetch(idx, out=out, use_tma_aligned_col_major_sf=col_major)()
    where = f"{case.name} (rank {table.config.rank}, {table.dtype}, col_major={col_major})"
    assert data.dtype == table.dtype and tuple(data.shape) == (t, k * table.hidden), where
    if out is not None:
        assert data.data_ptr() == out.data_ptr(), where
    got = data.view(torch.uint8).cpu()
    assert torch.equal(got, expected_rows(glob_rows, idx)), f"rows differ: {where}"
    if glob_sf is None:
        assert sf is None, where
        return
    assert sf is not None and sf.dtype == table.sf_dtype, where
    p = glob_sf.shape[1] // 4
    assert tuple(sf.shape) == (t, k * p), where
    if col_major and t > 0:
        assert sf.stride() == (1, (t + 3) // 4 * 4), f"{where}: strides {sf.stride()}"
    elif t > 0 and k * p > 1:
        assert sf.stride() == (k * p, 1), f"{where}: strides {sf.stride()}"
    want = expected_rows(glob_sf, idx)
    dense = torch.empty(sf.shape, dtype=sf.dtype).copy_(sf)
    assert torch.equal(dense.view(torch.uint8).view(want.shape), want), f"scales differ: {where}"


def _check_out_survives(
    table: EngramTable, rank: int, world: int, entries: int, glob_rows: torch.Tensor
) -> None:
    """A result fetched into ``out=`` is not touched by the next fetches (the landing area is)."""
    gen = torch.Generator().manual_seed(rank + 99)
    first = torch.randint(-1, world * entries, (5, 3), generator=gen).to(table.device)
    second = torch.randint(-1, world * entries, (5, 3), generator=gen).to(table.device)
    out = torch.empty((5, 3 * table.hidden), dtype=table.dtype, device=table.device)
    kept, _ = table.fetch(first, out=out)()
    landing, _ = table.fetch(second)()
    again, _ = table.fetch(first)()
    assert landing.data_ptr() == again.data_ptr(), "fetches without out= share the landing area"
    assert torch.equal(kept.view(torch.uint8).cpu(), expected_rows(glob_rows, first))


def run_standard_cases(
    group: dist.ProcessGroup,
    placement: str,
    backend: str,
    *,
    entries: int = 37,
    seed: int = 0,
) -> dict[str, int]:
    """Every dtype, scale format and layout with :func:`index_cases`; returns checks per dtype.

    Collective over ``group``. BF16 rows of 256 elements; FP8 rows of 400 elements (4 float32
    scale packs or 1 packed UE8M0 pack, the latter written as the whole-table ``sf``).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    done: dict[str, int] = {}
    for dtype, hidden in ((torch.bfloat16, 256), (torch.float8_e4m3fn, 400)):
        table = EngramTable(group, entries, hidden, dtype, placement, backend)
        device = table.device
        formats: tuple[torch.dtype | None, ...] = (None,)
        if dtype == torch.float8_e4m3fn:
            formats = (torch.float32, torch.int32)
        for round_, sf_dtype in enumerate(formats):
            shard = make_shard(rank, entries, hidden, dtype, seed + round_)
            sf = None if sf_dtype is None else make_scales(rank, entries, hidden, sf_dtype, seed)
            glob_rows = all_gather_bytes(shard, group, device)
            glob_sf = None if sf is None else all_gather_bytes(sf, group, device)
            write_sf = sf
            if sf is not None and sf_dtype == torch.int32:
                write_sf = glob_sf.view(torch.int32)  # type: ignore[union-attr]
            table.write(shard.to(device) if round_ else shard, write_sf)
            for case in index_cases(rank, world, entries, seed + round_):
                for col_major in (False, True) if sf is not None else (False,):
                    check_fetch(table, case, glob_rows, glob_sf, col_major)
                    done[str(dtype)] = done.get(str(dtype), 0) + 1
            _check_out_survives(table, rank, world, entries, glob_rows)
        table.destroy()
    return done


def _raises(kind: type[BaseException], match: str, fn: object, *args: object, **kw: object) -> str:
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except kind as exc:
        if match not in str(exc):
            raise AssertionError(f"expected {match!r} in {kind.__name__}: {exc}") from exc
        return str(exc)
    raise AssertionError(f"{kind.__name__} ({match!r}) not raised")


def run_error_cases(group: dist.ProcessGroup, placement: str, backend: str) -> list[str]:
    """Every documented error, each raised on every rank that must raise; returns the messages.

    Collective over ``group`` (at least 2 ranks).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seen: list[str] = []
    e, h = 16, 128
    # Construction: bad values, disagreement, a table too large for its placement.
    seen.append(
        _raises(ValueError, "hidden", EngramTable, group, e, 0, torch.bfloat16, placement, backend)
    )
    seen.append(
        _raises(
            ValueError, "16 bytes", EngramTable, group, e, 20, torch.bfloat16, placement, backend
        )
    )
    seen.append(
        _raises(TypeError, "dtype", EngramTable, group, e, h, torch.float16, placement, backend)
    )
    seen.append(
        _raises(ValueError, "placement", EngramTable, group, e, h, torch.bfloat16, "disk", backend)
    )
    seen.append(
        _raises(
            ValueError,
            "differs",
            EngramTable,
            group,
            e + rank,
            h,
            torch.bfloat16,
            placement,
            backend,
        )
    )
    # A bad EP_ENGRAM_BACKEND on one rank (it used to raise there alone, before the ranks met).
    with knobs.engram.scope():
        if rank == world - 1:
            os.environ[knobs.EngramKnobs.backend.name] = "bogus"
        seen.append(
            _raises(
                ValueError,
                "EP_ENGRAM_BACKEND" if rank == world - 1 else f"rank {world - 1}: ValueError",
                EngramTable,
                group,
                e,
                h,
                torch.bfloat16,
                placement,
            )
        )
    # A bad timeout on one rank (it used to raise there alone, after the ranks first met).
    seen.append(
        _raises(
            TypeError if rank == world - 1 else ValueError,
            "timeout_s" if rank == world - 1 else f"rank {world - 1}: TypeError",
            EngramTable,
            group,
            e,
            h,
            torch.bfloat16,
            placement,
            backend,
            timeout_s="soon" if rank == world - 1 else None,
        )
    )
    if not torch.cuda.is_available():
        seen.append(
            _raises(
                ValueError, "needs a CUDA device", EngramTable, group, e, h, torch.bfloat16, "gpu"
            )
        )
    huge = 1 << 40
    seen.append(
        _raises(
            ValueError,
            f"{huge * h * 2} bytes",
            EngramTable,
            group,
            huge,
            h,
            torch.bfloat16,
            placement,
            backend,
        )
    )

    table = EngramTable(group, e, h, torch.float8_e4m3fn, placement, backend)
    dev = table.device
    collective = table._backend.collective_fetch
    shard = make_shard(rank, e, h, torch.float8_e4m3fn)
    sf = make_scales(rank, e, h, torch.float32)
    idx = torch.zeros((2, 2), dtype=torch.int64, device=dev)
    # A fetch before any write (every rank: the tables agree).
    seen.append(_raises(RuntimeError, "before any write", table.fetch, idx))
    # A write made on rank 0 only: the others' next collective call meets it.
    if rank == 0:
        seen.append(_raises(ValueError, "same order", table.write, shard, sf))
    else:
        seen.append(_raises(ValueError, "same order", table.destroy))
    # Bad storage or scales on one rank: every rank raises.
    bad_kind: type[BaseException] = TypeError if rank == world - 1 else ValueError
    bad = shard.view(torch.uint8) if rank == world - 1 else shard
    seen.append(_raises(bad_kind, "storage" if rank == world - 1 else "rank", table.write, bad, sf))
    bad = shard[:-1] if rank == 0 else shard
    seen.append(
        _raises(ValueError, "storage must be" if rank == 0 else "rank 0", table.write, bad, sf)
    )
    seen.append(
        _raises(
            TypeError if rank == 0 else ValueError,
            "sf" if rank == 0 else "rank 0",
            table.write,
            shard,
            None if rank == 0 else sf,
        )
    )
    seen.append(_raises(ValueError, "sf must be", table.write, shard, sf[:-1]))
    seen.append(
        _raises(
            ValueError,
            "scale format",
            table.write,
            shard,
            sf if rank == 0 else make_scales(rank, e, h, torch.int32),
        )
    )
    table.write(shard, sf)
    n = world * e
    # Bad indices or out=: every rank raises with the reference backend, the bad rank otherwise.
    cases: list[tuple[type[BaseException], str, torch.Tensor, torch.Tensor | None]] = [
        (TypeError, "int32 or int64", idx.float(), None),
        (ValueError, "[num_tokens, K]", idx.view(-1), None),
        (
            ValueError,
            "out must be",
            idx,
            torch.empty((2, 3), dtype=torch.float8_e4m3fn, device=dev),
        ),
    ]
    for kind, match, bad_idx, out in cases:
        mine = rank == 0
        if mine or collective:
            use = bad_idx if mine else idx
            seen.append(
                _raises(
                    kind if mine else ValueError,
                    match if mine else "rank 0",
                    lambda i=use, o=(out if mine else None): table.fetch(i, out=o)(),
                )
            )
    for value in (n, -2):
        bad_idx = idx.clone()
        bad_idx[1, 1] = value if rank == 0 else 0
        if rank == 0 or collective:
            match = f"indices[1, 1] = {value}" if rank == 0 else "rank 0"
            seen.append(_raises(ValueError, match, lambda b=bad_idx: table.fetch(b)()))
    # Still usable after every error above.
    data, _ = table.fetch(idx)()
    assert torch.equal(
        data.view(torch.uint8).cpu(), expected_rows(all_gather_bytes(shard, group, dev), idx)
    )
    table.destroy()
    table.destroy()
    _raises(RuntimeError, "destroyed", table.fetch, idx)
    return seen
