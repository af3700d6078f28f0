// Monotonic epoch/tag signalling over peer-mapped memory.
//
// A signal word is 64 bits: the high 32 bits carry the tag (the low 32 bits of the epoch of the
// op that wrote it), the low 32 bits a payload. A reader waits until the word carries its op's
// tag, so words never need a reset pass between ops; the refresh rule below keeps a word that
// no op rewrote for 2^32 ops from reading as current.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>
#include <ep_jit/smxx_timeout.cuh>

namespace ep_jit {

// Spin until `(*p >> 32) == tag` (epoch-tagged 64-bit word).
__device__ __forceinline__ bool wait_tag(const WaitContext& ctx, const uint64_t* p, uint32_t tag,
                                         uint64_t* value, int stage, int peer) {
    uint64_t v = 0;
    if (!spin_acquire(
            ctx, p, [tag](uint64_t x) { return static_cast<uint32_t>(x >> 32) == tag; }, v, stage,
            peer))
        return false;
    if (value != nullptr) *value = v;
    return true;
}

// The whole warp waits for one tagged word: lane 0 waits and acquires it, then __syncwarp
// orders every lane's later reads after that acquire (a barrier carries it to the other lanes,
// as a CTA barrier after one thread's acquire does). Returns false (in every lane) on failure.
__device__ __forceinline__ bool warp_wait_tag(const WaitContext& ctx, const uint64_t* p,
                                              uint32_t tag, uint64_t* value, int stage, int peer) {
    bool ok = true;
    uint64_t v = 0;
    if ((threadIdx.x & 31) == 0) ok = wait_tag(ctx, p, tag, &v, stage, peer);
    __syncwarp();
    ok = __shfl_sync(0xffffffffu, ok ? 1 : 0, 0) != 0;
    if (value != nullptr) *value = __shfl_sync(0xffffffffu, v, 0);
    return ok;
}

// Tags are the low 32 bits of the epoch, so a tagged word that no op rewrote for a multiple of
// 2^32 ops would read as current. Every word a reader may wait on for its tag is therefore
// rewritten (with the current tag) at least once per kTagRefreshPeriod ops: words a reader
// needs in every op are rewritten by every op, and the others (slots past the current token or
// chunk count, words of the other op kind) by the op whose epoch is 0 or 1 modulo the period,
// one op per region. Epochs are consecutive, so no slot is ever older than the period plus two.
constexpr uint64_t kTagRefreshPeriod = 1ull << 30;

__device__ __forceinline__ bool tag_refresh_epoch(uint64_t epoch) {
    return (epoch & (kTagRefreshPeriod - 1)) < 2;
}

// words[i] = (tag << 32) for i in [from, to), by warp gw of nw warps sharing the range (one
// warp: 0 of 1). System-scope relaxed stores: no reader of this op looks at these words, they
// only must not keep an old tag.
__device__ __forceinline__ void refresh_tags(uint64_t* words, int64_t from, int64_t to,
                                             uint32_t tag, int gw = 0, int nw = 1) {
    const int64_t step = static_cast<int64_t>(nw) * 32;
    for (int64_t i = from + static_cast<int64_t>(gw) * 32 + (threadIdx.x & 31); i < to; i += step)
        st_relaxed_sys(words + i, static_cast<uint64_t>(tag) << 32);
}

}  // namespace ep_jit
