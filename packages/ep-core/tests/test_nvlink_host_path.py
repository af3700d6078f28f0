"""The NVLink backend's high-throughput host path on the CPU, its kernels replaced by fakes.

The fakes see what the real launches would get (the argument structs, the addresses) and play
a one-rank dispatch: they write the counts the kernels would write, straight into host memory
at the addresses they are given. This checks the host bookkeeping (which allocation each part
lives in, the views a handle keeps, what is bound once and what is set per call) without a GPU;
the kernels themselves are checked against the reference on GPUs (test_nvlink_ht.py).
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

from ep_core.nvlink import backend as backend_mod
from ep_core.nvlink import ht
from ep_core.nvlink.layout import NvlinkSizing, compute_layout

NMAX, HIDDEN, TOPK, E = 24, 128, 2, 8


def _words(address: int, n: int) -> Any:
    return (ctypes.c_int32 * n).from_address(address)


class _FakeKernel:
    """Records launches; plays the prologue (zeroing) and a one-rank dispatch (counts)."""

    def __init__(self, name: str, log: list[tuple[str, Any]]) -> None:
        self.name, self.log = name, log

    def launch(self, grid: Any, block: Any, *args: Any, **kwargs: Any) -> None:
        self.log.append((self.name, args))
        zeroed = {"ep_ht_layout": args[8:10], "ep_ht_zero": args[:2]}.get(self.name)
        if zeroed is not None and zeroed[1]:
            zero, num_zero = zeroed
            address = zero if isinstance(zero, int) else zero.data_ptr()
            ctypes.memset(address, 0, 4 * num_zero)
        elif self.name == "ep_ht_dispatch":
            a = args[0]
            # One rank receives all its tokens: psum per source, counts per local expert,
            # their inclusive prefix sums.
            idx = _ROUTING[0]
            counts = torch.bincount(idx[idx >= 0].flatten(), minlength=E).tolist()
            words = _words(a.out_counts, 1 + 2 * E)
            words[0] = a.num_tokens
            total = 0
            for i, c in enumerate(counts if a.count_experts else []):
                words[1 + i] += c
                total += c
                words[1 + E + i] = total
            _words(a.out_src_bad, 1)[0] = 0
            # Row o is token o (every token has an expert here): local ids and metadata.
            t, k = idx.shape
            ids = (ctypes.c_int64 * (t * k)).from_address(a.out_topk_idx)
            meta = _words(a.out_src_meta, 2 * t)
            for o in range(t):
                for j in range(k):
                    ids[o * k + j] = int(idx[o, j])
                meta[2 * o], meta[2 * o + 1] = o, 0

    def bind(self, grid: Any, block: Any, *args: Any, **kwargs: Any) -> Any:
        self.log.append(("bind " + self.name, args))
        return lambda: self.launch(grid, block, *args)


_ROUTING: list[torch.Tensor] = []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[tuple[str, Any]]]:
    log: list[tuple[str, Any]] = []
    monkeypatch.setattr(ht, "build_kernel", lambda spec: _FakeKernel(spec.name, log))
    monkeypatch.setattr(ht, "_configured", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    be = object.__new__(backend_mod.NvlinkBackend)
    sizing = NvlinkSizing(num_ranks=1, num_max_tokens_per_rank=NMAX, hidden=HIDDEN, num_topk=TOPK)
    layout, _ = compute_layout(sizing)
    watchdog = type("W", (), {"record_ptr": 8, "timeout_ns": 1})()
    peer_bases = torch.zeros(1, dtype=torch.int64)
    code = ctypes.c_int32(0)
    attrs = {
        "rank": 0,
        "num_ranks": 1,
        "device": torch.device("cpu"),
        "sizing": sizing,
        "layout": layout,
        "watchdog": watchdog,
        "_error_code": code,
        "_sm_count": 132,
        "_destroyed": False,
        "_gave_up": False,
        "_ll": None,
        "_host_counts": {},
        "_replay_scratch": {},
        "_scratch_meta": {},
        "ht": ht.HtContext(
            rank=0,
            num_ranks=1,
            sizing=sizing,
            layout=layout,
            peer_bases=peer_bases,
            watchdog=watchdog,
        ),
    }
    for name, value in attrs.items():
        setattr(be, name, value)
    be._read_counts = lambda block, n: block[:n].tolist()  # the host read, without CUDA
    return be, log


def _dispatch(be: Any, x: torch.Tensor, idx: torch.Tensor, **kw: Any) -> Any:
    args = {
        "num_experts": E,
        "num_max_tokens_per_rank": NMAX,
        "expert_alignment": 1,
        "do_expand": False,
        "do_cpu_sync": True,
        "handle": None,
        "num_sms": 4,
    }
    args.update(kw)
    weights = args.pop("topk_weights", None)
    return be.dispatch(x, None, idx, weights, **args)


def _inputs(seed: int, t: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """Random rows and routing of ``t`` tokens; the fake dispatch kernel plays this routing."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16)
    idx = torch.rand(t, E, generator=gen).topk(TOPK, dim=1).indices
    _ROUTING[:] = [idx]
    return gen, x, idx


def _owner(address: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    for t in tensors:
        start = t.untyped_storage().data_ptr()
        if start <= address < start + t.untyped_storage().nbytes():
            return t
    raise AssertionError(f"address {address:#x} is in none of the tensors")


def test_fresh_and_cached_dispatch_host_bookkeeping(fake: tuple[Any, list[Any]]) -> None:
    be, log = fake
    t = 19
    _, x, idx = _inputs(3, t)
    idx[4, 1] = -1  # in place: the fake kernel plays it too
    want = torch.bincount(idx[idx >= 0].flatten(), minlength=E)

    res = _dispatch(be, x, idx)
    h = res.handle
    names = [n for n, _ in log]
    # The dispatch kernel's launch is bound at its first call (its struct passed by address).
    assert names == ["ep_ht_layout", "bind ep_ht_dispatch", "ep_ht_dispatch"]
    # The handle's views of the small block hold what the kernels wrote there, sized by the
    # host read.
    assert h.num_recv_tokens == t and res.recv_x.shape == (t, HIDDEN)
    assert h.psum_num_recv_tokens_per_rank.tolist() == [t]
    assert torch.equal(h.num_unaligned_recv_tokens_per_expert, want.to(torch.int32))
    assert torch.equal(h.psum_num_recv_tokens_per_expert, want.cumsum(0).to(torch.int32))
    assert h.num_recv_tokens_per_expert_list == want.tolist()
    assert h.recv_src_metadata.shape == (t, 2) and h.recv_src_metadata.is_contiguous()
    assert h.topk_idx.shape == (t, TOPK) and h.send_row.shape == (t, 1)
    block = h.psum_num_recv_tokens_per_rank
    a = log[2][1][0]
    assert log[1][1][0] is a
    small = [block, h.recv_src_metadata, h.backend_state.chunk_end]
    # Every address the dispatch kernel writes lies in this call's allocations.
    for field in ("out_counts", "out_src_bad", "out_src_meta", "out_chunk_end", "out_nchunks"):
        assert _owner(getattr(a, field), small) is block, field
    assert a.out_src_meta == h.recv_src_metadata.data_ptr()
    assert a.out_counts == block.data_ptr() and a.topk_bad != 0 and a.num_topk_bad == 1
    # The one prologue launch zeroes the counts and writes the verdict the dispatch reads.
    # It gets addresses of the parts the handle keeps as views (made after the launches).
    prologue = log[0][1]
    kept = (h.send_row, h.is_token_in_rank, h.backend_state.chunk_prefix, h.topk_idx)
    assert prologue[3:7] == tuple(v.data_ptr() for v in kept)
    assert prologue[7:] == (E, block.data_ptr(), 1 + 2 * E, a.topk_bad)
    state = h.backend_state
    assert a.send_row == h.send_row.data_ptr() and a.out_chunk_end == state.chunk_end.data_ptr()
    assert _owner(a.topk_bad, small) is block
    assert a.out_x == res.recv_x.data_ptr() and a.num_tokens == t

    # Cached dispatches: no prologue and no allocation besides the received rows. The dispatch
    # kernel writes the backend's scratch and makes no per-expert counts (nobody reads them);
    # the chunk rows are rewritten into the handle's own tensors.
    assert a.count_experts == 1
    chunk_end, nchunks = h.backend_state.chunk_end, h.backend_state.nchunks
    log.clear()
    first = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    second = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert [n for n, _ in log] == ["ep_ht_dispatch", "ep_ht_dispatch"]
    (scratch,) = be._replay_scratch.values()
    for _, args in log:
        a = args[0]
        assert a.out_counts == scratch.data_ptr() and a.topk_bad == 0 and a.count_experts == 0
        assert _owner(a.out_src_meta, [scratch]) is scratch
        assert a.send_row == h.send_row.data_ptr() and a.topk_idx == h.topk_idx.data_ptr()
        assert a.out_chunk_end == chunk_end.data_ptr() and a.out_nchunks == nchunks.data_ptr()
    assert first.handle is h and second.handle is h
    assert h.backend_state.chunk_end is chunk_end and h.backend_state.nchunks is nchunks
    assert first.recv_x.shape == (t, HIDDEN) and second.recv_topk_idx.shape == (t, TOPK)
    assert torch.equal(h.psum_num_recv_tokens_per_rank, block) and int(block[0]) == t


def test_cached_dispatch_plan_is_kept_per_handle_and_shape(fake: tuple[Any, list[Any]]) -> None:
    be, log = fake
    t = 16
    gen, x, idx = _inputs(6, t)
    h = _dispatch(be, x, idx).handle
    other = _dispatch(be, x, idx).handle
    log.clear()
    first = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    _, plan = h.backend_state.replay
    a = log[-1][1][0]
    (scratch,) = be._replay_scratch.values()
    assert a.out_counts == scratch.data_ptr() and a.count_experts == 0 and a.topk_bad == 0
    assert a.send_row == h.send_row.data_ptr() and first.recv_x.shape == (t, HIDDEN)
    # The next call of the shape takes the same plan.
    _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert h.backend_state.replay[1] is plan
    # A fresh dispatch of the same shape shares the launch struct and writes all of it: the
    # next replay writes its fixed fields again.
    _dispatch(be, x, idx)
    assert a.count_experts == 1 and a.send_row != h.send_row.data_ptr()
    again = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert a.count_experts == 0 and a.send_row == h.send_row.data_ptr()
    assert a.out_counts == scratch.data_ptr() and a.num_tokens == t
    assert a.out_chunk_end == h.backend_state.chunk_end.data_ptr()
    assert a.out_x == again.recv_x.data_ptr() and a.topk_weights == 0
    # Another handle's replay of the same shape: its own plan, its own layout in the struct.
    _dispatch(be, x, other.topk_idx, handle=other, do_cpu_sync=False)
    assert a.send_row == other.send_row.data_ptr() and other.backend_state.replay[1] is not plan
    # Weights change the shape: a new plan that sets them, and the signature says so.
    w = torch.rand(t, TOPK, generator=gen)
    weighted = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False, topk_weights=w)
    assert h.backend_state.replay[1] is not plan
    assert a.topk_weights == w.data_ptr()
    assert a.out_topk_weights == weighted.recv_topk_weights.data_ptr()
    assert weighted.recv_topk_weights.shape == (t, TOPK)
    el = E // be.num_ranks
    assert a.signature == ht.dispatch_signature(el, x.dtype, HIDDEN * 2, None, 0, TOPK, NMAX, True)
    # Back to no weights: the plan clears them.
    _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert a.topk_weights == 0 and a.out_topk_weights == 0
    names = [n for n, _ in log]
    assert "ep_ht_zero" not in names and names.count("bind ep_ht_dispatch") <= 1
    # A developer override of the launch shape (benchmark sweeps) makes another plan.
    last = h.backend_state.replay[1]
    be.ht.dispatch_override = (4, 4, 2, 2)
    _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert h.backend_state.replay[1].template is not last.template
    be.ht.dispatch_override = None


def test_cached_dispatch_of_a_handle_without_sync_fills_the_tail(
    fake: tuple[Any, list[Any]],
) -> None:
    be, log = fake
    t = 9
    _, x, idx = _inputs(7, t)
    h = _dispatch(be, x, idx, do_cpu_sync=False).handle
    log.clear()
    res = _dispatch(be, x, h.topk_idx, handle=h, do_cpu_sync=False)
    assert [n for n, _ in log] == ["ep_ht_dispatch", "ep_ht_dispatch_tail"]
    (scratch,) = be._replay_scratch.values()
    tail = log[-1][1]
    a = log[0][1][0]
    # The tail reads the received total from the scratch's counts and fills worst-case rows.
    assert tail[0] == scratch.data_ptr() + 4 * (be.num_ranks - 1) and tail[2] == a.out_src_meta
    assert res.recv_x.shape == (NMAX, HIDDEN) and tail[3] is res.recv_topk_idx


def test_dispatch_without_sync_and_expanded_replay(fake: tuple[Any, list[Any]]) -> None:
    be, log = fake
    t = 10
    _, x, idx = _inputs(4, t)
    # Without CPU sync: worst-case outputs returned whole, the tail kernel reads the count.
    res = _dispatch(be, x, idx, do_cpu_sync=False)
    assert res.recv_x.shape == (NMAX, HIDDEN) and res.recv_x._base is None
    assert res.handle.recv_src_metadata.shape == (NMAX, 2)
    tail = [args for name, args in log if name == "ep_ht_dispatch_tail"]
    assert len(tail) == 1
    assert tail[0][0] == res.handle.psum_num_recv_tokens_per_rank.data_ptr()
    assert tail[0][1:3] == (NMAX, res.handle.recv_src_metadata.data_ptr())
    # Expanded: the replay uses its own block (its counts and metadata are read back).
    log.clear()
    res = _dispatch(be, x, idx, do_expand=True)
    h = res.handle
    assert h.recv_src_metadata.shape == (t, 2 + TOPK)
    log.clear()
    again = _dispatch(be, x, h.topk_idx, handle=h, do_expand=True, do_cpu_sync=False)
    assert [n for n, _ in log] == ["ep_ht_zero", "ep_ht_dispatch"]
    assert not be._replay_scratch
    assert again.recv_x.shape == res.recv_x.shape
    with pytest.raises(ValueError, match="handle's do_expand"):
        _dispatch(be, x, h.topk_idx, handle=h, do_expand=False, do_cpu_sync=False)


def test_combine_sets_handle_fields_when_the_handle_changes(fake: tuple[Any, list[Any]]) -> None:
    be, log = fake
    t = 12
    gen, x, idx = _inputs(5, t)
    h1 = _dispatch(be, x, idx).handle
    h2 = _dispatch(be, x, idx).handle
    y = torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16)
    log.clear()
    be.combine(y, h1, None, (), 4)
    a = log[-1][1][0]
    assert (a.topk_idx, a.send_row) == (h1.topk_idx.data_ptr(), h1.send_row.data_ptr())
    assert a.chunk_end == h1.backend_state.chunk_end.data_ptr() and a.num_tokens == t
    # Same struct, another handle: its fields are set; back to the first handle: set again.
    be.combine(y, h2, None, (), 4)
    assert log[-1][1][0] is a
    assert a.topk_idx == h2.topk_idx.data_ptr()
    assert a.psum_rank == h2.psum_num_recv_tokens_per_rank.data_ptr()
    # A cached dispatch refreshes the handle's chunk rows: the next combine sees the new ones.
    _dispatch(be, x, h2.topk_idx, handle=h2, do_cpu_sync=False)
    out, _ = be.combine(y, h2, None, (), 4)
    assert a.chunk_end == h2.backend_state.chunk_end.data_ptr()
    assert a.nchunks == h2.backend_state.nchunks.data_ptr()
    # One bound launch served every combine of this shape.
    assert [n for n, _ in log].count("bind ep_ht_combine") == 1
    assert a.out == out.data_ptr() and a.x == y.data_ptr() and a.bias0 == 0
    be.combine(y, h1, None, (), 4)
    assert a.topk_idx == h1.topk_idx.data_ptr()
    # The signature it announces says combine, and whether weights travel.
    el = E // be.num_ranks
    assert a.signature == ht.combine_signature(el, HIDDEN, TOPK, NMAX, False)
    w = torch.rand(h1.num_recv_tokens, TOPK, generator=gen)
    plan = h1.backend_state.combine[1]
    out, out_w = be.combine(y, h1, w, (), 4)
    assert a.signature == ht.combine_signature(el, HIDDEN, TOPK, NMAX, True)
    assert a.topk_weights == w.data_ptr() and a.out_weights == out_w.data_ptr()
    # Each handle keeps its plan per shape; weights change the shape: another plan, and back
    # without weights the struct loses them again.
    assert h1.backend_state.combine[1] is not plan and h2.backend_state.combine is not None
    be.combine(y, h1, None, (), 4)
    assert a.topk_weights == 0 and a.out_weights == 0
    assert a.signature == ht.combine_signature(el, HIDDEN, TOPK, NMAX, False)
    again = h1.backend_state.combine[1]
    be.combine(y, h1, None, (), 4)
    assert h1.backend_state.combine[1] is again and a.topk_idx == h1.topk_idx.data_ptr()
    # A developer override of the launch shape (benchmark sweeps) makes another plan.
    be.ht.combine_override = (4, 16, 4, 1)
    be.combine(y, h1, None, (), 4)
    assert h1.backend_state.combine[1] is not again
    assert h1.backend_state.combine[1].template is not again.template
    be.ht.combine_override = None


def test_a_rank_that_rejects_its_input_stops_every_rank(
    fake: tuple[Any, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # abort_call writes this rank's abort value into every rank's abort word of the buffer (the
    # control block's u32 at byte 12); later calls raise naming this rank. A peer whose kernel
    # recorded another rank's abort raises ValueError naming that rank, on every later call.
    import ep_jit

    be, _ = fake
    signals: list[tuple[list[int], int]] = []
    monkeypatch.setattr(
        ep_jit, "signal_abort", lambda words, rank, **kw: signals.append((words, rank))
    )
    be.sym = type("S", (), {"peer_ptrs": [1 << 20, 2 << 20]})()
    be._host_timeout_s = 5.0
    be.abort_call(torch.device("cpu"))
    ctrl = be.layout.ctrl
    assert signals == [([(1 << 20) + ctrl + 12, (2 << 20) + ctrl + 12], 0)]
    be.abort_call(torch.device("cpu"))  # once only
    assert len(signals) == 1
    x = torch.zeros(4, HIDDEN, dtype=torch.bfloat16)
    idx = torch.zeros(4, TOPK, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"rank 0 \(this rank\) rejected its input"):
        _dispatch(be, x, idx)

    be._gave_up = False
    be._error_code.value = 2
    record = ep_jit.watchdog.ErrorRecord(2, -1, 1, 0, 0, 0, ep_jit.watchdog.ABORT_BY_RANK + 1, 0)
    be.watchdog.read_record = lambda: record

    def check() -> None:
        raise ep_jit.JitPeerAbortError(1, 0)

    be.watchdog.check = check
    for _ in range(2):
        with pytest.raises(ValueError, match="rank 1 rejected its input to a collective call"):
            _dispatch(be, x, idx)

    # A dispatch kernel found that rank 1 called with another signature (kErrorArgumentsDiffer).
    be._error_code.value = ht.ERROR_ARGUMENTS_DIFFER
    record = ep_jit.watchdog.ErrorRecord(3, 1, 1, 0, 0, 0, 0x1234, 0x0567)
    with pytest.raises(
        ValueError, match=r"rank 1 called with other arguments than rank 0 \(one of"
    ):
        _dispatch(be, x, idx)
    # Found in the arrive words at the start of an op (stage 4: dispatch, 13: combine): another
    # kind of op, or a combine with other arguments.
    sig_c, sig_d = ht.combine_signature(4, HIDDEN, TOPK, NMAX, False), 0x0456
    record = ep_jit.watchdog.ErrorRecord(3, 4, 1, 0, 0, 0, 7 << 16 | sig_c, 7 << 16 | sig_d)
    with pytest.raises(ValueError, match="rank 1 called combine while rank 0 called dispatch"):
        _dispatch(be, x, idx)
    other = ht.combine_signature(4, HIDDEN // 2, TOPK, NMAX, False)
    record = ep_jit.watchdog.ErrorRecord(3, 13, 1, 0, 0, 0, 9 << 16 | other, 9 << 16 | sig_c)
    with pytest.raises(
        ValueError,
        match=r"combine configuration must agree on every rank: rank 1 called with other "
        r"arguments than rank 0 \(one of hidden size of x",
    ):
        _dispatch(be, x, idx)


def test_dispatch_signature_covers_the_arguments_ranks_must_share() -> None:
    base = (4, torch.bfloat16, 2 * HIDDEN, None, 0, TOPK, NMAX, True)
    sig = ht.dispatch_signature(*base)
    assert 0 <= sig < 1 << 15 and ht.dispatch_signature(*base) == sig
    # Each argument changes it (for these values; a digest of 15 bits may collide elsewhere).
    changed = [
        (8,), (4, torch.float8_e4m3fn), (4, torch.bfloat16, HIDDEN),
        (4, torch.bfloat16, 2 * HIDDEN, torch.float32, 1),
    ]  # fmt: skip
    for head in changed:
        assert ht.dispatch_signature(*head, *base[len(head) :]) != sig, head
    assert ht.dispatch_signature(*base[:5], TOPK + 1, NMAX, True) != sig
    assert ht.dispatch_signature(*base[:6], NMAX + 1, True) != sig
    assert ht.dispatch_signature(*base[:7], False) != sig


def test_combine_signature_marks_a_combine_and_covers_its_arguments() -> None:
    base = (4, HIDDEN, TOPK, NMAX, False)
    sig = ht.combine_signature(*base)
    assert sig & ht.SIGNATURE_COMBINE and sig < 1 << 16
    # A dispatch's never has the combine bit.
    assert not ht.dispatch_signature(4, torch.bfloat16, 2 * HIDDEN, None, 0, TOPK, NMAX, False) & (
        ht.SIGNATURE_COMBINE
    )
    for i, changed in enumerate((8, HIDDEN // 2, TOPK + 1, NMAX + 1, True)):
        args = list(base)
        args[i] = changed
        assert ht.combine_signature(*args) != sig, args
