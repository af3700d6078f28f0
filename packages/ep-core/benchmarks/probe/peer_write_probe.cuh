// Micro-probe: how fast can N SMs write into the 3 (R-1) peers at once, by TMA bulk stores from
// shared memory (mode 0) or by 16-byte lane stores (mode 1)? Developer tool, not shipped.
#pragma once
#include <cuda/std/cstdint>
#include <ep_core/smxx_ptx.cuh>

namespace probe {

template <int kMode, int kWarps, int kSlots, int kRowBytes>
__device__ __forceinline__ void peer_write(const uint64_t* peers, int64_t me, int64_t num_ranks,
                                           int64_t rows) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t gw = blockIdx.x * kWarps + warp, nw = gridDim.x * kWarps;
    constexpr int kFillSlots = kMode == 0 ? kWarps * kSlots : 1;
    uint8_t* slots = smem + (kMode == 0 ? static_cast<int64_t>(warp) * kSlots * kRowBytes : 0);
    for (int i = threadIdx.x; i < kFillSlots * kRowBytes / 16; i += blockDim.x)
        reinterpret_cast<int4*>(smem)[i] = make_int4(i, 1, 2, 3);
    ep_core::fence_proxy_async_smem();
    __syncthreads();
    int64_t n = 0;
    for (int64_t row = gw; row < rows; row += nw) {
        for (int64_t k = 1; k < num_ranks; ++k) {
            const int64_t d = (me + k) % num_ranks;
            uint8_t* dst = reinterpret_cast<uint8_t*>(peers[d]) + (me * rows + row) * kRowBytes;
            if constexpr (kMode == 0) {
                if (lane == 0) {
                    ep_core::tma_store(dst, slots + (n % kSlots) * kRowBytes, kRowBytes);
                    ep_core::tma_commit();
                    ep_core::tma_wait_read<kSlots - 1>();
                }
                ++n;
            } else {
                const int4* src = reinterpret_cast<const int4*>(slots);
#pragma unroll 4
                for (int v = lane; v < kRowBytes / 16; v += 32)
                    reinterpret_cast<int4*>(dst)[v] = src[v];
            }
        }
    }
    if (lane == 0) ep_core::tma_wait_all();
}

}  // namespace probe
