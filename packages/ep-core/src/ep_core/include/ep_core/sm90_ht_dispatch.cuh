// High-throughput intranode dispatch over NVLink (Hopper, TMA).
//
// One launch of `num_sms` CTAs, each with kNumSendWarps sender warps and kNumRecvWarps receiver
// warps. Tokens are cut into chunks of kChunk consecutive tokens; sender warp g owns chunks
// g, g + G, ... (G = all sender warps). For each token a warp assembles one "payload" row in a
// shared-memory slot (the token's data by TMA load, its scale packs and metadata by lane stores)
// and TMA-stores the whole payload into the staging region of every other destination rank at
// `data[src = me][send_row]`. A token's row for this rank itself skips the staging region: the
// sender writes it straight into the output (data by TMA store, the rest by lane stores) at row
// (rows of lower sources, from their announced totals) + send_row, so no receiver copies it
// (with R ranks a receiver moves (R - 1) / R of the rows, and each own row crosses the SM's memory
// path twice instead of four times). When a warp has finished a chunk it waits for its stores to
// complete and raises the chunk's flag at every other destination (tagged with the epoch, low
// half = the chunk's end row for that destination).
//
// With kSplit, CTAs [0, num_send_ctas) hold only sender warps and the others only receiver warps,
// so an SM's TMA unit serves one role (local copy-out is not queued behind stores that wait for
// NVLink) and the host can balance the two roles' SM counts.
//
// Receiver warps take the (chunk, peer source) units in the same order, wait for the unit's flag,
// TMA-load each payload row from the local staging region and write the outputs: the data by TMA
// store into the packed output (row = rows of lower sources + row inside the source), scale packs,
// local expert ids, weights and source metadata by lane stores. Copy-out overlaps the transfer.
#pragma once

#include <cuda/std/cstdint>

#include <ep_core/smxx_ht_common.cuh>

namespace ep_core {

struct HtDispatchArgs {
    const uint8_t* x;             // [T, row bytes]
    const uint32_t* x_sf;         // [T, P] 4-byte packs (any strides), may be null
    const int64_t* topk_idx;      // [T, k]
    const float* topk_weights;    // [T, k] or null
    const int32_t* send_row;      // [T, R] from the layout kernel
    const int32_t* chunk_prefix;  // [nchunks + 1, R]
    const uint64_t* peer_bases;   // [R] base address of every rank's symmetric buffer
    uint8_t* out_x;               // [R * Nmax, row bytes]
    uint32_t* out_sf;             // [R * Nmax, P] or null
    int64_t* out_topk_idx;        // [R * Nmax, k]
    float* out_topk_weights;      // [R * Nmax, k] or null
    int32_t* out_src_meta;        // [R * Nmax, 2]
    int32_t* out_counts;          // [R psum per source | El counts | El aligned psum], zeroed
    int32_t* out_chunk_end;       // [R, Cmax]
    int32_t* out_nchunks;         // [R]
    ErrorRecord* error;           // host-mapped
    int64_t sf_stride_t;          // in 4-byte elements
    int64_t sf_stride_p;
    int64_t num_tokens;
    int64_t num_max_tokens;
    int64_t num_local_experts;
    int64_t max_chunks;
    int64_t expert_alignment;
    uint64_t timeout_ns;
    int64_t rank;
    SymLayout lay;
    uint64_t* trace;        // null, or the developer trace (ht_trace)
    int64_t num_send_ctas;  // kSplit: CTAs [0, n) send, the others receive
    const int32_t* topk_bad;  // [num_topk_bad] the prologue's verdicts on topk_idx, or null
    int64_t num_topk_bad;     // <= 32
    int32_t* out_src_bad;     // [R] per source: 1 if its topk_idx failed its prologue's check
    int64_t signature;        // [0, 2^15): digest of the call's arguments every rank must share
    int64_t count_experts;    // 0: out_counts' per-expert counts and their prefix sums are not
                              // written (a replay whose counts nobody reads: no zeroing needed)
};
// Passed by value from the ctypes mirror HtDispatchArgs (ep_core/nvlink/layout.py): 41 8-byte
// fields (SymLayout counts 9).
static_assert(sizeof(HtDispatchArgs) == 41 * 8, "HtDispatchArgs and its ctypes mirror differ");

enum DispatchStage : int {
    kStageDispatchInfo = 1,
    kStageDispatchChunk = 2,
    kStageDispatchLoad = 3,
    kStageDispatchArrive = 4,
};

template <int kRanks, int kTopk, int kRowBytes, int kNumSF, int kNumSendWarps, int kNumRecvWarps,
          int kSendSlots, int kRecvSlots, int kChunk, bool kSplit>
struct HtDispatch {
    static constexpr int kSFBytes = (kNumSF * 4 + 15) / 16 * 16;
    static constexpr int kMetaBytes = (8 + 12 * kTopk + 15) / 16 * 16;
    // Rows are padded to whole 128-byte lines: NVLink and HBM writes of partial lines cost more.
    static constexpr int kPayload = (kRowBytes + kSFBytes + kMetaBytes + 127) / 128 * 128;
    static constexpr int kThreads =
        (kSplit ? (kNumSendWarps > kNumRecvWarps ? kNumSendWarps : kNumRecvWarps)
                : kNumSendWarps + kNumRecvWarps) * 32;
    static constexpr int kNumSendSlots = kNumSendWarps * kSendSlots;
    static constexpr int kNumRecvSlots = kNumRecvWarps * kRecvSlots;
    // Split CTAs reuse the same slots for their one role.
    static constexpr int kNumSlots =
        kSplit ? (kNumSendSlots > kNumRecvSlots ? kNumSendSlots : kNumRecvSlots)
               : kNumSendSlots + kNumRecvSlots;
    static constexpr int kRecvSlotBase = kSplit ? 0 : kNumSendSlots;
    static constexpr int kInfoInts = 1 + kRanks;  // per send slot: mask, rows per destination
    static_assert(kRanks <= 32 && kTopk <= 32, "ranks and top-k must fit a warp");
    static_assert(kRowBytes % 16 == 0, "rows must be a multiple of 16 bytes");

    static constexpr int64_t smem_bytes(int64_t num_local_experts) {
        return static_cast<int64_t>(kNumSlots) * kPayload + kNumSlots * 8 +
               kNumSendSlots * kInfoInts * 4 + num_local_experts * 4;
    }
    static_assert(kChunk <= 8, "lagged chunk flags wait with at most 8 groups in flight");

    // ---- sender -------------------------------------------------------------------------------
    struct SendCursor {
        int64_t c, t, t_end;
        __device__ __forceinline__ void start(int64_t first_chunk, int64_t num_tokens) {
            c = first_chunk;
            t = c * kChunk;
            t_end = min(t + kChunk, num_tokens);
        }
        __device__ __forceinline__ bool valid(int64_t nchunks) const { return c < nchunks; }
        // Returns true when the token just left was the last of its chunk.
        __device__ __forceinline__ bool advance(int64_t stride, int64_t num_tokens) {
            if (++t < t_end) return false;
            start(c + stride, num_tokens);
            return true;
        }
    };

    static constexpr int kSFPerLane = (kNumSF + 31) / 32;

    // What a lane holds of one token before it is written into a slot.
    struct TokenRegs {
        int64_t t;
        int64_t e;
        float w;
        int32_t row;
        uint32_t sf[kSFPerLane > 0 ? kSFPerLane : 1];
    };

    // Issues the global loads of token t's metadata (consumed one iteration later).
    static __device__ __forceinline__ void fetch(const HtDispatchArgs& a, TokenRegs& r, int64_t t,
                                                 int lane) {
        r.t = t;
        r.e = lane < kTopk ? a.topk_idx[t * kTopk + lane] : -1;
        r.w = (lane < kTopk && a.topk_weights != nullptr) ? a.topk_weights[t * kTopk + lane] : 0.0f;
        r.row = lane < kRanks ? a.send_row[t * kRanks + lane] : -1;
#pragma unroll
        for (int j = 0; j < kSFPerLane; ++j) {
            const int p = lane + 32 * j;
            if (p < kNumSF) r.sf[j] = a.x_sf[t * a.sf_stride_t + p * a.sf_stride_p];
        }
    }

    // Fills slot `item` with the fetched token: data by TMA (lane 0), the rest by lane stores.
    static __device__ __forceinline__ void stage(const HtDispatchArgs& a,
                                                 const WarpRing<kSendSlots, kPayload>& ring,
                                                 int32_t* info, int64_t item, const TokenRegs& r,
                                                 int lane) {
        uint8_t* slot = ring.slot(item);
        if (lane == 0) {
            uint64_t* bar = &ring.bars[item % kSendSlots];
            mbar_expect_tx(bar, kRowBytes);
            tma_load(slot, a.x + r.t * kRowBytes, kRowBytes, bar);
        }
#pragma unroll
        for (int j = 0; j < kSFPerLane; ++j) {
            const int p = lane + 32 * j;
            if (p < kNumSF) reinterpret_cast<uint32_t*>(slot + kRowBytes)[p] = r.sf[j];
        }
        uint8_t* meta = slot + kRowBytes + kSFBytes;
        if (lane == 0) *reinterpret_cast<int32_t*>(meta) = static_cast<int32_t>(r.t);
        if (lane < kTopk) {
            reinterpret_cast<int64_t*>(meta + 8)[lane] = r.e;
            reinterpret_cast<float*>(meta + 8 + 8 * kTopk)[lane] = r.w;
        }
        int32_t* slot_info = info + (item % kSendSlots) * kInfoInts;
        const uint32_t mask = __ballot_sync(0xffffffffu, r.row >= 0) & ((1u << kRanks) - 1u);
        if (lane < kRanks) slot_info[1 + lane] = r.row;
        if (lane == 0) slot_info[0] = static_cast<int32_t>(mask);
        fence_proxy_async_smem();
        __syncwarp();
    }

    // Lane 0: raise chunk c's flag at every destination (its writes must be complete). One
    // fence for all R flags (a release fence followed by relaxed flag stores): a release store
    // per flag is one system-scope fence per destination, each of which stalls the warp.
    static __device__ __forceinline__ void raise_chunk(const HtDispatchArgs& a, int64_t c,
                                                       uint32_t tag, int64_t region) {
        const int me = static_cast<int>(a.rank);
        fence_proxy_async();
        for (int d = 0; d < kRanks; ++d)
            if (d != me)
                reinterpret_cast<int32_t*>(peer_ptr(a.peer_bases, d, region) +
                                           a.lay.drstart)[me * a.max_chunks + c] =
                    a.chunk_prefix[c * kRanks + d];
        fence_acq_rel_sys();
        for (int d = 0; d < kRanks; ++d)
            if (d != me)
                st_relaxed_sys(
                    reinterpret_cast<uint64_t*>(peer_ptr(a.peer_bases, d, region) + a.lay.dflag) +
                        me * a.max_chunks + c,
                    make_tagged(tag, static_cast<uint32_t>(a.chunk_prefix[(c + 1) * kRanks + d])));
    }

    // Lane s < n: what source s announced to this rank at the start of the op (its info words):
    // `cnt` = rows it sends here and, with kTokens, `ntok` = its token count and `bad` = 1 when
    // its topk_idx failed its prologue's check; 0 on other lanes and after a timeout or an
    // abort (the lane's result is false then).
    template <bool kTokens>
    static __device__ __forceinline__ bool read_source_info(const HtDispatchArgs& a,
                                                            const WaitContext& ctx,
                                                            const uint8_t* my_region, uint32_t tag,
                                                            int lane, int n, int& cnt, int& ntok,
                                                            int& bad) {
        cnt = 0;
        ntok = 0;
        bad = 0;
        if (lane >= n) return true;
        const auto* info = reinterpret_cast<const uint64_t*>(my_region + a.lay.info) + lane * 2;
        uint64_t v0 = 0, v1 = 0;
        if (!wait_tag(ctx, info, tag, &v0, kStageDispatchInfo, lane)) return false;
        if (kTokens && !wait_tag(ctx, info + 1, tag, &v1, kStageDispatchInfo, lane)) return false;
        cnt = static_cast<int>(static_cast<uint32_t>(v0));
        const auto low = static_cast<uint32_t>(v1);
        ntok = static_cast<int>(low & kInfoTokensMask);
        bad = (low & kInfoBadRouting) != 0 ? 1 : 0;
        if (kTokens) {
            // The source called with other arguments: nothing it sent can be read as this
            // rank's layout. Recorded (and every CTA of this rank aborted); its peers find the
            // same difference in their own info words, so every rank reports it.
            const uint32_t sig = (low >> kInfoSignatureShift) & kInfoSignatureMask;
            if (sig != static_cast<uint32_t>(a.signature)) {
                record_error(ctx, kErrorArgumentsDiffer, kStageDispatchInfo, lane, sig,
                             a.signature);
                cnt = ntok = bad = 0;
                return false;
            }
        }
        return true;
    }

    // Where this rank's own rows start in its output: the rows announced by every lower source.
    // Warp-wide; false after a timeout or an abort.
    static __device__ __forceinline__ bool own_rows_base(const HtDispatchArgs& a,
                                                         const WaitContext& ctx,
                                                         const uint8_t* my_region, uint32_t tag,
                                                         int lane, int64_t& base) {
        int cnt = 0, ntok = 0, bad = 0;
        const bool ok = read_source_info<false>(a, ctx, my_region, tag, lane,
                                                static_cast<int>(a.rank), cnt, ntok, bad);
        base = static_cast<int64_t>(__reduce_add_sync(0xffffffffu, static_cast<uint32_t>(cnt)));
        return __all_sync(0xffffffffu, ok);
    }

    // Every output of a row except its data (local expert ids, weights, source metadata, scale
    // packs) from its payload in a shared-memory slot, and its count per local expert (the
    // CTA's shared-memory counters). `o` = output row, `s` = source rank.
    static __device__ __forceinline__ void write_row_outputs(const HtDispatchArgs& a,
                                                             const uint8_t* slot, int64_t o, int s,
                                                             int lane, int* counts) {
        const int64_t lo = a.rank * a.num_local_experts, hi = lo + a.num_local_experts;
        const uint8_t* meta = slot + kRowBytes + kSFBytes;
        if (lane < kTopk) {
            const int64_t e = reinterpret_cast<const int64_t*>(meta + 8)[lane];
            const bool local = e >= lo && e < hi;
            a.out_topk_idx[o * kTopk + lane] = local ? e - lo : -1;
            if (a.out_topk_weights != nullptr)
                a.out_topk_weights[o * kTopk + lane] =
                    local ? reinterpret_cast<const float*>(meta + 8 + 8 * kTopk)[lane] : 0.0f;
            if (local) atomicAdd(&counts[e - lo], 1);
        }
        if (lane == 0) {
            const int32_t tok = *reinterpret_cast<const int32_t*>(meta);
            a.out_src_meta[o * 2] = static_cast<int32_t>(s * a.num_max_tokens + tok);
            a.out_src_meta[o * 2 + 1] = s;
        }
        if constexpr (kNumSF > 0) {
            const auto* sf = reinterpret_cast<const uint32_t*>(slot + kRowBytes);
            for (int p = lane; p < kNumSF; p += 32) a.out_sf[o * kNumSF + p] = sf[p];
        }
    }

    static __device__ __forceinline__ void send(const HtDispatchArgs& a, const WaitContext& ctx,
                                                WarpRing<kSendSlots, kPayload> ring, int32_t* info,
                                                int gw, int nsw, uint32_t tag, int parity,
                                                int lane, int* counts) {
        const int me = static_cast<int>(a.rank);
        const int64_t T = a.num_tokens;
        const int64_t nchunks = (T + kChunk - 1) / kChunk;
        const int64_t region = a.lay.region[parity];
        // This rank's own rows skip the staging region: the sender writes them into the output
        // itself (data by TMA store, the rest by lane stores), at own_base + their row.
        const uint8_t* my_region = peer_ptr(a.peer_bases, me, region);
        int64_t own_base = -1;

        SendCursor ld, pr;
        ld.start(gw, T);
        pr.start(gw, T);
        TokenRegs nxt;
        bool have_nxt = ld.valid(nchunks);
        if (have_nxt) {
            fetch(a, nxt, ld.t, lane);
            ld.advance(nsw, T);
        }
        int64_t n_loaded = 0;
        for (; n_loaded < kSendSlots - 1 && have_nxt; ++n_loaded) {
            stage(a, ring, info, n_loaded, nxt, lane);
            have_nxt = ld.valid(nchunks);
            if (have_nxt) {
                fetch(a, nxt, ld.t, lane);
                ld.advance(nsw, T);
            }
        }
        // A finished chunk's flag is raised one chunk later, once its stores are known complete
        // without draining the pipeline: `since` = groups committed after the pending chunk.
        int64_t pending = -1;
        int since = 0;
        for (int64_t i = 0; pr.valid(nchunks); ++i) {
            bool ok = true;
            if (lane == 0) {
                const HtWaitTimer tm(a.trace);
                ok = ring.wait(ctx, i, kStageDispatchLoad);
                tm.add(3);
            }
            if (!__shfl_sync(0xffffffffu, ok ? 1 : 0, 0)) return;
            const int32_t* slot_info = info + (i % kSendSlots) * kInfoInts;
            const uint32_t mask = static_cast<uint32_t>(slot_info[0]);
            const bool own = (mask >> me) & 1u;
            if (own && own_base < 0 && !own_rows_base(a, ctx, my_region, tag, lane, own_base))
                return;
            const int64_t own_row = own ? own_base + slot_info[1 + me] : -1;
            if (lane == 0) {
                const HtWaitTimer issue(a.trace);
#pragma unroll
                for (int d = 0; d < kRanks; ++d) {
                    if (d == me || !(mask & (1u << d))) continue;
                    const int64_t idx = me * a.num_max_tokens + slot_info[1 + d];
                    tma_store(peer_ptr(a.peer_bases, d, region + a.lay.data) + idx * kPayload,
                              ring.slot(i), kPayload);
                }
                if (own) tma_store(a.out_x + own_row * kRowBytes, ring.slot(i), kRowBytes);
                issue.add(5);
                tma_commit();
            }
            if (own) write_row_outputs(a, ring.slot(i), own_row, me, lane, counts);
            ++since;
            // Refill the slot of item i - 1 (its stores are done reading once <= 1 group pends).
            ht_trace_count(a.trace);
            if (have_nxt) {
                if (lane == 0) {
                    const HtWaitTimer tm(a.trace);
                    tma_wait_read<1>();
                    tm.add(4);
                }
                __syncwarp();
                stage(a, ring, info, n_loaded++, nxt, lane);
                have_nxt = ld.valid(nchunks);
                if (have_nxt) {
                    fetch(a, nxt, ld.t, lane);
                    ld.advance(nsw, T);
                }
            }
            const int64_t c = pr.c;
            if (pr.advance(nsw, T)) {
                if (pending >= 0 && lane == 0) {
                    const HtWaitTimer tm(a.trace);
                    tma_wait_group_dyn(since);
                    tm.add(5);
                    raise_chunk(a, pending, tag, region);
                }
                pending = c;
                since = 0;
            }
        }
        if (pending >= 0 && lane == 0) {
            tma_wait_all();
            raise_chunk(a, pending, tag, region);
        }
    }

    // ---- receiver -----------------------------------------------------------------------------
    // Receivers take only the peers' rows (this rank's own rows go straight from its senders into
    // the output): unit u is chunk u / kPeers of source me + 1 + u % kPeers (mod R).
    static constexpr int kPeers = kRanks > 1 ? kRanks - 1 : 1;

    struct RecvCursor {
        int64_t u, i, end;
        int s;
        bool valid;
    };

    // Moves `cur` to the first non-empty unit at or after `u`. warp_wait_tag acquires each unit's
    // flag and orders every lane's later reads after that acquire.
    static __device__ __forceinline__ bool enter(const HtDispatchArgs& a, const WaitContext& ctx,
                                                 RecvCursor& cur, int64_t u, int64_t nunits,
                                                 int64_t stride, int nch_lane, uint32_t tag,
                                                 const uint8_t* my_region, bool record, int lane) {
        for (; u < nunits; u += stride) {
            const int s = static_cast<int>((a.rank + 1 + u % kPeers) % kRanks);
            const int64_t c = u / kPeers;
            const int nch = __shfl_sync(0xffffffffu, nch_lane, s);
            if (c >= nch) continue;
            uint64_t v = 0;
            const auto* flag =
                reinterpret_cast<const uint64_t*>(my_region + a.lay.dflag) + s * a.max_chunks + c;
            const HtWaitTimer tm(a.trace);
            const bool arrived = warp_wait_tag(ctx, flag, tag, &v, kStageDispatchChunk, s);
            tm.add(5);
            if (!arrived) {
                cur.valid = false;
                return false;
            }
            // The rows were written by TMA (async proxy); order our TMA loads after the flag.
            if (lane == 0) fence_proxy_async();
            const int64_t end = static_cast<uint32_t>(v);
            const int64_t start =
                reinterpret_cast<const int32_t*>(my_region + a.lay.drstart)[s * a.max_chunks + c];
            if (record && lane == 0) a.out_chunk_end[s * a.max_chunks + c] = static_cast<int32_t>(end);
            if (start < end) {
                cur.u = u;
                cur.s = s;
                cur.i = start;
                cur.end = end;
                cur.valid = true;
                return true;
            }
        }
        cur.valid = false;
        return true;
    }

    static __device__ __forceinline__ void recv(const HtDispatchArgs& a, const WaitContext& ctx,
                                                WarpRing<kRecvSlots, kPayload> ring, int rw,
                                                int nrw, uint32_t tag, int parity, int lane,
                                                int* smem_counts) {
        const int me = static_cast<int>(a.rank);
        const uint8_t* my_region = peer_ptr(a.peer_bases, me, a.lay.region[parity]);
        // Per-source totals, published by each sender at the start of the op.
        int cnt = 0, ntok = 0, bad = 0;
        read_source_info<true>(a, ctx, my_region, tag, lane, kRanks, cnt, ntok, bad);
        if (__any_sync(0xffffffffu, aborted(ctx))) return;
        int incl = cnt;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        const int base_lane = incl - cnt;  // rows of lower sources
        const int nch_lane = (ntok + kChunk - 1) / kChunk;
        int max_nch = nch_lane;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) max_nch = max(max_nch, __shfl_xor_sync(0xffffffffu, max_nch, o));
        if (rw == 0 && lane < kRanks) {
            a.out_counts[lane] = incl;
            a.out_nchunks[lane] = nch_lane;
            a.out_src_bad[lane] = bad;
        }
        const int64_t nunits = kRanks > 1 ? static_cast<int64_t>(max_nch) * kPeers : 0;
        // Chunk ends of this rank's own rows (the combine reads them per source like the others).
        const int64_t nch_me = (a.num_tokens + kChunk - 1) / kChunk;
        for (int64_t c = rw * 32 + lane; c < nch_me; c += static_cast<int64_t>(nrw) * 32)
            a.out_chunk_end[me * a.max_chunks + c] = a.chunk_prefix[(c + 1) * kRanks + me];

        RecvCursor ld, pr;
        if (!enter(a, ctx, ld, rw, nunits, nrw, nch_lane, tag, my_region, true, lane)) return;
        pr = ld;
        int64_t n_loaded = 0;
        auto issue_load = [&](int64_t item) {
            if (lane == 0) {
                uint64_t* bar = &ring.bars[item % kRecvSlots];
                mbar_expect_tx(bar, kPayload);
                tma_load(ring.slot(item),
                         my_region + a.lay.data + (ld.s * a.num_max_tokens + ld.i) * kPayload,
                         kPayload, bar);
            }
        };
        auto step = [&](RecvCursor& cur, bool record) -> bool {
            if (++cur.i < cur.end) return true;
            return enter(a, ctx, cur, cur.u + nrw, nunits, nrw, nch_lane, tag, my_region, record, lane);
        };
        for (; n_loaded < kRecvSlots - 1 && ld.valid; ++n_loaded) {
            issue_load(n_loaded);
            if (!step(ld, true)) return;
        }
        for (int64_t item = 0; pr.valid; ++item) {
            const int s = pr.s;
            const int64_t o = __shfl_sync(0xffffffffu, base_lane, s) + pr.i;
            bool ok = true;
            if (lane == 0) {
                const HtWaitTimer tm(a.trace);
                ok = ring.wait(ctx, item, kStageDispatchLoad);
                tm.add(3);
            }
            ht_trace_count(a.trace);
            if (!__shfl_sync(0xffffffffu, ok ? 1 : 0, 0)) return;
            const uint8_t* slot = ring.slot(item);
            if (lane == 0) {
                const HtWaitTimer issue(a.trace);
                tma_store(a.out_x + o * kRowBytes, slot, kRowBytes);
                tma_commit();
                issue.add(4);
            }
            write_row_outputs(a, slot, o, s, lane, smem_counts);
            if (ld.valid) {
                // Reuse the slot of item - 1 once its store has read it; lanes are done with it.
                if (lane == 0) {
                    const HtWaitTimer tm(a.trace);
                    tma_wait_read<1>();
                    tm.add(4);
                }
                __syncwarp();
                issue_load(n_loaded++);
                if (!step(ld, true)) return;
            }
            if (!step(pr, false)) return;
        }
    }

    // ---- kernel body --------------------------------------------------------------------------
    static __device__ __forceinline__ void run(const HtDispatchArgs& a) {
        extern __shared__ __align__(128) uint8_t smem[];
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int me = static_cast<int>(a.rank);
        auto* ctrl = reinterpret_cast<Ctrl*>(peer_ptr(a.peer_bases, me, a.lay.ctrl));
        const uint64_t epoch = *reinterpret_cast<volatile uint64_t*>(&ctrl->epoch) + 1;
        const uint32_t tag = static_cast<uint32_t>(epoch);
        const int parity = static_cast<int>(epoch & 1);
        const WaitContext ctx{a.error, &ctrl->abort, a.timeout_ns, me, 0};

        uint8_t* slots = smem;
        auto* bars = reinterpret_cast<uint64_t*>(smem + static_cast<int64_t>(kNumSlots) * kPayload);
        auto* info = reinterpret_cast<int32_t*>(bars + kNumSlots);
        int* counts = info + kNumSendSlots * kInfoInts;
        for (int64_t i = threadIdx.x; i < a.num_local_experts; i += blockDim.x) counts[i] = 0;
        __syncthreads();
        ht_trace(a.trace, 0);

        if (blockIdx.x == 0 && warp == 0) {
            // This rank's verdict on its routing (the prologue ran before this kernel on the
            // same stream) travels to every peer in the token-count word announced below.
            int bad = 0;
            for (int64_t i = lane; i < a.num_topk_bad; i += 32) bad |= a.topk_bad[i];
            const uint32_t bad_bit = __any_sync(0xffffffffu, bad != 0) ? kInfoBadRouting : 0u;
            const auto sig = static_cast<uint32_t>(a.signature) & kInfoSignatureMask;
            announce_start<kRanks>(a.peer_bases, a.lay, me, epoch, sig, lane);
            if (lane < kRanks) {
                const int64_t nchunks = (a.num_tokens + kChunk - 1) / kChunk;
                auto* info_words = reinterpret_cast<uint64_t*>(peer_ptr(
                                       a.peer_bases, lane, a.lay.region[parity] + a.lay.info)) +
                                   me * 2;
                const uint32_t low =
                    static_cast<uint32_t>(a.num_tokens) |
                    (static_cast<uint32_t>(a.signature) << kInfoSignatureShift) | bad_bit;
                st_release_sys(info_words + 1, make_tagged(tag, low));
                st_release_sys(info_words, make_tagged(tag, static_cast<uint32_t>(
                                                                a.chunk_prefix[nchunks * kRanks + lane])));
            }
            if (tag_refresh_epoch(epoch)) {
                // Flags no reader of this op waits on (kTagRefreshPeriod): this rank's chunks
                // past its last one (all of them at this rank itself, whose own rows are never
                // flagged), and its combine flags.
                const int64_t nchunks = (a.num_tokens + kChunk - 1) / kChunk;
                for (int d = 0; d < kRanks; ++d) {
                    uint8_t* reg = peer_ptr(a.peer_bases, d, a.lay.region[parity]);
                    refresh_tags(reinterpret_cast<uint64_t*>(reg + a.lay.dflag) + me * a.max_chunks,
                                 d == me ? 0 : nchunks, a.max_chunks, tag);
                    refresh_tags(reinterpret_cast<uint64_t*>(reg + a.lay.cflag) + me * a.max_chunks,
                                 0, a.max_chunks, tag);
                }
            }
            // Every peer is in a dispatch with this rank's signature (else every CTA unwinds).
            check_peers_agree<kRanks>(ctx, a.peer_bases, a.lay, me, epoch, sig, lane,
                                      kStageDispatchArrive);
        }
        // Role of this warp; CTA-level indices count only the CTAs of that role.
        const int nsend = static_cast<int>(a.num_send_ctas);
        const bool send_cta = !kSplit || static_cast<int>(blockIdx.x) < nsend;
        const int role_cta = static_cast<int>(blockIdx.x) - (kSplit && !send_cta ? nsend : 0);
        const int role_ctas = !kSplit ? static_cast<int>(gridDim.x)
                              : send_cta ? nsend
                                         : static_cast<int>(gridDim.x) - nsend;
        const int rwarp = kSplit ? warp : warp - kNumSendWarps;
        if (send_cta && warp < kNumSendWarps) {
            WarpRing<kSendSlots, kPayload> ring{
                slots + static_cast<int64_t>(warp) * kSendSlots * kPayload, bars + warp * kSendSlots};
            ring.init(lane);
            send(a, ctx, ring, info + warp * kSendSlots * kInfoInts, role_cta * kNumSendWarps + warp,
                 role_ctas * kNumSendWarps, tag, parity, lane, counts);
        } else if ((!kSplit || !send_cta) && rwarp >= 0 && rwarp < kNumRecvWarps) {
            const int64_t off = kRecvSlotBase;
            WarpRing<kRecvSlots, kPayload> ring{
                slots + (off + static_cast<int64_t>(rwarp) * kRecvSlots) * kPayload,
                bars + off + rwarp * kRecvSlots};
            ring.init(lane);
            recv(a, ctx, ring, role_cta * kNumRecvWarps + rwarp, role_ctas * kNumRecvWarps, tag,
                 parity, lane, counts);
        }
        ht_trace(a.trace, 1);
        if (lane == 0) tma_wait_all();
        ht_trace(a.trace, 2);
        __syncthreads();
        if (a.count_experts)
            for (int64_t i = threadIdx.x; i < a.num_local_experts; i += blockDim.x)
                if (counts[i] != 0) atomicAdd(&a.out_counts[kRanks + i], counts[i]);
        __syncthreads();
        // The last CTA publishes the op. Warp 0 computes the aligned inclusive prefix sum of
        // the per-expert counts 32 experts at a time (a serial loop of dependent atomics cost
        // ~1 us per expert at the very end of the kernel).
        if (finish_cta(ctrl) && warp == 0) {
            if (lane == 0) {
                __threadfence();
                wait_all_started<kRanks>(ctx, a.peer_bases, a.lay, me, epoch, kStageDispatchArrive);
            }
            __syncwarp();
            const int64_t el = a.count_experts ? a.num_local_experts : 0;
            int32_t carry = 0;
            for (int64_t base = 0; base < el; base += 32) {
                const int64_t i = base + lane;
                const int32_t n = i < el ? atomicAdd(&a.out_counts[kRanks + i], 0) : 0;
                int32_t v = static_cast<int32_t>((n + a.expert_alignment - 1) / a.expert_alignment *
                                                 a.expert_alignment);
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int32_t y = __shfl_up_sync(0xffffffffu, v, o);
                    if (lane >= o) v += y;
                }
                if (i < el) a.out_counts[kRanks + el + i] = carry + v;
                carry += __shfl_sync(0xffffffffu, v, 31);
            }
            __syncwarp();
            if (lane == 0) {
                __threadfence();
                ctrl->finish = 0;
                ctrl->epoch = epoch;
                __threadfence_system();
            }
        }
    }
};

// Entry point for the JIT's generated wrapper (one instantiation per shape).
template <int kRanks, int kTopk, int kRowBytes, int kNumSF, int kNumSendWarps, int kNumRecvWarps,
          int kSendSlots, int kRecvSlots, int kChunk, bool kSplit>
__device__ __forceinline__ void ht_dispatch(const HtDispatchArgs& args) {
    HtDispatch<kRanks, kTopk, kRowBytes, kNumSF, kNumSendWarps, kNumRecvWarps, kSendSlots,
               kRecvSlots, kChunk, kSplit>::run(args);
}

}  // namespace ep_core
