// Engram row gather: rows named by global id, read from the owners' peer-mapped segments (GPU
// memory over NVLink, or pinned host memory over PCIe / C2C) into one output buffer.
//
// Global row g lives on rank g / E at local row g % E. Id -1 gives a zero row and all-zero scale
// bytes. Any other id outside [0, R*E) also gives zeros and lowers *error_pos (initialised to
// INT64_MAX by the host) to the smallest flat position of such an id, for the host to report.
//
// Three variants of the row copy (kVariant):
//   kIlp (0): the rows are one flat list of 16-byte chunks and each thread first resolves, then
//     loads kUnroll chunks before storing any, so kUnroll * blockDim.x * 16 bytes are in flight
//     per CTA (what hides the ~1-2 us latency of host reads with few SMs);
//   kWarp (1): each warp copies one row at a time, a lane per 16-byte chunk (few bytes in
//     flight per SM: latency-bound on host memory);
//   kBulk (2): each warp moves batches of kRowsPerStage rows with bulk asynchronous copies
//     (cp.async.bulk global -> shared, completing on an mbarrier, then shared -> global),
//     kStages batches in flight per warp: up to the whole shared memory of the SM in flight
//     with 4 warps.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>

namespace ep_engram {

__device__ __forceinline__ int4 ld_nc_v4(const void* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void st_na_v4(void* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Resolves global id `g`: returns the owner's base address (+ the row's offset), or 0 for a zero
// row; a bad id also records `item` in *error_pos when `report` is set.
template <int kRowBytes>
__device__ __forceinline__ const char* row_address(long long g, long long item, bool report,
                                                   const unsigned long long* bases,
                                                   long long entries, long long num_rows,
                                                   long long* error_pos) {
    if (g >= 0 && g < num_rows) {
        const long long owner = g / entries;
        const long long local = g - owner * entries;
        return reinterpret_cast<const char*>(bases[owner]) + local * kRowBytes;
    }
    if (g != -1 && report) atomicMin(error_pos, item);
    return nullptr;
}

enum : int { kIlp = 0, kWarp = 1, kBulk = 2 };

// Writes one zero row with 16-byte stores (ids -1 and bad ids in the bulk variant).
template <int kRowBytes>
__device__ __forceinline__ void zero_row(char* row) {
    const int4 zero = make_int4(0, 0, 0, 0);
#pragma unroll 4
    for (int c = 0; c < kRowBytes / 16; ++c) st_na_v4(row + c * 16, zero);
}

// The bulk variant's copy loop for one warp (see the file comment). Shared memory: per warp,
// kStages stages of kRowsPerStage rows; static: one mbarrier per stage.
template <typename IndexT, int kRowBytes, int kStages, int kRowsPerStage>
__device__ __forceinline__ void bulk_copy(const IndexT* indices, char* dst, long long* error_pos,
                                          const unsigned long long* bases, long long num_items,
                                          long long entries, long long num_rows) {
    static_assert(kRowsPerStage >= 1 && kRowsPerStage <= 32, "one row per lane at most");
    constexpr int kMaxWarps = 32;
    extern __shared__ __align__(128) unsigned char smem_rows[];
    __shared__ __align__(8) uint64_t bars[kMaxWarps * kStages];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    uint64_t* my_bars = bars + warp * kStages;
    unsigned char* my_rows =
        smem_rows + static_cast<size_t>(warp) * kStages * kRowsPerStage * kRowBytes;
    if (lane == 0) {
        for (int s = 0; s < kStages; ++s) ep_jit::mbar_init(&my_bars[s], 1);
        ep_jit::fence_mbar_init();
    }
    __syncwarp();
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
    const long long first = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + warp;
    auto batch_item = [&](long long k) { return (first + k * warps) * kRowsPerStage + lane; };
    auto slot = [&](long long k) {
        return my_rows + (static_cast<size_t>(k % kStages) * kRowsPerStage + lane) * kRowBytes;
    };
    // Waits for batch k's loads and stores its rows (each lane its own row).
    auto drain = [&](long long k) {
        const int s = static_cast<int>(k % kStages);
        const uint32_t parity = static_cast<uint32_t>((k / kStages) & 1);
        while (!ep_jit::mbar_try_wait(&my_bars[s], parity)) {
        }
        const long long item = batch_item(k);
        if (lane < kRowsPerStage && item < num_items) {
            const long long g = static_cast<long long>(indices[item]);
            if (g >= 0 && g < num_rows) ep_jit::tma_store(dst + item * kRowBytes, slot(k), kRowBytes);
        }
        ep_jit::tma_commit();
    };
    long long k = 0;
    for (;; ++k) {
        if ((first + k * warps) * kRowsPerStage >= num_items) break;
        // This lane's stores of the batch that used the stage before have read their rows.
        ep_jit::tma_wait_read<0>();
        __syncwarp();
        const long long item = batch_item(k);
        const char* src = nullptr;
        if (lane < kRowsPerStage && item < num_items) {
            const long long g = static_cast<long long>(indices[item]);
            src = row_address<kRowBytes>(g, item, true, bases, entries, num_rows, error_pos);
            if (src == nullptr) zero_row<kRowBytes>(dst + item * kRowBytes);
        }
        const unsigned loading = __ballot_sync(0xffffffffu, src != nullptr);
        const int s = static_cast<int>(k % kStages);
        if (lane == 0) ep_jit::mbar_expect_tx(&my_bars[s], __popc(loading) * kRowBytes);
        __syncwarp();
        if (src != nullptr) ep_jit::tma_load(slot(k), src, kRowBytes, &my_bars[s]);
        if (k >= kStages - 1) drain(k - (kStages - 1));
    }
    for (long long d = k > kStages - 1 ? k - (kStages - 1) : 0; d < k; ++d) drain(d);
    ep_jit::tma_wait_all();
}

// Ranks a node can hold (the owners' base addresses are staged in shared memory).
constexpr int kMaxRanks = 64;

template <typename IndexT, int kRowBytes, int kNumSfPacks, bool kSfColMajor, int kUnroll, int kVariant, int kStages, int kRowsPerStage>
__device__ __forceinline__ void gather(const void* indices_raw, void* out, void* out_sf,
                                       long long* error_pos,
                                       const unsigned long long* rows_base,
                                       const unsigned long long* sf_base, long long num_items,
                                       long long entries, long long per_token, long long sf_ld,
                                       int num_ranks) {
    static_assert(kRowBytes % 16 == 0, "rows are copied in 16-byte chunks");
    const IndexT* indices = static_cast<const IndexT*>(indices_raw);
    constexpr int kChunks = kRowBytes / 16;
    __shared__ unsigned long long s_rows[kMaxRanks];
    __shared__ unsigned long long s_sf[kMaxRanks];
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
        s_rows[r] = rows_base[r];
        s_sf[r] = kNumSfPacks > 0 ? sf_base[r] : 0ull;
    }
    __syncthreads();
    const long long num_rows = entries * num_ranks;
    char* dst = reinterpret_cast<char*>(out);
    const int4 zero = make_int4(0, 0, 0, 0);

    if constexpr (kVariant == kBulk) {
        bulk_copy<IndexT, kRowBytes, kStages, kRowsPerStage>(indices, dst, error_pos, s_rows,
                                                             num_items, entries, num_rows);
    } else if constexpr (kVariant == kWarp) {
        const int lane = threadIdx.x % 32;
        const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
        for (long long item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < num_items;
             item += warps) {
            const long long g = static_cast<long long>(indices[item]);
            const char* src =
                row_address<kRowBytes>(g, item, lane == 0, s_rows, entries, num_rows, error_pos);
            char* row = dst + item * kRowBytes;
            for (int c = lane; c < kChunks; c += 32) {
                const int4 v = src != nullptr ? ld_nc_v4(src + c * 16) : zero;
                st_na_v4(row + c * 16, v);
            }
        }
    } else {
        const long long total = num_items * kChunks;
        const long long tile = static_cast<long long>(blockDim.x) * kUnroll;
        for (long long base = blockIdx.x * tile; base < total; base += gridDim.x * tile) {
            const char* src[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const long long q = base + u * blockDim.x + threadIdx.x;
                src[u] = nullptr;
                if (q < total) {
                    const long long item = q / kChunks;
                    const int c = static_cast<int>(q - item * kChunks);
                    const long long g = static_cast<long long>(indices[item]);
                    const char* row =
                        row_address<kRowBytes>(g, item, c == 0, s_rows, entries, num_rows, error_pos);
                    src[u] = row != nullptr ? row + c * 16 : nullptr;
                }
            }
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) v[u] = src[u] != nullptr ? ld_nc_v4(src[u]) : zero;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const long long q = base + u * blockDim.x + threadIdx.x;
                if (q < total) st_na_v4(dst + q * 16, v[u]);
            }
        }
    }

    if constexpr (kNumSfPacks > 0) {
        // Scales: 4-byte packs, kept in the owners' GPU segments.
        const long long total = num_items * kNumSfPacks;
        uint32_t* sf = reinterpret_cast<uint32_t*>(out_sf);
        for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < total;
             j += static_cast<long long>(gridDim.x) * blockDim.x) {
            const long long item = j / kNumSfPacks;
            const int p = static_cast<int>(j - item * kNumSfPacks);
            const long long g = static_cast<long long>(indices[item]);
            uint32_t value = 0;
            if (g >= 0 && g < num_rows) {
                const long long owner = g / entries;
                const long long local = g - owner * entries;
                value = reinterpret_cast<const uint32_t*>(s_sf[owner])[local * kNumSfPacks + p];
            }
            if constexpr (kSfColMajor) {
                const long long t = item / per_token;
                const long long k = item - t * per_token;
                sf[(k * kNumSfPacks + p) * sf_ld + t] = value;
            } else {
                sf[j] = value;
            }
        }
    }
}

}  // namespace ep_engram
