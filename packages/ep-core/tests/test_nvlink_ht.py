"""The NVLink high-throughput kernels against the reference backend, bit for bit (GPU only).

Each rank builds both backends on the same group, feeds them the same fresh random inputs and
compares every output with ``torch.equal``. Outputs are poisoned before the kernels write them.
"""

from __future__ import annotations

import pytest
import torch

from ep_jit.testing import RankInfo, gpu_placements, run_ranks

NMAX = 512
HIDDEN = 2048
TOPK = 8


def _config(info: RankInfo, nmax: int, hidden: int, topk: int, timeout: float = 30.0):
    from ep_core.backend import BackendConfig

    return BackendConfig(
        rank=info.rank,
        num_ranks=info.world_size,
        device=info.device,
        num_bytes=0,
        num_max_tokens_per_rank=nmax,
        hidden=hidden,
        num_topk=topk,
        use_fp8_dispatch=False,
        num_cpu_timeout_secs=60.0,
        num_gpu_timeout_secs=timeout,
    )


def _routing(
    gen: torch.Generator,
    num_tokens: int,
    num_experts: int,
    topk: int,
    kind: str,
    rank: int,
    num_ranks: int,
) -> torch.Tensor:
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    el = num_experts // num_ranks
    if kind == "skewed":
        scores[:, 0] += 2.0 * (torch.rand(num_tokens, generator=gen) < 0.8)
    if kind == "nothing_to_last":  # no token selects an expert of the last rank
        scores[:, (num_ranks - 1) * el :] = -1.0
    if kind == "only_rank0":
        scores[:, el:] = -1.0
    idx = scores.topk(topk, dim=1).indices
    if kind in ("masked", "skewed"):
        idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, -1, idx)
    if kind == "only_rank0":
        idx = torch.where(idx >= el, -1, idx)
    return idx.to(torch.int64)


def _eq(name: str, a: torch.Tensor | None, b: torch.Tensor | None, rows: int | None = None) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{name}: one side is None"
        return
    if rows is not None:
        a, b = a[:rows], b[:rows]
    assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} elements differ"


def _case(
    ref,
    fast,
    info: RankInfo,
    *,
    seed: int,
    num_tokens: int,
    hidden: int,
    num_experts: int,
    topk: int,
    kind: str,
    dtype: str,
    weights: bool,
    do_expand: bool,
    alignment: int,
    do_cpu_sync: bool,
    num_bias: int,
    num_sms: int,
) -> None:
    from ep_core.fp8 import per_token_cast_to_fp8

    dev = info.device
    gen = torch.Generator().manual_seed(seed * 1000 + info.rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(dev)
    idx = _routing(gen, num_tokens, num_experts, topk, kind, info.rank, info.world_size).to(dev)
    w = torch.rand(num_tokens, topk, generator=gen).to(dev) if weights else None
    scales = None
    if dtype != "bf16":
        x, scales = per_token_cast_to_fp8(
            x, round_scale=dtype == "ue8m0", use_ue8m0=dtype == "ue8m0"
        )
    kw = {
        "num_experts": num_experts,
        "num_max_tokens_per_rank": NMAX,
        "expert_alignment": alignment,
        "do_expand": do_expand,
        "do_cpu_sync": do_cpu_sync,
        "handle": None,
        "num_sms": num_sms,
    }
    r = ref.dispatch(x, scales, idx, w, **kw)
    f = fast.dispatch(x, scales, idx, w, **kw)
    torch.cuda.synchronize()
    if do_cpu_sync:
        rows = r.handle.num_expanded_tokens if do_expand else r.handle.num_recv_tokens
        assert f.recv_x.shape[0] == rows
        assert f.handle.num_recv_tokens_per_expert_list == r.handle.num_recv_tokens_per_expert_list
    # Non-expanded rows past the valid count are unspecified without CPU sync.
    rows = None if do_expand else int(r.handle.psum_num_recv_tokens_per_rank[-1].item())
    _eq("recv_x", f.recv_x, r.recv_x, rows)
    _eq("recv_x_scales", f.recv_x_scales, r.recv_x_scales, rows)
    _eq("recv_topk_idx", f.recv_topk_idx, r.recv_topk_idx, rows)
    _eq("recv_topk_weights", f.recv_topk_weights, r.recv_topk_weights, rows)
    for field in (
        "psum_num_recv_tokens_per_rank",
        "psum_num_recv_tokens_per_expert",
        "num_unaligned_recv_tokens_per_expert",
        "send_row",
        "is_token_in_rank",
    ):
        _eq(field, getattr(f.handle, field), getattr(r.handle, field))
    _eq("recv_src_metadata", f.handle.recv_src_metadata, r.handle.recv_src_metadata)
    _eq("handle topk_idx", f.handle.topk_idx, idx)
    if not do_cpu_sync and not do_expand:
        # Worst-case outputs: the rows past the valid count hold -1 ids, 0 weights and zero
        # rows and scales, as the reference's (the whole tensors are equal).
        assert rows is not None
        assert bool((f.recv_topk_idx[rows:] == -1).all()), "ids past the valid rows"
        if f.recv_topk_weights is not None:
            assert bool((f.recv_topk_weights[rows:] == 0).all()), "weights past the valid rows"
        _eq("recv_x (all rows)", f.recv_x, r.recv_x)
        _eq("recv_x_scales (all rows)", f.recv_x_scales, r.recv_x_scales)
        assert not bool(f.recv_x[rows:].view(torch.uint8).any()), "data past the valid rows"

    # Cached dispatch replays the same placement.
    if not do_expand:
        kw2 = dict(kw, do_cpu_sync=False, handle=f.handle)
        f2 = fast.dispatch(x, scales, f.handle.topk_idx, w, **kw2)
        _eq("cached recv_x", f2.recv_x, f.recv_x, rows)
        if not do_cpu_sync:
            _eq("cached recv_x (all rows)", f2.recv_x, f.recv_x)

    # Combine: expert outputs from the received bf16 rows (fresh values).
    m = f.recv_x.shape[0]
    y = torch.randn(m, hidden, generator=gen).to(torch.bfloat16).to(dev)
    cw = torch.rand(*((m,) if do_expand else (m, topk)), generator=gen).to(dev) if weights else None
    bias = tuple(
        torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(dev)
        for _ in range(num_bias)
    )
    rc, rcw = ref.combine(y, r.handle, cw, bias, num_sms)
    fc, fcw = fast.combine(y, f.handle, cw, bias, num_sms)
    torch.cuda.synchronize()
    _eq("combined_x", fc, rc)
    _eq("combined_topk_weights", fcw, rcw)


def _worker(info: RankInfo) -> None:
    from ep_core.nvlink import NvlinkBackend
    from ep_core.reference import TorchBackend

    cfg = _config(info, NMAX, HIDDEN, TOPK)
    ref = TorchBackend.from_config(info.group, cfg)
    fast = NvlinkBackend.from_config(info.group, cfg)
    ne = 16 * info.world_size
    # SM counts cover both launch shapes: from ht.SPLIT_MIN_SMS (20) on each CTA has
    # one role, below it every CTA has both.
    cases = [
        {
            "num_tokens": NMAX,
            "kind": "uniform",
            "dtype": "bf16",
            "weights": True,
            "do_expand": False,
            "alignment": 1,
            "do_cpu_sync": True,
            "num_bias": 0,
            "num_sms": 24,
        },
        {
            "num_tokens": NMAX - 3 * info.rank,
            "kind": "masked",
            "dtype": "fp8",
            "weights": True,
            "do_expand": False,
            "alignment": 1,
            "do_cpu_sync": True,
            "num_bias": 1,
            "num_sms": 20,
        },
        {
            "num_tokens": 100 + info.rank,
            "kind": "skewed",
            "dtype": "ue8m0",
            "weights": False,
            "do_expand": False,
            "alignment": 16,
            "do_cpu_sync": False,
            "num_bias": 2,
            "num_sms": 6,
        },
        {
            "num_tokens": 0 if info.rank == 1 else 37,
            "kind": "uniform",
            "dtype": "bf16",
            "weights": True,
            "do_expand": False,
            "alignment": 1,
            "do_cpu_sync": True,
            "num_bias": 0,
            "num_sms": 2,
        },
        {
            "num_tokens": 64,
            "kind": "nothing_to_last",
            "dtype": "bf16",
            "weights": True,
            "do_expand": False,
            "alignment": 1,
            "do_cpu_sync": True,
            "num_bias": 1,
            "num_sms": 3,
        },
        {
            "num_tokens": 200,
            "kind": "only_rank0",
            "dtype": "fp8",
            "weights": True,
            "do_expand": False,
            "alignment": 1,
            "do_cpu_sync": False,
            "num_bias": 0,
            "num_sms": 24,
        },
        {
            "num_tokens": 300,
            "kind": "uniform",
            "dtype": "bf16",
            "weights": True,
            "do_expand": True,
            "alignment": 128,
            "do_cpu_sync": True,
            "num_bias": 0,
            "num_sms": 32,
        },
        {
            "num_tokens": 250,
            "kind": "masked",
            "dtype": "fp8",
            "weights": True,
            "do_expand": True,
            "alignment": 16,
            "do_cpu_sync": True,
            "num_bias": 1,
            "num_sms": 8,
        },
    ]
    for i, case in enumerate(cases):
        for topk in (TOPK,):
            try:
                _case(ref, fast, info, seed=i, hidden=HIDDEN, num_experts=ne, topk=topk, **case)
            except AssertionError as e:
                raise AssertionError(f"case {i} {case}: {e}") from e
    # Two ranks combine with mixed CTAs at every SM count (use_split_combine): the split launch
    # (4 push warps x 4 slots, 16 reducers) still runs here, as a developer override.
    fast.ht.combine_override = (4, 16, 4, 1)
    _case(ref, fast, info, seed=50, hidden=HIDDEN, num_experts=ne, topk=TOPK, **cases[0])
    fast.ht.combine_override = None
    # Other shapes through a second buffer: hidden 2880 bf16 (gpt-oss), top-4, many experts.
    cfg2 = _config(info, NMAX, 2880, 4)
    fast2 = NvlinkBackend.from_config(info.group, cfg2)
    _case(
        ref,
        fast2,
        info,
        seed=99,
        num_tokens=NMAX,
        hidden=2880,
        num_experts=64 * info.world_size,
        topk=4,
        kind="uniform",
        dtype="bf16",
        weights=True,
        do_expand=False,
        alignment=1,
        do_cpu_sync=True,
        num_bias=0,
        num_sms=16,
    )
    fast2.destroy()
    _graph_case(ref, fast, info)
    fast.destroy()
    fast.destroy()


def _graph_case(ref, fast, info: RankInfo) -> None:
    """Dispatch (no CPU sync) + combine captured once, replayed with fresh routing and data."""
    dev, ne, t = info.device, 16 * info.world_size, NMAX - 7
    x = torch.empty(t, HIDDEN, dtype=torch.bfloat16, device=dev)
    idx = torch.empty(t, TOPK, dtype=torch.int64, device=dev)
    w = torch.empty(t, TOPK, dtype=torch.float32, device=dev)
    kw = {
        "num_experts": ne,
        "num_max_tokens_per_rank": NMAX,
        "expert_alignment": 1,
        "do_expand": False,
        "do_cpu_sync": False,
        "handle": None,
        "num_sms": 8,
    }

    def fill(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed * 7919 + info.rank)
        x.copy_(torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16))
        idx.copy_(_routing(gen, t, ne, TOPK, "masked", info.rank, info.world_size))
        w.copy_(torch.rand(t, TOPK, generator=gen))

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fast.dispatch(x, None, idx, w, **kw)  # warm-up: compiles and loads outside the capture
        warm = fast.dispatch(x, None, idx, w, **kw)
        fast.combine(warm.recv_x, warm.handle, warm.recv_topk_weights, (), 8)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        res = fast.dispatch(x, None, idx, w, **kw)
        comb, comb_w = fast.combine(res.recv_x, res.handle, res.recv_topk_weights, (), 8)
    for rep in range(1, 6):
        fill(rep)
        # Poison: every valid row, the rows past them and the handle's routing copy must be
        # rewritten by the replay.
        res.recv_x.fill_(7)
        res.recv_topk_idx.fill_(7)
        res.handle.topk_idx.fill_(7)
        g.replay()
        r = ref.dispatch(x, None, idx, w, **kw)
        rc, rcw = ref.combine(r.recv_x, r.handle, r.recv_topk_weights, (), 8)
        torch.cuda.synchronize()
        rows = int(r.handle.psum_num_recv_tokens_per_rank[-1].item())
        assert int(res.handle.psum_num_recv_tokens_per_rank[-1].item()) == rows
        _eq(f"graph {rep} recv_x", res.recv_x, r.recv_x, rows)
        _eq(f"graph {rep} recv_topk_idx", res.recv_topk_idx, r.recv_topk_idx, rows)
        assert bool((res.recv_topk_idx[rows:] == -1).all()), f"graph {rep}: ids past the rows"
        _eq(f"graph {rep} handle topk_idx", res.handle.topk_idx, idx)
        _eq(f"graph {rep} combined", comb, rc)
        _eq(f"graph {rep} combined weights", comb_w, rcw)


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((1, 2, 4)))
def test_nvlink_ht_matches_reference(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _worker, timeout_s=600, ranks_per_gpu=per_gpu)


def _tag_wrap_worker(info: RankInfo) -> None:
    """Ops across the 32-bit tag wrap, two of them refresh ops (epochs 2^32 and 2^32 + 1).

    Every tagged flag of both regions is first made to look 2^32 ops old (the tag of op
    2^32 + 9); the refresh ops must leave no such word, and every op must match the reference.
    """
    from ep_core.nvlink import NvlinkBackend
    from ep_core.reference import TorchBackend
    from ep_core.testing import StaleTags

    nmax = NMAX  # _case passes NMAX as the call's maximum
    cfg = _config(info, nmax, 1024, TOPK)
    ref = TorchBackend.from_config(info.group, cfg)
    fast = NvlinkBackend.from_config(info.group, cfg)
    fast._jump_epoch_for_testing(2**32 - 3)
    lay, r, cmax = fast.layout, info.world_size, fast.sizing.max_chunks
    areas = {"info": (lay.info, 2 * r), "dispatch flags": (lay.dflag, r * cmax)}
    areas["combine flags"] = (lay.cflag, r * cmax)
    stale = StaleTags(fast.sym, areas, (lay.region0, lay.region1), 2**32 + 9)
    stale.plant()
    # Three ops per case (dispatch, cached dispatch, combine): 2^32 - 2 .. 2^32 + 3; the
    # refresh ops are the first case's combine and the second case's dispatch.
    for case, (dtype, sms) in enumerate((("bf16", 24), ("fp8", 8))):
        _case(
            ref,
            fast,
            info,
            seed=70 + case,
            num_tokens=nmax - 40 - 7 * info.rank,
            hidden=1024,
            num_experts=16 * r,
            topk=TOPK,
            kind="uniform",
            dtype=dtype,
            weights=True,
            do_expand=False,
            alignment=1,
            do_cpu_sync=True,
            num_bias=0,
            num_sms=sms,
        )
    left = {name: n for name, n in stale.remaining().items() if n}
    assert not left, f"rank {info.rank}: words that kept a stale tag: {left}"
    fast.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2, 4)))
def test_nvlink_ht_tag_wrap_and_refresh(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _tag_wrap_worker, timeout_s=600, ranks_per_gpu=per_gpu)


def _timeout_worker(info: RankInfo) -> None:
    from ep_core.nvlink import NvlinkBackend
    from ep_jit import JitTimeoutError

    fast = NvlinkBackend.from_config(info.group, _config(info, 64, 256, 2, timeout=1.0))
    x = torch.randn(16, 256, device=info.device).to(torch.bfloat16)
    idx = torch.zeros(16, 2, dtype=torch.int64, device=info.device)
    idx[:, 1] = info.world_size  # expert on rank 1
    if info.rank == 0:
        with pytest.raises(JitTimeoutError, match="waiting for peer 1"):
            fast.dispatch(
                x,
                None,
                idx,
                None,
                num_experts=2 * info.world_size,
                num_max_tokens_per_rank=64,
                expert_alignment=1,
                do_expand=False,
                do_cpu_sync=True,
                handle=None,
                num_sms=2,
            )


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2,)))
def test_nvlink_timeout_names_the_peer(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _timeout_worker, timeout_s=180, ranks_per_gpu=per_gpu)


def _bad_routing_worker(info: RankInfo) -> None:
    # A dispatch with CPU sync checks topk_idx's values on the device; each rank's verdict
    # travels to every peer with the token count its dispatch kernel announces, and comes back
    # with the counts in every rank's one host read. So every rank raises: a rank with bad ids
    # the host check's error, the others an error naming it (their results miss its rows). The
    # call completes on every rank first (the kernels skip bad ids), so each rank's next
    # dispatch pairs with its peers' and is exact, and so is a cached replay of it.
    from ep_core.nvlink import NvlinkBackend
    from ep_core.reference import TorchBackend

    cfg = _config(info, NMAX, HIDDEN, TOPK)
    ref = TorchBackend.from_config(info.group, cfg)
    fast = NvlinkBackend.from_config(info.group, cfg)
    n = info.world_size
    ne = 16 * n
    gen = torch.Generator().manual_seed(7 + info.rank)
    good = _routing(gen, NMAX, ne, TOPK, "masked", info.rank, n).to(info.device)
    x = torch.randn(NMAX, HIDDEN, generator=gen).to(torch.bfloat16).to(info.device)
    kw = {
        "num_experts": ne,
        "num_max_tokens_per_rank": NMAX,
        "expert_alignment": 1,
        "do_expand": False,
        "do_cpu_sync": True,
        "handle": None,
        "num_sms": 24,
    }
    out_of_range = good.clone()
    out_of_range[300, TOPK - 1] = ne
    below = good.clone()
    below[0, 0] = -2
    dup = good.clone()
    dup[NMAX - 1, 3] = dup[NMAX - 1, 5] = 1
    last = n - 1
    cases = [
        ((last,), out_of_range, rf"topk_idx\[300, {TOPK - 1}\] = {ne} is outside"),
        ((0,), below, r"topk_idx\[0, 0\] = -2 is outside"),
        ((last,), dup, f"row {NMAX - 1} selects expert 1 more than once"),
    ]
    if n >= 3:  # two bad ranks: each names its own entry, the others name both ranks
        cases.append(((1, last), out_of_range, rf"topk_idx\[300, {TOPK - 1}\] = {ne} is outside"))
    for bad_ranks, bad, own_pattern in cases:
        if info.rank in bad_ranks:
            pattern, idx = own_pattern, bad
        elif len(bad_ranks) == 1:
            b = bad_ranks[0]
            pattern = (
                rf"^dispatch: rank {b} passed invalid topk_idx \(see rank {b}'s error\); "
                r"no rank's result is valid$"
            )
            idx = good
        else:
            names = ", ".join(map(str, bad_ranks))
            pattern = (
                rf"^dispatch: ranks {names} passed invalid topk_idx \(see their errors\); "
                r"no rank's result is valid$"
            )
            idx = good
        with pytest.raises(ValueError, match=pattern):
            fast.dispatch(x, None, idx, None, **kw)
        r = ref.dispatch(x, None, good, None, **kw)
        f = fast.dispatch(x, None, good, None, **kw)
        torch.cuda.synchronize()
        assert f.handle.num_recv_tokens == r.handle.num_recv_tokens
        assert f.handle.num_recv_tokens_per_expert_list == r.handle.num_recv_tokens_per_expert_list
        _eq("recv_x after a rejected dispatch", f.recv_x, r.recv_x)
        _eq("recv_topk_idx after a rejected dispatch", f.recv_topk_idx, r.recv_topk_idx)
    # A cached replay of the last good dispatch (no check, no host read) still pairs and matches.
    cached = fast.dispatch(
        x, None, f.handle.topk_idx, None, **dict(kw, do_cpu_sync=False, handle=f.handle)
    )
    torch.cuda.synchronize()
    _eq("cached recv_x after rejected dispatches", cached.recv_x[: r.recv_x.shape[0]], r.recv_x)
    # Zero tokens: one verdict word, written 0.
    empty = fast.dispatch(x[:0], None, good[:0], None, **kw)
    assert empty.recv_x.shape[1] == HIDDEN
    fast.destroy()
    ref.destroy()
    # More tokens than one check CTA covers (1024): the last rank's bad id is in the third.
    t = 2 * 1024 + 52
    wide = NvlinkBackend.from_config(info.group, _config(info, t, 256, TOPK))
    idx = _routing(gen, t, ne, TOPK, "masked", info.rank, n).to(info.device)
    if info.rank == last:
        idx[t - 1, 0] = ne
        pattern = rf"topk_idx\[{t - 1}, 0\] = {ne} is outside"
    else:
        pattern = rf"^dispatch: rank {last} passed invalid topk_idx"
    xw = torch.randn(t, 256, generator=gen).to(torch.bfloat16).to(info.device)
    with pytest.raises(ValueError, match=pattern):
        wide.dispatch(xw, None, idx, None, **dict(kw, num_max_tokens_per_rank=t))
    wide.destroy()


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((1, 2, 4)))
def test_nvlink_rejects_bad_routing_after_its_one_read(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _bad_routing_worker, timeout_s=180, ranks_per_gpu=per_gpu)


def test_bad_routing_messages() -> None:
    # What the ranks with valid ids raise when others passed bad ones (the bad ranks raise the
    # host check's own error, naming the entry).
    from ep_core.nvlink.backend import _bad_routing_message, _raise_bad_routing

    assert _bad_routing_message([1]) == (
        "dispatch: rank 1 passed invalid topk_idx (see rank 1's error); no rank's result is valid"
    )
    assert _bad_routing_message([0, 3]) == (
        "dispatch: ranks 0, 3 passed invalid topk_idx (see their errors); no rank's result is valid"
    )
    idx = torch.tensor([[0, 1], [2, 16]])
    with pytest.raises(ValueError, match=r"topk_idx\[1, 1\] = 16 is outside"):
        _raise_bad_routing(2, [0, 2], idx, 16)
    with pytest.raises(ValueError, match=r"^dispatch: ranks 0, 2 passed"):
        _raise_bad_routing(1, [0, 2], idx, 16)
    with pytest.raises(RuntimeError, match="the host check does not see"):
        _raise_bad_routing(0, [0], torch.tensor([[0, 1]]), 16)


def test_dispatch_args_mirror_matches_header() -> None:
    # HtDispatchArgs is passed by value: the ctypes mirror lists the header's fields in order,
    # each 8 bytes (the header asserts the size it expects).
    import ctypes
    import re
    from pathlib import Path

    import ep_core
    from ep_core.nvlink.layout import HtDispatchArgs, SymLayout

    header = Path(ep_core.__file__).parent / "include" / "ep_core" / "sm90_ht_dispatch.cuh"
    text = header.read_text()
    body = re.search(r"struct HtDispatchArgs \{(.*?)\n\};", text, re.S)
    assert body is not None
    names = re.findall(r"^\s*(?:const\s+)?[\w:]+\*?\s+(\w+);", body.group(1), re.M)
    assert names == [f[0] for f in HtDispatchArgs._fields_]
    size = re.search(r"static_assert\(sizeof\(HtDispatchArgs\) == (\d+) \* 8", text)
    assert size is not None
    assert ctypes.sizeof(HtDispatchArgs) == int(size.group(1)) * 8
    assert ctypes.sizeof(SymLayout) == 9 * 8


def test_int32_block_offsets() -> None:
    # The int32 outputs of a dispatch share one allocation: parts 256-byte aligned, disjoint.
    from ep_core.nvlink.backend import _INT32_ALIGN, _int32_offsets

    sizes = [5, 0, 64, 65, 1]
    offsets, total = _int32_offsets(sizes)
    assert offsets[0] == 0 and all(o % _INT32_ALIGN == 0 for o in offsets)
    for (o, n), nxt in zip(zip(offsets, sizes, strict=True), [*offsets[1:], total], strict=True):
        assert o + n <= nxt
    assert total == 5 * _INT32_ALIGN
    assert _int32_offsets([]) == ([], 1)


@pytest.mark.parametrize(
    ("tokens", "ranks", "topk", "fresh"),
    [(0, 1, 8, True), (512, 1, 8, True), (7, 4, 3, True), (513, 8, 32, True), (100, 2, 4, False)],
)
def test_small_outputs_are_disjoint_views(tokens: int, ranks: int, topk: int, fresh: bool) -> None:
    # A dispatch's small outputs share one allocation: each part starts on 256 bytes (the
    # per-source verdicts right after the counts, for the one host read, and the prologue's
    # words right after them), and no two parts overlap. The kernels get addresses; the views a
    # handle keeps have their shape and dtype, are contiguous and lie where the addresses point.
    from ep_core.nvlink.backend import _small_layout, _small_outputs, _small_views

    el, max_chunks, nmax = 16, 70, 600
    num_counts, num_bad = ranks + 2 * el, 3 if fresh else 0
    key = (tokens, topk) if fresh else None
    block, offsets, bad, at = _small_outputs(
        torch.device("cpu"),
        num_counts=num_counts,
        num_bad=num_bad,
        num_ranks=ranks,
        max_chunks=max_chunks,
        rows=ranks * nmax,
        fresh=key,
    )
    base = block.data_ptr()
    assert (offsets, block.numel()) == _small_layout(
        num_counts, num_bad, ranks, max_chunks, ranks * nmax, key
    )
    # int32 words of each part, in the order of the addresses, then the prologue's verdicts.
    words = [num_counts, ranks, ranks * max_chunks, ranks, ranks * nmax * 2]
    if fresh:
        chunks = -(-tokens // 8) + 1
        words += [tokens * ranks, chunks * ranks, -(-tokens * ranks // 4), tokens * topk * 2]
    assert len(at) == len(words) and all(type(p) is int for p in at)
    parts = [*zip(at, words, strict=True)]
    if fresh:
        parts.append((bad, num_bad))
    else:
        assert bad is None
    cover = torch.zeros(block.numel() * 4, dtype=torch.int32)
    for i, (address, n) in enumerate(parts):
        first, size = address - base, 4 * n
        adjacent = {1: 4 * num_counts, len(words): 4 * (num_counts + ranks)}
        assert first % 256 == 0 or first == adjacent.get(i)
        assert first + size <= block.numel() * 4
        cover[first : first + size] += 1
    assert int(cover.max()) <= 1
    # The views the handle keeps: (shape, dtype) and where each starts.
    views = _small_views(block, offsets, ranks, max_chunks, key)
    expect = [((ranks, max_chunks), torch.int32, at[2]), ((ranks,), torch.int32, at[3])]
    if fresh:
        expect += [
            ((tokens, ranks), torch.int32, at[5]),
            ((-(-tokens // 8) + 1, ranks), torch.int32, at[6]),
            ((tokens, ranks), torch.bool, at[7]),
            ((tokens, topk), torch.int64, at[8]),
        ]
    assert len(views) == len(expect)
    for v, (shape, dtype, address) in zip(views, expect, strict=True):
        assert (tuple(v.shape), v.dtype) == (shape, dtype) and v.is_contiguous()
        assert v.numel() == 0 or v.data_ptr() == address  # torch gives 0 for empty tensors
    if fresh:  # the routing copy holds int64 ids as written
        ids = torch.randint(-1, 64, (tokens, topk))
        views[-1].copy_(ids)
        assert torch.equal(views[-1], ids)


def test_aligned_counts_from_prefix_sums() -> None:
    # The host side of a dispatch with CPU sync turns the kernel's inclusive prefix sums of the
    # aligned per-expert counts into the counts (`num_recv_tokens_per_expert_list`).
    from ep_core.nvlink.backend import _aligned_from_psum

    assert _aligned_from_psum([]) == []
    assert _aligned_from_psum([0]) == [0]
    assert _aligned_from_psum([4, 4, 12, 16]) == [4, 0, 8, 4]
    counts = torch.randint(0, 50, (64,)).tolist()
    psum = torch.tensor(counts).cumsum(0).tolist()
    assert _aligned_from_psum(psum) == counts
