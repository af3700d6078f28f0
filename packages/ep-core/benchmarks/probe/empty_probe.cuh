// An empty kernel body: the launch floor of a timing method (developer tool, not shipped).
#pragma once
#include <cuda/std/cstdint>

namespace probe {

__device__ __forceinline__ void empty(int64_t unused) { (void)unused; }

}  // namespace probe
