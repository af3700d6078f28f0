"""The NVLink low-latency kernels (``ep_core.nvlink.ll``) against the reference backend.

GPU tests build a :class:`~ep_core.nvlink.ll.LowLatencyEngine` and the reference
:class:`~ep_core.reference.TorchBackend` on the same group, feed both the same fresh random inputs
and compare bit for bit: the valid rows of every local expert (data and scales), ``recv_count``,
the handle's ranges and source tokens, and the combined output. Outputs are poisoned before the
kernels write them; combine inputs carry NaN in every row combine must not read. CPU tests check
that the module imports without CUDA, that the ctypes mirror matches the header, and that every
shipped instantiation compiles for sm_90a without local memory.
"""

from __future__ import annotations

import ctypes
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_jit import DeviceWatchdog, JitTimeoutError
from ep_jit.testing import RankInfo, gpu_placements, run_ranks

HEADER = Path(__file__).resolve().parents[1] / "src/ep_core/include/ep_core/sm90_ll.cuh"
WORLDS = gpu_placements((2, 4))
PLACES = ("world_size", "per_gpu")

# ---- CPU ----------------------------------------------------------------------------------------


def test_module_imports_without_cuda() -> None:
    code = (
        "import torch, ep_core.nvlink.ll as m\n"
        "specs = m.shipped_kernels()\n"
        "lay = m.compute_ll_layout(4, 64, 128, 64, 7168, 8)\n"
        "assert lay.total_bytes > 0 and specs\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_args_mirror_matches_header() -> None:
    from ep_core.nvlink.ll import LlArgs

    body = re.search(r"struct LlArgs \{(.*?)\n\};", HEADER.read_text(), re.S)
    assert body is not None
    names: list[str] = []
    for line in body.group(1).splitlines():
        m = re.match(r"\s*(?:u?int64_t)\s+(\w+)(\[2\])?;", line)
        if m:
            names += [f"{m.group(1)}0", f"{m.group(1)}1"] if m.group(2) else [m.group(1)]
    assert names == [f[0] for f in LlArgs._fields_]
    assert all(f[1] in (ctypes.c_uint64, ctypes.c_int64) for f in LlArgs._fields_)


def test_layout_parts_do_not_overlap() -> None:
    from ep_core.nvlink.ll import compute_ll_layout

    for r, nc, n, el, h, k in (
        (1, 1, 1, 1, 64, 1),
        (4, 64, 128, 64, 7168, 8),
        (8, 33, 257, 256, 8192, 16),
    ):
        lay = compute_ll_layout(r, nc, n, el, h, k)
        assert lay.off_rel + 2 * r * 8 <= lay.off_pend
        assert lay.off_pend + nc * 8 <= lay.region[0]
        parts = sorted(
            [
                (lay.r_cnt, r * el * 8),
                (lay.r_ntok, r * 8),
                (lay.r_done, r * nc * 8),
                (lay.r_meta, r * n * k * 4),
                (lay.r_cmask, r * n * 8),
                (lay.r_cw, r * n * k * 8),
                (lay.r_stage, r * n * lay.row_bytes),
            ]
        )
        for (a, sa), (b, _) in itertools.pairwise(parts):
            assert a % 16 == 0 and a + sa <= b
        assert lay.region[0] + parts[-1][0] + parts[-1][1] <= lay.region[1]
        assert lay.region[1] + parts[-1][0] + parts[-1][1] <= lay.total_bytes
        assert lay.row_bytes >= 2 * h and lay.row_bytes % 128 == 0


def test_kernels_compile_for_sm90a(tmp_path: Path) -> None:
    ep_jit = pytest.importorskip("ep_jit")
    from ep_core.nvlink import _common
    from ep_core.nvlink import ll as nvlink_ll
    from ep_jit import knobs

    _common.register_include_root()
    with knobs.jit.scope():
        knobs.jit.cache_dir = str(tmp_path / "cache")
        knobs.jit.ptxas_check = True  # a stack frame or a spill is an error
        ep_jit.clear_memory_cache()
        try:
            for spec in nvlink_ll.shipped_kernels():
                entry = ep_jit.compile_spec(spec, arch="90a")
                assert spec.entry.encode() in entry.read_cubin()
        finally:
            ep_jit.clear_memory_cache()


def _host_only_engine(monkeypatch: pytest.MonkeyPatch, launched: list[tuple[str, int]]):
    """A LowLatencyEngine without a GPU: the launches are recorded instead of run."""
    import contextlib

    from ep_core.nvlink import ll as nvlink_ll

    eng = object.__new__(nvlink_ll.LowLatencyEngine)
    r, nmax, hidden, num_experts, k = 2, 8, 256, 8, 4
    eng.group, eng.rank, eng.num_ranks = None, 0, r
    eng.num_max_tokens, eng.hidden, eng.num_experts, eng.num_topk = nmax, hidden, num_experts, k
    eng.device, eng.num_ctas, eng.cooperative, eng.poison_outputs = (
        torch.device("cpu"),
        4,
        True,
        True,
    )
    eng._watchdog = DeviceWatchdog(nvlink_ll.LL_STAGES, rank=0, timeout_s=1.0, device="cpu")
    eng.timeout_ns = eng._watchdog.timeout_ns
    eng._error_code = ctypes.c_int32.from_address(eng._watchdog.record_ptr)
    eng.layout = nvlink_ll.compute_ll_layout(r, 4, nmax, num_experts // r, hidden, k)
    eng._peer_bases = torch.zeros(r, dtype=torch.int64)
    eng._seq, eng._pending, eng._calls, eng._destroyed = 0, set(), [0, 0], False
    eng.sym = None

    def fake_launch(spec, args, smem: int) -> None:
        launched.append((spec.name, int(args.slot)))

    monkeypatch.setattr(eng, "_launch", fake_launch)
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    return eng


def test_calls_carry_their_signature_and_a_difference_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ep_core.nvlink import ll as nvlink_ll

    eng = _host_only_engine(monkeypatch, [])
    sigs: list[int] = []
    monkeypatch.setattr(eng, "_launch", lambda spec, args, smem: sigs.append(int(args.signature)))
    x = torch.zeros(5, 256, dtype=torch.bfloat16)
    idx = torch.zeros(5, 4, dtype=torch.int64)
    opts = {"num_max_dispatch_tokens_per_rank": 8, "num_experts": 8}
    res, _ = eng.dispatch(x, idx, use_fp8=False, **opts)
    eng.dispatch(x, idx, use_fp8=True, **opts)
    eng.combine(torch.zeros(4, 16, 256, dtype=torch.bfloat16), idx, torch.ones(5, 4), res.handle)
    assert sigs == [
        nvlink_ll.dispatch_signature(8, 256, 4, 8, "bf16"),
        nvlink_ll.dispatch_signature(8, 256, 4, 8, "fp8"),
        nvlink_ll.combine_signature(8, 256, 4, 8),
    ]
    assert sigs[0] != sigs[1] and sigs[0] < 1 << 15 and sigs[2] & nvlink_ll.SIGNATURE_COMBINE
    for i, changed in enumerate((16, 512, 8, 16)):
        args = [8, 256, 4, 8]
        args[i] = changed
        assert nvlink_ll.combine_signature(*args) != sigs[2], args
        assert nvlink_ll.dispatch_signature(*args, "bf16") != sigs[0], args
    # A kernel recorded that rank 1 wrote a combine's signature where this rank's dispatch read
    # its token count: ValueError naming both kinds, at this call and the next.
    record = ctypes.cast(eng._watchdog.record_ptr, ctypes.POINTER(ctypes.c_int32 * 16)).contents
    record[0], record[1], record[2], record[3] = nvlink_ll.ERROR_ARGUMENTS_DIFFER, 22, 1, 0
    observed = ctypes.c_int64.from_address(eng._watchdog.record_ptr + 24)
    expected = ctypes.c_int64.from_address(eng._watchdog.record_ptr + 32)
    observed.value, expected.value = sigs[2], sigs[0]
    for _ in range(2):
        with pytest.raises(
            ValueError,
            match="rank 1 called low_latency_combine while rank 0 called low_latency_dispatch",
        ):
            eng.dispatch(x, idx, use_fp8=False, **opts)
    observed.value = sigs[1]
    with pytest.raises(
        ValueError,
        match=r"low_latency_dispatch configuration must agree on every rank: rank 1 called with "
        r"other arguments than rank 0 \(one of num_experts",
    ):
        eng.dispatch(x, idx, use_fp8=False, **opts)


def test_host_logic_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[tuple[str, int]] = []
    eng = _host_only_engine(monkeypatch, launched)
    x = torch.zeros(5, 256, dtype=torch.bfloat16)
    idx = torch.zeros(5, 4, dtype=torch.int64)
    opts = {"num_max_dispatch_tokens_per_rank": 8, "num_experts": 8}
    res, hook = eng.dispatch(x, idx, use_fp8=True, round_scale=True, use_ue8m0=True, **opts)
    assert hook is None and launched[-1] == ("ep_ll_dispatch_ue8m0_p3", 0)
    assert res.recv_x.shape == (4, 16, 256) and res.recv_x.dtype == torch.float8_e4m3fn
    assert res.recv_x_scales is not None and res.recv_x_scales.dtype == torch.int32
    assert res.recv_x_scales.shape == (4, 16, 1) and res.recv_x_scales.stride()[1] == 1
    h = res.handle
    assert h.recv_src_info.shape == (4, 16) and h.recv_layout_range.shape == (4, 2)
    assert h.recv_layout_range.dtype == torch.int64 and h.recv_count.shape == (4,)
    res2, hook2 = eng.dispatch(x, idx, use_fp8=False, return_recv_hook=True, **opts)
    assert hook2 is not None and launched[-1] == ("ep_ll_dispatch_bf16_p1", 1)
    assert res2.recv_x_scales is None and res2.recv_x.dtype == torch.bfloat16
    w = torch.ones(5, 4)
    y = torch.zeros(4, 16, 256, dtype=torch.bfloat16)
    out, chook = eng.combine(y, idx, w, res.handle, return_recv_hook=True)
    assert chook is not None and launched[-1] == ("ep_ll_combine_p1", 0)
    assert out.shape == (5, 256)
    with pytest.raises(RuntimeError, match="at most two"):  # op 2 still waits for its hook
        eng.dispatch(x, idx, use_fp8=False, **opts)
    hook2()
    assert launched[-1] == ("ep_ll_dispatch_bf16_p2", 1)
    with pytest.raises(RuntimeError, match="already called"):
        hook2()
    res4, _ = eng.dispatch(x, idx, use_fp8=True, **opts)  # op 4: op 2 was received
    assert launched[-1] == ("ep_ll_dispatch_fp8_p3", 0)
    assert res4.recv_x_scales is not None and res4.recv_x_scales.shape == (4, 16, 2)
    chook()
    assert launched[-1] == ("ep_ll_combine_p2", 0)
    strided = torch.zeros(256, 5, dtype=torch.bfloat16).t()  # not contiguous: copied back
    got, _ = eng.combine(y, idx, w, res4.handle, out=strided)
    assert got is strided and launched[-1] == ("ep_ll_combine_p3", 1)
    with pytest.raises(TypeError, match="not made by this engine"):
        eng.combine(
            y,
            idx,
            w,
            _host_only_engine(monkeypatch, []).dispatch(x, idx, use_fp8=False, **opts)[0].handle,
        )
    with pytest.raises(ValueError, match="exceed"):
        eng.dispatch(
            torch.zeros(9, 256, dtype=torch.bfloat16),
            torch.zeros(9, 4, dtype=torch.int64),
            use_fp8=False,
            **opts,
        )
    with pytest.raises(ValueError, match="hidden % 128"):
        eng.dispatch(torch.zeros(5, 192, dtype=torch.bfloat16), idx, use_fp8=True, **opts)
    with pytest.raises(ValueError, match="round_scale"):
        eng.dispatch(x, idx, use_fp8=True, use_ue8m0=True, **opts)
    record = eng._watchdog._record.view(torch.int32)  # code, stage, peer, rank, ...
    record[0], record[1], record[2] = 1, 23, 1
    with pytest.raises(JitTimeoutError, match="waiting for peer 1"):
        eng.dispatch(x, idx, use_fp8=False, **opts)


# ---- GPU helpers --------------------------------------------------------------------------------


def _engine(
    info: RankInfo, nmax: int, hidden: int, num_experts: int, topk: int, timeout: float = 60.0
):
    from ep_core.nvlink.ll import LowLatencyEngine

    return LowLatencyEngine(
        info.group,
        rank=info.rank,
        num_ranks=info.world_size,
        num_max_dispatch_tokens_per_rank=nmax,
        hidden=hidden,
        num_experts=num_experts,
        num_topk=topk,
        device=info.device,
        num_gpu_timeout_secs=timeout,
        poison_outputs=True,
    )


def _reference(info: RankInfo):
    from ep_core.reference import TorchBackend

    return TorchBackend(info.group, info.rank, info.world_size)


def _routing(
    gen: torch.Generator, num_tokens: int, num_experts: int, topk: int, kind: str, num_ranks: int
) -> torch.Tensor:
    """``[T, k]`` int64 distinct experts per row (CPU); ``kind`` picks the pattern."""
    el = num_experts // num_ranks
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if kind == "skewed":
        scores[:, 0] += 2.0 * (torch.rand(num_tokens, generator=gen) < 0.75)
    if kind == "nothing_to_last":
        scores[:, (num_ranks - 1) * el :] = -1.0
    if kind == "all_to_rank0":
        scores[:, el:] = -1.0
    idx = scores.topk(topk, dim=1).indices
    picked = scores.gather(1, idx)
    idx = torch.where(picked < -0.5, -1, idx)
    if kind in ("masked", "skewed"):
        idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, -1, idx)
    return idx.to(torch.int64)


def _wide(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """bf16 values whose float32 sums depend on their order (some exactly +-2^20, signed zeros)."""
    v = torch.randn(shape, generator=gen, device=device)
    v = v * torch.exp2(torch.randint(-20, 21, shape, generator=gen, device=device).float())
    big = torch.where(torch.rand(shape, generator=gen, device=device) < 0.5, 2.0**20, -(2.0**20))
    v = torch.where(torch.rand(shape, generator=gen, device=device) < 0.2, big, v)
    v[..., :2] = -0.0
    return v.to(torch.bfloat16)


def _weights(gen: torch.Generator, num_tokens: int, topk: int) -> torch.Tensor:
    w = torch.rand(num_tokens, topk, generator=gen)
    exact = torch.where(torch.rand(w.shape, generator=gen) < 0.5, 1.0, 0.5)
    w = torch.where(torch.rand(w.shape, generator=gen) < 0.5, exact, w)
    return torch.where(torch.rand(w.shape, generator=gen) < 0.2, -w, w)


def _valid_rows(recv_count: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.arange(slots, device=recv_count.device)[None, :] < recv_count[:, None].long()


def _check_dispatch(tag: str, got, ref) -> None:
    from ep_core.testing import assert_equal

    count = ref.recv_count
    assert_equal(f"{tag} recv_count", got.recv_count, count.cpu())
    assert_equal(
        f"{tag} layout range", got.handle.recv_layout_range, ref.handle.recv_layout_range.cpu()
    )
    assert_equal(f"{tag} src_info", got.handle.recv_src_info, ref.handle.recv_src_info.cpu())
    assert got.recv_x.shape == ref.recv_x.shape and got.recv_x.dtype == ref.recv_x.dtype, tag
    valid = _valid_rows(count, ref.recv_x.shape[1])
    # Compared as bytes (boolean indexing of e4m3 tensors is not implemented everywhere).
    assert_equal(
        f"{tag} recv_x",
        got.recv_x.view(torch.uint8)[valid],
        ref.recv_x.view(torch.uint8)[valid].cpu(),
    )
    if ref.recv_x_scales is None:
        assert got.recv_x_scales is None, f"{tag}: unexpected scales"
        return
    s = got.recv_x_scales
    assert (
        s is not None and s.shape == ref.recv_x_scales.shape and s.dtype == ref.recv_x_scales.dtype
    )
    assert s.stride(1) == 1, f"{tag}: scales must be column-major, strides {s.stride()}"
    assert_equal(f"{tag} scales", s[valid], ref.recv_x_scales[valid].cpu())


def _combine_input(
    gen: torch.Generator,
    recv_count: torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device,
) -> torch.Tensor:
    y = _wide(shape, gen, device)
    y[~_valid_rows(recv_count, shape[1])] = float("nan")
    return y


FMT = {
    "bf16": {"use_fp8": False, "round_scale": False, "use_ue8m0": False},
    "fp8": {"use_fp8": True, "round_scale": False, "use_ue8m0": False},
    "fp8_pow2": {"use_fp8": True, "round_scale": True, "use_ue8m0": False},
    "ue8m0": {"use_fp8": True, "round_scale": True, "use_ue8m0": True},
}


def _run_case(
    eng,
    ref,
    info: RankInfo,
    *,
    seed: int,
    num_tokens: int,
    nmax: int,
    hidden: int,
    num_experts: int,
    topk: int,
    kind: str,
    fmt: str,
    use_out: bool,
) -> None:
    from ep_core.testing import assert_equal

    dev = info.device
    tag = f"[{kind} {fmt} T={num_tokens} H={hidden} E={num_experts} k={topk} rank {info.rank}]"
    gen = torch.Generator().manual_seed(seed * 1009 + info.rank)
    cgen = torch.Generator(device=dev).manual_seed(seed * 1013 + info.rank)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(torch.bfloat16).to(dev)
    idx = _routing(gen, num_tokens, num_experts, topk, kind, info.world_size).to(dev)
    opts = dict(num_max_dispatch_tokens_per_rank=nmax, num_experts=num_experts, **FMT[fmt])
    r = ref.low_latency_dispatch(x, idx, **opts)[0]
    f, hook = eng.dispatch(x, idx, **opts)
    assert hook is None
    torch.cuda.synchronize()
    _check_dispatch(tag, f, r)

    el = num_experts // info.world_size
    y = _combine_input(cgen, r.recv_count, (el, info.world_size * nmax, hidden), dev)
    w = _weights(gen, num_tokens, topk).to(dev)
    want = ref.low_latency_combine(y, idx, w, r.handle, None)[0]
    out = (
        torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16, device=dev)
        if use_out
        else None
    )
    got, hook = eng.combine(y, idx, w, f.handle, out=out)
    assert hook is None
    if out is not None:
        assert got is out
    torch.cuda.synchronize()
    assert_equal(f"{tag} combined", got, want.cpu())


# ---- GPU workers --------------------------------------------------------------------------------


def _cases_worker(info: RankInfo) -> None:
    r = info.world_size
    ref = _reference(info)
    nmax = 96
    eng = _engine(info, nmax, 8192, 64 * r, 8)
    first = info.rank == 0
    cases = [
        {
            "num_tokens": nmax - 5 * info.rank,
            "hidden": 7168,
            "num_experts": 64 * r,
            "topk": 8,
            "kind": "uniform",
            "fmt": "fp8",
        },
        {
            "num_tokens": nmax,
            "hidden": 1152,
            "num_experts": 16 * r,
            "topk": 4,
            "kind": "masked",
            "fmt": "ue8m0",
        },
        {
            "num_tokens": 33 + info.rank,
            "hidden": 2048,
            "num_experts": 8 * r,
            "topk": 6,
            "kind": "skewed",
            "fmt": "fp8_pow2",
        },
        {
            "num_tokens": nmax,
            "hidden": 2880,
            "num_experts": 32 * r,
            "topk": 8,
            "kind": "uniform",
            "fmt": "bf16",
        },
        {
            "num_tokens": 0,
            "hidden": 7168,
            "num_experts": 64 * r,
            "topk": 8,
            "kind": "uniform",
            "fmt": "fp8",
        },
        {
            "num_tokens": 0 if first else 17,
            "hidden": 4096,
            "num_experts": 4 * r,
            "topk": 3,
            "kind": "uniform",
            "fmt": "bf16",
        },
        {
            "num_tokens": nmax,
            "hidden": 7168,
            "num_experts": 8 * r,
            "topk": 8,
            "kind": "all_to_rank0",
            "fmt": "fp8",
        },
        {
            "num_tokens": 50,
            "hidden": 5120,
            "num_experts": 12 * r,
            "topk": 5,
            "kind": "nothing_to_last",
            "fmt": "ue8m0",
        },
        {
            "num_tokens": 1,
            "nmax": 4,
            "hidden": 64,
            "num_experts": r,
            "topk": 1,
            "kind": "uniform",
            "fmt": "bf16",
        },
        {
            "num_tokens": nmax,
            "hidden": 8192,
            "num_experts": 64 * r,
            "topk": 8,
            "kind": "skewed",
            "fmt": "bf16",
        },
    ]
    for i, case in enumerate(cases):
        case = dict(case)
        _run_case(eng, ref, info, seed=i, nmax=case.pop("nmax", nmax), use_out=i % 2 == 0, **case)
    # The same engine keeps working after many ops (epochs, both regions, both slots).
    for i in range(6):
        _run_case(
            eng,
            ref,
            info,
            seed=100 + i,
            nmax=nmax,
            num_tokens=nmax - i,
            hidden=7168,
            num_experts=64 * r,
            topk=8,
            kind="uniform",
            fmt=("fp8", "bf16", "ue8m0")[i % 3],
            use_out=False,
        )
    eng.destroy()
    eng.destroy()


def _graph_worker(info: RankInfo, fmt: str, replays: int) -> None:
    from ep_core.testing import assert_equal

    r, dev = info.world_size, info.device
    nmax, hidden, num_experts, topk = 128, 7168, 64 * r, 8
    num_tokens = nmax - 3 * info.rank
    el, slots = num_experts // r, r * nmax
    ref = _reference(info)
    eng = _engine(info, nmax, hidden, num_experts, topk)
    opts = dict(num_max_dispatch_tokens_per_rank=nmax, num_experts=num_experts, **FMT[fmt])
    gen = torch.Generator().manual_seed(7 + info.rank)
    cgen = torch.Generator(device=dev).manual_seed(11 + info.rank)
    sx = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16, device=dev)
    sidx = torch.full((num_tokens, topk), -1, dtype=torch.int64, device=dev)
    sidx[:, 0] = 0
    sy = torch.zeros(el, slots, hidden, dtype=torch.bfloat16, device=dev)
    sw = torch.ones(num_tokens, topk, device=dev)
    # Warm-up outside the capture compiles and loads the kernels.
    d0, _ = eng.dispatch(sx, sidx, **opts)
    eng.combine(sy, sidx, sw, d0.handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gd, _ = eng.dispatch(sx, sidx, **opts)
        gout, _ = eng.combine(sy, sidx, sw, gd.handle)
    torch.cuda.synchronize()
    for i in range(replays):
        tag = f"[graph {fmt} replay {i} rank {info.rank}]"
        kind = ("uniform", "masked", "skewed", "all_to_rank0", "nothing_to_last")[i % 5]
        x = (torch.randn(num_tokens, hidden, generator=gen) * (1 + i)).to(torch.bfloat16).to(dev)
        idx = _routing(gen, num_tokens, num_experts, topk, kind, r).to(dev)
        rd = ref.low_latency_dispatch(x, idx, **opts)[0]
        y = _combine_input(cgen, rd.recv_count, (el, slots, hidden), dev)
        w = _weights(gen, num_tokens, topk).to(dev)
        want = ref.low_latency_combine(y, idx, w, rd.handle, None)[0]
        sx.copy_(x)
        sidx.copy_(idx)
        sy.copy_(y)
        sw.copy_(w)
        gd.recv_x.view(torch.uint8).fill_(0x7F)  # poison: the replay must rewrite the valid rows
        gout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_dispatch(tag, gd, rd)
        assert_equal(f"{tag} combined", gout, want.cpu())
    eng.check_error()
    del graph
    eng.destroy()


def _hook_worker(info: RankInfo) -> None:
    from ep_core.testing import assert_equal

    r, dev = info.world_size, info.device
    nmax, hidden, num_experts, topk = 64, 2048, 16 * r, 4
    el, slots = num_experts // r, r * nmax
    ref = _reference(info)
    eng = _engine(info, nmax, hidden, num_experts, topk)
    gen = torch.Generator().manual_seed(3 + info.rank)
    cgen = torch.Generator(device=dev).manual_seed(5 + info.rank)
    opts = dict(num_max_dispatch_tokens_per_rank=nmax, num_experts=num_experts, **FMT["fp8"])

    def batch(n: int):
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16).to(dev)
        idx = _routing(gen, n, num_experts, topk, "masked", r).to(dev)
        return x, idx

    for rnd in range(3):
        xa, ia = batch(nmax - rnd)
        xb, ib = batch(17 + info.rank)
        ra_ref = ref.low_latency_dispatch(xa, ia, **opts)[0]
        rb_ref = ref.low_latency_dispatch(xb, ib, **opts)[0]
        ra, ha = eng.dispatch(xa, ia, **opts, return_recv_hook=True)
        rb, hb = eng.dispatch(xb, ib, **opts, return_recv_hook=True)
        assert ha is not None and hb is not None
        with pytest.raises(RuntimeError, match="at most two"):
            eng.dispatch(xa, ia, **opts, return_recv_hook=True)
        hb()  # hooks in either order
        ha()
        with pytest.raises(RuntimeError, match="already called"):
            ha()
        torch.cuda.synchronize()
        _check_dispatch(f"[hook dispatch a {rnd}]", ra, ra_ref)
        _check_dispatch(f"[hook dispatch b {rnd}]", rb, rb_ref)

        ya = _combine_input(cgen, ra_ref.recv_count, (el, slots, hidden), dev)
        yb = _combine_input(cgen, rb_ref.recv_count, (el, slots, hidden), dev)
        wa, wb = _weights(gen, xa.shape[0], topk).to(dev), _weights(gen, xb.shape[0], topk).to(dev)
        want_a = ref.low_latency_combine(ya, ia, wa, ra_ref.handle, None)[0]
        want_b = ref.low_latency_combine(yb, ib, wb, rb_ref.handle, None)[0]
        out_a = torch.full((xa.shape[0], hidden), float("nan"), dtype=torch.bfloat16, device=dev)
        ca, hca = eng.combine(ya, ia, wa, ra.handle, out=out_a, return_recv_hook=True)
        # A fused op may run between a split op's send and its hook.
        cb, _ = eng.combine(yb, ib, wb, rb.handle)
        assert hca is not None
        hca()
        torch.cuda.synchronize()
        assert ca is out_a
        assert_equal(f"[hook combine a {rnd}]", ca, want_a.cpu())
        assert_equal(f"[fused combine b {rnd}]", cb, want_b.cpu())

    # Split kernels inside a CUDA graph (one eager run first compiles and loads them).
    x, idx = batch(nmax)
    y = torch.zeros(el, slots, hidden, dtype=torch.bfloat16, device=dev)
    w = torch.ones(nmax, topk, device=dev)

    def step():
        d, hd = eng.dispatch(x, idx, **opts, return_recv_hook=True)
        assert hd is not None
        hd()
        out, hc = eng.combine(y, idx, w, d.handle, return_recv_hook=True)
        assert hc is not None
        hc()
        return d, out

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gd, gout = step()
    torch.cuda.synchronize()
    for i in range(4):
        nx, nidx = batch(nmax)
        rd = ref.low_latency_dispatch(nx, nidx, **opts)[0]
        ny = _combine_input(cgen, rd.recv_count, (el, slots, hidden), dev)
        nw = _weights(gen, nmax, topk).to(dev)
        want = ref.low_latency_combine(ny, nidx, nw, rd.handle, None)[0]
        x.copy_(nx)
        idx.copy_(nidx)
        y.copy_(ny)
        w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        _check_dispatch(f"[hook graph {i}]", gd, rd)
        assert_equal(f"[hook graph {i} combined]", gout, want.cpu())
    eng.destroy()


def _timeout_worker(info: RankInfo) -> None:
    import torch.distributed as dist

    eng = _engine(info, 32, 256, 4 * info.world_size, 2, timeout=2.0)
    cpu_group = dist.new_group(backend="gloo")
    x = torch.randn(16, 256, device=info.device).to(torch.bfloat16)
    idx = torch.zeros(16, 2, dtype=torch.int64, device=info.device)
    idx[:, 1] = 4  # an expert of rank 1
    if info.rank != 1:  # rank 1 never calls: everybody else must get an exception, not a hang
        eng.dispatch(
            x,
            idx,
            num_max_dispatch_tokens_per_rank=32,
            num_experts=4 * info.world_size,
            use_fp8=False,
        )
        torch.cuda.synchronize()
        with pytest.raises(JitTimeoutError, match="waiting for peer 1") as err:
            eng.check_error()
        assert "low-latency dispatch" in str(err.value)
        with pytest.raises(JitTimeoutError):
            eng.dispatch(
                x,
                idx,
                num_max_dispatch_tokens_per_rank=32,
                num_experts=4 * info.world_size,
                use_fp8=False,
            )
    dist.barrier(group=cpu_group)
    eng.destroy()


# ---- GPU tests ----------------------------------------------------------------------------------


def _tag_wrap_worker(info: RankInfo) -> None:
    """Ops across the 32-bit tag wrap, two of them refresh ops (epochs 2^32 and 2^32 + 1).

    Tagged words carry the low 32 bits of the epoch. Every word of both regions is first made
    to look 2^32 ops old (the tag of op 2^32 + 6, as a slot that no op wrote since op 6 would
    have); the refresh ops must leave no such word, and every op must match the reference.
    """
    from ep_core.testing import StaleTags

    r, nmax, hidden, topk = info.world_size, 48, 1024, 8
    num_experts = 8 * r
    ref = _reference(info)
    eng = _engine(info, nmax, hidden, num_experts, topk)
    eng._jump_epoch_for_testing(2**32 - 3)
    lay = eng.layout
    areas = {
        "counts": (lay.r_cnt, r * lay.max_local_experts),
        "token counts": (lay.r_ntok, r),
        "combine masks": (lay.r_cmask, r * nmax),
        "combine weights": (lay.r_cw, r * nmax * topk),
    }
    stale = StaleTags(eng.sym, areas, lay.region, 2**32 + 6)
    stale.plant()
    # Ops 2^32 - 2 .. 2^32 + 3: dispatch, combine per case; the second case's top-k is below the
    # buffer's, so the refresh combine also covers the lanes past the call's top-k.
    for case, (k, fmt) in enumerate(((topk, "fp8"), (4, "bf16"), (topk, "ue8m0"))):
        _run_case(
            eng,
            ref,
            info,
            seed=90 + case,
            num_tokens=nmax - 5 - 3 * info.rank,
            nmax=nmax,
            hidden=hidden,
            num_experts=num_experts,
            topk=k,
            kind="uniform",
            fmt=fmt,
            use_out=False,
        )
    eng.check_error()
    left = {name: n for name, n in stale.remaining().items() if n}
    assert not left, f"rank {info.rank}: words that kept a stale tag: {left}"
    eng.destroy()


def _agreement_worker(info: RankInfo) -> None:
    from ep_core.nvlink.ll import LowLatencyEngine

    common = {
        "rank": info.rank,
        "num_ranks": info.world_size,
        "num_max_dispatch_tokens_per_rank": 32,
        "hidden": 1024,
        "num_experts": 8 * info.world_size,
        "num_topk": 4,
        "device": info.device,
    }
    # Ranks that would build different engines all fail, naming the field.
    with pytest.raises(ValueError, match="num_ctas differs"):
        LowLatencyEngine(info.group, num_sms=16 + 8 * info.rank, **common)
    # A size error on one rank fails every rank (none waits for it in the buffer's set-up).
    bad = dict(common, hidden=100 if info.rank == 0 else 1024)
    others = "cannot be built: rank 0: ValueError: hidden must be"
    with pytest.raises(ValueError, match="hidden must be" if info.rank == 0 else others):
        LowLatencyEngine(info.group, **bad)
    # The group is usable afterwards.
    eng = LowLatencyEngine(info.group, num_sms=16, **common)
    x = torch.randn(8, 1024, device=info.device).to(torch.bfloat16)
    idx = torch.randint(0, 8 * info.world_size, (8, 4), device=info.device)
    eng.dispatch(
        x, idx, num_max_dispatch_tokens_per_rank=32, num_experts=8 * info.world_size, use_fp8=False
    )
    torch.cuda.synchronize()
    eng.check_error()
    eng.destroy()


@pytest.mark.gpu
def test_reference_fp8_cast_is_device_independent() -> None:
    """The kernels implement docs/design.md's ``sf = max(amax, 1e-4) / 448`` (IEEE division).

    If this fails, ``ep_core.fp8`` computes a different FP8 scale on CUDA than on CPU (e.g. a
    division by a Python scalar, which CUDA torch turns into a multiply by the rounded
    reciprocal) and every FP8 comparison against the reference backend will differ too.
    """
    from ep_core.fp8 import per_token_cast_to_fp8
    from ep_core.testing import assert_equal

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 1024, generator=gen) * 7).to(torch.bfloat16)
    for round_scale in (False, True):
        q_cpu, s_cpu = per_token_cast_to_fp8(x, round_scale=round_scale)
        q_gpu, s_gpu = per_token_cast_to_fp8(x.cuda(), round_scale=round_scale)
        assert_equal(f"scales round={round_scale}", s_gpu, s_cpu)
        assert_equal(f"data round={round_scale}", q_gpu, q_cpu)


@pytest.mark.parametrize(PLACES, gpu_placements((1, 2, 4)))
def test_low_latency_matches_reference(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _cases_worker, timeout_s=900, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(PLACES, WORLDS)
@pytest.mark.parametrize("fmt,replays", [("fp8", 20), ("ue8m0", 5), ("bf16", 5)])
def test_low_latency_graph_replays(world_size: int, per_gpu: int, fmt: str, replays: int) -> None:
    run_ranks(world_size, _graph_worker, fmt, replays, timeout_s=900, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(PLACES, WORLDS)
def test_low_latency_hooks(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _hook_worker, timeout_s=900, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(PLACES, WORLDS)
def test_low_latency_timeout_names_stage_and_peer(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _timeout_worker, timeout_s=300, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(PLACES, WORLDS)
def test_low_latency_tag_wrap_and_refresh(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _tag_wrap_worker, timeout_s=300, ranks_per_gpu=per_gpu)


@pytest.mark.parametrize(PLACES, WORLDS)
def test_low_latency_engines_must_agree(world_size: int, per_gpu: int) -> None:
    run_ranks(world_size, _agreement_worker, timeout_s=300, ranks_per_gpu=per_gpu)


def test_prepare_builds_and_binds_every_kernel_of_a_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    import ep_core.nvlink.ll as ll

    bound: list[tuple[str, int]] = []

    class FakeKernel:
        def __init__(self, spec) -> None:
            self.spec = spec

        def bind(self, grid, block, args, smem: int = 0) -> None:
            assert grid == (eng.num_ctas, 1, 1) and block == (ll.THREADS, 1, 1)
            assert isinstance(args, ll.LlArgs)
            bound.append((self.spec.name, smem))

    monkeypatch.setattr(ll, "build_kernel", FakeKernel)
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    eng = ll.LowLatencyEngine.__new__(ll.LowLatencyEngine)
    eng._destroyed = False
    eng._watchdog = type("W", (), {"check": lambda self: None})()
    eng._error_code = ctypes.c_int32(0)
    eng.num_ranks, eng.num_topk, eng.hidden = 4, 8, 2048
    eng.num_max_tokens, eng.num_experts, eng.num_ctas = 64, 32, 16
    eng.device = torch.device("cuda", 0)
    eng.prepare()
    names = [n for n, _ in bound]
    assert len(names) == len(set(names)) == 15
    for fmt in ("bf16", "fp8", "fp8_pow2", "ue8m0"):
        for p in (1, 2, 3):
            assert (f"ep_ll_dispatch_{fmt}_p{p}", ll.dispatch_smem_bytes(4, 64, 32)) in bound
    for p in (1, 2, 3):
        assert (f"ep_ll_combine_p{p}", ll.combine_smem_bytes(4)) in bound
