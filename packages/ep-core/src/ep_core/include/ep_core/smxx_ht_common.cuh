// Shared pieces of the high-throughput (intranode, NVLink) dispatch/combine kernels:
// the symmetric-buffer layout, the routing-layout kernel, and the epoch/finish protocol.
//
// Protocol summary (see docs/kernels.md):
// * Every op (dispatch or combine) on a buffer has an epoch e (1, 2, ...), kept on the device in
//   the buffer's control block, so a launch needs no host argument that changes per call (the
//   calls can be captured in a CUDA graph). All ranks run the same sequence of ops, so epochs agree.
// * Op e writes into region e % 2 of its peers. Every op waits for a word from every peer that the
//   peer writes at the start of the same op, so when op e runs, every peer has finished op e - 2 and
//   region e % 2 is free again.
// * Flags are 64-bit words tagged with (uint32)e in the high half: no reset is ever needed.
// * Each op announces (e << 16) | its call signature in the peers' arrive words; one warp compares
//   every peer's with its own at the start of the op (check_peers_agree), so ranks that are in
//   different kinds of op, or that called the same op with other arguments, stop and report it
//   instead of waiting for flags that never come.
#pragma once

#include <cuda/std/cstdint>

#include <ep_core/smxx_ptx.cuh>

namespace ep_core {

// Byte offsets inside one rank's symmetric buffer. Computed on the host (ep_core/nvlink_layout.py).
struct SymLayout {
    int64_t ctrl;       // u64 epoch, u32 finish counter, u32 abort flag
    int64_t arrive;     // [R] u64: (op number << 16) | call signature each peer has started
    int64_t region[2];  // base of the two alternating regions
    // Offsets relative to a region base:
    int64_t info;     // [R][2] u64: (tag, rows sent to me), (tag, tokens of the sender |
                      // its call signature << 16 | kInfoBadRouting when its topk_idx failed
                      // the dispatch's check)
    int64_t dflag;    // [R][Cmax] u64: dispatch chunk done, low half = row end
    int64_t drstart;  // [R][Cmax] i32: dispatch chunk row start
    int64_t cflag;    // [R][Cmax] u64: combine chunk done
    int64_t data;     // [R][Nmax][payload]: dispatch rows (data | scale packs | metadata) or
                      // combine rows (bf16 data | weights); never live in the same op
};

// The low half of a dispatch's second info word: the sender's token count (< 2^16), its call
// signature (15 bits: a digest of the arguments every rank must agree on, from the host) and
// kInfoBadRouting: the sender's prologue (the check CTAs of ht_layout) found a bad id in its
// topk_idx. Every receiver copies that bit into its per-source verdicts, so the one host read of
// every rank sees it; a receiver whose own signature differs records kErrorArgumentsDiffer.
constexpr uint32_t kInfoBadRouting = 1u << 31;
constexpr uint32_t kInfoTokensMask = 0xFFFFu;
constexpr int kInfoSignatureShift = 16;
constexpr uint32_t kInfoSignatureMask = 0x7FFFu;
// Error code (ep_jit::ErrorRecord::code) of an op whose peer called with other arguments, or is
// in another kind of op: peer = that rank; at stage kStageDispatchInfo observed = its dispatch
// signature and expected = this rank's, at the arrive stages the arrive words (check_peers_agree).
constexpr int32_t kErrorArgumentsDiffer = 3;

struct Ctrl {
    uint64_t epoch;
    uint32_t finish;
    uint32_t abort;
};

// Developer trace of the high-throughput kernels. When `trace` is not null, lane 0 of every
// warp writes into its 8 words at trace + (cta * 32 + warp) * kHtTracePoints: the global timer
// (ns) at points 0 (start), 1 (main loop done), 2 (bulk stores drained), and the nanoseconds
// spent in three kinds of wait at 3..5 (kernel-specific) and the rows it handled at 6. Off, it
// costs one uniform branch per wait.
constexpr int kHtTracePoints = 8;

__device__ __forceinline__ uint64_t* ht_trace_word(uint64_t* trace, int p) {
    return trace + (blockIdx.x * 32 + (threadIdx.x >> 5)) * kHtTracePoints + p;
}

__device__ __forceinline__ void ht_trace(uint64_t* trace, int p) {
    if (trace != nullptr && (threadIdx.x & 31) == 0) *ht_trace_word(trace, p) = ep_jit::globaltimer_ns();
}

// The counters below are fire-and-forget reductions (red.global.add): a `+=` would be a
// dependent global load per call, a stall of an L2 round trip that the trace itself would add.
__device__ __forceinline__ void ht_trace_add(uint64_t* trace, int p, uint64_t v) {
    atomicAdd(reinterpret_cast<unsigned long long*>(ht_trace_word(trace, p)),
              static_cast<unsigned long long>(v));
}

__device__ __forceinline__ void ht_trace_count(uint64_t* trace) {
    if (trace != nullptr && (threadIdx.x & 31) == 0) ht_trace_add(trace, 6, 1);
}

// Accumulates the time from its construction to add(p) into wait word p (lane 0 only).
struct HtWaitTimer {
    uint64_t* trace;
    uint64_t t0;
    __device__ __forceinline__ explicit HtWaitTimer(uint64_t* tr)
        : trace(tr), t0(tr != nullptr ? ep_jit::globaltimer_ns() : 0) {}
    __device__ __forceinline__ void add(int p) const {
        if (trace != nullptr && (threadIdx.x & 31) == 0)
            ht_trace_add(trace, p, ep_jit::globaltimer_ns() - t0);
    }
};

__device__ __forceinline__ uint8_t* peer_ptr(const uint64_t* peer_bases, int peer, int64_t off) {
    return reinterpret_cast<uint8_t*>(peer_bases[peer]) + off;
}

__device__ __forceinline__ uint64_t make_tagged(uint32_t tag, uint32_t low) {
    return (static_cast<uint64_t>(tag) << 32) | low;
}

// Block-wide exclusive scan of one int per thread (blockDim.x multiple of 32, <= 1024).
__device__ __forceinline__ int block_exclusive_scan(int v, int* smem_warp, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) smem_warp[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nwarps ? smem_warp[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nwarps) smem_warp[lane] = w;
    }
    __syncthreads();
    const int warp_base = warp > 0 ? smem_warp[warp - 1] : 0;
    *total = smem_warp[nwarps - 1];
    __syncthreads();
    return warp_base + x - v;
}

// Routing layout of destination rank d, by one CTA of kLayoutThreads threads (ht_layout):
//   send_row[t][d]     row of token t inside d's region for this source, -1 if not sent
//   is_in[t][d]        token t goes to d
//   chunk_prefix[c][d] rows sent to d by tokens before chunk c (c = 0 .. nchunks)
//   topk_copy          (optional, CTA 0) a copy of topk_idx for the dispatch's handle, written
//                      from the loads the CTA makes anyway instead of by a separate copy kernel
// The CTA walks the tokens in tiles of kLayoutThreads. A tile's ids are read flat (id m * blockDim
// + thread), so each load instruction of a warp is coalesced and a thread's kTopk loads are in
// flight together; the next tile's loads are issued before this tile's scan. Each id's hit goes
// to a byte in shared memory, thread i ORs the bytes of the tile's token i, and one block scan
// per tile numbers the rows.
constexpr int kLayoutThreads = 1024;

template <int kRanks, int kTopk, int kChunk>
__device__ __forceinline__ void layout_of_rank(int d, const int64_t* __restrict__ topk_idx,
                                               int64_t num_tokens, int64_t num_local_experts,
                                               int32_t* __restrict__ send_row,
                                               bool* __restrict__ is_in,
                                               int32_t* __restrict__ chunk_prefix,
                                               int64_t* __restrict__ topk_copy) {
    __shared__ int warp_sums[32];
    __shared__ __align__(16) uint8_t hits[kLayoutThreads * kTopk];
    const int tid = threadIdx.x;
    const int64_t lo = d * num_local_experts, hi = lo + num_local_experts;
    const int64_t num_ids = num_tokens * kTopk;
    int64_t ids[kTopk];
    auto load_tile = [&](int64_t first_token) {
        const int64_t first = first_token * kTopk + tid;
#pragma unroll
        for (int m = 0; m < kTopk; ++m) {
            const int64_t i = first + static_cast<int64_t>(m) * kLayoutThreads;
            ids[m] = i < num_ids ? __ldg(topk_idx + i) : -1;
        }
    };
    const bool copy = topk_copy != nullptr && d == 0;
    load_tile(0);
    int running = 0;
    for (int64_t base = 0; base < num_tokens; base += kLayoutThreads) {
#pragma unroll
        for (int m = 0; m < kTopk; ++m)
            hits[m * kLayoutThreads + tid] = (ids[m] >= lo && ids[m] < hi) ? 1 : 0;
        if (copy) {
            const int64_t first = base * kTopk + tid;
#pragma unroll
            for (int m = 0; m < kTopk; ++m) {
                const int64_t i = first + static_cast<int64_t>(m) * kLayoutThreads;
                if (i < num_ids) topk_copy[i] = ids[m];
            }
        }
        if (base + kLayoutThreads < num_tokens) load_tile(base + kLayoutThreads);
        __syncthreads();
        const uint8_t* h = hits + tid * kTopk;
        uint32_t any = 0;
        if constexpr (kTopk % 4 == 0) {
#pragma unroll
            for (int j = 0; j < kTopk / 4; ++j) any |= reinterpret_cast<const uint32_t*>(h)[j];
        } else {
#pragma unroll
            for (int j = 0; j < kTopk; ++j) any |= h[j];
        }
        const int flag = any != 0 ? 1 : 0;
        // The scan's barriers also keep the next tile's hit bytes from overwriting this one's.
        int total;
        const int row = running + block_exclusive_scan(flag, warp_sums, &total);
        const int64_t t = base + tid;
        if (t < num_tokens) {
            send_row[t * kRanks + d] = flag ? row : -1;
            is_in[t * kRanks + d] = flag != 0;
            if (t % kChunk == 0) chunk_prefix[(t / kChunk) * kRanks + d] = row;
        }
        running += total;
    }
    if (tid == 0) {
        const int64_t nchunks = (num_tokens + kChunk - 1) / kChunk;
        chunk_prefix[nchunks * kRanks + d] = running;
    }
}

// Whether token row `ids` (kTopk ids) names an id outside [-1, num_experts) or one expert twice.
// Up to 8 ids are held in registers; longer rows compare against reloads (L1 hits), so the
// 1024-thread prologue keeps its registers for any top-k.
template <int kTopk>
__device__ __forceinline__ bool token_ids_bad(const int64_t* __restrict__ ids,
                                              int64_t num_experts) {
    bool bad = false;
    if constexpr (kTopk <= 8) {
        int64_t v[kTopk];
#pragma unroll
        for (int m = 0; m < kTopk; ++m) v[m] = __ldg(ids + m);
#pragma unroll
        for (int m = 0; m < kTopk; ++m) {
            bad |= v[m] < -1 || v[m] >= num_experts;
#pragma unroll
            for (int j = 0; j < m; ++j) bad |= v[m] >= 0 && v[j] == v[m];
        }
    } else {
        for (int m = 0; m < kTopk; ++m) {
            const int64_t v = __ldg(ids + m);
            bad |= v < -1 || v >= num_experts;
            for (int j = 0; v >= 0 && j < m; ++j) bad |= __ldg(ids + j) == v;
        }
    }
    return bad;
}

// Prologue of a fresh dispatch, one launch (grid = kRanks + C CTAs of kLayoutThreads threads):
//   CTAs [0, kRanks)   the routing layout of destination rank blockIdx.x (layout_of_rank)
//   CTA kRanks         also zeroes zero[0, num_zero) (the counters the dispatch kernel adds
//                      into), so the host allocates them without a fill
//   CTAs kRanks + b    (bad not null, b < C) the verdict bad[b] on tokens b, b + C, ... (one
//                      per thread): 1 if an id is outside [-1, num_experts) or a row names one
//                      expert twice, else 0; written unconditionally (no zeroing needed). The
//                      dispatch kernel ORs these words into the token-count word it announces
//                      to every peer (kInfoBadRouting); each rank's host reads every source's
//                      verdict with its counts (one device-to-host read) and the bad rank names
//                      the first bad entry from the ids themselves.
// Without bad, C = 1 (zeroing only). The layout and check CTAs run side by side: the check costs
// no launch of its own.
template <int kRanks, int kTopk, int kChunk>
__device__ __forceinline__ void ht_layout(const int64_t* __restrict__ topk_idx, int64_t num_tokens,
                                          int64_t num_local_experts, int32_t* __restrict__ send_row,
                                          bool* __restrict__ is_in,
                                          int32_t* __restrict__ chunk_prefix,
                                          int64_t* __restrict__ topk_copy, int64_t num_experts,
                                          int32_t* __restrict__ zero, int64_t num_zero,
                                          int32_t* __restrict__ bad) {
    const int cta = static_cast<int>(blockIdx.x);
    if (cta < kRanks) {
        layout_of_rank<kRanks, kTopk, kChunk>(cta, topk_idx, num_tokens, num_local_experts,
                                              send_row, is_in, chunk_prefix, topk_copy);
        return;
    }
    const int b = cta - kRanks, nb = static_cast<int>(gridDim.x) - kRanks;
    if (b == 0)
        for (int64_t i = threadIdx.x; i < num_zero; i += blockDim.x) zero[i] = 0;
    if (bad == nullptr) return;
    int found = 0;
    const int64_t stride = static_cast<int64_t>(nb) * blockDim.x;
    for (int64_t t = static_cast<int64_t>(b) * blockDim.x + threadIdx.x; t < num_tokens;
         t += stride)
        found |= token_ids_bad<kTopk>(topk_idx + t * kTopk, num_experts) ? 1 : 0;
    found = __syncthreads_or(found);
    if (threadIdx.x == 0) bad[b] = found != 0 ? 1 : 0;
}

// Zeroes zero[0, num_zero) (one CTA of kZeroThreads threads): the counters of a cached dispatch
// that reads its counts back (no layout to fold this into).
constexpr int kZeroThreads = 256;

__device__ __forceinline__ void ht_zero_words(int32_t* __restrict__ zero, int64_t num_zero) {
    for (int64_t i = threadIdx.x; i < num_zero; i += blockDim.x) zero[i] = 0;
}

// Zeroes bytes [begin, end) of `base` with grid-stride stores: 16 bytes at a time where `base`,
// `begin` and `end` allow it, else 4 or 1.
__device__ __forceinline__ void zero_byte_range(void* base, int64_t begin, int64_t end,
                                                int64_t first, int64_t stride) {
    auto* p = static_cast<char*>(base);
    const auto addr = reinterpret_cast<uintptr_t>(p);
    if (addr % 16 == 0 && begin % 16 == 0 && end % 16 == 0) {
        const int4 zero = make_int4(0, 0, 0, 0);
        for (int64_t i = begin / 16 + first; i < end / 16; i += stride)
            reinterpret_cast<int4*>(p)[i] = zero;
    } else if (addr % 4 == 0 && begin % 4 == 0 && end % 4 == 0) {
        for (int64_t i = begin / 4 + first; i < end / 4; i += stride)
            reinterpret_cast<int32_t*>(p)[i] = 0;
    } else {
        for (int64_t i = begin + first; i < end; i += stride) p[i] = 0;
    }
}

// Rows of a dispatch without CPU sync past the valid count (*valid_rows, read on the device) up to
// `rows`: metadata and top-k ids -1, weights 0 (weights may be null), the received rows and their
// scales zero (scales may be null), as the reference backend gives them: code that indexes with
// the worst-case outputs stays in bounds, and an expert applied to every row sees finite zeros
// (uninitialised memory may hold NaN, which zero gradients do not cancel in a weight gradient).
// Grid-stride loops, one per output, each coalesced.
template <int kTopk>
__device__ __forceinline__ void ht_dispatch_tail(const int32_t* __restrict__ valid_rows,
                                                 int64_t rows, int32_t* __restrict__ meta,
                                                 int64_t* __restrict__ topk_idx,
                                                 float* __restrict__ topk_weights, void* x,
                                                 int64_t x_row_bytes, void* x_sf,
                                                 int64_t sf_row_bytes) {
    const int64_t valid = *valid_rows;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t i = valid * 2 + first; i < rows * 2; i += stride) meta[i] = -1;
    for (int64_t i = valid * kTopk + first; i < rows * kTopk; i += stride) topk_idx[i] = -1;
    if (topk_weights != nullptr)
        for (int64_t i = valid * kTopk + first; i < rows * kTopk; i += stride) topk_weights[i] = 0.0f;
    if (x != nullptr) zero_byte_range(x, valid * x_row_bytes, rows * x_row_bytes, first, stride);
    if (x_sf != nullptr)
        zero_byte_range(x_sf, valid * sf_row_bytes, rows * sf_row_bytes, first, stride);
}

// Called by every CTA at its very end (after __syncthreads). The last CTA to finish publishes the
// new epoch and re-arms the finish counter; it returns true in every thread of that CTA.
__device__ __forceinline__ bool finish_cta(Ctrl* ctrl) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&ctrl->finish, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    return last;
}

// A call signature (16 bits, from the host): kSignatureCombine for a combine, and a 15-bit digest
// of the arguments every rank must share (ht.dispatch_signature / ht.combine_signature).
constexpr uint32_t kSignatureCombine = 0x8000u;
constexpr int kArriveShift = 16;

// The arrive word of op `epoch` with call signature `sig`: ordered by op number first, so "peer
// has started op e" is still one comparison (>= arrive_word(e, 0)).
__device__ __forceinline__ uint64_t arrive_word(uint64_t epoch, uint32_t sig) {
    return (epoch << kArriveShift) | (sig & 0xFFFFu);
}

// Each rank announces the start of op `epoch` to every peer (thread lanes 0..R-1 of one warp).
template <int kRanks>
__device__ __forceinline__ void announce_start(const uint64_t* peer_bases, const SymLayout& lay,
                                               int rank, uint64_t epoch, uint32_t sig, int lane) {
    if (lane < kRanks) {
        auto* p = reinterpret_cast<uint64_t*>(peer_ptr(peer_bases, lane, lay.arrive)) + rank;
        st_release_sys(p, arrive_word(epoch, sig));
    }
}

// Wait until every peer has started op `epoch` (so it finished op epoch - 1 entirely).
template <int kRanks>
__device__ __forceinline__ bool wait_all_started(const WaitContext& ctx, const uint64_t* peer_bases,
                                                 const SymLayout& lay, int rank, uint64_t epoch,
                                                 int stage) {
    const auto* arrive = reinterpret_cast<const uint64_t*>(peer_ptr(peer_bases, rank, lay.arrive));
    for (int s = 0; s < kRanks; ++s)
        if (!wait_geq(ctx, arrive + s, arrive_word(epoch, 0), stage, s)) return false;
    return true;
}

// Lane s < kRanks (s != rank) of one warp, right after announce_start: waits until peer s has
// started op `epoch` and compares the kind and signature it announced with this rank's. A
// difference is recorded (kErrorArgumentsDiffer, observed = the peer's arrive word, expected =
// this rank's) and aborts every CTA of this rank; the peer finds the same difference in this
// rank's word, so every rank of the op reports it. A peer already past op `epoch` compared this
// rank's word before it went on (it cannot finish the op without this rank), so it is skipped.
// Warp-wide; false after a difference, a timeout or an abort.
template <int kRanks>
__device__ __forceinline__ bool check_peers_agree(const WaitContext& ctx,
                                                  const uint64_t* peer_bases, const SymLayout& lay,
                                                  int rank, uint64_t epoch, uint32_t sig, int lane,
                                                  int stage) {
    bool ok = true;
    if (lane < kRanks && lane != rank) {
        const auto* word =
            reinterpret_cast<const uint64_t*>(peer_ptr(peer_bases, rank, lay.arrive)) + lane;
        const uint64_t mine = arrive_word(epoch, sig);
        const uint64_t first = arrive_word(epoch, 0);
        uint64_t v = 0;
        ok = spin_acquire(ctx, word, [first](uint64_t x) { return x >= first; }, v, stage, lane);
        if (ok && (v >> kArriveShift) == epoch && v != mine) {
            record_error(ctx, kErrorArgumentsDiffer, stage, lane, static_cast<int64_t>(v),
                         static_cast<int64_t>(mine));
            ok = false;
        }
    }
    return __all_sync(0xffffffffu, ok);
}

}  // namespace ep_core

namespace ep_core {

// A per-warp ring of shared-memory slots fed by TMA loads (issued by the kernels, lane 0); item i
// lives in slot i % kSlots, and its load completes on that slot's mbarrier with parity
// (i / kSlots) & 1.
template <int kSlots, int kBytes>
struct WarpRing {
    uint8_t* slots;
    uint64_t* bars;

    __device__ __forceinline__ void init(int lane) {
        if (lane == 0) {
            for (int s = 0; s < kSlots; ++s) mbar_init(&bars[s], 1);
            fence_mbar_init();
        }
        __syncwarp();
    }
    __device__ __forceinline__ uint8_t* slot(int64_t i) const {
        return slots + (i % kSlots) * static_cast<int64_t>(kBytes);
    }
    // Lane 0 only.
    __device__ __forceinline__ bool wait(const WaitContext& ctx, int64_t i, int stage) const {
        return wait_mbar(ctx, &bars[i % kSlots], static_cast<uint32_t>((i / kSlots) & 1), stage);
    }
};

}  // namespace ep_core
