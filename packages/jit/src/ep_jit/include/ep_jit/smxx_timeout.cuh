// Timeout-checked spin waits that report a stuck peer to the host instead of hanging.
//
// The one timeout system of every package's kernels. The host (ep_jit.DeviceWatchdog) allocates
// one ErrorRecord in pinned, device-mapped host memory, so it stays readable after the context
// dies. The abort word lives in device memory (atomics on host memory are not atomic over
// PCIe): the kernels' own (a DeviceWatchdog's, or a word of the caller's buffer). A wait that
// exceeds the timeout claims the abort word with a CAS (the first failure wins) and fills in the
// stage, the peer and the values; from then on every wait of every CTA that shares the word
// sees `aborted()` and unwinds, so one stuck peer stops the whole grid instead of each CTA
// waiting out its own timeout. The word stays set until the host resets it. A wait either
// returns false (the kernel unwinds) or traps (the context dies, the host sees a launch failure
// and reads the record). DeviceWatchdog.check() turns the record into a JitTimeoutError naming
// the stage and the peer. Times come from the GPU's nanosecond timer (%globaltimer).
//
// A rank may also give up on an op from the host (it rejected its input, so its kernels will
// never take part): it writes kAbortByRank + its rank into the abort words of its peers
// (ep_jit.signal_abort). Their kernels unwind as after a timeout, and the first thread that sees
// such a value records kErrorPeerAbort naming that rank, so the host raises instead of waiting.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>

namespace ep_jit {

enum ErrorCode : int32_t {
  kErrorNone = 0,
  kErrorTimeout = 1,
  kErrorPeerAbort = 2,  // a rank gave up on the op: `peer` names it
};

// Abort word values: 0 none; 1 a kernel sharing the word recorded a failure; kAbortByRank + r:
// rank r gave up on the op from its host. Shared with ep_jit/watchdog.py.
constexpr uint32_t kAbortByRank = 0x10000u;

// Layout shared with ep_jit/watchdog.py (eight 64-bit words).
struct ErrorRecord {
  int32_t code;   // ErrorCode; 0 while no failure was recorded
  int32_t stage;  // caller-defined stage id, named on the host
  int32_t peer;   // rank waited for, -1 if none
  int32_t rank;   // rank of the waiting kernel
  int32_t block;
  int32_t thread;
  int64_t observed;
  int64_t expected;
  int64_t reserved[3];
};
static_assert(sizeof(ErrorRecord) == 64, "ErrorRecord layout is shared with Python");

// Passed to kernels by value, or built inside them; layout shared with ep_jit/watchdog.py.
struct WaitContext {
  ErrorRecord* record;  // host-mapped; nullptr: no record (waits still honour the abort word)
  uint32_t* abort;      // device memory, zero until a failure is recorded; never null
  uint64_t timeout_ns;  // 0: wait forever
  int32_t rank;
  int32_t reserved;
};
static_assert(sizeof(WaitContext) == 32, "WaitContext layout is shared with Python");

// Records that rank `word - kAbortByRank` gave up on the op, unless a failure is recorded
// already. Threads that see the abort at once write the same values, so no claim is needed.
__device__ __noinline__ void note_peer_abort(ErrorRecord* record, int32_t rank, uint32_t word) {
  if (record == nullptr || ld_volatile(reinterpret_cast<const uint32_t*>(&record->code)) != 0)
    return;
  record->stage = -1;
  record->peer = static_cast<int32_t>(word - kAbortByRank);
  record->rank = rank;
  record->block = static_cast<int32_t>(blockIdx.x);
  record->thread = static_cast<int32_t>(threadIdx.x);
  record->observed = word;
  record->expected = 0;
  __threadfence_system();
  st_release_sys(&record->code, static_cast<int32_t>(kErrorPeerAbort));
}

// Whether the op was aborted: a thread sharing the abort word recorded a failure, or a rank gave
// up on the op (then recorded here, see note_peer_abort). Lets every wait bail out.
__device__ __forceinline__ bool aborted(const WaitContext& ctx) {
  const uint32_t word = ld_volatile(ctx.abort);
  if (word == 0) return false;
  if (word >= kAbortByRank) note_peer_abort(ctx.record, ctx.rank, word);
  return true;
}

__device__ __forceinline__ bool timed_out(const WaitContext& ctx, uint64_t start) {
  return ctx.timeout_ns != 0 && globaltimer_ns() - start > ctx.timeout_ns;
}

// Out of line, with plain values: the record's stores would otherwise swell every inlined
// wait, and a reference parameter of a non-inlined function would force a local-memory copy.
__device__ __noinline__ void record_error_at(ErrorRecord* record, uint32_t* abort, int32_t rank,
                                             int32_t code, int32_t stage, int32_t peer,
                                             int64_t observed, int64_t expected) {
  if (atomicCAS(abort, 0u, 1u) == 0u && record != nullptr) {
    record->stage = stage;
    record->peer = peer;
    record->rank = rank;
    record->block = static_cast<int32_t>(blockIdx.x);
    record->thread = static_cast<int32_t>(threadIdx.x);
    record->observed = observed;
    record->expected = expected;
    __threadfence_system();
    st_release_sys(&record->code, code);
  }
}

__device__ __forceinline__ void record_error(const WaitContext& ctx, int32_t code, int32_t stage,
                                             int32_t peer, int64_t observed, int64_t expected) {
  record_error_at(ctx.record, ctx.abort, ctx.rank, code, stage, peer, observed, expected);
}

// Spins until ld_acquire_sys(flag) - expected >= 0 (wrap-safe, for monotonic counters).
// Returns false after a timeout (recorded) or an abort; traps instead when kTrap.
template <bool kTrap = false>
__device__ __forceinline__ bool wait_ge(const uint32_t* flag, uint32_t expected,
                                        const WaitContext& ctx, int32_t stage, int32_t peer) {
  uint32_t seen = ld_acquire_sys(flag);
  if (static_cast<int32_t>(seen - expected) >= 0) return true;
  const uint64_t start = globaltimer_ns();
  while (static_cast<int32_t>(seen - expected) < 0) {
    if (aborted(ctx)) return false;
    if (timed_out(ctx, start)) {
      record_error(ctx, kErrorTimeout, stage, peer, seen, expected);
      if constexpr (kTrap) {
        asm volatile("trap;");
      }
      return false;
    }
    seen = ld_acquire_sys(flag);
  }
  return true;
}

// Spins until pred() is true; same timeout and abort behaviour as wait_ge.
template <bool kTrap = false, typename Pred>
__device__ __forceinline__ bool wait_until(Pred pred, const WaitContext& ctx, int32_t stage,
                                           int32_t peer, int64_t expected = 0) {
  if (pred()) return true;
  const uint64_t start = globaltimer_ns();
  while (!pred()) {
    if (aborted(ctx)) return false;
    if (timed_out(ctx, start)) {
      record_error(ctx, kErrorTimeout, stage, peer, 0, expected);
      if constexpr (kTrap) {
        asm volatile("trap;");
      }
      return false;
    }
  }
  return true;
}

// Waits until done(*p) for a 64-bit word. The first read is the acquire itself (one round trip
// when the word is already there); while it is not, polls with relaxed loads (cheap for the
// memory system), checks the abort word and the clock every 64 polls, and acquires once at the
// end, into `v`. Returns false on timeout (recorded) or abort.
template <typename Done>
__device__ __forceinline__ bool spin_acquire(const WaitContext& ctx, const uint64_t* p, Done done,
                                             uint64_t& v, int stage, int peer) {
  v = ld_acquire_sys(p);
  if (done(v)) return true;
  const uint64_t start = globaltimer_ns();
  uint32_t polls = 0;
  while (!done(ld_relaxed_sys(p))) {
    if ((++polls & 63u) == 0) {
      if (aborted(ctx)) return false;
      if (timed_out(ctx, start)) {
        record_error(ctx, kErrorTimeout, stage, peer, static_cast<int64_t>(ld_relaxed_sys(p)), 0);
        return false;
      }
    }
    __nanosleep(32);
  }
  v = ld_acquire_sys(p);
  return true;
}

// Spin until `*p >= target` (monotonic 64-bit counter).
__device__ __forceinline__ bool wait_geq(const WaitContext& ctx, const uint64_t* p,
                                         uint64_t target, int stage, int peer) {
  uint64_t v = 0;
  return spin_acquire(ctx, p, [target](uint64_t x) { return x >= target; }, v, stage, peer);
}

// Wait for a TMA load into shared memory (an mbarrier phase), with the same discipline.
__device__ __forceinline__ bool wait_mbar(const WaitContext& ctx, uint64_t* bar, uint32_t parity,
                                          int stage) {
  const uint64_t start = globaltimer_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (timed_out(ctx, start)) {
      record_error(ctx, kErrorTimeout, stage, -1, 0, parity);
      return false;
    }
  }
  return true;
}

}  // namespace ep_jit
