// High-throughput intranode combine over NVLink (Hopper, TMA), the reverse of sm90_ht_dispatch.
//
// Push warps walk the (chunk, source) units of the dispatch that made the handle (same chunks,
// same rows), TMA-load each received row of `x` and TMA-store it into the source's region
// (`cdata[from = me][source token]`), with the row's top-k weights beside it; rows of this rank's
// own tokens are not moved. A finished unit raises its flag at the source.
//
// Reducer warps own chunks of this rank's tokens: once every peer has raised the chunk's flag they
// add, per token and in increasing rank order, the float32 values of every contribution (own rows
// read straight from `x`), then the biases, and store bf16. Reduction overlaps the transfer.
#pragma once

#include <cuda_bf16.h>

#include <cuda/std/cstdint>

#include <ep_core/smxx_ht_common.cuh>

namespace ep_core {

struct HtCombineArgs {
    const uint8_t* x;              // [M, H] bf16, rows in dispatch order
    const float* topk_weights;     // [M, k] or null
    const int32_t* src_meta;       // [M, 2] (src_rank * Nmax + src_token, src_rank)
    const int32_t* psum_rank;      // [R] inclusive
    const int32_t* chunk_end;      // [R, Cmax]
    const int32_t* nchunks;        // [R]
    const int64_t* topk_idx;       // [T, k] this rank's tokens
    const int32_t* send_row;       // [T, R]
    const uint8_t* bias0;          // [T, H] bf16 or null
    const uint8_t* bias1;          // [T, H] bf16 or null
    const uint64_t* peer_bases;    // [R]
    uint8_t* out;                  // [T, H] bf16
    float* out_weights;            // [T, k] or null
    ErrorRecord* error;
    int64_t num_tokens;
    int64_t num_max_tokens;
    int64_t num_local_experts;
    int64_t max_chunks;
    uint64_t timeout_ns;
    int64_t rank;
    SymLayout lay;
    uint64_t* trace;        // null, or the developer trace (ht_trace)
    int64_t num_push_ctas;  // kSplit: CTAs [0, n) push, the others reduce
    int64_t signature;      // kSignatureCombine | 15-bit digest (ht.combine_signature)
};

enum CombineStage : int {
    kStageCombineChunk = 11,
    kStageCombineLoad = 12,
    kStageCombineArrive = 13,
};

template <int kRanks, int kTopk, int kHidden, int kNumPushWarps, int kNumReduceWarps, int kSlots,
          int kChunk, bool kSplit>
struct HtCombine {
    static constexpr int kRowBytes = kHidden * 2;
    static constexpr int kWBytes = (kTopk * 4 + 15) / 16 * 16;
    // bf16 row | top-k weights, padded to whole 128-byte lines.
    static constexpr int kPayload = (kRowBytes + kWBytes + 127) / 128 * 128;
    // kSplit: push and reduce warps live in different CTAs (the reducers' polling and loads do
    // not share an SM with the pushes).
    static constexpr int kThreads =
        (kSplit ? (kNumPushWarps > kNumReduceWarps ? kNumPushWarps : kNumReduceWarps)
                : kNumPushWarps + kNumReduceWarps) * 32;
    static constexpr int kVecs = kHidden / 8;  // 16-byte vectors per row
    // Vectors per lane in flight in the reducer (x up to kRanks sources).
    static constexpr int kUnroll = kRanks <= 2 ? 8 : (kRanks <= 4 ? 4 : 2);
    static_assert(kHidden % 8 == 0, "hidden must be a multiple of 8");

    static constexpr int64_t smem_bytes() {
        return static_cast<int64_t>(kNumPushWarps) * kSlots * (kPayload + 8 + 4);
    }

    // Units are (chunk c, source s != me) pairs, numbered u = c * (R - 1) + j with
    // s = (me + 1 + j) % R, so every push warp has remote work (no warp owns this rank's rows).
    static constexpr int kPeers = kRanks > 1 ? kRanks - 1 : 1;

    struct Unit {
        int64_t u, c, i, end;
        int s;
        bool valid;
    };

    // Next unit at or after `u` that this rank must push (the chunk exists at its source).
    static __device__ __forceinline__ void next_unit(const HtCombineArgs& a, Unit& cur, int64_t u,
                                                     int64_t nunits, int64_t stride, int nch_lane) {
        const int me = static_cast<int>(a.rank);
        for (; u < nunits; u += stride) {
            const int s = (me + 1 + static_cast<int>(u % kPeers)) % kRanks;
            const int64_t c = u / kPeers;
            if (c >= __shfl_sync(0xffffffffu, nch_lane, s)) continue;
            cur.u = u;
            cur.c = c;
            cur.s = s;
            cur.i = c == 0 ? 0 : a.chunk_end[s * a.max_chunks + c - 1];
            cur.end = a.chunk_end[s * a.max_chunks + c];
            cur.valid = true;
            return;
        }
        cur.valid = false;
    }

    // Lane 0 only: raise chunk `c`'s flag at source `s` (its stores must be complete).
    static __device__ __forceinline__ void raise_flag(const HtCombineArgs& a, int64_t c, int s,
                                                      uint32_t tag, int parity) {
        fence_proxy_async();
        auto* flag = reinterpret_cast<uint64_t*>(
                         peer_ptr(a.peer_bases, s, a.lay.region[parity] + a.lay.cflag)) +
                     a.rank * a.max_chunks + c;
        st_release_sys(flag, make_tagged(tag, 0));
    }

    // What a lane holds of one received row before it is staged: its row, the source token it
    // returns to (lane 0) and its top-k weights (lanes < k). Loaded one row ahead, so the loads'
    // latency overlaps the previous row's store.
    struct RowRegs {
        int64_t o;
        int32_t tok;
        float w;
    };

    static __device__ __forceinline__ void fetch_row(const HtCombineArgs& a, RowRegs& r, int64_t o,
                                                     int s, int lane) {
        r.o = o;
        r.tok = lane == 0 ? static_cast<int32_t>(a.src_meta[o * 2] - s * a.num_max_tokens) : 0;
        r.w = lane < kTopk && a.topk_weights != nullptr ? a.topk_weights[o * kTopk + lane] : 0.0f;
    }

    // Fills slot `item` with the fetched row (data by TMA, weights by lanes) and records the
    // source token it returns to.
    static __device__ __forceinline__ void stage_row(const HtCombineArgs& a,
                                                     const WarpRing<kSlots, kPayload>& ring,
                                                     int32_t* tok_of_slot, int64_t item,
                                                     const RowRegs& r, int lane) {
        uint8_t* slot = ring.slot(item);
        if (lane == 0) {
            uint64_t* bar = &ring.bars[item % kSlots];
            mbar_expect_tx(bar, kRowBytes);
            tma_load(slot, a.x + r.o * kRowBytes, kRowBytes, bar);
            tok_of_slot[item % kSlots] = r.tok;
        }
        if (lane < kTopk) reinterpret_cast<float*>(slot + kRowBytes)[lane] = r.w;
        fence_proxy_async_smem();
        __syncwarp();
    }

    static __device__ __forceinline__ void push(const HtCombineArgs& a, const WaitContext& ctx,
                                                WarpRing<kSlots, kPayload> ring, int32_t* tok_of_slot,
                                                int gw, int nw, uint32_t tag, int parity, int lane) {
        const int me = static_cast<int>(a.rank);
        const int nch_lane = lane < kRanks ? a.nchunks[lane] : 0;
        int max_nch = nch_lane;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) max_nch = max(max_nch, __shfl_xor_sync(0xffffffffu, max_nch, o));
        const int base_lane = lane < kRanks && lane > 0 ? a.psum_rank[lane - 1] : 0;
        const int64_t nunits = kRanks > 1 ? static_cast<int64_t>(max_nch) * kPeers : 0;
        const int64_t region = a.lay.region[parity];

        // Units may be empty; they still raise their flag (at once: nothing to wait for). A unit
        // with rows raises its flag one unit later, once its stores are known complete without
        // draining the pipeline (`since` = groups committed after the pending unit).
        Unit ld, pr;
        next_unit(a, ld, gw, nunits, nw, nch_lane);
        while (ld.valid && ld.i == ld.end) {  // leading empty units
            if (lane == 0) raise_flag(a, ld.c, ld.s, tag, parity);
            next_unit(a, ld, ld.u + nw, nunits, nw, nch_lane);
        }
        pr = ld;
        auto src_row = [&](const Unit& cur) {
            return __shfl_sync(0xffffffffu, base_lane, cur.s) + cur.i;
        };
        // Moves `ld` to the next row and fetches it (a row fetched is staged next).
        RowRegs nxt;
        auto step_ld = [&]() {
            if (++ld.i >= ld.end) {
                do next_unit(a, ld, ld.u + nw, nunits, nw, nch_lane);
                while (ld.valid && ld.i == ld.end);
            }
            if (ld.valid) fetch_row(a, nxt, src_row(ld), ld.s, lane);
        };
        if (ld.valid) fetch_row(a, nxt, src_row(ld), ld.s, lane);
        int64_t n_loaded = 0;
        for (; n_loaded < kSlots - 1 && ld.valid; ++n_loaded) {
            stage_row(a, ring, tok_of_slot, n_loaded, nxt, lane);
            step_ld();
        }
        int64_t pending_c = -1;
        int pending_s = 0, since = 0;
        for (int64_t item = 0; pr.valid; ++item) {
            bool ok = true;
            if (lane == 0) {
                const HtWaitTimer tm(a.trace);
                ok = ring.wait(ctx, item, kStageCombineLoad);
                tm.add(3);
                if (ok) {
                    const int64_t idx = me * a.num_max_tokens + tok_of_slot[item % kSlots];
                    const HtWaitTimer issue(a.trace);
                    tma_store(peer_ptr(a.peer_bases, pr.s, region + a.lay.data) + idx * kPayload,
                              ring.slot(item), kPayload);
                    issue.add(5);
                }
                tma_commit();
            }
            if (!__shfl_sync(0xffffffffu, ok ? 1 : 0, 0)) return;
            ++since;
            ht_trace_count(a.trace);
            if (ld.valid) {
                if (lane == 0) {
                    const HtWaitTimer tm(a.trace);
                    tma_wait_read<1>();
                    tm.add(4);
                }
                __syncwarp();
                stage_row(a, ring, tok_of_slot, n_loaded++, nxt, lane);
                step_ld();
            }
            if (++pr.i == pr.end) {
                if (pending_c >= 0 && lane == 0) {
                    const HtWaitTimer tm(a.trace);
                    tma_wait_group_dyn(since);
                    tm.add(5);
                    raise_flag(a, pending_c, pending_s, tag, parity);
                }
                pending_c = pr.c;
                pending_s = pr.s;
                since = 0;
                next_unit(a, pr, pr.u + nw, nunits, nw, nch_lane);
                while (pr.valid && pr.i == pr.end) {
                    if (lane == 0) raise_flag(a, pr.c, pr.s, tag, parity);
                    next_unit(a, pr, pr.u + nw, nunits, nw, nch_lane);
                }
            }
        }
        if (pending_c >= 0 && lane == 0) {
            tma_wait_all();
            raise_flag(a, pending_c, pending_s, tag, parity);
        }
    }

    static __device__ __forceinline__ void add_row(float (&acc)[8], const int4& v) {
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float2 f = __bfloat1622float2(h[q]);
            acc[2 * q] = __fadd_rn(acc[2 * q], f.x);
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], f.y);
        }
    }

    static __device__ __forceinline__ void reduce(const HtCombineArgs& a, const WaitContext& ctx,
                                                  int gw, int nw, uint32_t tag, int parity,
                                                  int lane) {
        const int me = static_cast<int>(a.rank);
        const int64_t T = a.num_tokens;
        const uint8_t* region = peer_ptr(a.peer_bases, me, a.lay.region[parity]);
        const int64_t my_base = me > 0 ? a.psum_rank[me - 1] : 0;
        // One token per work item (not one chunk): the chunks that arrive last are reduced by
        // many warps at once, which shortens the tail after the last push.
        for (int64_t t = gw; t < T; t += nw) {
            const int64_t c = t / kChunk;
            const HtWaitTimer tm(a.trace);
            // Lane d waits for (and acquires) peer d's flag, all peers at once; __syncwarp then
            // orders every lane's loads of the rows after those acquires.
            bool ok = true;
            if (lane < kRanks && lane != me)
                ok = wait_tag(ctx,
                              reinterpret_cast<const uint64_t*>(region + a.lay.cflag) +
                                  lane * a.max_chunks + c,
                              tag, nullptr, kStageCombineChunk, lane);
            __syncwarp();
            if (!__all_sync(0xffffffffu, ok)) return;
            tm.add(5);
            ht_trace_count(a.trace);
            const int32_t row = lane < kRanks ? a.send_row[t * kRanks + lane] : -1;
            const uint32_t mask = __ballot_sync(0xffffffffu, row >= 0);
            const int64_t my_row = __shfl_sync(0xffffffffu, row, me);
            const int4* srcs[kRanks];
#pragma unroll
            for (int d = 0; d < kRanks; ++d)
                srcs[d] = reinterpret_cast<const int4*>(
                    d == me ? a.x + (my_base + my_row) * kRowBytes
                            : region + a.lay.data + (d * a.num_max_tokens + t) * kPayload);
            auto* dst = reinterpret_cast<int4*>(a.out + t * kRowBytes);
            const auto* b0 = reinterpret_cast<const int4*>(a.bias0 + t * kRowBytes);
            const auto* b1 = reinterpret_cast<const int4*>(a.bias1 + t * kRowBytes);
            // -0.0 is the identity of IEEE addition, so the sum starts from the first
            // contribution exactly; with nothing at all the result is +0.
            const bool empty = mask == 0 && a.bias0 == nullptr && a.bias1 == nullptr;
            for (int v0 = lane; v0 < kVecs; v0 += 32 * kUnroll) {
                int4 vals[kUnroll][kRanks];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int v = v0 + 32 * u;
#pragma unroll
                    for (int d = 0; d < kRanks; ++d)
                        if (v < kVecs && (mask & (1u << d))) vals[u][d] = srcs[d][v];
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int v = v0 + 32 * u;
                    if (v >= kVecs) break;
                    float acc[8];
#pragma unroll
                    for (int q = 0; q < 8; ++q) acc[q] = empty ? 0.0f : -0.0f;
#pragma unroll
                    for (int d = 0; d < kRanks; ++d)
                        if (mask & (1u << d)) add_row(acc, vals[u][d]);
                    if (a.bias0 != nullptr) add_row(acc, b0[v]);
                    if (a.bias1 != nullptr) add_row(acc, b1[v]);
                    int4 outv;
                    auto* h = reinterpret_cast<__nv_bfloat162*>(&outv);
#pragma unroll
                    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
                    dst[v] = outv;
                }
            }
            if (a.out_weights != nullptr && lane < kTopk) {
                const int64_t e = a.topk_idx[t * kTopk + lane];
                float w = 0.0f;
                if (e >= 0) {
                    const int d = static_cast<int>(e / a.num_local_experts);
                    w = d == me ? a.topk_weights[(my_base + my_row) * kTopk + lane]
                                : reinterpret_cast<const float*>(
                                      region + a.lay.data +
                                      (d * a.num_max_tokens + t) * kPayload + kRowBytes)[lane];
                }
                a.out_weights[t * kTopk + lane] = w;
            }
        }
    }

    static __device__ __forceinline__ void run(const HtCombineArgs& a) {
        extern __shared__ __align__(128) uint8_t smem[];
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int me = static_cast<int>(a.rank);
        auto* ctrl = reinterpret_cast<Ctrl*>(peer_ptr(a.peer_bases, me, a.lay.ctrl));
        const uint64_t epoch = *reinterpret_cast<volatile uint64_t*>(&ctrl->epoch) + 1;
        const uint32_t tag = static_cast<uint32_t>(epoch);
        const int parity = static_cast<int>(epoch & 1);
        const WaitContext ctx{a.error, &ctrl->abort, a.timeout_ns, me, 0};

        ht_trace(a.trace, 0);
        if (blockIdx.x == 0 && warp == 0) {
            const auto sig = static_cast<uint32_t>(a.signature);
            announce_start<kRanks>(a.peer_bases, a.lay, me, epoch, sig, lane);
            if (tag_refresh_epoch(epoch)) {
                // Words no reader of this op waits on (kTagRefreshPeriod): this rank's dispatch
                // words, and its combine flags past the last chunk of each source (all of them
                // at this rank, which no push of its own raises).
                for (int d = 0; d < kRanks; ++d) {
                    uint8_t* reg = peer_ptr(a.peer_bases, d, a.lay.region[parity]);
                    refresh_tags(reinterpret_cast<uint64_t*>(reg + a.lay.info) + me * 2, 0, 2, tag);
                    refresh_tags(reinterpret_cast<uint64_t*>(reg + a.lay.dflag) + me * a.max_chunks,
                                 0, a.max_chunks, tag);
                    refresh_tags(reinterpret_cast<uint64_t*>(reg + a.lay.cflag) + me * a.max_chunks,
                                 d == me ? 0 : a.nchunks[d], a.max_chunks, tag);
                }
            }
            // Every peer is in a combine with this rank's signature (else every CTA unwinds).
            check_peers_agree<kRanks>(ctx, a.peer_bases, a.lay, me, epoch, sig, lane,
                                      kStageCombineArrive);
        }
        const int npush = static_cast<int>(a.num_push_ctas);
        const bool push_cta = !kSplit || static_cast<int>(blockIdx.x) < npush;
        if (push_cta && warp < kNumPushWarps) {
            const int64_t slot_bytes = static_cast<int64_t>(kNumPushWarps) * kSlots * kPayload;
            auto* bars = reinterpret_cast<uint64_t*>(smem + slot_bytes);
            auto* toks = reinterpret_cast<int32_t*>(bars + kNumPushWarps * kSlots);
            WarpRing<kSlots, kPayload> ring{smem + static_cast<int64_t>(warp) * kSlots * kPayload,
                                            bars + warp * kSlots};
            ring.init(lane);
            const int pctas = kSplit ? npush : static_cast<int>(gridDim.x);
            push(a, ctx, ring, toks + warp * kSlots, blockIdx.x * kNumPushWarps + warp,
                 pctas * kNumPushWarps, tag, parity, lane);
            ht_trace(a.trace, 1);
            if (lane == 0) tma_wait_all();
        } else if (!kSplit || (!push_cta && warp < kNumReduceWarps)) {
            const int rw = kSplit ? warp : warp - kNumPushWarps;
            const int rcta = kSplit ? static_cast<int>(blockIdx.x) - npush : static_cast<int>(blockIdx.x);
            const int rctas = kSplit ? static_cast<int>(gridDim.x) - npush : static_cast<int>(gridDim.x);
            reduce(a, ctx, rcta * kNumReduceWarps + rw, rctas * kNumReduceWarps, tag, parity, lane);
            ht_trace(a.trace, 1);
        } else {
            ht_trace(a.trace, 1);  // a warp without a role in this split CTA
        }
        ht_trace(a.trace, 2);
        __syncthreads();
        if (finish_cta(ctrl) && threadIdx.x == 0) {
            __threadfence();
            wait_all_started<kRanks>(ctx, a.peer_bases, a.lay, me, epoch, kStageCombineArrive);
            ctrl->finish = 0;
            ctrl->epoch = epoch;
            __threadfence_system();
        }
    }
};

// Entry point for the JIT's generated wrapper (one instantiation per shape).
template <int kRanks, int kTopk, int kHidden, int kNumPushWarps, int kNumReduceWarps, int kSlots,
          int kChunk, bool kSplit>
__device__ __forceinline__ void ht_combine(const HtCombineArgs& args) {
    HtCombine<kRanks, kTopk, kHidden, kNumPushWarps, kNumReduceWarps, kSlots, kChunk,
              kSplit>::run(args);
}

}  // namespace ep_core
