"""``NvlinkBackend``: dispatch/combine with JIT-compiled CUDA kernels over peer-mapped memory.

For groups whose ranks share one NVLink domain (one host, peer access between every pair). The
kernels (``include/ep_core/sm90_ht_*.cuh``) push token rows with TMA stores straight into the
peers' symmetric buffers and copy them out as they arrive (see ``docs/kernels.md``); the
low-latency pair is delegated to :class:`ep_core.nvlink.ll.LowLatencyEngine`. Results equal the
reference backend's bit for bit (``docs/design.md``).

Every method launches on the caller's current stream and returns without waiting, except where
``do_cpu_sync`` asks for exact sizes (then it synchronises the stream once to read the counts).
Nothing changes address between calls in the no-sync path, so dispatch and combine can be
captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NoReturn

import torch
import torch.distributed as dist

import ep_jit
from ep_core import knobs
from ep_core.backend import BackendConfig, DispatchResult, LowLatencyDispatchResult, RecvHook
from ep_core.expand import expand_rows, reduce_expanded_rows
from ep_core.handle import EPHandle, LowLatencyHandle
from ep_core.layout import align_up_tensor, worst_case_num_expanded_tokens
from ep_core.nvlink import ht
from ep_core.nvlink._common import device_ptr
from ep_core.nvlink.layout import CHUNK_TOKENS, NvlinkSizing, compute_layout
from ep_core.nvlink.ll import LowLatencyEngine, last_op_of_parity, tag_word
from ep_core.validation import check_topk_idx_values
from ep_jit.streams import current_stream

__all__ = ["NvlinkBackend"]


class _HtState:
    """Backend-private part of an :class:`EPHandle` made by this backend."""

    def __init__(
        self,
        chunk_prefix: torch.Tensor,
        chunk_end: torch.Tensor,
        nchunks: torch.Tensor,
        counts: torch.Tensor,
        exact_rows: int | None,
    ) -> None:
        self.chunk_prefix = chunk_prefix
        self.chunk_end = chunk_end
        self.nchunks = nchunks
        self.counts = counts
        self.exact_rows = exact_rows
        self.replay: tuple[tuple, ht.DispatchReplay] | None = None
        """The last cached dispatch's plan and the shape it is for (see ``_replay``)."""
        self.combine: tuple[tuple, ht.CombinePlan] | None = None
        """The last combine's plan and the shape it is for."""


def _ht_state(handle: EPHandle) -> _HtState:
    """The backend part of a high-throughput handle made by this backend."""
    state = handle.backend_state
    if not isinstance(state, _HtState):
        raise ValueError("the handle was not made by the nvlink backend")
    return state


class NvlinkBackend:
    """Kernel implementation of :class:`ep_core.backend.EPBackend` for one NVLink domain.

    Args:
        group: The process group: NCCL with every rank on its own GPU of one host, or gloo with
            ranks sharing GPUs (peer memory on ``ep_jit.PeerMemory``; for testing).
        config: The agreed configuration of the owning ``ElasticBuffer``.

    Raises:
        ValueError: The configuration is outside what the kernels support.
    """

    name = "nvlink"

    checks_topk_idx_on_device = True
    """A dispatch with ``do_cpu_sync`` checks ``topk_idx``'s values on the device (ids in
    ``[-1, E)``, no expert twice in a row); the dispatch kernel passes each rank's verdict to
    every peer with the token count it announces anyway, and every rank reads all verdicts
    with its counts. When any rank's ids are bad, every rank raises ``ValueError``: that rank
    the one of :func:`ep_core.validation.check_topk_idx`, the others one naming it. The caller
    may skip its host checks (a sort and two device syncs). The kernels ignore ids outside the
    range, so bad ids never make them read or write out of bounds before the error is raised,
    and the call completes on every rank (the buffer stays usable)."""

    def __init__(self, group: dist.ProcessGroup, config: BackendConfig) -> None:
        self.group = group
        self.rank = config.rank
        self.num_ranks = config.num_ranks
        self.device = torch.device(config.device)
        self.config = config
        hidden = config.hidden if config.hidden > 0 else 8192
        topk = config.num_topk if config.num_topk > 0 else 32
        self.sizing = NvlinkSizing(
            num_ranks=self.num_ranks,
            num_max_tokens_per_rank=config.num_max_tokens_per_rank,
            hidden=hidden,
            num_topk=topk,
        )
        self.layout, nbytes = compute_layout(self.sizing)
        # The buffer's num_bytes is honoured: exactly that many bytes (0: what the layout needs).
        # A buffer not sized for high-throughput calls (Nmax 0, e.g. low-latency only) gets at
        # least its small control layout.
        if config.num_bytes:
            if config.num_bytes < nbytes and config.num_max_tokens_per_rank > 0:
                raise ValueError(
                    f"num_bytes {config.num_bytes} is too small: the NVLink backend's layout for "
                    f"R={self.num_ranks}, Nmax={config.num_max_tokens_per_rank}, H={hidden}, "
                    f"k={topk} needs {nbytes} bytes"
                )
            nbytes = max(nbytes, config.num_bytes)
        self.sym = ep_jit.peer_memory(group, nbytes, device=self.device)
        self.sym.local.zero_()
        self.peer_bases = self.sym.peer_ptrs_dev
        # Device timeouts: the kernels record stage, peer and values here; the abort word that
        # stops every CTA is the buffer's own (ctrl), so it lives with the buffer.
        self.watchdog = ep_jit.DeviceWatchdog(
            ht.STAGES,
            rank=self.rank,
            timeout_s=max(config.num_gpu_timeout_secs, 0.0),
            device=self.device,
        )
        # The record's first word (its error code, pinned host memory): read on every call
        # instead of parsing the whole record, which is done only once it is set.
        self._error_code = ctypes.c_int32.from_address(self.watchdog.record_ptr)
        self._sm_count = 0
        # Pinned landing buffers of the dispatch's counts (by length), read after the one host
        # synchronisation of a dispatch with do_cpu_sync.
        self._host_counts: dict[int, torch.Tensor] = {}
        # Scratch of cached non-expanded dispatches, by (count words, rows): counts, verdicts
        # and metadata that only their kernels read. The buffer's calls are ordered after each
        # other (as its peer memory needs), so one scratch serves them all.
        self._replay_scratch: dict[tuple[int, int], torch.Tensor] = {}
        self._scratch_meta: dict[tuple[int, int], int] = {}
        self._counts_event = torch.cuda.Event()  # re-recorded by each read
        self._host_timeout_s = config.num_cpu_timeout_secs
        # Every rank's zeroed buffer is in place before any peer writes into it.
        self.sym.settle(self._host_timeout_s)
        self._ll: LowLatencyEngine | None = None
        self._destroyed = False
        self._gave_up = False
        """This rank rejected its input to a call and told its peers (:meth:`abort_call`)."""
        # Declared low-latency use: the engine (a collective allocation) and its kernels for the
        # declared hidden/num_topk are built here, so no low-latency call allocates, compiles or
        # synchronises (the first one can be captured in a CUDA graph).
        self._ll_declared = config.low_latency_mode
        if config.low_latency_mode:
            self._ll = self._new_ll_engine(
                config.num_max_dispatch_tokens_per_rank,
                config.hidden,
                config.num_experts,
                config.num_topk if config.num_topk > 0 else 32,
            )
            self._ll.prepare()
        # What the high-throughput launchers see of this buffer; its developer fields
        # (launch-shape overrides, traces) are set by benchmarks.
        self.ht = ht.HtContext(
            rank=self.rank,
            num_ranks=self.num_ranks,
            sizing=self.sizing,
            layout=self.layout,
            peer_bases=self.peer_bases,
            watchdog=self.watchdog,
        )

    def allocation(self) -> dict[str, int]:
        """Bytes of peer memory this rank holds, by region (for ``EP_BUFFER_DEBUG``)."""
        lay = self.layout
        regions = {
            "high-throughput control": int(lay.region0),
            "high-throughput region 0": int(lay.region1 - lay.region0),
            "high-throughput region 1": int(lay.region1 - lay.region0),
            # 2 MiB padding of the whole, and what an explicit num_bytes gives beyond the layout.
            "beyond the two regions": int(self.sym.nbytes - 2 * lay.region1 + lay.region0),
        }
        if self._ll is not None:
            regions["low-latency buffer"] = int(self._ll.layout.total_bytes)
        return regions

    @classmethod
    def from_config(cls, group: dist.ProcessGroup, config: BackendConfig) -> NvlinkBackend:
        """Builds the backend from an ``ElasticBuffer``'s agreed configuration."""
        return cls(group, config)

    # ---- helpers --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._destroyed:
            raise RuntimeError("NvlinkBackend was destroyed")
        if self._gave_up:
            raise ValueError(
                f"rank {self.rank} (this rank) rejected its input to an earlier call of this "
                "buffer and stopped every rank's kernels of that call; the buffer serves no more "
                "calls: build a new one"
            )
        ll = self._ll
        if self._error_code.value or (ll is not None and ll.failed):
            self._raise_recorded()

    def _raise_recorded(self) -> None:
        """Raises what a kernel of this buffer recorded: a timeout (``ep_jit.JitTimeoutError``),
        or ``ValueError`` naming the rank that rejected its input to a call (:meth:`abort_call`)
        or that called with other arguments than this rank, or made another kind of call.
        """
        rec = self.watchdog.read_record()
        if rec.code == ht.ERROR_ARGUMENTS_DIFFER:
            what = ht.describe_disagreement(
                rec.rank, rec.peer, rec.stage, rec.observed, rec.expected
            )
            raise ValueError(
                f"{what}; no rank's result is valid, and the buffer serves no more calls: "
                "build a new one"
            )
        try:
            self.watchdog.check()
            if self._ll is not None:
                self._ll.check_error()
        except ep_jit.JitPeerAbortError as exc:
            raise ValueError(_peer_abort_message(exc.peer)) from exc

    def abort_call(self, device: torch.device) -> None:
        """Stops every rank's kernels of the current call: this rank rejected its input.

        Writes this rank's abort value into the abort word of every rank's buffer (high-throughput
        control block and, when it exists, the low-latency engine's) on the current stream, after
        this rank's earlier work, and waits for the writes (``ep_jit.signal_abort``). The peers'
        kernels of this call (or of their next call, if they are not in it yet) unwind instead of
        waiting for this rank until ``num_gpu_timeout_secs``, and their hosts raise
        ``ValueError`` naming this rank: in the call itself for a dispatch with CPU sync, else
        at their next call. The buffer serves no more calls on any rank. While the current
        stream is being captured into a CUDA graph nothing is written (nothing runs during a
        capture; the caller's capture fails with its error).
        """
        del device  # the buffer's own
        if self._destroyed or self._gave_up or torch.cuda.is_current_stream_capturing():
            return
        self._gave_up = True
        words = [base + self.layout.ctrl + _CTRL_ABORT_OFFSET for base in self.sym.peer_ptrs]
        if self._ll is not None:
            words += self._ll.abort_words()
        ep_jit.signal_abort(words, self.rank, timeout_s=self._host_timeout_s)

    def _check_shape(self, hidden: int, topk: int, nmax: int) -> None:
        if hidden > self.sizing.hidden:
            raise ValueError(f"hidden {hidden} exceeds the buffer's hidden {self.sizing.hidden}")
        if topk > self.sizing.num_topk:
            raise ValueError(
                f"num_topk {topk} exceeds the buffer's num_topk {self.sizing.num_topk}"
            )
        if nmax > self.sizing.num_max_tokens_per_rank:
            raise ValueError(
                f"num_max_tokens_per_rank {nmax} exceeds the buffer's "
                f"{self.sizing.num_max_tokens_per_rank}"
            )

    def _num_sms(self, num_sms: int) -> int:
        limit = self._sm_count
        if not limit:
            limit = torch.cuda.get_device_properties(self.device).multi_processor_count
            self._sm_count = limit
        n = num_sms if num_sms > 0 else ht.DEFAULT_NUM_SMS
        if not 1 <= n <= limit:
            raise ValueError(f"num_sms must be in [1, {limit}], got {num_sms}")
        return n

    # ---- high-throughput ------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        *,
        num_experts: int,
        num_max_tokens_per_rank: int,
        expert_alignment: int,
        do_expand: bool,
        do_cpu_sync: bool,
        handle: EPHandle | None,
        num_sms: int,
    ) -> DispatchResult:
        """See :meth:`ep_core.backend.EPBackend.dispatch`; runs on the current stream."""
        self._check()
        state: _HtState | None = None
        if handle is not None:
            state = _ht_state(handle)
            if handle.do_expand != do_expand:
                raise ValueError("a cached dispatch must use the handle's do_expand")
            if not do_expand:
                plan = self._replay(
                    handle,
                    state,
                    x,
                    x_scales,
                    topk_idx,
                    topk_weights,
                    num_experts,
                    num_max_tokens_per_rank,
                    expert_alignment,
                    num_sms,
                )
                if plan is not None:
                    return DispatchResult(*plan(x, x_scales, topk_idx, topk_weights), handle)
        r, nmax = self.num_ranks, num_max_tokens_per_rank
        num_tokens, hidden = x.shape
        k = topk_idx.shape[1]
        el = num_experts // r
        self._check_shape(hidden, k, nmax)
        n_sms = self._num_sms(num_sms)
        dev = self.device
        rows = r * nmax
        # Value checks of the routing on the device (fresh dispatch with CPU sync only: without
        # a host read there is nobody to raise). The dispatch kernel sends this rank's verdict
        # to every peer with its token count, so every rank's one host read sees every rank's.
        check = handle is None and do_cpu_sync and knobs.ep.check_inputs
        num_counts = r + 2 * el
        num_bad = ht.check_ctas(num_tokens) if check else 0
        fresh = (num_tokens, k) if handle is None else None
        max_chunks = self.sizing.max_chunks
        idx_copy: torch.Tensor | None = None
        unaligned: torch.Tensor | None = None
        # The kernels get addresses; the views of the block that are kept are made once they
        # run. A cached dispatch gets here when expanded (its counts and metadata are read
        # back) or with no replay scratch yet during a CUDA graph capture (the others take
        # ``_replay``'s plan): it has its own block too.
        block, offsets, bad, at = _small_outputs(
            dev,
            num_counts=num_counts,
            num_bad=num_bad,
            num_ranks=r,
            max_chunks=max_chunks,
            rows=rows,
            fresh=fresh,
        )
        counts, src_bad, end_at, nchunks_at, out_meta = at[:5]
        meta_offset = offsets[3]  # int32 words from the block's start
        row_at: torch.Tensor | int
        prefix_at: torch.Tensor | int
        if handle is None:
            row_at, prefix_at, in_at, copy_at = at[5:]
            # One prologue launch: the layout, the handle's copy of the routing, the zeroed
            # counters and the routing's verdicts.
            ht.launch_layout(
                r,
                k,
                topk_idx,
                el,
                row_at,
                in_at,
                prefix_at,
                copy_at,
                num_experts=num_experts,
                zero=counts,
                num_zero=num_counts,
                bad=bad,
                num_bad=num_bad,
            )
        else:
            assert state is not None
            row_at, prefix_at = handle.send_row, state.chunk_prefix
            ht.launch_zero(counts, num_counts)

        scale_cols = 0 if x_scales is None else x_scales.shape[1]
        out_x = torch.empty((rows, hidden), dtype=x.dtype, device=dev)
        out_sf = None
        if x_scales is not None:
            out_sf = torch.empty((rows, scale_cols), dtype=x_scales.dtype, device=dev)
        out_idx = torch.empty((rows, k), dtype=torch.int64, device=dev)
        out_w = (
            None
            if topk_weights is None
            else torch.empty((rows, k), dtype=torch.float32, device=dev)
        )
        ht.launch_dispatch(
            self.ht,
            x=x,
            x_scales=x_scales,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            send_row=row_at,
            chunk_prefix=prefix_at,
            out_x=out_x,
            out_sf=out_sf,
            out_idx=out_idx,
            out_w=out_w,
            out_meta=out_meta,
            counts=counts,
            src_bad=src_bad,
            topk_bad=bad,
            num_topk_bad=num_bad,
            chunk_end=end_at,
            nchunks=nchunks_at,
            num_max_tokens=nmax,
            num_local_experts=el,
            expert_alignment=expert_alignment,
            num_sms=n_sms,
        )
        # A fresh dispatch's views whose sizes do not depend on the counts, made while its
        # kernels run (before the host read waits for them): host work hidden behind GPU time.
        psum_rank: torch.Tensor | None = None
        psum_expert: torch.Tensor | None = None
        views = _small_views(block, offsets, r, max_chunks, fresh)
        chunk_end, nchunks_t = views[:2]
        if handle is None:
            send_row, chunk_prefix, is_in, idx_copy = views[2:]
            psum_rank = block.as_strided((r,), (1,), 0)
            unaligned = block.as_strided((el,), (1,), r)
            if not do_expand:
                psum_expert = block.as_strided((el,), (1,), r + el)
        exact_rows: int | None = None
        aligned_list: list[int] = []
        if state is not None:
            exact_rows = state.exact_rows
        elif do_cpu_sync:
            # The one host synchronisation of this call: the counts and every rank's verdict
            # on its routing (each source's, as announced to this rank).
            host = self._read_counts(block, num_counts + r)
            if self._error_code.value:
                self._raise_recorded()
            if any(host[num_counts:]):
                bad_ranks = [s for s in range(r) if host[num_counts + s]]
                _raise_bad_routing(self.rank, bad_ranks, topk_idx, num_experts)
            exact_rows = int(host[r - 1])
            aligned_list = _aligned_from_psum(host[r + el : num_counts])
        num_rows = exact_rows if exact_rows is not None else rows

        # Worst-case outputs are returned whole (no slicing views).
        whole = num_rows == rows
        recv_x = out_x if whole else out_x[:num_rows]
        recv_sf = None if out_sf is None else (out_sf if whole else out_sf[:num_rows])
        recv_idx: torch.Tensor | None = out_idx if whole else out_idx[:num_rows]
        recv_w = None if out_w is None else (out_w if whole else out_w[:num_rows])
        # The views of the metadata (with the valid rows) and of the per-expert counts: a fresh
        # dispatch's handle keeps them, an expanded one reads them; a cached one keeps its
        # handle's (the replay wrote the same).
        meta: torch.Tensor | None = None
        if handle is None or do_expand:
            meta = block.as_strided((num_rows, 2), (2, 1), meta_offset)
            if unaligned is None:
                unaligned = block.as_strided((el,), (1,), r)
        # Rows past the valid count get the reference's values (zero rows and scales, -1 ids
        # and metadata, 0 weights), so code that uses the whole worst-case tensors stays in
        # bounds and finite. One small kernel, in place, no host sync.
        if exact_rows is None:
            ht.launch_dispatch_tail(counts + 4 * (r - 1), out_meta, out_idx, out_w, out_x, out_sf)

        starts = None
        if do_expand:
            assert unaligned is not None and meta is not None
            aligned = align_up_tensor(unaligned.to(torch.int64), expert_alignment)
            starts = aligned.cumsum(0) - aligned
        if handle is not None:
            num_expanded = handle.num_expanded_tokens
        elif exact_rows is not None:
            num_expanded = sum(aligned_list)
        else:
            num_expanded = worst_case_num_expanded_tokens(r, nmax, k, el, expert_alignment)
        if do_expand:
            assert recv_idx is not None and starts is not None and meta is not None
            # Rows past the valid count carry no lanes (their metadata is -1).
            local_idx = torch.where(meta[:, :1] >= 0, recv_idx, -1)
            recv_x, recv_sf, recv_w, expanded_row = expand_rows(
                local_idx, starts, num_expanded, recv_x, recv_sf, recv_w
            )
            meta = torch.cat([meta, expanded_row.to(torch.int32)], dim=1)
            recv_idx = None

        if handle is None:
            assert idx_copy is not None and unaligned is not None and meta is not None
            assert psum_rank is not None
            if psum_expert is None:  # expanded: the aligned starts plus the counts
                assert starts is not None
                psum_expert = (starts + unaligned).to(torch.int32)
            state = _HtState(chunk_prefix, chunk_end, nchunks_t, psum_rank, exact_rows)
            handle = EPHandle(
                rank=self.rank,
                num_ranks=r,
                num_experts=num_experts,
                num_max_tokens_per_rank=nmax,
                expert_alignment=expert_alignment,
                do_expand=do_expand,
                num_sms=n_sms,
                topk_idx=idx_copy,
                is_token_in_rank=is_in,
                send_row=send_row,
                num_recv_tokens=num_rows,
                num_expanded_tokens=num_expanded,
                num_recv_tokens_per_expert_list=aligned_list,
                psum_num_recv_tokens_per_rank=psum_rank,
                psum_num_recv_tokens_per_expert=psum_expert,
                num_unaligned_recv_tokens_per_expert=unaligned,
                recv_src_metadata=meta,
                backend_state=state,
            )
        else:
            # The replay wrote the same layout; keep the handle's tensors, refresh the chunk rows.
            assert state is not None
            state.chunk_end, state.nchunks = chunk_end, nchunks_t
            # The plans hold the addresses of the chunk rows replaced here.
            state.replay = state.combine = None
        return DispatchResult(recv_x, recv_sf, recv_idx, recv_w, handle)

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        num_sms: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See :meth:`ep_core.backend.EPBackend.combine`; runs on the current stream."""
        self._check()
        state = _ht_state(handle)
        weights = topk_weights
        meta = handle.recv_src_metadata
        if handle.do_expand:
            x, weights = reduce_expanded_rows(x, topk_weights, meta, handle.num_topk)
            meta = meta[:, :2].contiguous()  # the lane map follows the two columns
        if x.shape[0] < meta.shape[0]:
            raise ValueError(f"combine x has {x.shape[0]} rows, the handle needs {meta.shape[0]}")
        # The developer overrides (benchmarks) pick another launch: part of the key.
        ctx = self.ht
        key = (
            x.shape[1],
            weights is None,
            num_sms,
            ctx.combine_override,
            device_ptr(ctx.trace_combine),
        )
        found = state.combine
        if found is not None and found[0] == key:
            plan = found[1]
        else:
            hidden = x.shape[1]
            self._check_shape(hidden, handle.num_topk, handle.num_max_tokens_per_rank)
            n_sms = self._num_sms(num_sms if num_sms > 0 else handle.num_sms)
            plan = ht.CombinePlan(
                ctx, handle, state, hidden=hidden, weighted=weights is not None, num_sms=n_sms
            )
            state.combine = (key, plan)
        return plan(x.contiguous(), None if weights is None else weights.contiguous(), meta, bias)

    # ---- low-latency ------------------------------------------------------------------------
    def _new_ll_engine(self, nmax: int, hidden: int, num_experts: int, k: int) -> LowLatencyEngine:
        return LowLatencyEngine(
            self.group,
            rank=self.rank,
            num_ranks=self.num_ranks,
            num_max_dispatch_tokens_per_rank=nmax,
            hidden=hidden,
            num_experts=num_experts,
            num_topk=k,
            device=self.device,
            num_gpu_timeout_secs=self.config.num_gpu_timeout_secs,
        )

    def _ll_engine(self, nmax: int, hidden: int, num_experts: int, k: int) -> LowLatencyEngine:
        """The low-latency engine for a call of this shape.

        Built at construction when low-latency use was declared: a call beyond its limits is a
        ``ValueError`` naming the limit (never a rebuild, which would be a collective inside the
        call). Otherwise built at the first call and rebuilt when a call outgrows it (collective,
        and not capturable in a CUDA graph).
        """
        eng = self._ll
        if self._ll_declared:
            assert eng is not None
            limits = (
                ("num_max_dispatch_tokens_per_rank", nmax, eng.num_max_tokens),
                ("hidden", hidden, eng.hidden),
                ("num_experts", num_experts, eng.num_experts),
                ("num_topk", k, eng.num_topk),
            )
            for name, value, limit in limits:
                if value > limit:
                    raise ValueError(
                        f"low-latency {name} {value} exceeds the buffer's {limit} (given at "
                        "construction with low_latency_mode=True)"
                    )
            return eng
        if eng is None or not eng.fits(nmax, hidden, num_experts, k):
            if eng is not None:
                eng.destroy()
            eng = self._ll = self._new_ll_engine(nmax, hidden, num_experts, k)
        return eng

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        *,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        return_recv_hook: bool = False,
    ) -> tuple[LowLatencyDispatchResult, RecvHook | None]:
        """See :meth:`ep_core.backend.EPBackend.low_latency_dispatch`.

        With ``return_recv_hook`` only the send kernel is launched; the hook launches the
        receive kernel on the stream current when it is called.
        """
        self._check()
        eng = self._ll_engine(
            num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, topk_idx.shape[1]
        )
        return eng.dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            num_experts=num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            return_recv_hook=return_recv_hook,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        out: torch.Tensor | None,
        return_recv_hook: bool = False,
    ) -> tuple[torch.Tensor, RecvHook | None]:
        """See :meth:`ep_core.backend.EPBackend.low_latency_combine` (hooks as the dispatch)."""
        self._check()
        if self._ll is None:
            raise ValueError("low_latency_combine needs a low_latency_dispatch first")
        return self._ll.combine(
            x, topk_idx, topk_weights, handle, out, return_recv_hook=return_recv_hook
        )

    def _replay(
        self,
        handle: EPHandle,
        state: _HtState,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        num_experts: int,
        nmax: int,
        expert_alignment: int,
        num_sms: int,
    ) -> ht.DispatchReplay | None:
        """The plan of a cached dispatch (not expanded) of this handle and shape: the last one
        if the shape is the same, else a new one; ``None`` while the replay scratch cannot be
        made (a CUDA graph capture before any cached dispatch of this size).

        A plan sends the source counts, verdicts and metadata to the backend's replay scratch
        (no allocation, no prologue), makes no per-expert counts (nobody reads them), and
        writes the chunk rows (the same as the handle's dispatch wrote) into the handle's own
        tensors, which only this buffer's kernels read, in call order.
        """
        scales = None if x_scales is None else (x_scales.shape, x_scales.stride(), x_scales.dtype)
        key = (
            x.shape,
            x.dtype,
            scales,
            topk_idx.shape,
            topk_weights is None,
            num_experts,
            nmax,
            expert_alignment,
            num_sms,
            self.ht.dispatch_override,
            device_ptr(self.ht.trace_dispatch),
        )
        found = state.replay
        if found is not None and found[0] == key:
            return found[1]
        r, k = self.num_ranks, topk_idx.shape[1]
        self._check_shape(x.shape[1], k, nmax)
        n_sms = self._num_sms(num_sms)
        el = num_experts // r
        scratch = self._scratch(r + 2 * el, r * nmax)
        if scratch is None:
            return None
        plan = ht.DispatchReplay(
            self.ht,
            x=x,
            x_scales=x_scales,
            num_topk=k,
            weighted=topk_weights is not None,
            layout=(handle.send_row, state.chunk_prefix, state.chunk_end, state.nchunks),
            scratch=scratch,
            num_rows=state.exact_rows,
            num_local_experts=el,
            num_max_tokens=nmax,
            expert_alignment=expert_alignment,
            num_sms=n_sms,
        )
        state.replay = (key, plan)
        return plan

    def _scratch(self, num_counts: int, rows: int) -> tuple[int, int, int] | None:
        """Addresses of the replay scratch's counts, verdicts and metadata (``num_counts``
        count words, ``rows`` rows); ``None`` when it must be made during a CUDA graph capture
        (it would live in the graph's memory pool, freed with the graph)."""
        key = (num_counts, rows)
        t = self._replay_scratch.get(key)
        if t is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            # Kept until the backend goes (never freed while a call on another stream may
            # still use it); one per size of the calls, a handful.
            (_, meta), total = _int32_offsets([num_counts + self.num_ranks, rows * 2])
            t = torch.empty(total, dtype=torch.int32, device=self.device)
            self._replay_scratch[key] = t
            self._scratch_meta[key] = meta
        base = t.data_ptr()
        return base, base + 4 * num_counts, base + 4 * self._scratch_meta[key]

    def _read_counts(self, block: torch.Tensor, n: int) -> list[int]:
        """The first ``n`` words of ``block`` as Python ints: copied into a pinned buffer, then
        the stream synchronised.

        Cheaper on the host than ``.cpu()`` (no pageable staging copy); everything the host does
        between the sync and the return of the dispatch adds to the call's latency.
        """
        host = self._host_counts.get(n)
        if host is None:
            host = self._host_counts[n] = torch.empty(n, dtype=block.dtype, pin_memory=True)
        host.copy_(block[:n], non_blocking=True)
        index = self.device.index
        stream = current_stream(torch.cuda.current_device() if index is None else index)
        self._counts_event.record(stream)
        ep_jit.wait_event(
            self._counts_event,
            what="the dispatch's received-token counts",
            timeout_s=self._host_timeout_s,
        )
        return host.tolist()

    def barrier(self) -> None:
        """GPU barrier across the group on the current stream."""
        self._check()
        self.sym.barrier()

    def _jump_epoch_for_testing(self, last_epoch: int) -> None:
        """Tests only: the high-throughput buffer looks as if ``last_epoch`` ops had run.

        See ``LowLatencyEngine._jump_epoch_for_testing`` (which the low-latency engine, if one
        exists, also gets). Collective, with no kernel in flight.
        """
        self._check()
        if last_epoch < 0:
            raise ValueError(f"last_epoch must be >= 0, got {last_epoch}")
        lay = self.layout
        with torch.cuda.device(self.device):
            self.sym.settle()
            # Ctrl: u64 epoch, u32 finish counter, u32 abort; arrive: [R] u64, the op number
            # above bit 16 (its signature below: none here).
            self.sym.tensor(lay.ctrl, (1,), torch.int64).fill_(last_epoch)
            self.sym.tensor(lay.ctrl + 8, (1,), torch.int32).zero_()
            self.sym.tensor(lay.arrive, (self.num_ranks,), torch.int64).fill_(last_epoch << 16)
            # Tagged words of each region as the last op of its parity left them.
            r, cmax = self.num_ranks, self.sizing.max_chunks
            for p, base in enumerate((lay.region0, lay.region1)):
                last = last_op_of_parity(last_epoch, p)
                for off, count in ((lay.info, 2 * r), (lay.dflag, r * cmax), (lay.cflag, r * cmax)):
                    self.sym.tensor(base + off, (count,), torch.int64).fill_(tag_word(last))
            self.sym.settle()
        if self._ll is not None:
            self._ll._jump_epoch_for_testing(last_epoch)

    def destroy(self) -> None:
        """Frees the symmetric buffers (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._ll is not None:
            self._ll.destroy()
            self._ll = None
        self.sym.destroy()


_CTRL_ABORT_OFFSET = 12
"""Byte offset of the abort word in the control block (``ep_core::Ctrl``: u64 epoch, u32
finish counter, u32 abort)."""


def _peer_abort_message(peer: int) -> str:
    """What a rank raises once its kernels saw that ``peer`` rejected its input to a call."""
    return (
        f"rank {peer} rejected its input to a collective call of this buffer (see its error); "
        "every rank's kernels of that call stopped, so its results are not valid, and the "
        "buffer serves no more calls: build a new one"
    )


_INT32_ALIGN = 64
"""int32 words (256 bytes) each part of a dispatch's int32 block starts on a multiple of."""


def _int32_offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of parts of ``sizes`` int32 words in one block, each ``_INT32_ALIGN``-aligned,
    and the block's length."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _INT32_ALIGN) * _INT32_ALIGN
    return offsets, max(end, 1)


@functools.lru_cache(maxsize=64)
def _small_layout(
    num_counts: int,
    num_bad: int,
    num_ranks: int,
    max_chunks: int,
    rows: int,
    fresh: tuple[int, int] | None,
) -> tuple[tuple[int, ...], int]:
    """Offsets (int32 words) of the parts of a dispatch's small-output block and its length;
    see :func:`_small_outputs` (computed once per shape: a call's host path)."""
    r = num_ranks
    parts = [num_counts + r + num_bad, r * max_chunks, r, rows * 2]
    if fresh is not None:
        t, k = fresh
        parts += [t * r, (-(-t // CHUNK_TOKENS) + 1) * r, -(-t * r // 4), t * k * 2]
    offsets, total = _int32_offsets(parts)
    return tuple(offsets), total


def _small_outputs(
    device: torch.device,
    *,
    num_counts: int,
    num_bad: int,
    num_ranks: int,
    max_chunks: int,
    rows: int,
    fresh: tuple[int, int] | None,
) -> tuple[torch.Tensor, tuple[int, ...], int | None, tuple[int, ...]]:
    """A dispatch's small outputs in one uninitialised allocation, as device addresses.

    The counts, the per-source verdicts (``[R]``: 1 = that rank's ``topk_idx`` failed its check)
    and the prologue's ``num_bad`` verdict words come first and adjacent (one device-to-host
    read takes the first two), then the chunk ends, the chunk counts, the metadata and, for a
    fresh dispatch of ``fresh = (T, k)``, the send rows, chunk prefixes, ``is_in`` (bool) and
    the handle's routing copy (int64); each part but the two verdicts starts on a 256-byte
    boundary. The rows (``out_x``, ...) are not part of it, so a caller can free them while it
    keeps the handle. The kernels take addresses; the views a caller keeps are made by
    :func:`_small_views` once the kernels are launched (while they run).

    Returns:
        ``(block, offsets, check verdicts' address or None, addresses)``: the offsets of
        :func:`_small_layout`, and the addresses of the counts, the source verdicts, the chunk
        ends, the chunk counts and the metadata, followed, when ``fresh``, by those of the send
        rows, the chunk prefixes, ``is_in`` and the routing copy.
    """
    r = num_ranks
    offsets, total = _small_layout(num_counts, num_bad, r, max_chunks, rows, fresh)
    block = torch.empty(total, dtype=torch.int32, device=device)
    base = block.data_ptr()
    bad = base + 4 * (num_counts + r) if num_bad else None
    at = (base, base + 4 * num_counts, *(base + 4 * o for o in offsets[1:]))
    return block, offsets, bad, at


def _small_views(
    block: torch.Tensor,
    offsets: tuple[int, ...],
    num_ranks: int,
    max_chunks: int,
    fresh: tuple[int, int] | None,
) -> list[torch.Tensor]:
    """The views of a dispatch's small-output block (``offsets`` from :func:`_small_layout`)
    that a handle keeps: ``chunk_end [R, max_chunks]``, ``nchunks [R]`` and, when ``fresh =
    (T, k)``, ``send_row [T, R]``, ``chunk_prefix [ceil(T / CHUNK_TOKENS) + 1, R]``, ``is_in
    [T, R]`` (bool) and the routing copy ``[T, k]`` (int64)."""
    r = num_ranks
    out = [
        block.as_strided((r, max_chunks), (max_chunks, 1), offsets[1]),
        block.as_strided((r,), (1,), offsets[2]),
    ]
    if fresh is not None:
        t, k = fresh
        out += [
            block.as_strided((t, r), (r, 1), offsets[4]),
            block.as_strided((-(-t // CHUNK_TOKENS) + 1, r), (r, 1), offsets[5]),
            block.view(torch.bool).as_strided((t, r), (r, 1), 4 * offsets[6]),
            block.view(torch.int64).as_strided((t, k), (k, 1), offsets[7] // 2),
        ]
    return out


def _raise_bad_routing(
    rank: int, bad_ranks: list[int], topk_idx: torch.Tensor, num_experts: int
) -> NoReturn:
    """Raises on every rank of a dispatch in which ``bad_ranks`` passed bad ``topk_idx``.

    A rank in ``bad_ranks`` raises the host check's ``ValueError`` naming its first bad entry;
    the others raise a ``ValueError`` naming the bad ranks: the kernels skipped the bad ids,
    so the rows those ids route are missing from the results and no rank's result is valid.
    """
    if rank in bad_ranks:
        check_topk_idx_values(topk_idx, num_experts)
        raise RuntimeError(
            "the device check of topk_idx found a bad id that the host check does not see"
        )
    raise ValueError(_bad_routing_message(bad_ranks))


def _bad_routing_message(bad_ranks: list[int]) -> str:
    """What the ranks with valid ``topk_idx`` raise when ``bad_ranks`` passed bad ones."""
    if len(bad_ranks) == 1:
        who, see = f"rank {bad_ranks[0]}", f"rank {bad_ranks[0]}'s error"
    else:
        who, see = f"ranks {', '.join(map(str, bad_ranks))}", "their errors"
    return f"dispatch: {who} passed invalid topk_idx (see {see}); no rank's result is valid"


def _aligned_from_psum(psum: list[int]) -> list[int]:
    """Per-expert counts from their inclusive prefix sums (Python ints)."""
    return [b - a for a, b in zip([0, *psum][:-1], psum, strict=True)]
