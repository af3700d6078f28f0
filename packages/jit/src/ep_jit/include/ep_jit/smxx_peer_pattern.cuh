// Test kernel for peer memory: every rank writes a recognisable pattern into its slice of every
// peer's buffer (ep_jit.testing.peer_write_spec / peer_pattern check it from Python).
#pragma once

#include <cuda/std/cstdint>

namespace ep_jit::testing {

__device__ __forceinline__ uint32_t pattern(uint32_t src, uint32_t dst, uint32_t i) {
  return (src << 28) ^ (dst << 24) ^ (i * 2654435761u >> 8);
}

// Rank `rank` writes words [rank * n, rank * n + n) of region `offset` on every rank `dst`.
template <int kNumRanks>
__device__ void peer_write(const uint64_t* __restrict__ buffer_ptrs, int64_t offset, int rank,
                           int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int dst = 0; dst < kNumRanks; ++dst) {
    uint32_t* out = reinterpret_cast<uint32_t*>(buffer_ptrs[dst] + offset) + rank * n;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
      out[i] = pattern(rank, dst, static_cast<uint32_t>(i));
    }
  }
}

}  // namespace ep_jit::testing
