// Low-latency (decode) dispatch and combine over NVLink, in DeepEP's legacy layout.
//
// Layout of the outputs (L = R * Nmax): recv_x [El, L, H] (e4m3 or bf16), the rows of local
// expert e packed by (source rank, source token); scales [El, L, P] column-major (stride 1 along
// rows); recv_count [El]; recv_src_info [El, L] (source token, -1 past the count);
// recv_layout_range [El, R] ((count << 32) | begin). Exact semantics: docs/design.md.
//
// Protocol (one symmetric buffer per engine; offsets in LlArgs, computed in nvlink_ll.py):
// * Ops. Every send kernel (dispatch or combine, fused or split) is one op with an epoch
//   e = 1, 2, ... kept on the device: CTA c reads ctrl.cta_epoch[c] + 1 and stores it back at its
//   end, so graph replays need no host argument. All ranks run the same op sequence with the same
//   grid, so epochs agree. A split receive kernel (the hook) finds its op's epoch in
//   ctrl.slot_epoch[kind][slot], written by its send kernel (the host alternates the slot per
//   kind; at most two ops of the engine wait for their hook at any time).
// * Regions. Op e writes only into region e % 2 of its peers. Flags are 64-bit words that hold
//   the epoch (or (epoch << 32) | value); they are never reset. Before writing into a peer, a send
//   kernel waits until every CTA of every peer has released op e - 2: once an op's receive is
//   done each CTA adds 1 (release) to rel[e % 2][me] at every rank (a fused op defers that to the
//   next send kernel's signal, defer_release), so the gate waits for rel[e % 2][peer] >=
//   num CTAs * ((e - 1) / 2) with one acquire load per peer. A region is never overwritten while
//   its owner still reads it.
// * Dispatch (sender s, every CTA): per (token, chunk of 2048 channels) a warp loads x, casts
//   to FP8 (per 128 channels, float32 IEEE arithmetic) into shared memory and TMA-stores the
//   chunk once per destination rank into stage[s][t] of that rank (a token goes once per rank,
//   not once per expert); FP8 scales follow as plain stores. Meanwhile the upper half of each
//   CTA's warps (the table warps) builds a per-expert bitmap of this rank's tokens, writes the
//   CTA's share of the per-expert counts (tagged words), and for its tokens the lane table
//   meta[s][t][j] = (local expert << 16) | position-in-expert, or -1, at every rank. After its
//   TMA stores completed, the CTA releases done[s][cta] at every rank.
// * Dispatch (receiver d): waits for every source's counts (prefix over sources gives each
//   (expert, source) its first row; in a fused op the table warps do this before the CTA's own
//   flags, while its rows are on the way), then copies each staged (source, token) row into the
//   packed rows of its local experts as soon as the source CTAs that wrote its chunks and its
//   lane table are done (work item u of a kernel always belongs to CTA u % num_ctas, so a
//   receiver knows which flag covers which item).
// * Combine (source s): writes its top-k weights and per-destination lane masks to every rank
//   as tagged words ((epoch << 32) | bits: no fence, no flag; a reader checks each word's tag).
//   A tag is the low 32 bits of the epoch, so a word that no op rewrote for a multiple of 2^32
//   ops (a token index above every batch in between) would pass as current if read before its
//   new value lands. The ops whose epoch is 0 or 1 modulo 2^30 (one per region) give their tag
//   to every tagged word of theirs that they do not write anyway (refresh_words), so no word
//   is ever more than 2^30 + 1 ops old.
//   Each rank d, per (source, token, chunk) with lanes on d, computes
//   p_d = bf16(sum over those lanes, increasing j, of w * float(y)) (__fmul_rn/__fadd_rn, starting
//   from the first term) and TMA-stores it into stage[d][t] of s; releases done[d][cta]. The
//   source waits for the CTA of every destination that made the token's partial (it knows every
//   rank's token count from the dispatch, hence d's item numbering) and sums in rank order.
// * Timeouts: every spin wait is timed (WaitContext); a timeout records stage and peer in the
//   host-mapped ErrorRecord, raises the local abort flag, and every kernel unwinds.
#pragma once

#include <cuda_bf16.h>

#include <cuda/std/cstdint>
#include <ep_core/smxx_ptx.cuh>

namespace ep_core {

// Arguments of every low-latency kernel (passed by value as __grid_constant__). Every field is
// 8 bytes wide so the ctypes mirror in nvlink_ll.py has no padding to get wrong.
struct LlArgs {
    uint64_t x;                 // dispatch: [T, H] bf16; combine: y [El, L, H] bf16
    uint64_t topk_idx;          // [T, k] int64 of this rank's tokens
    uint64_t topk_weights;      // combine: [T, k] float32
    uint64_t recv_x;            // dispatch out: [El, L, H] e4m3 or bf16
    uint64_t recv_scales;       // dispatch out: [El, P, L] 4-byte scales (column-major view)
    uint64_t recv_count;        // dispatch out: [El] int32
    uint64_t recv_src_info;     // dispatch out: [El, L] int32
    uint64_t recv_range;        // dispatch out: [El, R] int64
    uint64_t cmap;              // dispatch out / combine in: [R, Nmax, k] int32 packed row or -1
    uint64_t recv_ntok;         // dispatch out / combine in: [R] int32 tokens of each source
    uint64_t out;               // combine out: [T, H] bf16
    uint64_t peer_bases;        // [R] base address of every rank's symmetric buffer
    uint64_t error;             // ErrorRecord in host-mapped memory
    int64_t num_tokens;         // T (this rank)
    int64_t num_experts;        // E
    int64_t num_local_experts;  // El
    int64_t num_max_tokens;     // Nmax of this call (L = R * Nmax)
    uint64_t timeout_ns;
    int64_t rank;
    int64_t slot;               // host-alternated slot of a split op (0/1)
    int64_t buf_max_tokens;     // Nmax the buffer is sized for (stride of the staged arrays)
    int64_t buf_local_experts;  // El the buffer is sized for (stride of the count words)
    int64_t buf_topk;           // k the buffer is sized for (stride of the weight words)
    int64_t row_bytes;          // stride of a staged row
    int64_t off_abort;          // u32 abort flag (local use)
    int64_t off_slot_epoch;     // [2 kinds][2 slots] u64
    int64_t off_cta_epoch;      // [num CTAs] u64
    int64_t off_rel;            // [2 parities][R] u64 release counters, added to by peers
    int64_t off_pend;           // [num CTAs] u64: epoch of this CTA's fused op not released yet
    int64_t region[2];          // bases of the two alternating regions
    int64_t r_cnt;              // [R][buf El] u64 (epoch << 32) | count
    int64_t r_ntok;             // [R] u64 (epoch << 32) | signature << 16 | T of the source
    int64_t r_done;             // [R][num CTAs] u64 epoch: rows/partials of a source CTA complete
    int64_t r_meta;             // [R][buf Nmax][k] int32
    int64_t r_cmask;            // [R][buf Nmax] u64 (epoch << 32) | combine lanes on this rank
    int64_t r_cw;               // [R][buf Nmax][buf k] u64 (epoch << 32) | float32 bits of a weight
    int64_t r_stage;            // [R][buf Nmax][row_bytes] staged rows / combine partials
    uint64_t trace;             // 0, or [num CTAs][kTracePoints] u64 %globaltimer (developer trace)
    int64_t signature;          // the call's 16-bit signature (kLlSignatureCombine for a combine)
};

enum LlStage : int {
    kStageLlRelease = 21,
    kStageLlCounts = 22,
    kStageLlRows = 23,
    kStageLlWeights = 24,
    kStageLlPartials = 25,
};

// Call signatures of the low-latency ops (16 bits, from the host: ll.dispatch_signature /
// ll.combine_signature): kLlSignatureCombine marks a combine, the other 15 bits digest what every
// rank must share. Each op writes its signature into the upper half of the low word of r_ntok at
// every rank (the dispatch beside its token count, the combine alone); a reader whose own differs
// records kErrorLlArgumentsDiffer (observed = the peer's signature, expected = this rank's), and
// every CTA of the rank unwinds; the peer finds the same difference.
constexpr uint32_t kLlSignatureCombine = 0x8000u;
constexpr int32_t kErrorLlArgumentsDiffer = 3;

namespace ll {

constexpr uint32_t kFull = 0xffffffffu;
constexpr int kChunk = 2048;            // channels of one work item
constexpr int kSlotBytes = kChunk * 2;  // one shared-memory staging slot (a bf16 chunk)
constexpr int kPhaseSend = 1;
constexpr int kPhaseRecv = 2;
constexpr int kKindDispatch = 0;
constexpr int kKindCombine = 1;
constexpr int kTracePoints = 16;

// Developer trace (LlArgs::trace != 0): one thread of each CTA records the global timer (ns) at
// numbered points of the kernel (see nvlink_ll.TRACE_POINTS): trace_here by the calling thread,
// trace by thread 0. Costs one branch when off.
__device__ __forceinline__ void trace_here(const LlArgs& a, int point) {
    if (a.trace != 0)
        reinterpret_cast<uint64_t*>(a.trace)[blockIdx.x * kTracePoints + point] =
            ep_jit::globaltimer_ns();
}

__device__ __forceinline__ void trace(const LlArgs& a, int point) {
    if (threadIdx.x == 0) trace_here(a, point);
}

__device__ __forceinline__ uint64_t tagged(uint64_t epoch, uint32_t value) {
    return (epoch << 32) | value;
}

// max that propagates NaN, as torch.amax.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Two floats to two e4m3 bytes (x in the low byte), round to nearest even, saturating.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Eight bf16 (one 16-byte vector) to float, channel order.
template <int kN>
__device__ __forceinline__ void unpack8(const int4& v, float (&f)[kN], int at) {
    f[at + 0] = bf16_lo(static_cast<uint32_t>(v.x));
    f[at + 1] = bf16_hi(static_cast<uint32_t>(v.x));
    f[at + 2] = bf16_lo(static_cast<uint32_t>(v.y));
    f[at + 3] = bf16_hi(static_cast<uint32_t>(v.y));
    f[at + 4] = bf16_lo(static_cast<uint32_t>(v.z));
    f[at + 5] = bf16_hi(static_cast<uint32_t>(v.z));
    f[at + 6] = bf16_lo(static_cast<uint32_t>(v.w));
    f[at + 7] = bf16_hi(static_cast<uint32_t>(v.w));
}

// Everything a kernel derives once from its arguments.
struct Env {
    const uint64_t* bases;
    uint8_t* local;
    int me;
    int nc;  // CTAs of every kernel of this engine (gridDim.x)
    int parity;
    uint64_t epoch;
    WaitContext ctx;

    __device__ __forceinline__ uint8_t* region(const LlArgs& a, int peer) const {
        return reinterpret_cast<uint8_t*>(bases[peer]) + a.region[parity];
    }
    __device__ __forceinline__ uint8_t* my_region(const LlArgs& a) const {
        return local + a.region[parity];
    }
};

// Each lane waits for its own word (`flag` may be null: nothing to wait for), then the warp
// proceeds together: the acquires and __syncwarp order every lane's later loads after them.
__device__ __forceinline__ bool warp_wait_lanes(const Env& env, const uint64_t* flag,
                                                uint64_t target, int stage, int peer) {
    const bool ok = flag == nullptr || wait_geq(env.ctx, flag, target, stage, peer);
    __syncwarp();
    return __all_sync(kFull, ok);
}

// Whether the signature peer `peer` wrote beside its token count (the upper half of `low`, the
// low word of its r_ntok word of this op) is this op's; else records the difference (every CTA of
// this rank then unwinds) and returns false.
__device__ __forceinline__ bool signature_agrees(const LlArgs& a, const Env& env, int peer,
                                                 uint32_t low, int stage) {
    const uint32_t seen = low >> 16, mine = static_cast<uint32_t>(a.signature) & 0xFFFFu;
    if (seen == mine) return true;
    record_error(env.ctx, kErrorLlArgumentsDiffer, stage, peer, seen, mine);
    return false;
}

// Prologue shared by every kernel: abort check and epoch (send kernels pass the release gate per
// warp, warp_gate). Returns false (uniformly over the CTA) when the kernel must not run.
template <int kRanks, int kKind, int kPhase>
__device__ __forceinline__ bool prologue(const LlArgs& a, Env& env) {
    __shared__ uint64_t s_epoch;
    __shared__ int s_stop;
    const int tid = threadIdx.x;
    env.bases = reinterpret_cast<const uint64_t*>(a.peer_bases);
    env.me = static_cast<int>(a.rank);
    env.local = reinterpret_cast<uint8_t*>(env.bases[env.me]);
    env.nc = static_cast<int>(gridDim.x);
    auto* abort_flag = reinterpret_cast<uint32_t*>(env.local + a.off_abort);
    env.ctx =
        WaitContext{reinterpret_cast<ErrorRecord*>(a.error), abort_flag, a.timeout_ns, env.me, 0};
    if (tid == 0) {
        s_stop = aborted(env.ctx) ? 1 : 0;  // records a peer's abort for the host
        const auto* word =
            (kPhase & kPhaseSend)
                ? reinterpret_cast<const uint64_t*>(env.local + a.off_cta_epoch) + blockIdx.x
                : reinterpret_cast<const uint64_t*>(env.local + a.off_slot_epoch) + kKind * 2 +
                      a.slot;
        const uint64_t stored = *reinterpret_cast<const volatile uint64_t*>(word);
        s_epoch = (kPhase & kPhaseSend) ? stored + 1 : stored;
    }
    __syncthreads();
    env.epoch = s_epoch;
    env.parity = static_cast<int>(env.epoch & 1);
    return s_stop == 0;
}

// Release gate of a send kernel, per warp, before the warp's first write into a peer: every CTA
// of every peer must have finished reading region epoch % 2 for op epoch - 2. Each CTA of a peer
// adds 1 with release semantics to rel[parity][peer] here once per op (release_region, or
// signal_sent for a deferred one; in op order: no op of a parity can release before the op two
// earlier has, see below), so that word reaches
// nc * (number of ops of this parity before epoch) = nc * ((epoch - 1) / 2). Lane p reads the
// word of peer p with one acquire load (its value comes from the last of the peer CTAs' release
// additions, so the acquire synchronises with all of them), and spins only if it is not there
// yet. No fence: a fence.acq_rel.sys per warp cost 1.5-3 us here. Called lazily so its latency
// overlaps the warp's first local loads. Returns false (on every lane) after a timeout or an
// abort; the warp must then write nothing into its peers.
template <int kRanks>
__device__ __forceinline__ bool warp_gate(const LlArgs& a, const Env& env) {
    if (env.epoch <= 2) return true;
    const int lane = threadIdx.x & 31;
    bool ok = true;
    if (lane < kRanks) {
        const auto* rel = reinterpret_cast<const uint64_t*>(env.local + a.off_rel) +
                          env.parity * kRanks + lane;
        const uint64_t target = static_cast<uint64_t>(env.nc) * ((env.epoch - 1) / 2);
        ok = wait_geq(env.ctx, rel, target, kStageLlRelease, lane);
    }
    __syncwarp();
    return __all_sync(kFull, ok);
}

// Send kernels: remember the op's epoch for this CTA's next op and, for a split op only, for
// its receive kernel (a fused op must not touch the slot a pending split op may own).
template <int kKind, int kPhase>
__device__ __forceinline__ void store_epoch(const LlArgs& a, const Env& env) {
    if (threadIdx.x == 0) {
        reinterpret_cast<uint64_t*>(env.local + a.off_cta_epoch)[blockIdx.x] = env.epoch;
        if (kPhase == kPhaseSend && blockIdx.x == 0)
            reinterpret_cast<uint64_t*>(env.local + a.off_slot_epoch)[kKind * 2 + a.slot] =
                env.epoch;
    }
}

// Receive end of a split op (the hook's kernel): this CTA no longer reads region epoch % 2;
// tell every peer (one release addition to its rel[parity][me]; the barrier orders every warp's
// reads of the region before it).
template <int kRanks>
__device__ __forceinline__ void release_region(const LlArgs& a, const Env& env) {
    __syncthreads();
    if (threadIdx.x < kRanks && !aborted(env.ctx)) {
        auto* rel = reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(env.bases[threadIdx.x]) +
                                                a.off_rel);
        red_add_release_sys(rel + static_cast<int64_t>(env.parity) * kRanks + env.me, 1);
    }
}

// Receive end of a fused op: the release is deferred to the next send kernel of this CTA index,
// whose signal_sent adds it under the fence it pays anyway (a system-scope fence costs ~1 us, and
// here it would end every kernel). Until then peers cannot reuse region epoch % 2 of this rank,
// which they only do for op epoch + 2, after that next op has signalled. The kernel boundary
// orders this op's reads before the release.
__device__ __forceinline__ void defer_release(const LlArgs& a, const Env& env) {
    if (threadIdx.x == 0 && !aborted(env.ctx))
        reinterpret_cast<uint64_t*>(env.local + a.off_pend)[blockIdx.x] = env.epoch;
}

// End of a receive phase: a split op (the hook's kernel, kPhase == kPhaseRecv) releases now, a
// fused op defers its release.
template <int kRanks, int kPhase>
__device__ __forceinline__ void end_receive(const LlArgs& a, const Env& env) {
    if constexpr (kPhase == kPhaseRecv)
        release_region<kRanks>(a, env);
    else
        defer_release(a, env);
}

// After a send phase: wait for this CTA's TMA stores and make every store of the CTA visible
// before `flags` (a [R][num CTAs] array in region epoch % 2) is raised at every rank. The
// barrier orders every thread's stores (and, after wait + proxy fence, each warp's TMA stores)
// before one system-scope fence in threads 0..R-1 (cumulativity), each followed by relaxed
// stores: its flag and, if this CTA's previous op was fused, that op's deferred release
// (defer_release).
template <int kRanks>
__device__ __forceinline__ void signal_sent(const LlArgs& a, const Env& env, int64_t flags_off) {
    if ((threadIdx.x & 31) == 0) {
        tma_wait_all();
        fence_proxy_async();
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        auto* pend = reinterpret_cast<uint64_t*>(env.local + a.off_pend) + blockIdx.x;
        const uint64_t prev = *pend;
        if (threadIdx.x < kRanks && !aborted(env.ctx)) {
            uint8_t* peer = reinterpret_cast<uint8_t*>(env.bases[threadIdx.x]);
            fence_acq_rel_sys();
            st_relaxed_sys(reinterpret_cast<uint64_t*>(env.region(a, threadIdx.x) + flags_off) +
                               static_cast<int64_t>(env.me) * env.nc + blockIdx.x,
                           env.epoch);
            if (prev != 0)
                red_add_relaxed_sys(reinterpret_cast<uint64_t*>(peer + a.off_rel) +
                                        static_cast<int64_t>(prev & 1) * kRanks + env.me,
                                    1);
        }
        __syncwarp();
        if (threadIdx.x == 0 && prev != 0) *pend = 0;
    }
}

// Rotated source order (this rank first): item prefix sums over sources, `spoff[0..R]` (by one
// thread).
template <int kRanks, int kNumChunks>
__device__ __forceinline__ void source_offsets(int me, const int* ntok, int* spoff) {
    int acc = 0;
    for (int i = 0; i < kRanks; ++i) {
        spoff[i] = acc;
        acc += ntok[(me + i) % kRanks] * kNumChunks;
    }
    spoff[kRanks] = acc;
}

// In a refresh op (tag_refresh_epoch, see kTagRefreshPeriod in smxx_ptx.cuh): this rank's
// tagged words at every rank that no reader of this op waits on get this op's tag, so no word
// ever keeps a tag that is 2^32 ops old. A dispatch refreshes the combine's masks and weights
// and the count words past this call's experts; a combine refreshes the dispatch's count words
// (it writes the token words itself, with its signature), its masks past this call's tokens and
// its weight words past this call's tokens or top-k (send_weights gives the lanes not routed to a
// rank their tag). Words that the op itself writes are left alone. Called by warps that passed the release gate.
template <int kRanks, int kTopk, int kKind>
__device__ __forceinline__ void refresh_words(const LlArgs& a, const Env& env, int gw, int nw) {
    const int64_t nbuf = a.buf_max_tokens, kbuf = a.buf_topk, elbuf = a.buf_local_experts;
    const int64_t T = a.num_tokens, k = kTopk;
    const uint32_t tag = static_cast<uint32_t>(env.epoch);
    for (int r = 0; r < kRanks; ++r) {
        uint8_t* reg = env.region(a, r);
        auto* cnt = reinterpret_cast<uint64_t*>(reg + a.r_cnt) + env.me * elbuf;
        auto* mask = reinterpret_cast<uint64_t*>(reg + a.r_cmask) + env.me * nbuf;
        auto* cw = reinterpret_cast<uint64_t*>(reg + a.r_cw) + env.me * nbuf * kbuf;
        if (kKind == kKindDispatch) {
            refresh_tags(cnt, a.num_local_experts, elbuf, tag, gw, nw);
            refresh_tags(mask, 0, nbuf, tag, gw, nw);
            refresh_tags(cw, 0, nbuf * kbuf, tag, gw, nw);
        } else {
            refresh_tags(cnt, 0, elbuf, tag, gw, nw);
            refresh_tags(mask, T, nbuf, tag, gw, nw);
            refresh_tags(cw, T * kbuf, nbuf * kbuf, tag, gw, nw);
            // Top-k lanes [k, kbuf) of the call's tokens.
            const int64_t extra = kbuf - k;
            const int64_t step = static_cast<int64_t>(nw) * 32;
            for (int64_t i = static_cast<int64_t>(gw) * 32 + (threadIdx.x & 31); i < T * extra;
                 i += step)
                st_relaxed_sys(cw + (i / extra) * kbuf + k + i % extra, tagged(env.epoch, 0));
        }
    }
}

// ==============================================================================================
// Dispatch
// ==============================================================================================
template <int kRanks, int kTopk, int kHidden, int kNumWarps, bool kFp8, bool kRoundScale,
          bool kUe8m0, int kPhase>
struct Dispatch {
    static constexpr int kThreads = kNumWarps * 32;
    static constexpr int kNumChunks = (kHidden + kChunk - 1) / kChunk;
    static constexpr int kElemBytes = kFp8 ? 1 : 2;
    static constexpr int kDataBytes = kHidden * kElemBytes;
    static constexpr int kNumScales =
        !kFp8 ? 0 : (kUe8m0 ? (kHidden / 128 + 3) / 4 : kHidden / 128);
    static constexpr int kScaleWords = kChunk / 128;  // per warp, per chunk
    static constexpr int kIters = kChunk / 512;       // 16 channels per lane per iteration
    static constexpr int kVec = kDataBytes / 16;      // 16-byte vectors of a row's data
    static constexpr int kU = 16;                     // vectors per lane in one copy round
    static constexpr int kScaleRounds = kNumScales > 0 ? (kNumScales + 31) / 32 : 1;
    static_assert(kRanks >= 1 && kRanks <= 32, "1..32 ranks");
    static_assert(kTopk >= 1 && kTopk <= 32, "top-k must fit a warp");
    static_assert(kHidden % (kFp8 ? 128 : 64) == 0, "hidden: multiple of 128 (FP8) or 64 (BF16)");
    static_assert(!kUe8m0 || (kFp8 && kRoundScale), "UE8M0 needs FP8 with round_scale");
    static_assert(kChunk % 512 == 0, "a chunk is whole UE8M0 packs");
    static_assert(kNumChunks < 32, "one lane per chunk waits for its flag");

    // ---- send ---------------------------------------------------------------------------------
    // One (token, chunk): load, cast, stage in shared memory, TMA-store to every rank of the token.
    static __device__ __forceinline__ void send_chunk(const LlArgs& a, const Env& env, int t,
                                                      int ch, uint32_t dmask, uint8_t* slot,
                                                      uint32_t* scl, int lane, bool& gated,
                                                      bool& ok) {
        const int c0 = ch * kChunk;
        const int c1 = min(kHidden, c0 + kChunk);
        const auto* xrow =
            reinterpret_cast<const uint8_t*>(a.x) + static_cast<int64_t>(t) * kHidden * 2;
        int4 v[kIters][2];
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int cb = c0 + it * 512 + lane * 16;
            v[it][0] = v[it][1] = make_int4(0, 0, 0, 0);
            if (cb < c1) {
                v[it][0] = __ldg(reinterpret_cast<const int4*>(xrow + cb * 2));
                v[it][1] = __ldg(reinterpret_cast<const int4*>(xrow + cb * 2 + 16));
            }
        }
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int cb = c0 + it * 512 + lane * 16;
            const bool active = cb < c1;
            if constexpr (kFp8) {
                float f[16];
                unpack8(v[it][0], f, 0);
                unpack8(v[it][1], f, 8);
                float amax = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; ++i) amax = nan_max(amax, fabsf(f[i]));
                // 8 lanes hold one 128-channel block.
                amax = nan_max(amax, __shfl_xor_sync(kFull, amax, 1));
                amax = nan_max(amax, __shfl_xor_sync(kFull, amax, 2));
                amax = nan_max(amax, __shfl_xor_sync(kFull, amax, 4));
                const float floor_amax = amax != amax ? amax : fmaxf(amax, 1e-4f);
                float sf = __fdiv_rn(floor_amax, 448.0f);
                if constexpr (kRoundScale) {
                    const uint32_t bits = __float_as_uint(sf);
                    const uint32_t ex = (bits >> 23) + ((bits & 0x7fffffu) != 0u ? 1u : 0u);
                    sf = __uint_as_float(ex << 23);
                }
                const float inv = __frcp_rn(sf);
                uint32_t q[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float p[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const float y = __fmul_rn(f[4 * i + k], inv);
                        p[k] = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
                    }
                    q[i] = e4m3x2(p[0], p[1]) | (e4m3x2(p[2], p[3]) << 16);
                }
                if (active)
                    *reinterpret_cast<int4*>(slot + (cb - c0)) =
                        make_int4(static_cast<int>(q[0]), static_cast<int>(q[1]),
                                  static_cast<int>(q[2]), static_cast<int>(q[3]));
                if constexpr (!kUe8m0) {
                    if (active && (lane & 7) == 0) scl[(cb - c0) / 128] = __float_as_uint(sf);
                } else {
                    const uint32_t byte = active ? ((__float_as_uint(sf) >> 23) & 0xffu) : 0u;
                    const uint32_t b0 = __shfl_sync(kFull, byte, 0);
                    const uint32_t b1 = __shfl_sync(kFull, byte, 8);
                    const uint32_t b2 = __shfl_sync(kFull, byte, 16);
                    const uint32_t b3 = __shfl_sync(kFull, byte, 24);
                    if (lane == 0 && c0 + it * 512 < c1)
                        scl[it] = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24);
                }
            } else {
                if (active) {
                    *reinterpret_cast<int4*>(slot + (cb - c0) * 2) = v[it][0];
                    *reinterpret_cast<int4*>(slot + (cb - c0) * 2 + 16) = v[it][1];
                }
            }
        }
        fence_proxy_async_smem();
        __syncwarp();
        // The gate's loads only now: they overlap the loads and the cast above.
        if (!gated) {
            ok = warp_gate<kRanks>(a, env);
            gated = true;
        }
        if (!ok) return;
        const int64_t row_off =
            a.r_stage + (static_cast<int64_t>(env.me) * a.buf_max_tokens + t) * a.row_bytes;
        if (lane == 0) {
            for (uint32_t m = dmask; m != 0; m &= m - 1) {
                const int d = __ffs(m) - 1;
                tma_store(env.region(a, d) + row_off + c0 * kElemBytes, slot,
                          static_cast<uint32_t>((c1 - c0) * kElemBytes));
            }
            tma_commit();
        }
        if constexpr (kFp8) {
            const int nsc = kUe8m0 ? (c1 - c0 + 511) / 512 : (c1 - c0) / 128;
            const int sc0 = kUe8m0 ? c0 / 512 : c0 / 128;
            if (lane < nsc) {
                const uint32_t val = scl[lane];
                for (uint32_t m = dmask; m != 0; m &= m - 1) {
                    const int d = __ffs(m) - 1;
                    reinterpret_cast<uint32_t*>(env.region(a, d) + row_off +
                                                kDataBytes)[sc0 + lane] = val;
                }
            }
            __syncwarp();
        }
    }

    // Warps [kFirstTableWarp, kNumWarps) build the tables (bitmap, counts, lane tables and, in a
    // fused op, the receive tables) while the lower warps issue the rows; they take rows of
    // their own only when a CTA has more items than row warps (more than 128 tokens per 128 CTAs
    // with hidden 7168).
    static constexpr int kTableWarps = kNumWarps / 2;
    static constexpr int kFirstTableWarp = kNumWarps - kTableWarps;
    static constexpr int kTableThreads = kTableWarps * 32;
    static constexpr uint32_t kTableBarrier = 1;  // named barrier of the table warps
    static_assert(kTableWarps >= 1 && kFirstTableWarp >= 1, "row and table warps");
    // Shared memory: each warp's two staging slots, each warp's scale words, then the send
    // side's bitmap, which the receive tables overwrite (dispatch_smem_bytes in nvlink_ll.py).
    static constexpr int kTablesOffset = kNumWarps * (2 * kSlotBytes + kScaleWords * 4);

    static __device__ __forceinline__ void table_sync() {
        named_barrier(kTableBarrier, kTableThreads);
    }

    // Shared-memory tables of the receive side (over the send side's bitmap, which they follow).
    struct RecvTables {
        int* sbase;  // [R][El] first packed row of (source, expert), then the counts' prefix
        int* stot;   // [El] rows of each local expert
        int* sntok;  // [R] tokens of each source
        int* spoff;  // [R + 1] item prefix over sources, this rank first
    };

    static __device__ __forceinline__ RecvTables recv_tables_at(const LlArgs& a, uint8_t* smem) {
        const int El = static_cast<int>(a.num_local_experts);
        RecvTables tb;
        tb.sbase = reinterpret_cast<int*>(smem + kTablesOffset);
        tb.stot = tb.sbase + kRanks * El;
        tb.sntok = tb.stot + El;
        tb.spoff = tb.sntok + kRanks;
        return tb;
    }

    // Tables of the send side, by the table warps (`ttid` = thread index among them): the
    // per-expert bitmap of this rank's tokens (bm[e][w] bit b = token 32w + b chose e), this
    // rank's per-expert counts and token count at every rank, and the lane table of each token
    // at every rank. Passes the release gate (returned in `ok`) before its first peer write.
    static __device__ __forceinline__ void send_tables(const LlArgs& a, const Env& env,
                                                       uint32_t* bm, int ttid, bool& ok) {
        const int lane = ttid & 31, tw = ttid >> 5;
        const int T = static_cast<int>(a.num_tokens);
        const int E = static_cast<int>(a.num_experts);
        const int El = static_cast<int>(a.num_local_experts);
        const int nc = env.nc;
        const auto* topk = reinterpret_cast<const int64_t*>(a.topk_idx);
        const int W = (T + 31) / 32;
        for (int i = ttid; i < E * W; i += kTableThreads) bm[i] = 0;
        table_sync();
        constexpr int kBatch = 8;  // independent loads in flight per thread
        for (int base = ttid; base < T * kTopk; base += kBatch * kTableThreads) {
            int64_t ev[kBatch];
#pragma unroll
            for (int q = 0; q < kBatch; ++q) {
                const int i = base + q * kTableThreads;
                ev[q] = i < T * kTopk ? __ldg(topk + i) : -1;
            }
#pragma unroll
            for (int q = 0; q < kBatch; ++q) {
                const int t = (base + q * kTableThreads) / kTopk;
                if (ev[q] >= 0 && ev[q] < E)
                    atomicOr(&bm[static_cast<int>(ev[q]) * W + (t >> 5)], 1u << (t & 31));
            }
        }
        ok = warp_gate<kRanks>(a, env);  // its load overlaps the barrier wait
        table_sync();

        // Counts: expert e is written by CTA e % nc; the token count by CTA 0.
        for (int e = static_cast<int>(blockIdx.x) + nc * ttid; ok && e < E;
             e += nc * kTableThreads) {
            int cnt = 0;
            for (int w = 0; w < W; ++w) cnt += __popc(bm[e * W + w]);
            const int d = e / El, el = e - d * El;
            auto* word = reinterpret_cast<uint64_t*>(env.region(a, d) + a.r_cnt) +
                         static_cast<int64_t>(env.me) * a.buf_local_experts + el;
            st_relaxed_sys(word, tagged(env.epoch, static_cast<uint32_t>(cnt)));
        }
        if (ok && blockIdx.x == 0 && ttid < kRanks) {
            auto* word = reinterpret_cast<uint64_t*>(env.region(a, ttid) + a.r_ntok) + env.me;
            st_relaxed_sys(word, tagged(env.epoch, (static_cast<uint32_t>(a.signature) << 16) |
                                                       static_cast<uint32_t>(T)));
        }

        // Lane table of token t (written by CTA t % nc) at every rank.
        for (int t = static_cast<int>(blockIdx.x) + nc * tw; ok && t < T; t += nc * kTableWarps) {
            const int64_t e =
                lane < kTopk ? __ldg(topk + static_cast<int64_t>(t) * kTopk + lane) : -1;
            int d = -1;
            int32_t val = -1;
            if (e >= 0 && e < E) {
                const int ei = static_cast<int>(e);
                const uint32_t* bits = bm + ei * W;
                int pos = __popc(bits[t >> 5] & ((1u << (t & 31)) - 1u));
                for (int w = 0; w < (t >> 5); ++w) pos += __popc(bits[w]);
                d = ei / El;
                val = ((ei - d * El) << 16) | pos;
            }
            if (lane < kTopk) {
                const int64_t idx =
                    (static_cast<int64_t>(env.me) * a.buf_max_tokens + t) * kTopk + lane;
#pragma unroll 4
                for (int r = 0; r < kRanks; ++r)
                    reinterpret_cast<int32_t*>(env.region(a, r) + a.r_meta)[idx] =
                        r == d ? val : -1;
            }
        }
    }

    static __device__ __forceinline__ void send(const LlArgs& a, const Env& env, uint8_t* smem) {
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
        const int T = static_cast<int>(a.num_tokens);
        const int E = static_cast<int>(a.num_experts);
        const int nc = env.nc;
        const auto* topk = reinterpret_cast<const int64_t*>(a.topk_idx);
        uint8_t* ring = smem + warp * 2 * kSlotBytes;
        uint32_t* scl =
            reinterpret_cast<uint32_t*>(smem + kNumWarps * 2 * kSlotBytes) + warp * kScaleWords;
        auto* bm = reinterpret_cast<uint32_t*>(smem + kTablesOffset);

        bool gated = false, ok = true;  // this warp passed the release gate / may write to peers
        const bool table_warp = warp >= kFirstTableWarp;
        if (table_warp) {
            const int ttid = tid - kFirstTableWarp * 32;
            send_tables(a, env, bm, ttid, ok);
            gated = true;
            if (ttid == 0) trace_here(a, 3);
            // A fused op's receive tables need only the peers' counts: build them now, while
            // this CTA's rows are still on the way (the lane tables above are done with bm).
            if constexpr (kPhase == kPhaseSend + kPhaseRecv) {
                table_sync();
                recv_tables(a, env, recv_tables_at(a, smem), ttid, kTableThreads,
                            [] { table_sync(); });
            }
        }

        // Rows: item u = (t, chunk) belongs to CTA u % nc (consecutive items on different SMs);
        // a CTA's i-th item goes to warp i % kNumWarps, so the table warps get rows last.
        const int gw = warp * nc + static_cast<int>(blockIdx.x);
        int nitem = 0;
        for (int u = gw; u < T * kNumChunks; u += nc * kNumWarps) {
            const int t = u / kNumChunks, ch = u - t * kNumChunks;
            const int64_t e =
                lane < kTopk ? __ldg(topk + static_cast<int64_t>(t) * kTopk + lane) : -1;
            const bool valid = e >= 0 && e < E;
            const int d = valid ? static_cast<int>(e) / static_cast<int>(a.num_local_experts) : 0;
            const uint32_t dmask = __reduce_or_sync(kFull, valid ? (1u << d) : 0u);
            if (dmask == 0) continue;
            if (nitem >= 2 && lane == 0) tma_wait_read<1>();  // slot nitem % 2 is read out
            __syncwarp();
            send_chunk(a, env, t, ch, dmask, ring + (nitem & 1) * kSlotBytes, scl, lane, gated, ok);
            ++nitem;
        }
        if (!gated) ok = warp_gate<kRanks>(a, env);
        if (ok && tag_refresh_epoch(env.epoch))
            refresh_words<kRanks, kTopk, kKindDispatch>(a, env, gw, nc * kNumWarps);
        trace(a, 2);
        signal_sent<kRanks>(a, env, a.r_done);
        trace(a, 4);
    }

    // ---- receive ------------------------------------------------------------------------------
    // Receive tables from the sources' counts, by `nthreads` threads (`gtid` = index among them,
    // `sync` their barrier): first packed row of each (source, expert), the outputs recv_count,
    // recv_layout_range, recv_ntok (CTA 0) and recv_src_info's -1 past each count (grid-strided).
    // A timeout or abort sets s_stop.
    template <typename Sync>
    static __device__ __forceinline__ void recv_tables(const LlArgs& a, const Env& env,
                                                       const RecvTables& tb, int gtid,
                                                       int nthreads, Sync&& sync) {
        const int El = static_cast<int>(a.num_local_experts);
        const int nmax = static_cast<int>(a.num_max_tokens);
        const int L = kRanks * nmax;
        const int nc = env.nc;
        const uint8_t* reg = env.my_region(a);
        int* sbase = tb.sbase;
        int* stot = tb.stot;
        int* sntok = tb.sntok;

        // Count words carry their own tag (no payload behind them): batched relaxed loads, and a
        // timed spin only for a word not written yet.
        const uint32_t tag = static_cast<uint32_t>(env.epoch);
        const auto* cnt_words = reinterpret_cast<const uint64_t*>(reg + a.r_cnt);
        const int ncnt = kRanks * El;
        const auto* ntok_words = reinterpret_cast<const uint64_t*>(reg + a.r_ntok);
        bool stop = false;
        if (gtid < kRanks) {
            // Source gtid's token count and signature, before its counts: a source in another
            // kind of op, or called with other arguments, writes no counts this rank could wait
            // for.
            uint64_t ntv = ld_relaxed_sys(ntok_words + gtid);
            bool ok = static_cast<uint32_t>(ntv >> 32) == tag ||
                      wait_tag(env.ctx, ntok_words + gtid, tag, &ntv, kStageLlCounts, gtid);
            const auto low = static_cast<uint32_t>(ntv);
            ok = ok && signature_agrees(a, env, gtid, low, kStageLlCounts);
            stop = !ok;
            sntok[gtid] = ok ? static_cast<int>(low & 0xFFFFu) : 0;
        }
        constexpr int kBatch = 8;
        for (int base = gtid; base < ncnt; base += kBatch * nthreads) {
            uint64_t v[kBatch];
#pragma unroll
            for (int q = 0; q < kBatch; ++q) {
                const int i = base + q * nthreads;
                const int s = i / El;
                v[q] = i < ncnt ? ld_relaxed_sys(cnt_words +
                                                 static_cast<int64_t>(s) * a.buf_local_experts +
                                                 (i - s * El))
                                : 0;
            }
#pragma unroll
            for (int q = 0; q < kBatch; ++q) {
                const int i = base + q * nthreads;
                if (i >= ncnt) continue;
                const int s = i / El;
                if (static_cast<uint32_t>(v[q] >> 32) != tag &&
                    !wait_tag(
                        env.ctx,
                        cnt_words + static_cast<int64_t>(s) * a.buf_local_experts + (i - s * El),
                        tag, &v[q], kStageLlCounts, s))
                    stop = true;
                sbase[i] = static_cast<int>(static_cast<uint32_t>(v[q]));
            }
        }
        if (stop) s_stop_word() = 1;
        sync();
        if (gtid == 0) trace_here(a, 5);
        if (s_stop_word()) return;  // uniform over the group (read after its barrier)

        // First row of (source, expert) = rows of lower sources; outputs from CTA 0.
        auto* range = reinterpret_cast<int64_t*>(a.recv_range);
        for (int el = gtid; el < El; el += nthreads) {
            int run = 0;
            for (int s = 0; s < kRanks; ++s) {
                const int c = sbase[s * El + el];
                if (blockIdx.x == 0)
                    range[el * kRanks + s] =
                        (static_cast<int64_t>(c) << 32) | static_cast<uint32_t>(run);
                sbase[s * El + el] = run;
                run += c;
            }
            stot[el] = run;
            if (blockIdx.x == 0) reinterpret_cast<int32_t*>(a.recv_count)[el] = run;
        }
        if (blockIdx.x == 0 && gtid < kRanks)
            reinterpret_cast<int32_t*>(a.recv_ntok)[gtid] = sntok[gtid];
        if (gtid == 0) source_offsets<kRanks, 1>(env.me, sntok, tb.spoff);
        sync();

        auto* src_info = reinterpret_cast<int32_t*>(a.recv_src_info);
        for (int64_t i = static_cast<int64_t>(blockIdx.x) * nthreads + gtid;
             i < static_cast<int64_t>(El) * L; i += static_cast<int64_t>(nc) * nthreads) {
            const int el = static_cast<int>(i / L);
            if (static_cast<int>(i - static_cast<int64_t>(el) * L) >= stot[el]) src_info[i] = -1;
        }
        if (gtid == 0) trace_here(a, 6);
    }

    // The CTA's stop flag of the receive side (a timeout or abort while reading the counts).
    static __device__ __forceinline__ int& s_stop_word() {
        __shared__ int s_stop;
        return s_stop;
    }

    static __device__ __forceinline__ void recv(const LlArgs& a, const Env& env, uint8_t* smem) {
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
        const int El = static_cast<int>(a.num_local_experts);
        const int nmax = static_cast<int>(a.num_max_tokens);
        const int L = kRanks * nmax;
        const int nc = env.nc;
        const uint8_t* reg = env.my_region(a);
        const RecvTables tb = recv_tables_at(a, smem);
        const int* sbase = tb.sbase;
        const int* spoff = tb.spoff;
        // A fused op built the tables in its send phase (signal_sent's barrier publishes them);
        // a receive kernel builds them here with every thread.
        if constexpr (kPhase == kPhaseRecv) {
            recv_tables(a, env, tb, tid, kThreads, [] { __syncthreads(); });
        }
        if (s_stop_word()) return;

        auto* src_info = reinterpret_cast<int32_t*>(a.recv_src_info);
        // Items: one (source, token) each, this rank's own tokens first. The whole staged row is
        // copied with every load in flight.
        const auto* done = reinterpret_cast<const uint64_t*>(reg + a.r_done);
        auto* cmap = reinterpret_cast<int32_t*>(a.cmap);
        auto* recv_x = reinterpret_cast<uint8_t*>(a.recv_x);
        const int total = spoff[kRanks];
        int i_src = 0;
        for (int u = warp * nc + static_cast<int>(blockIdx.x); u < total; u += nc * kNumWarps) {
            while (spoff[i_src + 1] <= u) ++i_src;
            const int s = (env.me + i_src) % kRanks;
            const int t = u - spoff[i_src];
            // Chunk ch of the row was staged by source CTA (t * chunks + ch) % nc, the lane table
            // by CTA t % nc: lane ch waits for the former, lane `chunks` for the latter.
            const uint64_t* flags = done + static_cast<int64_t>(s) * nc;
            const uint64_t* mine = lane < kNumChunks    ? flags + (t * kNumChunks + lane) % nc
                                   : lane == kNumChunks ? flags + t % nc
                                                        : nullptr;
            if (!warp_wait_lanes(env, mine, env.epoch, kStageLlRows, s)) break;
            const int64_t slot_idx = static_cast<int64_t>(s) * a.buf_max_tokens + t;
            // One round of independent loads: the lane table, the row's first kU vectors per
            // lane and its scales (a token not routed here wastes them: ~10 % of the items).
            const uint8_t* src_row = reg + a.r_stage + slot_idx * a.row_bytes;
            int4 first[kU];
            load_round(src_row, 0, first, lane);
            uint32_t sf[kScaleRounds];
            if constexpr (kFp8) {
                const auto* src_sf = reinterpret_cast<const uint32_t*>(src_row + kDataBytes);
#pragma unroll
                for (int r = 0; r < kScaleRounds; ++r) {
                    const int q = r * 32 + lane;
                    sf[r] = q < kNumScales ? src_sf[q] : 0u;
                }
            }
            const int32_t m =
                lane < kTopk
                    ? reinterpret_cast<const int32_t*>(reg + a.r_meta)[slot_idx * kTopk + lane]
                    : -1;
            const bool valid = m >= 0;
            int el = 0, row = 0;
            if (valid) {
                el = m >> 16;
                row = sbase[s * El + el] + (m & 0xffff);
            }
            if (lane < kTopk) {
                cmap[(static_cast<int64_t>(s) * nmax + t) * kTopk + lane] =
                    valid ? el * L + row : -1;
                if (valid) src_info[static_cast<int64_t>(el) * L + row] = t;
            }
            const uint32_t vmask = __ballot_sync(kFull, valid);
            if (vmask == 0) continue;
            copy_row(src_row, first, recv_x, vmask, el, row, L, lane);
            if constexpr (kFp8) {
                auto* scales = reinterpret_cast<uint32_t*>(a.recv_scales);
#pragma unroll
                for (int r = 0; r < kScaleRounds; ++r) {
                    const int q = r * 32 + lane;
                    for (uint32_t mm = vmask; mm != 0; mm &= mm - 1) {
                        const int j = __ffs(mm) - 1;
                        const int tel = __shfl_sync(kFull, el, j);
                        const int trow = __shfl_sync(kFull, row, j);
                        if (q < kNumScales)
                            scales[(static_cast<int64_t>(tel) * kNumScales + q) * L + trow] = sf[r];
                    }
                }
            }
        }
        trace(a, 7);
    }

    // Vectors v0 + q * 32 + lane (q < kU) of a staged row's data (zero past its end).
    static __device__ __forceinline__ void load_round(const uint8_t* src, int v0, int4 (&buf)[kU],
                                                      int lane) {
#pragma unroll
        for (int q = 0; q < kU; ++q) {
            const int vi = v0 + q * 32 + lane;
            buf[q] = vi < kVec ? *reinterpret_cast<const int4*>(src + vi * 16) : make_int4(0, 0, 0, 0);
        }
    }

    // Copies a staged row's data to row (el, row) of every lane in `vmask`, 8 KiB per round with
    // all of the round's loads in flight; `first` holds the first round, already loaded.
    static __device__ __forceinline__ void copy_row(const uint8_t* src, const int4 (&first)[kU],
                                                    uint8_t* dst_base, uint32_t vmask, int el,
                                                    int row, int L, int lane) {
#pragma unroll
        for (int v0 = 0; v0 < kVec; v0 += 32 * kU) {
            int4 buf[kU];
            if (v0 == 0) {
#pragma unroll
                for (int q = 0; q < kU; ++q) buf[q] = first[q];
            } else {
                load_round(src, v0, buf, lane);
            }
            for (uint32_t mm = vmask; mm != 0; mm &= mm - 1) {
                const int j = __ffs(mm) - 1;
                const int tel = __shfl_sync(kFull, el, j);
                const int trow = __shfl_sync(kFull, row, j);
                uint8_t* dst = dst_base + (static_cast<int64_t>(tel) * L + trow) * kDataBytes;
#pragma unroll
                for (int q = 0; q < kU; ++q) {
                    const int vi = v0 + q * 32 + lane;
                    if (vi < kVec) *reinterpret_cast<int4*>(dst + vi * 16) = buf[q];
                }
            }
        }
    }

    static __device__ __forceinline__ void run(const LlArgs& a) {
        extern __shared__ __align__(128) uint8_t smem[];
        Env env;
        trace(a, 0);
        if (threadIdx.x == 0) s_stop_word() = 0;  // published by the prologue's barrier
        if (!prologue<kRanks, kKindDispatch, kPhase>(a, env)) return;
        trace(a, 1);
        if constexpr ((kPhase & kPhaseSend) != 0) {
            send(a, env, smem);
            store_epoch<kKindDispatch, kPhase>(a, env);
        }
        if constexpr ((kPhase & kPhaseRecv) != 0) {
            __syncthreads();
            recv(a, env, smem);
            end_receive<kRanks, kPhase>(a, env);
        }
        trace(a, 8);
    }
};

// ==============================================================================================
// Combine
// ==============================================================================================
template <int kRanks, int kTopk, int kHidden, int kNumWarps, int kPhase>
struct Combine {
    static constexpr int kThreads = kNumWarps * 32;
    static constexpr int kNumChunks = (kHidden + kChunk - 1) / kChunk;
    static constexpr int kU = 4;      // 8-channel vectors per lane and row in one round
    static constexpr int kGroup = 4;  // rows (expert lanes / destinations) loaded together
    static_assert(kRanks >= 1 && kRanks <= 32, "1..32 ranks");
    static_assert(kTopk >= 1 && kTopk <= 32, "top-k must fit a warp");
    static_assert(kHidden % 64 == 0, "hidden: multiple of 64");

    // acc = the float32 sum, over the set bits j of `bits` in increasing order, of term_j =
    // w_j * row_j (kWeighted; __fmul_rn) or row_j, for the lane's vectors v0 + q * 32 + lane
    // (q < kU, below nvec) of a chunk: the first term as it is, each later one added with
    // __fadd_rn. kGroup entries at a time with all of their loads in flight (read-only loads
    // when kReadOnly). entry(j, have, w) returns entry j's chunk base (nullptr: a zero row) and,
    // for weighted sums, sets w; it is called with have = false (and j = 0) for the unused slots
    // of the last group, uniformly over the warp, so it may shuffle.
    template <bool kWeighted, bool kReadOnly, typename Entry>
    static __device__ __forceinline__ void ordered_sum(uint32_t bits, int v0, int nvec, int lane,
                                                       Entry&& entry, float (&acc)[kU][8]) {
#pragma unroll
        for (int q = 0; q < kU; ++q)
#pragma unroll
            for (int h = 0; h < 8; ++h) acc[q][h] = 0.0f;
        bool first = true;
        for (uint32_t rest = bits; rest != 0;) {
            const int taken = min(__popc(rest), kGroup);  // uniform
            float w[kGroup];
            int4 v[kGroup][kU];
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                const bool have = g < taken;
                const int j = have ? __ffs(rest) - 1 : 0;
                rest = have ? rest & (rest - 1) : rest;
                const uint8_t* p = entry(j, have, w[g]);
#pragma unroll
                for (int q = 0; q < kU; ++q) {
                    const int vi = v0 + q * 32 + lane;
                    v[g][q] = make_int4(0, 0, 0, 0);
                    if (p != nullptr && vi < nvec) {
                        const auto* src = reinterpret_cast<const int4*>(p + vi * 16);
                        v[g][q] = kReadOnly ? __ldg(src) : *src;
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                if (g >= taken) break;
#pragma unroll
                for (int q = 0; q < kU; ++q) {
                    float f[8];
                    unpack8(v[g][q], f, 0);
#pragma unroll
                    for (int h = 0; h < 8; ++h) {
                        const float term = kWeighted ? __fmul_rn(w[g], f[h]) : f[h];
                        acc[q][h] = first ? term : __fadd_rn(acc[q][h], term);
                    }
                }
                first = false;
            }
        }
    }

    // The lane's vectors of `acc` as bf16 (round to nearest even) at dst + vi * 16.
    static __device__ __forceinline__ void store_bf16(uint8_t* dst, int v0, int nvec, int lane,
                                                      const float (&acc)[kU][8]) {
#pragma unroll
        for (int q = 0; q < kU; ++q) {
            const int vi = v0 + q * 32 + lane;
            if (vi < nvec)
                *reinterpret_cast<int4*>(dst + vi * 16) =
                    make_int4(static_cast<int>(pack_bf16x2(acc[q][0], acc[q][1])),
                              static_cast<int>(pack_bf16x2(acc[q][2], acc[q][3])),
                              static_cast<int>(pack_bf16x2(acc[q][4], acc[q][5])),
                              static_cast<int>(pack_bf16x2(acc[q][6], acc[q][7])));
        }
    }

    // Source: weights and per-destination lane masks of every token, at every rank.
    static __device__ __forceinline__ void send_weights(const LlArgs& a, const Env& env) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int T = static_cast<int>(a.num_tokens);
        const int E = static_cast<int>(a.num_experts);
        const int El = static_cast<int>(a.num_local_experts);
        const int nc = env.nc;
        const auto* topk = reinterpret_cast<const int64_t*>(a.topk_idx);
        const auto* weights = reinterpret_cast<const float*>(a.topk_weights);
        const bool ok = warp_gate<kRanks>(a, env);
        // This op's signature, at every rank (where a dispatch writes its token count).
        if (ok && blockIdx.x == 0 && warp == 0 && lane < kRanks)
            st_relaxed_sys(reinterpret_cast<uint64_t*>(env.region(a, lane) + a.r_ntok) + env.me,
                           tagged(env.epoch, static_cast<uint32_t>(a.signature) << 16));
        // A refresh op (kTagRefreshPeriod) also gives its tag to the weight words of the lanes
        // not routed to a rank.
        const bool refresh = tag_refresh_epoch(env.epoch);
        const int gw = warp * nc + static_cast<int>(blockIdx.x);
        for (int t = gw; ok && t < T; t += nc * kNumWarps) {
            const int64_t e =
                lane < kTopk ? __ldg(topk + static_cast<int64_t>(t) * kTopk + lane) : -1;
            const float w =
                lane < kTopk ? __ldg(weights + static_cast<int64_t>(t) * kTopk + lane) : 0.0f;
            const int d = (e >= 0 && e < E) ? static_cast<int>(e) / El : -1;
            const int64_t slot_idx = static_cast<int64_t>(env.me) * a.buf_max_tokens + t;
#pragma unroll 4
            for (int r = 0; r < kRanks; ++r) {
                const uint32_t m = __ballot_sync(kFull, d == r);
                uint8_t* reg = env.region(a, r);
                if (lane == 0)
                    st_relaxed_sys(reinterpret_cast<uint64_t*>(reg + a.r_cmask) + slot_idx,
                                   tagged(env.epoch, m));
                if (d == r || (refresh && lane < kTopk))
                    st_relaxed_sys(
                        reinterpret_cast<uint64_t*>(reg + a.r_cw) + slot_idx * a.buf_topk + lane,
                        tagged(env.epoch, __float_as_uint(w)));
            }
        }
        if (ok && refresh) refresh_words<kRanks, kTopk, kKindCombine>(a, env, gw, nc * kNumWarps);
        trace(a, 2);
    }

    // Destination: partial sums of every (source, token, chunk) with lanes here, to the source.
    static __device__ __forceinline__ void send_partials(const LlArgs& a, const Env& env,
                                                         uint8_t* smem) {
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
        const int nc = env.nc;
        const int nmax = static_cast<int>(a.num_max_tokens);
        const uint8_t* reg = env.my_region(a);
        int* spoff = reinterpret_cast<int*>(smem + kNumWarps * 2 * kSlotBytes);
        int* sntok = spoff + kRanks + 1;
        if (tid < kRanks) sntok[tid] = reinterpret_cast<const int32_t*>(a.recv_ntok)[tid];
        // CTA 0: every source is in a combine with this rank's signature (its send_weights wrote
        // it); else recorded, and every wait of every CTA sees the abort. The other CTAs do not
        // wait for it (their items wait for the sources' masks anyway).
        if (blockIdx.x == 0 && tid < kRanks && tid != env.me) {
            const auto* word = reinterpret_cast<const uint64_t*>(env.my_region(a) + a.r_ntok) + tid;
            uint64_t v = 0;
            if (wait_tag(env.ctx, word, static_cast<uint32_t>(env.epoch), &v, kStageLlWeights, tid))
                signature_agrees(a, env, tid, static_cast<uint32_t>(v), kStageLlWeights);
        }
        __syncthreads();
        if (tid == 0) source_offsets<kRanks, kNumChunks>(env.me, sntok, spoff);
        __syncthreads();

        const auto* masks = reinterpret_cast<const uint64_t*>(reg + a.r_cmask);
        const auto* cws = reinterpret_cast<const uint64_t*>(reg + a.r_cw);
        const uint32_t tag = static_cast<uint32_t>(env.epoch);
        const auto* cmap = reinterpret_cast<const int32_t*>(a.cmap);
        const auto* y = reinterpret_cast<const uint8_t*>(a.x);
        uint8_t* ring = smem + warp * 2 * kSlotBytes;
        const int total = spoff[kRanks];
        int i_src = 0, nitem = 0;
        for (int u = warp * nc + static_cast<int>(blockIdx.x); u < total; u += nc * kNumWarps) {
            while (spoff[i_src + 1] <= u) ++i_src;
            const int s = (env.me + i_src) % kRanks;
            const int rem = u - spoff[i_src];
            const int t = rem / kNumChunks, ch = rem - t * kNumChunks;
            // One round of independent loads: the lane mask, and per lane its weight and row; a
            // word whose tag is not this op's yet is waited for (the weight only of a lane here).
            const int64_t slot_idx = static_cast<int64_t>(s) * a.buf_max_tokens + t;
            const uint64_t* wword = lane < kTopk ? cws + slot_idx * a.buf_topk + lane : nullptr;
            uint64_t mv = ld_relaxed_sys(masks + slot_idx);
            uint64_t wv = wword != nullptr ? ld_relaxed_sys(wword) : 0;
            const int row_lane =
                lane < kTopk ? cmap[(static_cast<int64_t>(s) * nmax + t) * kTopk + lane] : -1;
            bool got = static_cast<uint32_t>(mv >> 32) == tag ||
                       wait_tag(env.ctx, masks + slot_idx, tag, &mv, kStageLlWeights, s);
            const uint32_t mask = static_cast<uint32_t>(mv);
            if (got && ((mask >> lane) & 1u) != 0 && static_cast<uint32_t>(wv >> 32) != tag)
                got = wait_tag(env.ctx, wword, tag, &wv, kStageLlWeights, s);
            if (!__all_sync(kFull, got)) break;
            const float w_lane = __uint_as_float(static_cast<uint32_t>(wv));
            if (nitem == 0) trace(a, 9);
            if (mask == 0) continue;
            uint8_t* slot = ring + (nitem & 1) * kSlotBytes;
            if (nitem >= 2 && lane == 0) tma_wait_read<1>();
            __syncwarp();
            const int c0 = ch * kChunk, c1 = min(kHidden, c0 + kChunk);
            const int nvec = (c1 - c0) / 8;
            // Lanes of the token in increasing order; a lane that dispatch did not route here
            // reads as a zero row.
            const uint8_t* yc = y + static_cast<int64_t>(c0) * 2;
            auto lane_row = [&](int j, bool have, float& w) -> const uint8_t* {
                w = __shfl_sync(kFull, w_lane, j);
                const int row = have ? __shfl_sync(kFull, row_lane, j) : -1;
                return row >= 0 ? yc + static_cast<int64_t>(row) * kHidden * 2 : nullptr;
            };
            for (int v0 = 0; v0 < nvec; v0 += 32 * kU) {
                float acc[kU][8];
                ordered_sum<true, true>(mask, v0, nvec, lane, lane_row, acc);
                store_bf16(slot, v0, nvec, lane, acc);
            }
            fence_proxy_async_smem();
            __syncwarp();
            if (lane == 0) {
                uint8_t* dst = env.region(a, s) + a.r_stage +
                               (static_cast<int64_t>(env.me) * a.buf_max_tokens + t) * a.row_bytes +
                               c0 * 2;
                tma_store(dst, slot, static_cast<uint32_t>((c1 - c0) * 2));
                tma_commit();
            }
            ++nitem;
        }
        trace(a, 3);
        signal_sent<kRanks>(a, env, a.r_done);
        trace(a, 4);
    }

    // Source: out[t] = bf16(sum over destinations d of t, increasing d, of float(p_d(t))).
    static __device__ __forceinline__ void reduce(const LlArgs& a, const Env& env, uint8_t* smem) {
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
        const int T = static_cast<int>(a.num_tokens);
        const int E = static_cast<int>(a.num_experts);
        const int El = static_cast<int>(a.num_local_experts);
        const int nc = env.nc;
        const uint8_t* reg = env.my_region(a);
        const auto* topk = reinterpret_cast<const int64_t*>(a.topk_idx);
        const auto* done = reinterpret_cast<const uint64_t*>(reg + a.r_done);
        auto* out = reinterpret_cast<uint8_t*>(a.out);
        // Destination d numbers its partial items in its rotated source order (see
        // send_partials); sfirst[d] is the number of d's items before this rank's tokens, so the
        // item (t, chunk) of this rank was made by d's CTA (sfirst[d] + t * chunks + chunk) % nc.
        int* sfirst = reinterpret_cast<int*>(smem + kNumWarps * 2 * kSlotBytes);
        __syncthreads();
        if (tid < kRanks) {
            const auto* ntok = reinterpret_cast<const int32_t*>(a.recv_ntok);
            int acc = 0;
            for (int i = 0; i < (env.me - tid + kRanks) % kRanks; ++i)
                acc += ntok[(tid + i) % kRanks] * kNumChunks;
            sfirst[tid] = acc;
        }
        __syncthreads();
        trace(a, 5);
        for (int u = warp * nc + static_cast<int>(blockIdx.x); u < T * kNumChunks;
             u += nc * kNumWarps) {
            const int t = u / kNumChunks, ch = u - t * kNumChunks;
            const int64_t e =
                lane < kTopk ? __ldg(topk + static_cast<int64_t>(t) * kTopk + lane) : -1;
            const bool valid = e >= 0 && e < E;
            const uint32_t dmask =
                __reduce_or_sync(kFull, valid ? (1u << (static_cast<int>(e) / El)) : 0u);
            // Lane i waits for the i-th destination of the token.
            const uint64_t* flag = nullptr;
            int peer = -1;
            if (lane < __popc(dmask)) {
                uint32_t mm = dmask;
                for (int i = 0; i < lane; ++i) mm &= mm - 1;
                peer = __ffs(mm) - 1;
                flag = done + static_cast<int64_t>(peer) * nc +
                       (sfirst[peer] + t * kNumChunks + ch) % nc;
            }
            if (!warp_wait_lanes(env, flag, env.epoch, kStageLlPartials, peer)) break;
            const int c0 = ch * kChunk, c1 = min(kHidden, c0 + kChunk);
            const int nvec = (c1 - c0) / 8;
            // Destinations in increasing order; a token with no valid lane gives +0.
            const uint8_t* parts = reg + a.r_stage + static_cast<int64_t>(t) * a.row_bytes + c0 * 2;
            auto partial = [&](int d, bool have, float&) -> const uint8_t* {
                return have ? parts + static_cast<int64_t>(d) * a.buf_max_tokens * a.row_bytes
                            : nullptr;
            };
            uint8_t* dst = out + (static_cast<int64_t>(t) * kHidden + c0) * 2;
            for (int v0 = 0; v0 < nvec; v0 += 32 * kU) {
                float acc[kU][8];
                ordered_sum<false, false>(dmask, v0, nvec, lane, partial, acc);
                store_bf16(dst, v0, nvec, lane, acc);
            }
        }
    }

    static __device__ __forceinline__ void run(const LlArgs& a) {
        extern __shared__ __align__(128) uint8_t smem[];
        Env env;
        trace(a, 0);
        if (!prologue<kRanks, kKindCombine, kPhase>(a, env)) return;
        trace(a, 1);
        if constexpr ((kPhase & kPhaseSend) != 0) {
            send_weights(a, env);
            send_partials(a, env, smem);
            store_epoch<kKindCombine, kPhase>(a, env);
        }
        if constexpr ((kPhase & kPhaseRecv) != 0) {
            reduce(a, env, smem);
            trace(a, 7);
            end_receive<kRanks, kPhase>(a, env);
        }
        trace(a, 8);
    }
};

}  // namespace ll

// Entry points for the JIT's generated wrappers (one instantiation per shape).
// kPhase: 1 = send only, 2 = receive only (the hook), 3 = both.
template <int kRanks, int kTopk, int kHidden, int kNumWarps, bool kFp8, bool kRoundScale,
          bool kUe8m0, int kPhase>
__device__ __forceinline__ void ll_dispatch(const LlArgs& args) {
    ll::Dispatch<kRanks, kTopk, kHidden, kNumWarps, kFp8, kRoundScale, kUe8m0, kPhase>::run(args);
}

template <int kRanks, int kTopk, int kHidden, int kNumWarps, int kPhase>
__device__ __forceinline__ void ll_combine(const LlArgs& args) {
    ll::Combine<kRanks, kTopk, kHidden, kNumWarps, kPhase>::run(args);
}

}  // namespace ep_core
