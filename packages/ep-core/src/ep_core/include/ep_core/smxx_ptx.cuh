// Small PTX wrappers shared by the EP kernels: system-scope acquire/release, TMA bulk copies,
// mbarriers, and a timed spin-wait that turns a stuck peer into a reported error.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>

namespace ep_core {

// System-scope acquire loads and release stores come from ep-jit (shared by every package).
using ep_jit::ld_acquire_sys;
using ep_jit::fence_acq_rel_sys;
using ep_jit::st_release_sys;

__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_relaxed_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Adds without returning the old value, with release semantics at system scope.
__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Adds without returning the old value, relaxed (after a release fence: a release pattern).
__device__ __forceinline__ void red_add_relaxed_sys(uint64_t* p, uint64_t v) {
    asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_volatile(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Barrier `id` (1..15; 0 is __syncthreads's) of `threads` threads, whole warps that all call it
// with the same id and count: a subset of the CTA's warps synchronises without the others.
__device__ __forceinline__ void named_barrier(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Makes this thread's generic stores to shared memory visible to later TMA reads of it.
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Orders generic-proxy accesses (flags, plain loads/stores) with async-proxy (TMA) accesses.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier + TMA bulk copies -------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
}

__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t ok;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(ok)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return ok != 0;
}

// Global -> shared bulk copy completing on `bar` (bytes: multiple of 16, 16-byte aligned).
__device__ __forceinline__ void tma_load(void* smem, const void* gmem, uint32_t bytes,
                                         uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_addr(smem)),
        "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

// Shared -> global bulk copy (the destination may be a peer GPU's mapped memory).
__device__ __forceinline__ void tma_store(void* gmem, const void* smem, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem),
                 "r"(smem_addr(smem)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void tma_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until at most N bulk groups still read shared memory (the slot may then be reused).
template <int N>
__device__ __forceinline__ void tma_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Wait until at most `n` (0..8) of this thread's most recent bulk groups are still in flight
// (writes included): the older groups' writes are complete.
__device__ __forceinline__ void tma_wait_group_dyn(int n) {
    switch (n) {
        case 0: asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); break;
        case 1: asm volatile("cp.async.bulk.wait_group 1;" ::: "memory"); break;
        case 2: asm volatile("cp.async.bulk.wait_group 2;" ::: "memory"); break;
        case 3: asm volatile("cp.async.bulk.wait_group 3;" ::: "memory"); break;
        case 4: asm volatile("cp.async.bulk.wait_group 4;" ::: "memory"); break;
        case 5: asm volatile("cp.async.bulk.wait_group 5;" ::: "memory"); break;
        case 6: asm volatile("cp.async.bulk.wait_group 6;" ::: "memory"); break;
        case 7: asm volatile("cp.async.bulk.wait_group 7;" ::: "memory"); break;
        default: asm volatile("cp.async.bulk.wait_group 8;" ::: "memory"); break;
    }
}

// Wait until every bulk group of this thread has fully completed its writes.
__device__ __forceinline__ void tma_wait_all() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// ---- timed waits ----------------------------------------------------------------------------

// Error record written into host-mapped memory when a wait times out; read by Python.
struct ErrorRecord {
    int32_t code;   // 0 = none, 1 = timeout
    int32_t stage;  // which wait (see the kernel's stage ids)
    int32_t peer;   // the rank waited for, -1 if none
    int32_t rank;   // this rank
};

// Shared state every timed wait of one launch looks at.
struct WaitContext {
    ErrorRecord* error;      // host-mapped, may be null
    uint32_t* abort_flag;    // device memory local to this GPU
    int64_t timeout_cycles;  // <= 0: wait forever
    int32_t rank;
};

__device__ __forceinline__ bool aborted(const WaitContext& ctx) {
    return ld_volatile(ctx.abort_flag) != 0;
}

__device__ __noinline__ void report_timeout_impl(ErrorRecord* error, uint32_t* abort_flag,
                                                int rank, int stage, int peer) {
    if (error != nullptr && atomicCAS(&error->code, 0, 1) == 0) {
        error->stage = stage;
        error->peer = peer;
        error->rank = rank;
        __threadfence_system();
    }
    atomicExch(abort_flag, 1u);
}

__device__ __forceinline__ void report_timeout(const WaitContext& ctx, int stage, int peer) {
    report_timeout_impl(ctx.error, ctx.abort_flag, ctx.rank, stage, peer);
}

// Waits until done(*p). The first read is the acquire itself (one round trip when the word is
// already there); while it is not, polls with relaxed loads (cheap for the memory system) and
// acquires once at the end, into `v`. Returns false on timeout or abort.
template <typename Done>
__device__ __forceinline__ bool spin_acquire(const WaitContext& ctx, const uint64_t* p, Done done,
                                             uint64_t& v, int stage, int peer) {
    v = ld_acquire_sys(p);
    if (done(v)) return true;
    const int64_t start = clock64();
    uint32_t polls = 0;
    while (!done(ld_relaxed_sys(p))) {
        if ((++polls & 63u) == 0) {
            if (aborted(ctx)) return false;
            if (ctx.timeout_cycles > 0 && clock64() - start > ctx.timeout_cycles) {
                report_timeout(ctx, stage, peer);
                return false;
            }
        }
        __nanosleep(32);
    }
    v = ld_acquire_sys(p);
    return true;
}

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

// Spin until `*p >= target` (monotonic 64-bit counter).
__device__ __forceinline__ bool wait_geq(const WaitContext& ctx, const uint64_t* p,
                                         uint64_t target, int stage, int peer) {
    uint64_t v = 0;
    return spin_acquire(ctx, p, [target](uint64_t x) { return x >= target; }, v, stage, peer);
}

// Wait for a TMA load into shared memory, with the same timeout discipline.
__device__ __forceinline__ bool wait_mbar(const WaitContext& ctx, uint64_t* bar, uint32_t parity,
                                          int stage) {
    const int64_t start = clock64();
    while (!mbar_try_wait(bar, parity)) {
        if (ctx.timeout_cycles > 0 && clock64() - start > ctx.timeout_cycles) {
            report_timeout(ctx, stage, -1);
            return false;
        }
    }
    return true;
}

}  // namespace ep_core
