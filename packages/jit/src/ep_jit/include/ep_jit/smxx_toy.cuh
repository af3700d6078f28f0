// Toy kernels that exercise the JIT end to end (template constants, pointers, scalars and a
// struct passed by value). Used by ep-jit's own tests.
#pragma once

#include <cuda/std/cstdint>

namespace ep_jit::toy {

struct AxpyArgs {
  float alpha;
  int32_t pad;
  int64_t n;
};

// out[i] = kScale * (alpha * x[i]) + y[i] + offset
template <int kScale>
__device__ __forceinline__ void axpy(float* __restrict__ out, const float* __restrict__ x,
                                     const float* __restrict__ y, int offset, AxpyArgs args) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < args.n;
       i += stride) {
    out[i] = static_cast<float>(kScale) * (args.alpha * x[i]) + y[i] + static_cast<float>(offset);
  }
}

}  // namespace ep_jit::toy
