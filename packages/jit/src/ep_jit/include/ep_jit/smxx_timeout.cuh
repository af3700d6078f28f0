// Timeout-checked spin waits that report a stuck peer to the host instead of hanging.
//
// The host (ep_jit.DeviceWatchdog) allocates one ErrorRecord in pinned, device-mapped host
// memory, so it stays readable after the context dies, and one claim word in device memory
// (atomics on host memory are not atomic over PCIe). A wait that exceeds the timeout claims the
// word with a CAS (the first failure wins), fills in the stage, the peer and the values,
// then either returns false (the kernel unwinds) or traps (the context dies, the host sees a
// launch failure and reads the record). DeviceWatchdog.check() turns the record into a
// JitTimeoutError naming the stage and the peer.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>

namespace ep_jit {

enum ErrorCode : int32_t {
  kErrorNone = 0,
  kErrorTimeout = 1,
};

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

// Passed to kernels by value; layout shared with ep_jit/watchdog.py (32 bytes).
struct WaitContext {
  ErrorRecord* record;  // host-mapped; nullptr: waits never time out
  int32_t* claim;       // device memory, zero until a failure is recorded
  uint64_t timeout_ns;
  int32_t rank;
  int32_t reserved;
};
static_assert(sizeof(WaitContext) == 32, "WaitContext layout is shared with Python");

__device__ __forceinline__ void record_error(const WaitContext& ctx, int32_t code, int32_t stage,
                                             int32_t peer, int64_t observed, int64_t expected) {
  if (ctx.record == nullptr) return;
  if (atomicCAS(ctx.claim, 0, 1) == 0) {
    ctx.record->stage = stage;
    ctx.record->peer = peer;
    ctx.record->rank = ctx.rank;
    ctx.record->block = static_cast<int32_t>(blockIdx.x);
    ctx.record->thread = static_cast<int32_t>(threadIdx.x);
    ctx.record->observed = observed;
    ctx.record->expected = expected;
    __threadfence_system();
    st_release_sys(&ctx.record->code, code);
  }
}

// Spins until ld_acquire_sys(flag) - expected >= 0 (wrap-safe, for monotonic counters).
// Returns false after recording a timeout; traps instead when kTrap.
template <bool kTrap = false>
__device__ __forceinline__ bool wait_ge(const uint32_t* flag, uint32_t expected,
                                        const WaitContext& ctx, int32_t stage, int32_t peer) {
  uint32_t seen = ld_acquire_sys(flag);
  if (static_cast<int32_t>(seen - expected) >= 0) return true;
  const uint64_t start = globaltimer_ns();
  while (static_cast<int32_t>(seen - expected) < 0) {
    if (ctx.record != nullptr && globaltimer_ns() - start > ctx.timeout_ns) {
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

// Spins until pred() is true; same timeout behaviour as wait_ge. `observed` is reported.
template <bool kTrap = false, typename Pred>
__device__ __forceinline__ bool wait_until(Pred pred, const WaitContext& ctx, int32_t stage,
                                           int32_t peer, int64_t expected = 0) {
  if (pred()) return true;
  const uint64_t start = globaltimer_ns();
  while (!pred()) {
    if (ctx.record != nullptr && globaltimer_ns() - start > ctx.timeout_ns) {
      record_error(ctx, kErrorTimeout, stage, peer, 0, expected);
      if constexpr (kTrap) {
        asm volatile("trap;");
      }
      return false;
    }
  }
  return true;
}

// Whether any thread of the grid already recorded a failure (lets other waits bail out early).
__device__ __forceinline__ bool failed(const WaitContext& ctx) {
  return ctx.record != nullptr && ld_relaxed_sys(reinterpret_cast<uint32_t*>(ctx.claim)) != 0;
}

}  // namespace ep_jit
