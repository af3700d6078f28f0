// A GPU barrier across the ranks of a symmetric buffer, over NVLink-mapped signal words.
//
// Each rank's signal region holds kNumRanks arrival counters (one per source rank) followed by
// a local epoch. A barrier adds 1 to its slot in every peer's region (release, system scope)
// and waits until every peer's slot in its own region reaches epoch + 1 (acquire). Counters
// only grow, so no reset pass is needed and back-to-back barriers cannot be confused.
// Launch with one block of at least kNumRanks threads; waits are timeout-checked.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>
#include <ep_jit/smxx_timeout.cuh>

namespace ep_jit {

template <int kNumRanks, bool kTrap>
__device__ __forceinline__ void barrier_kernel(const uint64_t* __restrict__ buffer_ptrs,
                                               int64_t signal_offset, int rank, WaitContext ctx,
                                               int stage) {
  static_assert(kNumRanks >= 1 && kNumRanks <= 1024, "one thread per rank");
  __shared__ uint32_t target;
  uint32_t* mine = reinterpret_cast<uint32_t*>(buffer_ptrs[rank] + signal_offset);
  if (threadIdx.x == 0) target = mine[kNumRanks] + 1;
  __syncthreads();
  const int peer = static_cast<int>(threadIdx.x);
  if (peer < kNumRanks) {
    // Writes this rank made before the barrier (earlier kernels, other threads) must be
    // visible to the peer before it sees the arrival.
    fence_acq_rel_sys();
    uint32_t* theirs = reinterpret_cast<uint32_t*>(buffer_ptrs[peer] + signal_offset);
    red_add_release_sys(theirs + rank, 1);
    wait_ge<kTrap>(mine + peer, target, ctx, stage, peer);
  }
  __syncthreads();
  if (threadIdx.x == 0) mine[kNumRanks] = target;
}

}  // namespace ep_jit
