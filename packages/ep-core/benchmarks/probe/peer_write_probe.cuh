// Micro-probe: how fast can N SMs move rows between this GPU and its peers over NVLink?
// Push: TMA bulk stores from shared memory (mode 0) or 16-byte lane stores (mode 1) into each
// peer. Pull: TMA bulk loads from each peer into a shared-memory ring (mode 2) or 16-byte lane
// loads from each peer (mode 3); pulled data is discarded. Developer tool, not shipped.
//
// Layout: every rank's buffer holds `rows` rows of kRowBytes per rank. Rank `me` exchanges row
// `row` with peer d at peers[d] + (me * rows + row) * kRowBytes (push: writes it, pull: reads it),
// for every d whose bit is set in `peer_mask`.
#pragma once
#include <cuda/std/cstdint>
#include <ep_core/smxx_ptx.cuh>

namespace probe {

// kSlots: shared-memory slots per warp (modes 0 and 2: bulk copies in flight per warp), or
// 16-byte loads in flight per lane (mode 3); unused by mode 1.
// Dynamic shared memory: mode 0 kWarps * kSlots * kRowBytes, mode 1 kRowBytes,
// mode 2 kWarps * kSlots * (kRowBytes + 8), mode 3 none.
// sink: one word per thread of the grid (mode 3 stores its xor of the loaded data there).
template <int kMode, int kWarps, int kSlots, int kRowBytes>
__device__ __forceinline__ void peer_write(const uint64_t* peers, int64_t me, int64_t num_ranks,
                                           int64_t rows, int64_t peer_mask, uint32_t* sink) {
    static_assert(kMode >= 0 && kMode <= 3, "mode: 0 tma store, 1 st, 2 tma load, 3 ld");
    static_assert(kRowBytes % 16 == 0 && kRowBytes > 0, "rows are copied in 16-byte units");
    static_assert(kSlots >= 1, "at least one slot");
    extern __shared__ __align__(128) uint8_t smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t gw = blockIdx.x * kWarps + warp, nw = gridDim.x * kWarps;
    constexpr bool kTma = kMode == 0 || kMode == 2;
    uint8_t* slots = smem + (kTma ? static_cast<int64_t>(warp) * kSlots * kRowBytes : 0);
    // Mode 2: one mbarrier per slot, after every warp's slots.
    uint64_t* bars =
        reinterpret_cast<uint64_t*>(smem + kWarps * kSlots * kRowBytes) + warp * kSlots;
    if constexpr (kMode == 0 || kMode == 1) {
        constexpr int kFillSlots = kMode == 0 ? kWarps * kSlots : 1;
        for (int i = threadIdx.x; i < kFillSlots * kRowBytes / 16; i += blockDim.x)
            reinterpret_cast<int4*>(smem)[i] = make_int4(i, 1, 2, 3);
        ep_core::fence_proxy_async_smem();
    } else if constexpr (kMode == 2) {
        if (lane == 0) {
            for (int s = 0; s < kSlots; ++s) ep_core::mbar_init(bars + s, 1);
            ep_core::fence_mbar_init();
        }
    }
    __syncthreads();
    int64_t n = 0;     // rows handled by this warp (modes 0 and 2: bulk copies issued)
    uint32_t acc = 0;  // xor of everything loaded (mode 3)
    for (int64_t row = gw; row < rows; row += nw) {
        for (int64_t k = 1; k < num_ranks; ++k) {
            const int64_t d = (me + k) % num_ranks;
            if (((peer_mask >> d) & 1) == 0) continue;
            uint8_t* remote = reinterpret_cast<uint8_t*>(peers[d]) + (me * rows + row) * kRowBytes;
            if constexpr (kMode == 0) {
                if (lane == 0) {
                    ep_core::tma_store(remote, slots + (n % kSlots) * kRowBytes, kRowBytes);
                    ep_core::tma_commit();
                    ep_core::tma_wait_read<kSlots - 1>();
                }
            } else if constexpr (kMode == 1) {
                const int4* src = reinterpret_cast<const int4*>(slots);
#pragma unroll 4
                for (int v = lane; v < kRowBytes / 16; v += 32)
                    reinterpret_cast<int4*>(remote)[v] = src[v];
            } else if constexpr (kMode == 2) {
                if (lane == 0) {
                    // Use u = n / kSlots of slot s completes the barrier's phase u (parity u & 1);
                    // before reusing the slot, wait for its previous use (phase u - 1).
                    const int s = static_cast<int>(n % kSlots);
                    const int64_t u = n / kSlots;
                    if (u > 0) {
                        const uint32_t parity = static_cast<uint32_t>((u - 1) & 1);
                        while (!ep_core::mbar_try_wait(bars + s, parity)) {
                        }
                    }
                    ep_core::mbar_expect_tx(bars + s, kRowBytes);
                    ep_core::tma_load(slots + s * kRowBytes, remote, kRowBytes, bars + s);
                }
            } else {
                const int4* src = reinterpret_cast<const int4*>(remote);
                constexpr int kVecs = kRowBytes / 16;
                for (int base = lane; base < kVecs; base += 32 * kSlots) {
                    int4 v[kSlots];
#pragma unroll
                    for (int j = 0; j < kSlots; ++j) {
                        const int idx = base + j * 32;
                        v[j] = idx < kVecs ? src[idx] : make_int4(0, 0, 0, 0);
                    }
#pragma unroll
                    for (int j = 0; j < kSlots; ++j)
                        acc ^= static_cast<uint32_t>(v[j].x ^ v[j].y ^ v[j].z ^ v[j].w);
                }
            }
            ++n;
        }
    }
    if constexpr (kMode == 0) {
        if (lane == 0) ep_core::tma_wait_all();
    } else if constexpr (kMode == 2) {
        // Drain: the last min(n, kSlots) loads are still in flight (use (j / kSlots) of slot
        // j % kSlots); shared memory must not be released under them.
        if (lane == 0) {
            for (int64_t j = n > kSlots ? n - kSlots : 0; j < n; ++j) {
                const uint32_t parity = static_cast<uint32_t>((j / kSlots) & 1);
                while (!ep_core::mbar_try_wait(bars + j % kSlots, parity)) {
                }
            }
        }
    } else if constexpr (kMode == 3) {
        // One store per thread keeps every load observable, so none can be dropped.
        sink[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = acc;
    }
}

}  // namespace probe
